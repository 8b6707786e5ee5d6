# The two set-up commands of the README.  Both install into .venv first
# (tools/install.sh: idempotent, reuses a cached mmcv wheel when present).
# The demo's final numbers are reported on testA and testB (val is for
# checkpoint selection and tuning).
PY      := .venv/bin/python
DATA    := data/synthetic_refer
DEMO    := work_dirs/demo
DEMO_CFG := configs/sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py
PYTEST_ARGS ?=

.PHONY: install test demo clean-demo

install:
	bash tools/install.sh

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

$(DATA)/refcoco/instances.json: | install
	$(PY) tools/data/make_synthetic_refer.py --out $(DATA)

demo: install $(DATA)/refcoco/instances.json
	$(PY) tools/train.py $(DEMO_CFG) --work-dir $(DEMO)
	for split in testA testB; do \
	  $(PY) tools/test.py $(DEMO_CFG) $$(cat $(DEMO)/last_checkpoint) \
	    --work-dir $(DEMO)/test_$$split --show-dir $(DEMO)/overlays_$$split \
	    --show-interval 10 --out $(DEMO)/$$split \
	    --cfg-options test_dataloader.dataset.split=$$split || exit 1; \
	done
	$(PY) tools/analysis_tools/visualize_routing.py $(DEMO_CFG) $$(cat $(DEMO)/last_checkpoint) \
	    --out-dir $(DEMO)/routing --num-samples 8

clean-demo:
	rm -rf $(DEMO)
