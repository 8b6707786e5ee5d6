"""Efficiency switches keep the results: activation checkpointing (with_cp)
and mixed precision (CPUAmpOptimWrapper, tools/train.py --amp)."""
import pytest
import torch
from mmengine.optim import OptimWrapper
from torch.utils import checkpoint as torch_cp

from mmseg.registry import OPTIM_WRAPPERS
from mmseg_sera.engine import CPUAmpOptimWrapper
from mmseg_sera.models.backbones import dinov2 as dinov2_module
from test_segmentor import build_tiny, make_batch
from tests.conftest import count_host_reads

TEXTS = ['the red circle', 'the leftmost big square',
         'the blue triangle above the small circle']
ORI = [(112, 112), (90, 112), (112, 80)]


def _loss_and_grads(model, batch):
    data = model.data_preprocessor(batch, True)
    losses = model.loss(data['inputs'], data['data_samples'])
    total = sum(v for k, v in losses.items() if k.startswith('loss'))
    model.zero_grad()
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize('trainable', ['ln_bias', 'full'])
def test_with_cp_gives_the_same_losses_and_gradients(trainable, monkeypatch):
    calls = []
    real = torch_cp.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(dinov2_module.cp, 'checkpoint', counting)
    batch = make_batch(TEXTS, ORI, seed=3)
    results = []
    for with_cp in (False, True):
        model = build_tiny(backbone=dict(with_cp=with_cp,
                                         trainable=trainable))
        model.train()
        # noise-free routing so that both runs route alike
        model.neck.router.noise = False
        torch.manual_seed(0)
        results.append(_loss_and_grads(model, batch))
        if not with_cp:
            assert not calls
    # every block ran under checkpointing (4 blocks, no prefix shortcut)
    assert len(calls) == 4
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_a.keys() == loss_b.keys()
    for k in loss_a:
        torch.testing.assert_close(loss_a[k], loss_b[k], rtol=1e-6,
                                   atol=1e-7)
    assert grad_a.keys() == grad_b.keys()
    assert any(k.startswith('backbone.blocks.') for k in grad_a)
    for k in grad_a:
        torch.testing.assert_close(grad_a[k], grad_b[k], rtol=1e-5,
                                   atol=1e-7, msg=k)


def test_with_cp_is_off_in_eval_and_without_grad(monkeypatch):
    calls = []
    monkeypatch.setattr(dinov2_module.cp, 'checkpoint',
                        lambda *a, **k: calls.append(1))
    model = build_tiny(backbone=dict(with_cp=True))
    batch = make_batch(TEXTS[:1], ORI[:1])
    data = model.data_preprocessor(batch, False)
    model.eval()
    model.predict(data['inputs'], data['data_samples'])
    model.train()
    with torch.no_grad():
        model._forward(data['inputs'], data['data_samples'])
    assert not calls


def _amp_step(model, wrapper, batch):
    """The forward and backward of ``train_step`` (without the optimizer
    step, which would zero the gradients); returns the losses."""
    data = model.data_preprocessor(batch, True)
    with wrapper.optim_context(model):
        losses = model.loss(data['inputs'], data['data_samples'])
    total, log_vars = model.parse_losses(losses)
    wrapper.backward(total)
    return log_vars


def test_cpu_amp_wrapper_trains_close_to_fp32():
    batch = make_batch(TEXTS, ORI, seed=5)
    runs = {}
    for kind in ('OptimWrapper', 'CPUAmpOptimWrapper'):
        model = build_tiny()
        model.train()
        model.neck.router.noise = False
        wrapper = OPTIM_WRAPPERS.build(
            dict(type=kind,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
        seen = []
        handle = model.backbone.blocks[0].attn.qkv.register_forward_hook(
            lambda m, a, out: seen.append(out.dtype) and None)
        losses = _amp_step(model, wrapper, batch)
        handle.remove()
        grads = torch.cat([
            p.grad.flatten() for p in model.parameters()
            if p.grad is not None
        ])
        runs[kind] = (losses, grads, seen[0], model)
    fp32, bf16 = runs['OptimWrapper'], runs['CPUAmpOptimWrapper']
    assert fp32[2] == torch.float32
    assert bf16[2] == torch.bfloat16  # the matmuls ran in bfloat16
    # parameters and gradients stay float32 under autocast
    assert all(p.dtype == torch.float32 for p in bf16[3].parameters())
    assert bf16[1].dtype == torch.float32
    for k in ('loss_mask', 'loss_dice'):
        assert float(bf16[0][k]) == pytest.approx(float(fp32[0][k]),
                                                  rel=3e-2), k
    cos = torch.nn.functional.cosine_similarity(fp32[1], bf16[1], dim=0)
    assert cos > 0.99, float(cos)


def test_cpu_amp_wrapper_rejects_float16():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match='bfloat16'):
        CPUAmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1),
                           dtype='float16')
    wrapper = CPUAmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(wrapper, OptimWrapper)
    with wrapper.optim_context(model):
        assert torch.is_autocast_enabled('cpu')
    assert not torch.is_autocast_enabled('cpu')


def test_padding_experts_compile_with_inductor():
    """``torch.compile`` (Inductor) runs the experts with replicate padding
    (shape: blur + Laplacian; boundary: fixed Sobel) forward and backward,
    with the eager results; with the padding through ``F.pad(mode=
    'replicate')`` it stopped on a stride assertion in the backward. Only
    these two experts are compiled (they hold all of SERA-Fusion's padding):
    compiling the whole neck took minutes on a cold compile cache."""
    from mmseg_sera.models.moe import BoundaryExpert, ShapeExpert
    torch.manual_seed(0)
    experts = torch.nn.Sequential(ShapeExpert(4), BoundaryExpert(4)).eval()
    x = torch.randn(2, 4, 5, 6)
    results = []
    for model in (experts, torch.compile(experts)):
        inp = x.clone().requires_grad_()
        experts.zero_grad()
        out = model(inp)
        (out * out).sum().backward()
        results.append((out.detach(), [inp.grad] + [
            p.grad.clone() for p in experts.parameters()
            if p.grad is not None]))
    (out_e, grads_e), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    assert len(grads_e) == len(grads_c) > 2
    for a, b in zip(grads_e, grads_c):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('routing', ['sample', 'token'])
def test_training_forward_never_reads_the_device(routing):
    """The training forward of the backbone (with SERA-Adapters) and of
    SERA-Fusion with Top-K = E has no host read of a tensor value (``if
    t.any()``, ``.item()``, ``.cpu()``, ...: ``HOST_READS``): on a GPU each
    would stall the host until the device catches up, in the middle of the
    forward."""
    model = build_tiny(neck=dict(routing=routing)).train()
    assert model.neck.top_k == model.neck.num_experts
    batch = make_batch(TEXTS, ORI, seed=3)
    data = model.data_preprocessor(batch, True)
    texts = model.texts_of(data['data_samples'])
    # one sentence without any word left after padding is masked out:
    # the adapter's empty-sentence guard must not need a host read either
    text = model.text_encoder(texts)
    text.mask[0] = True
    with count_host_reads() as reads:
        bb = model.backbone.forward_features(data['inputs'], text=text)
        out = model.neck(bb.feats, text=text)
    assert reads == []
    assert len(bb.routing) == 2 and out.routing['weights'].shape[0] == 3
    assert torch.isfinite(out.feats[0]).all()
