"""Our components inside stock MMSegmentation models: the DINOv2 backbone
(with SERA-Adapters, no text) in mmseg's ``EncoderDecoder`` with stock
decode heads computes a semantic-segmentation loss and predicts, built from
a dict and from a config file that loads the plugin via ``custom_imports``.
"""
import json
import subprocess
import sys
import textwrap
from typing import List, Sequence, Tuple

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmseg_sera  # noqa: F401  (registers the components)
from mmseg_sera.models.backbones.dinov2 import DINOv2

NUM_CLASSES = 3
WIDTH = 24
BACKBONE = dict(
    type='DINOv2',
    arch=dict(embed_dims=WIDTH, num_layers=4, num_heads=2, mlp_ratio=2),
    img_size=56,
    out_indices=(1, 2, 3),
    adapter_indices=(1, 3),
    adapter_cfg=dict(type='SERAAdapter', text_dims=16, hidden_dims=16,
                     num_heads=2),
    trainable='ln_bias')
DATA_PREPROCESSOR = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size_divisor=14,
    test_cfg=dict(size_divisor=14))
NORM = dict(type='BN', requires_grad=True)
# SERAAdapter parts that only run with a sentence
ADAPTER_TEXT_ONLY = ('text_proj', 'query_norm', 'cross_attn',
                     'route_text_proj')
HEADS = {
    # FCN on the last level
    'fcn-last': dict(type='FCNHead', in_channels=WIDTH, in_index=-1,
                     channels=16, num_convs=1, concat_input=False,
                     num_classes=NUM_CLASSES, norm_cfg=NORM),
    # FCN on the three levels, concatenated
    'fcn-concat': dict(type='FCNHead', in_channels=[WIDTH] * 3,
                       in_index=[0, 1, 2], input_transform='resize_concat',
                       channels=16, num_convs=1, num_classes=NUM_CLASSES,
                       norm_cfg=NORM),
    # UPerNet on the three levels
    'uper': dict(type='UPerHead', in_channels=[WIDTH] * 3,
                 in_index=[0, 1, 2], pool_scales=(1, 2), channels=16,
                 num_classes=NUM_CLASSES, norm_cfg=NORM),
}


def model_cfg(head: str) -> dict:
    return dict(
        type='EncoderDecoder',
        data_preprocessor=DATA_PREPROCESSOR,
        backbone=BACKBONE,
        decode_head=HEADS[head],
        train_cfg=dict(),
        test_cfg=dict(mode='whole'))


def make_batch(shapes: Sequence[Tuple[int, int]], seed: int = 0) -> dict:
    """uint8 images of the given sizes (not multiples of 14) with 3-class
    labels (every class present), stock mmseg metainfo, no sentence."""
    g = torch.Generator().manual_seed(seed)
    inputs: List[torch.Tensor] = []
    samples: List[SegDataSample] = []
    for h, w in shapes:
        inputs.append(
            torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        gt = torch.randint(0, NUM_CLASSES, (1, h, w), generator=g)
        gt[0, :3, :3] = torch.arange(NUM_CLASSES)[:, None]
        sample = SegDataSample(metainfo=dict(
            ori_shape=(h, w), img_shape=(h, w), pad_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=gt)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def build(cfg: dict) -> EncoderDecoder:
    """As the Runner does; ConfigDict because EncoderDecoder reads
    ``test_cfg.mode`` as an attribute."""
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(ConfigDict(cfg))


def check_loss_and_grads(model: EncoderDecoder) -> None:
    """One training step's loss and backward: finite positive CE, gradients
    reach the adapters and the head, the frozen backbone weights get
    none."""
    assert isinstance(model, EncoderDecoder)
    assert isinstance(model.backbone, DINOv2)
    model.train()
    data = model.data_preprocessor(
        make_batch([(50, 60), (42, 65)]), training=True)
    assert data['inputs'].shape == (2, 3, 56, 70)
    losses = model(**data, mode='loss')
    ce = losses['decode.loss_ce']
    assert ce.ndim == 0 and torch.isfinite(ce) and ce > 0
    # random weights: CE near log(3), far from 0
    assert 0.3 < ce.item() < 5.0
    total = sum(v for k, v in losses.items() if 'loss' in k)
    total.backward()

    adapters = model.backbone.adapters
    assert set(adapters) == {'1', '3'}
    text_only = set()
    for name, p in adapters.named_parameters():
        if name.split('.')[1] in ADAPTER_TEXT_ONLY:
            # Without a sentence the cross-attention and the text half of
            # the router input do not run (they exist, unused: DDP needs
            # find_unused_parameters=True for such a config).
            assert p.grad is None, f'text-only adapter {name} got a grad'
            text_only.add('backbone.adapters.' + name)
        else:
            assert p.grad is not None, f'adapter {name} got no gradient'
    assert text_only
    for a in adapters.values():  # the zero-initialised output learns
        assert a.up_proj.weight.grad.abs().sum() > 0
    head = model.decode_head
    for name, p in head.named_parameters():
        assert p.grad is not None, f'head {name} got no gradient'
    assert head.conv_seg.weight.grad.abs().sum() > 0
    blocks = model.backbone.blocks
    assert blocks[0].norm1.weight.grad is not None
    assert blocks[0].attn.qkv.bias.grad is not None
    assert blocks[0].attn.qkv.weight.grad is None
    assert model.backbone.pos_embed.grad is None
    for name, p in model.named_parameters():
        if name not in text_only:
            assert (p.grad is not None) == p.requires_grad, name


def check_predict(model: EncoderDecoder) -> None:
    """Predict at the original sizes (batch padding removed), labels in
    {0, 1, 2}, pred = argmax of seg_logits."""
    model.eval()
    shapes = [(50, 60), (50, 60)]  # mmseg tests one size per batch
    data = model.data_preprocessor(make_batch(shapes, seed=1),
                                   training=False)
    assert data['inputs'].shape == (2, 3, 56, 70)
    with torch.no_grad():
        results = model(**data, mode='predict')
    assert len(results) == 2
    for res, (h, w) in zip(results, shapes):
        pred = res.pred_sem_seg.data
        logits = res.seg_logits.data
        assert pred.shape == (1, h, w)
        assert logits.shape == (NUM_CLASSES, h, w)
        assert set(pred.unique().tolist()) <= set(range(NUM_CLASSES))
        assert torch.equal(pred[0], logits.argmax(0))


@pytest.mark.parametrize('head', sorted(HEADS))
def test_stock_encoder_decoder_with_dinov2(head):
    model = build(model_cfg(head))
    assert type(model.decode_head).__name__ == HEADS[head]['type']
    check_loss_and_grads(model)
    check_predict(model)


def _write_config(path) -> None:
    path.write_text(
        textwrap.dedent(f"""\
            custom_imports = dict(imports=['mmseg_sera'],
                                  allow_failed_imports=False)
            default_scope = 'mmseg'
            model = {model_cfg('fcn-concat')!r}
            """))


def test_config_file_with_custom_imports(tmp_path):
    path = tmp_path / 'dinov2_fcn_mixing.py'
    _write_config(path)
    cfg = Config.fromfile(str(path))
    assert cfg.default_scope == 'mmseg'
    assert cfg.custom_imports['imports'] == ['mmseg_sera']
    # as the Runner does: mmengine's root registry under the default scope
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = ROOT_MODELS.build(cfg.model)
    check_loss_and_grads(model)
    check_predict(model)


SUBPROCESS = """
import json, sys
assert 'mmseg_sera' not in sys.modules
from mmengine.config import Config, ConfigDict
cfg = Config.fromfile(sys.argv[1])
assert 'mmseg_sera' in sys.modules, 'custom_imports did not import it'
import torch
from mmengine.registry import MODELS, init_default_scope
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample
init_default_scope(cfg.default_scope)
torch.manual_seed(0)
model = MODELS.build(cfg.model)
s = SegDataSample(metainfo=dict(ori_shape=(30, 40), img_shape=(30, 40)))
s.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, 30, 40)))
data = model.data_preprocessor(
    dict(inputs=[torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)],
         data_samples=[s]), training=True)
losses = model(**data, mode='loss')
print(json.dumps(dict(
    model=type(model).__name__, backbone=type(model.backbone).__name__,
    backbone_module=type(model.backbone).__module__,
    loss_ce=float(losses['decode.loss_ce']))))
"""


def test_custom_imports_in_a_fresh_process(tmp_path):
    """Nothing imports mmseg_sera but the config's ``custom_imports``."""
    path = tmp_path / 'dinov2_fcn_mixing.py'
    _write_config(path)
    proc = subprocess.run([sys.executable, '-c', SUBPROCESS, str(path)],
                          capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['model'] == 'EncoderDecoder'
    assert result['backbone'] == 'DINOv2'
    assert result['backbone_module'].startswith('mmseg_sera.')
    assert 0 < result['loss_ce'] < 5
