"""One contract for every model component mmseg_sera registers in mmseg's
``MODELS``.

Every class registered from an ``mmseg_sera`` module must have an entry in
:data:`CASES` (``test_every_registered_component_has_a_contract`` fails
otherwise, so a new component cannot skip the contract). Each case:

1. builds the component from a config dict with ``MODELS.build``;
2. runs a forward on tiny inputs and checks output types and shapes;
3. checks which parameters have ``requires_grad`` (the component's
   freezing policy, computed independently of the component's own code);
4. backpropagates one scalar made from all floating outputs (a fixed random
   weighting) and checks that exactly the trainable parameters got a
   gradient, minus documented exceptions (parts that a given input does not
   run, e.g. un-routed experts or blocks after the last output).
"""
import dataclasses
import os.path as osp
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import Tensor

import mmseg_sera  # noqa: F401  (registers the components)
from mmseg_sera.models.adapters.spectral_moe import tie_shared_parts
from mmseg_sera.models.backbones import BackboneFeatures
from mmseg_sera.models.moe.router import RouterOutput
from mmseg_sera.models.structures import (AdapterOutput, BackboneOutput,
                                          NeckOutput, TextFeatures)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TINY_CONFIG = osp.join(
    REPO,
    'configs/sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')

REGISTERED = sorted(
    name for name, cls in MODELS.module_dict.items()
    if getattr(cls, '__module__', '').startswith('mmseg_sera'))


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One contract case.

    Attributes:
        id: test id suffix.
        cfg: config dict for ``MODELS.build``.
        run: ``(module) -> outputs``; builds its own inputs.
        check: ``(module, outputs) -> None``; asserts types and shapes.
        trainable: ``(module) -> names`` of parameters that must have
            ``requires_grad``; ``None`` means all of them.
        no_grad: ``(module, outputs) -> names`` of trainable parameters that
            legitimately get no gradient for this input.
        train: module mode during the forward.
        parameter_free: the component has no parameters (a loss); its
            outputs then carry no graph.
    """
    id: str
    cfg: dict
    run: Callable[[nn.Module], Any]
    check: Callable[[nn.Module, Any], None]
    trainable: Optional[Callable[[nn.Module], Set[str]]] = None
    no_grad: Callable[[nn.Module, Any], Set[str]] = lambda m, out: set()
    train: bool = True
    parameter_free: bool = False


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _float_tensors(obj: Any) -> Iterator[Tensor]:
    """Every floating tensor inside (nested) dataclasses, dicts, lists,
    tuples."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _float_tensors(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _float_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _float_tensors(v)


def _scalar(outputs: Any) -> Optional[Tensor]:
    """``sum_t <t, R_t>`` over the floating outputs that carry a graph, with
    fixed random R_t (a sum of plain sums could have a zero gradient, e.g.
    for softmax weights); ``None`` if no output carries a graph."""
    g = _gen(1234)
    total = None
    for t in _float_tensors(outputs):
        if not t.requires_grad:
            continue
        term = (t.float() * torch.randn(t.shape, generator=g)).sum()
        total = term if total is None else total + term
    return total


def _names_under(module: nn.Module, prefix: str) -> Set[str]:
    return {n for n, _ in module.named_parameters() if n.startswith(prefix)}


def _ln_bias_names(module: nn.Module, skip: str = '') -> Set[str]:
    """The ``ln_bias`` policy, derived from module types: every LayerNorm
    parameter and every parameter named ``*bias``, outside ``skip``."""
    out = set()
    for mname, m in module.named_modules():
        if skip and (mname == skip or mname.startswith(skip + '.')):
            continue
        for pname, _ in m.named_parameters(recurse=False):
            full = f'{mname}.{pname}' if mname else pname
            if isinstance(m, nn.LayerNorm) or pname.endswith('bias'):
                out.add(full)
    return out


def _text(B: int = 2, L: int = 5, dims: int = 16,
          pooled_dims: Optional[int] = None, seed: int = 0) -> TextFeatures:
    g = _gen(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[-1, L - 2:] = True  # the last sentence is two words shorter
    return TextFeatures(
        tokens=torch.randn(B, L, dims, generator=g),
        mask=mask,
        pooled=torch.randn(B, pooled_dims or dims, generator=g))


def _maps(*shape, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed))


# --------------------------------------------------------------------------
# routers
# --------------------------------------------------------------------------
def _check_router(top_k: int, lead: tuple, E: int):

    def check(m, out):
        assert isinstance(out, RouterOutput)
        assert out.weights.shape == lead + (E, )
        assert out.logits.shape == lead + (E, )
        assert out.probs.shape == lead + (E, )
        assert out.indices.shape == lead + (top_k, )
        assert out.indices.dtype == torch.int64
        assert out.weights.dtype == torch.float32
        torch.testing.assert_close(
            out.weights.sum(-1), torch.ones(lead), atol=1e-6, rtol=0)
        assert ((out.weights > 0).sum(-1) == top_k).all()
        # indices are the kept experts, by decreasing weight
        kept = out.weights.gather(-1, out.indices)
        assert (kept > 0).all()
        assert (kept[..., :-1] >= kept[..., 1:]).all()

    return check


def _run_on(x: Tensor) -> Callable[[nn.Module], Any]:
    return lambda m: m(x)


ROUTER_CASES = [
    Case('top4-train',
         dict(type='NoisyTopKRouter', in_dims=6, num_experts=4, top_k=4),
         _run_on(_maps(2, 3, 6)), _check_router(4, (2, 3), 4)),
    Case('top2-train-laplace',
         dict(type='NoisyTopKRouter', in_dims=6, num_experts=4, top_k=2,
              logit_fn='laplace', noise_floor=0.01),
         _run_on(_maps(5, 6)), _check_router(2, (5, ), 4)),
    # In eval mode there is no noise, so the noise projection is not used.
    Case('top4-eval',
         dict(type='NoisyTopKRouter', in_dims=6, num_experts=4, top_k=4,
              bias=True),
         _run_on(_maps(5, 6)), _check_router(4, (5, ), 4),
         no_grad=lambda m, out: {'noise_proj.weight'}, train=False),
]
SOFT_ROUTER_CASES = [
    Case('soft', dict(type='SoftRouter', in_dims=6, num_experts=3),
         _run_on(_maps(2, 4, 6)), _check_router(3, (2, 4), 3)),
]


# --------------------------------------------------------------------------
# experts
# --------------------------------------------------------------------------
EXPERT_X = (2, 8, 5, 6)


def _check_expert(buffers: Set[str] = frozenset()):

    def check(m, out):
        assert isinstance(out, Tensor)
        assert out.shape == EXPERT_X
        assert torch.isfinite(out).all()
        params = dict(m.named_parameters())
        for b in buffers:  # fixed filters are buffers, never trained
            assert b in dict(m.named_buffers()) and b not in params

    return check


def _expert_case(type_: str, buffers=frozenset(), id_='default', **kw):
    return Case(id_, dict(type=type_, channels=EXPERT_X[1], **kw),
                _run_on(_maps(*EXPERT_X)), _check_expert(set(buffers)))


EXPERT_CASES = {
    'SpatialExpert': [
        _expert_case('SpatialExpert'),
        _expert_case('SpatialExpert', id_='fixed-alpha',
                     learnable_alpha=False),
    ],
    'ContextExpert': [_expert_case('ContextExpert', num_heads=2)],
    'BoundaryExpert': [_expert_case('BoundaryExpert', buffers={'sobel'})],
    'ShapeExpert': [
        _expert_case('ShapeExpert', buffers={'blur', 'laplacian'}),
        _expert_case('ShapeExpert', buffers={'laplacian'},
                     id_='learnable-blur', learnable_blur=True),
    ],
    'DWConvBoundaryExpert': [_expert_case('DWConvBoundaryExpert')],
    'DWConvSpatialExpert': [_expert_case('DWConvSpatialExpert')],
}


# --------------------------------------------------------------------------
# SERA-Adapter
# --------------------------------------------------------------------------
ADAPTER_CFG = dict(type='SERAAdapter', embed_dims=24, text_dims=16,
                   hidden_dims=8, num_heads=2)
ADAPTER_X = _maps(2, 20, 24)


def _check_adapter(m, out):
    assert isinstance(out, AdapterOutput)
    assert out.tokens.shape == ADAPTER_X.shape
    assert out.routing.shape == (2, 2)
    torch.testing.assert_close(out.routing.sum(-1), torch.ones(2))
    assert out.aux_losses == {}
    # zero-initialised up-projection: a fresh adapter is the identity
    torch.testing.assert_close(out.tokens, ADAPTER_X, atol=0, rtol=0)


ADAPTER_TEXT_ONLY = ('text_proj.', 'query_norm.', 'cross_attn.',
                     'route_text_proj.')
ADAPTER_CASES = [
    Case('text', ADAPTER_CFG,
         lambda m: m(ADAPTER_X, hw=(4, 5), text=_text(dims=16)),
         _check_adapter),
    # Without a sentence the cross-attention and the text half of the
    # router input are skipped, so their parameters get no gradient.
    Case('no-text', ADAPTER_CFG,
         lambda m: m(ADAPTER_X, hw=(4, 5), text=None), _check_adapter,
         no_grad=lambda m, out: {
             n
             for p in ADAPTER_TEXT_ONLY for n in _names_under(m, p)
         }),
]


# --------------------------------------------------------------------------
# DETRIS parts (parallel adapters return a tensor of the input's shape)
# --------------------------------------------------------------------------
def _check_shape(shape):

    def check(m, out):
        assert isinstance(out, Tensor) and out.shape == shape

    return check


DETRIS_DA = dict(type='DETRISDenseAligner', embed_dims=24, hidden_dims=16,
                 attn_dims=8, num_heads=2, text_dims=16)
DA_H = _maps(2, 2 + 12, 24)  # P = 2 prefix tokens, 3 x 4 patches
DENSE_MOC_CASES = [
    Case('2d', dict(type='DenseMoC', dims=16), _run_on(_maps(2, 16, 3, 4)),
         _check_shape((2, 16, 3, 4))),
    Case('1d', dict(type='DenseMoC', dims=16, ndim=1, inner_residual=False),
         _run_on(_maps(2, 16, 7)), _check_shape((2, 16, 7))),
]
DENSE_ALIGNER_CASES = [
    Case('tokens', DETRIS_DA,
         lambda m: m(DA_H, hw=(3, 4), text=_text(dims=16), num_prefix=2),
         _check_shape(DA_H.shape)),
    Case('masked-residual', dict(DETRIS_DA, key_padding=True,
                                 cross_residual=True),
         lambda m: m(DA_H, hw=(3, 4), text=_text(dims=16), num_prefix=2),
         _check_shape(DA_H.shape)),
    Case('pooled', dict(DETRIS_DA, text_source='pooled', text_dims=12),
         lambda m: m(DA_H, hw=(3, 4), text=_text(dims=16, pooled_dims=12),
                     num_prefix=2),
         _check_shape(DA_H.shape)),
]
TEXT_ADAPTER_CASES = [
    Case('default',
         dict(type='DETRISTextAdapter', embed_dims=24, hidden_dims=16),
         _run_on(_maps(2, 6, 24)), _check_shape((2, 6, 24))),
]


# --------------------------------------------------------------------------
# SpectralMoE (routed low-rank token experts, a second modality)
# --------------------------------------------------------------------------
SMOE_CFG = dict(type='SpectralMoEAdapter', embed_dims=24, num_experts=3,
                token_length=6, rank=4, text_dims=16)
SMOE_X = _maps(2, 20, 24)


def _check_smoe(m, out):
    assert isinstance(out, AdapterOutput)
    assert out.tokens.shape == SMOE_X.shape
    assert out.routing.shape == (2, 20, 3)  # per token, visual router
    assert set(out.aux_losses) == {'loss_moe_balance'}
    assert out.aux_losses['loss_moe_balance'].ndim == 0


def _run_smoe_released(m):
    tie_shared_parts(m)  # the owner of its own shared parts: no warning
    return m(SMOE_X, hw=(4, 5), second=_maps(2, 20, 24, seed=1))


SMOE_CASES = [
    Case('text', SMOE_CFG,
         lambda m: m(SMOE_X, hw=(4, 5), text=_text(dims=16)), _check_smoe),
    # Without a sentence the second router and projection do not run.
    Case('no-text', SMOE_CFG, lambda m: m(SMOE_X, hw=(4, 5)), _check_smoe,
         no_grad=lambda m, out: _names_under(m, 'second_router.')
         | _names_under(m, 'shared.second_proj.')),
    Case('released-second', dict(SMOE_CFG, released_compat=True),
         _run_smoe_released, _check_smoe),
]
TOKEN_EXPERT_CASES = [
    Case('top1',
         dict(type='LowRankTokenExpert', embed_dims=24, num_experts=3,
              token_length=6, rank=4),
         lambda m: m(_maps(2, 5, 24), nn.Linear(24, 24),
                     torch.randint(0, 3, (2, 5, 1), generator=_gen(2))),
         _check_shape((2, 5, 1, 24))),
]


# --------------------------------------------------------------------------
# SERA-Fusion
# --------------------------------------------------------------------------
def _fusion_cfg(**kw):
    cfg = dict(type='SERAFusion', in_channels=[12, 20], channels=16,
               text_dims=8, context_heads=2)
    cfg.update(kw)
    return cfg


def _run_fusion(m):
    feats = (_maps(2, 12, 3, 4, seed=1), _maps(2, 20, 3, 4, seed=2))
    return m(feats, text=_text(dims=6, pooled_dims=8))


def _check_fusion(top_k: int, routing: str):

    def check(m, out):
        assert isinstance(out, NeckOutput)
        assert len(out.feats) == 1 and out.feats[0].shape == (2, 16, 3, 4)
        assert set(out.aux_losses) == {
            'loss_moe_z', 'loss_moe_balance', 'loss_moe_token'
        }
        for v in out.aux_losses.values():
            assert v.ndim == 0 and torch.isfinite(v)
        lead = (2, ) if routing == 'sample' else (2, 12)
        assert out.routing['weights'].shape == lead + (4, )
        assert out.routing['indices'].shape == lead + (top_k, )

    return check


def _unrouted_experts(m, out) -> Set[str]:
    """Experts no unit is routed to are not run, so they get no grad."""
    routed = set(out.routing['indices'].unique().tolist())
    return {
        n
        for e in range(m.num_experts) if e not in routed
        for n in _names_under(m, f'experts.{e}.')
    }


def _forced_single_expert(m):
    """top_k=1 with the router driven to expert 1 for every sample, so the
    other three are certainly un-routed: the text half of the router input
    is LN(s) + 1 (a LayerNorm output sums to 0 without the bias), and only
    expert 1 reads it."""
    with torch.no_grad():
        m.router_norm_text.bias.fill_(1.0)
        m.router.gate.weight.zero_()
        m.router.gate.weight[1, m.channels:] = 1.0
    # Noise stays on (std ~0.7 against a logit margin of ~8; the seed is
    # fixed): the noise projection still learns through the noisy probs.
    return _run_fusion(m)


FUSION_CASES = [
    Case('top4-sample', _fusion_cfg(), _run_fusion,
         _check_fusion(4, 'sample')),
    Case('top4-token', _fusion_cfg(routing='token'), _run_fusion,
         _check_fusion(4, 'token')),
    Case('top2-token', _fusion_cfg(routing='token', top_k=2), _run_fusion,
         _check_fusion(2, 'token'), no_grad=_unrouted_experts),
    Case('top1-forced', _fusion_cfg(top_k=1), _forced_single_expert,
         _check_fusion(1, 'sample'),
         no_grad=lambda m, out: (_unrouted_experts(m, out) if (
             out.routing['indices'] == 1).all() else {'routing-not-forced'})),
]


# --------------------------------------------------------------------------
# DINOv2
# --------------------------------------------------------------------------
def _dinov2_cfg(**kw):
    cfg = dict(type='DINOv2',
               arch=dict(embed_dims=24, num_layers=3, num_heads=2,
                         mlp_ratio=2),
               img_size=56, num_register_tokens=2, out_indices=(1, 2),
               trainable='full')
    cfg.update(kw)
    return cfg


DINO_ADAPTER = dict(type='SERAAdapter', text_dims=16, hidden_dims=8,
                    num_heads=2)
DINO_X = _maps(2, 3, 42, 56)  # non-square, not the 4 x 4 pre-training grid


def _check_dinov2(levels: int):

    def check(m, out):
        assert isinstance(out, tuple) and len(out) == levels
        for f in out:
            assert f.shape == (2, 24, 3, 4)
        if m.trainable != 'full':
            m.train()  # the backbone's own modules stay in eval mode
            assert not m.blocks.training and not m.patch_embed.training
            assert all(a.training for a in m.adapters.values())

    return check


DINOV2_CASES = [
    Case('full', _dinov2_cfg(), lambda m: m(DINO_X), _check_dinov2(2)),
    # Blocks after the last out index are not run.
    Case('full-early-out', _dinov2_cfg(out_indices=(0, )),
         lambda m: m(DINO_X), _check_dinov2(1),
         no_grad=lambda m, out: _names_under(m, 'blocks.1.')
         | _names_under(m, 'blocks.2.')),
    Case('ln_bias-adapter',
         _dinov2_cfg(trainable='ln_bias', adapter_indices=(1, ),
                     adapter_cfg=DINO_ADAPTER),
         lambda m: m(DINO_X, text=_text(dims=16)), _check_dinov2(2),
         trainable=lambda m: _ln_bias_names(m, skip='adapters')
         | _names_under(m, 'adapters.')),
    Case('frozen-adapter',
         _dinov2_cfg(trainable='frozen', adapter_indices=(0, 2),
                     adapter_cfg=DINO_ADAPTER),
         lambda m: m(DINO_X, text=_text(dims=16)), _check_dinov2(2),
         trainable=lambda m: _names_under(m, 'adapters.')),
    Case('frozen-parallel-mlp',
         _dinov2_cfg(trainable='frozen', adapters=[
             dict(DETRIS_DA, insert=(0, 2), scale=0.2, embed_dims=24)
         ]),
         lambda m: m(DINO_X, text=_text(dims=16)), _check_dinov2(2),
         trainable=lambda m: _names_under(m, 'adapters.')),
    # ETRIS bridge: a lock-step text stream (tiny frozen tower, built by
    # the run) beside the blocks; the final text comes back with the maps
    Case('frozen-bridge',
         _dinov2_cfg(trainable='frozen', adapters=[
             dict(type='ETRISBridger', insert=(0, 2), text_dims=16,
                  hidden_dims=8, num_heads=2)
         ]),
         lambda m: m.forward_features(DINO_X,
                                      text_stream=_stream(_clip_cfg(
                                          'frozen'))),
         lambda m, out: _check_bridged(out, [(2, 24, 3, 4)] * 2),
         trainable=lambda m: _names_under(m, 'adapters.')),
]


# --------------------------------------------------------------------------
# DINOv3 (the DINOv2 tower with RoPE): every slot kind
# --------------------------------------------------------------------------
def _dinov3_cfg(**kw):
    cfg = dict(type='DINOv3',
               arch=dict(embed_dims=24, num_layers=3, num_heads=2,
                         mlp_ratio=2),
               num_register_tokens=2, out_indices=(1, 2), trainable='full')
    cfg.update(kw)
    return cfg


# 3 x 4 grid after flooring 54 x 70 (patch 16), non-square
DINOV3_X = _maps(2, 3, 54, 70)

DINOV3_CASES = [
    Case('full', _dinov3_cfg(), lambda m: m(DINOV3_X), _check_dinov2(2)),
    # SwiGLU FFN, RoPE coordinate rescaling in training mode
    Case('full-swiglu-rescale',
         _dinov3_cfg(arch=dict(embed_dims=24, num_layers=3, num_heads=2,
                               mlp_ratio=6, ffn_type='swiglu'),
                     rope_rescale_coords=2.0),
         lambda m: m(DINOV3_X), _check_dinov2(2)),
    Case('ln_bias-adapter',
         _dinov3_cfg(trainable='ln_bias', adapter_indices=(1, ),
                     adapter_cfg=DINO_ADAPTER),
         lambda m: m(DINOV3_X, text=_text(dims=16)), _check_dinov2(2),
         trainable=lambda m: _ln_bias_names(m, skip='adapters')
         | _names_under(m, 'adapters.')),
    Case('frozen-parallel-mlp',
         _dinov3_cfg(trainable='frozen', adapters=[
             dict(DETRIS_DA, insert=(0, 2), scale=0.2, embed_dims=24)
         ]),
         lambda m: m(DINOV3_X, text=_text(dims=16)), _check_dinov2(2),
         trainable=lambda m: _names_under(m, 'adapters.')),
    Case('frozen-bridge',
         _dinov3_cfg(trainable='frozen', adapters=[
             dict(type='ETRISBridger', insert=(0, 2), text_dims=16,
                  hidden_dims=8, num_heads=2)
         ]),
         lambda m: m.forward_features(DINOV3_X,
                                      text_stream=_stream(_clip_cfg(
                                          'frozen'))),
         lambda m, out: _check_bridged(out, [(2, 24, 3, 4)] * 2),
         trainable=lambda m: _names_under(m, 'adapters.')),
]


def _stream(text_cfg: dict):
    """A lock-step text stream of a fresh tiny text tower."""
    with DefaultScope.overwrite_default_scope('mmseg'):
        enc = MODELS.build(dict(text_cfg))
    return enc.begin(SENTENCES)


def _check_bridged(out, shapes):
    """``BackboneOutput`` of a bridged backbone: maps and the final text
    of the bridge-modified stream (carrying the bridge's graph)."""
    assert isinstance(out, BackboneOutput)
    assert [tuple(f.shape) for f in out.feats] == shapes
    assert isinstance(out.text, TextFeatures)
    assert out.text.tokens.shape == (2, 10, 16)
    assert out.text.pooled.shape == (2, 8)
    assert out.text.tokens.requires_grad


# --------------------------------------------------------------------------
# CLIP ViT backbone (open_clip visual tower)
# --------------------------------------------------------------------------
def _clip_vit_cfg(**kw):
    cfg = dict(type='CLIPViT', model_name='ViT-B-16',
               vision_cfg=dict(width=24, layers=3, head_width=12,
                               patch_size=16, image_size=64),
               embed_dim=8, out_indices=(1, 2), trainable='full')
    cfg.update(kw)
    return cfg


CLIP_VIT_X = _maps(2, 3, 48, 80)  # non-square 3 x 5 grid (table: 4 x 4)


def _check_clip_vit(shapes):

    def check(m, out):
        assert isinstance(out, tuple)
        assert [tuple(f.shape) for f in out] == shapes
        if m.trainable != 'full':
            m.train()
            assert not m.transformer.training and not m.conv1.training
            assert all(a.training for a in m.adapters.modules())

    return check


CLIP_VIT_CASES = [
    # without out_proj the joint-space projection is not used
    Case('full', _clip_vit_cfg(), lambda m: m(CLIP_VIT_X),
         _check_clip_vit([(2, 24, 3, 5)] * 2),
         no_grad=lambda m, out: {'proj'}),
    # ETRIS levels: un-normed, then ln_post(.) @ proj (8-d)
    Case('ln_bias-proj', _clip_vit_cfg(trainable='ln_bias', out_proj=True),
         lambda m: m(CLIP_VIT_X),
         _check_clip_vit([(2, 24, 3, 5), (2, 8, 3, 5)]),
         trainable=_ln_bias_names),
    Case('frozen-parallel-mlp',
         _clip_vit_cfg(trainable='frozen', adapters=[
             dict(DETRIS_DA, insert=(0, 2), scale=0.2, embed_dims=24)
         ]),
         lambda m: m(CLIP_VIT_X, text=_text(dims=16)),
         _check_clip_vit([(2, 24, 3, 5)] * 2),
         trainable=lambda m: _names_under(m, 'adapters.')),
    # ETRIS: frozen tower, trained position table, bridge after 0 and 2
    Case('frozen-pos-bridge',
         _clip_vit_cfg(trainable='frozen', train_pos_embed=True,
                       out_proj=True, adapters=[
                           dict(type='ETRISBridger', insert=(0, 2),
                                text_dims=16, hidden_dims=8, num_heads=2)
                       ]),
         lambda m: m.forward_features(CLIP_VIT_X,
                                      text_stream=_stream(_clip_cfg(
                                          'frozen'))),
         lambda m, out: _check_bridged(out, [(2, 24, 3, 5), (2, 8, 3, 5)]),
         trainable=lambda m: {'positional_embedding'}
         | _names_under(m, 'adapters.')),
]


def _run_bridger(m):
    """All three stages, chained (stage s reads stage s - 1's carry)."""
    x, t = _maps(2, 15, 24), _maps(2, 6, 16, seed=1)
    carry = None
    for s in range(3):
        x, t, carry = m(s, x, t, hw=(3, 5), carry=carry)
    return x, t


def _check_bridger(m, out):
    assert out[0].shape == (2, 15, 24) and out[1].shape == (2, 6, 16)


BRIDGER_CFG = dict(type='ETRISBridger', embed_dims=24, insert=(1, 2, 3),
                   text_dims=16, hidden_dims=8, num_heads=2)
BRIDGER_CASES = [
    Case('etris', BRIDGER_CFG, _run_bridger, _check_bridger),
    Case('zero-init-key-padding',
         dict(BRIDGER_CFG, zero_init_out=True, key_padding=True),
         lambda m: _run_bridger(m), _check_bridger),
]


# --------------------------------------------------------------------------
# OpenCLIP text encoder
# --------------------------------------------------------------------------
SENTENCES = ['the big blue square on the left', 'a red ball']


def _clip_cfg(trainable: str):
    return dict(type='OpenCLIPTextEncoder', model_name='ViT-B-16',
                text_cfg=dict(width=16, layers=1, heads=2), embed_dim=8,
                context_length=10, pretrained=None, trainable=trainable)


def _check_clip(m, out):
    assert isinstance(out, TextFeatures)
    assert out.tokens.shape == (2, 10, 16)
    assert out.pooled.shape == (2, 8)
    assert out.mask.dtype == torch.bool and out.mask.shape == (2, 10)
    # SOT ... EOT then padding: padding is a suffix, longer sentence has less
    lengths = (~out.mask).sum(1)
    assert lengths[0] > lengths[1] >= 3
    for b in range(2):
        assert not out.mask[b, :lengths[b]].any()
        assert out.mask[b, lengths[b]:].all()
    if m.trainable == 'frozen':
        m.train()
        assert not m.training  # a frozen tower stays in eval mode
        if len(m.adapters):  # ... but its adapters train
            assert all(a.training for a in m.adapters.modules())
            assert out.tokens.requires_grad and out.pooled.requires_grad
        elif m.train_pos_embed:  # ... or its position table (ETRIS)
            assert out.tokens.requires_grad and out.pooled.requires_grad
        else:
            assert not any(t.requires_grad for t in _float_tensors(out))


CLIP_CASES = [
    Case('full', _clip_cfg('full'), lambda m: m(SENTENCES), _check_clip),
    Case('ln_bias', _clip_cfg('ln_bias'), lambda m: m(SENTENCES),
         _check_clip, trainable=_ln_bias_names),
    Case('frozen', _clip_cfg('frozen'), lambda m: m(SENTENCES), _check_clip,
         trainable=lambda m: set()),
    # A frozen tower with text adapters: only they train (and the outputs
    # carry their graph).
    Case('frozen-text-adapter',
         dict(_clip_cfg('frozen'), adapters=[
             dict(type='DETRISTextAdapter', insert=(0, ), scale=0.2,
                  hidden_dims=16)
         ]),
         lambda m: m(SENTENCES), _check_clip,
         trainable=lambda m: _names_under(m, 'adapters.')),
    # ETRIS: a frozen tower whose position table trains
    Case('frozen-pos-embed',
         dict(_clip_cfg('frozen'), train_pos_embed=True),
         lambda m: m(SENTENCES), _check_clip,
         trainable=lambda m: {'positional_embedding'}),
]


# --------------------------------------------------------------------------
# Refer head
# --------------------------------------------------------------------------
def _head_cfg(**kw):
    cfg = dict(type='ReferHead', in_channels=16, channels=8, text_dims=12,
               pooled_dims=10, num_decoder_layers=1, decoder_heads=2)
    cfg.update(kw)
    return cfg


def _check_head(m, out):
    assert isinstance(out, Tensor)
    # 4 x 5 at stride 14 -> floor(3.5 h + 0.5) x floor(3.5 w + 0.5) at 4
    assert out.shape == (2, 1, 14, 18)
    assert torch.isfinite(out).all()


def _run_head(m):
    return m((_maps(2, 16, 4, 5), ), _text(L=6, dims=12, pooled_dims=10))


def _run_head_loss(m):
    """``loss`` on two samples, the first flagged no_target (empty
    mask)."""
    samples = []
    for flag in (True, False):
        s = SegDataSample()
        gt = torch.zeros(1, 14, 18, dtype=torch.long)
        if not flag:
            gt[:, 3:9, 4:12] = 1
        s.gt_sem_seg = PixelData(data=gt)
        s.set_metainfo(dict(no_target=flag))
        samples.append(s)
    return m.loss((_maps(2, 16, 4, 5), ), _text(L=6, dims=12,
                                                pooled_dims=10),
                  samples, None)


def _check_no_target_loss(m, out):
    assert isinstance(out, dict) and m.predicts_no_target
    assert {'loss_mask', 'loss_no_target', 'acc_no_target'} <= set(out)
    for k, v in out.items():
        assert v.ndim == 0 and v.requires_grad == k.startswith('loss'), k


HEAD_CASES = [
    Case('decoder', _head_cfg(), _run_head, _check_head),
    Case('no-decoder', _head_cfg(num_decoder_layers=0, kernel_size=3),
         _run_head, _check_head),
    # generalized RES: the no-target scorer, trained through the loss
    Case('no-target', _head_cfg(no_target_cfg=dict(hidden_channels=8)),
         _run_head_loss, _check_no_target_loss),
]


# --------------------------------------------------------------------------
# Segmentor
# --------------------------------------------------------------------------
def _segmentor_cfg(**overrides) -> dict:
    model = Config.fromfile(TINY_CONFIG).model.to_dict()
    for part, kw in overrides.items():
        model[part].update(kw)
    return model


def _run_segmentor(m):
    g = _gen(0)
    samples = []
    for text in ('the red circle', 'a small blue square at the top'):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(
            data=torch.randint(0, 2, (1, 56, 70), generator=g))
        s.set_metainfo(
            dict(text=text, ori_shape=(56, 70), img_shape=(56, 70),
                 pad_shape=(56, 70)))
        samples.append(s)
    inputs = [
        torch.randint(0, 256, (3, 56, 70), generator=g, dtype=torch.uint8)
        for _ in samples
    ]
    data = m.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), training=True)
    return m(**data, mode='loss')


def _check_segmentor(m, out):
    assert isinstance(out, dict)
    assert {
        'loss_mask', 'loss_dice', 'loss_moe_z', 'loss_moe_balance',
        'loss_moe_token'
    } <= set(out)
    assert ('loss_no_target' in out) == m.decode_head.predicts_no_target
    for k, v in out.items():
        assert v.ndim == 0 and torch.isfinite(v), k
        assert v.requires_grad == k.startswith('loss'), k


def _paper_trainable(m) -> Set[str]:
    """Frozen text tower; backbone LayerNorm + bias; all else trains."""
    names = {n for n, _ in m.named_parameters()}
    names -= _names_under(m, 'text_encoder.')
    names -= _names_under(m, 'backbone.')
    names |= {
        'backbone.' + n
        for n in _ln_bias_names(m.backbone, skip='adapters')
    }
    names |= _names_under(m, 'backbone.adapters.')
    return names


SEGMENTOR_CASES = [
    Case('tiny-config', _segmentor_cfg(), _run_segmentor, _check_segmentor),
    Case('tiny-config-paper-freezing',
         _segmentor_cfg(backbone=dict(trainable='ln_bias'),
                        text_encoder=dict(trainable='frozen')),
         _run_segmentor, _check_segmentor, trainable=_paper_trainable),
    Case('tiny-config-no-target',
         _segmentor_cfg(decode_head=dict(no_target_cfg=dict(
             hidden_channels=8))),
         _run_segmentor, _check_segmentor),
]


# --------------------------------------------------------------------------
# CRIS-lineage parts (ETRIS / DETRIS)
# --------------------------------------------------------------------------
def _cris_neck_cfg(**kw):
    cfg = dict(type='HierarchicalAlignNeck', in_channels=[16, 16, 12],
               channels=8, text_dims=10, num_heads=2)
    cfg.update(kw)
    return cfg


def _run_cris_neck(m):
    feats = (_maps(2, 16, 3, 5), _maps(2, 16, 3, 5, seed=1),
             _maps(2, 12, 3, 5, seed=2))
    return m(feats, _text(L=6, dims=12, pooled_dims=10))


def _check_cris_neck(m, out):
    assert isinstance(out, NeckOutput) and len(out.feats) == 1
    assert out.feats[0].shape == (2, 8, 3, 5)
    assert not out.aux_losses and not out.routing


def _check_cris_map(shape):

    def check(m, out):
        assert isinstance(out, Tensor) and out.shape == shape

    return check


CRIS_NECK_CASES = [
    Case('mha-etris', _cris_neck_cfg(), _run_cris_neck, _check_cris_neck),
    Case('linear-detris', _cris_neck_cfg(gate='linear', coord_residual=True),
         _run_cris_neck, _check_cris_neck),
]
CRIS_DECODER_CASES = [
    Case('small',
         dict(type='VLGlobalAlignDecoder', num_layers=2, dims=16,
              text_dims=12, num_heads=2, ffn_dims=16),
         lambda m: m(_maps(2, 16, 3, 5), _text(L=6, dims=12)),
         _check_cris_map((2, 16, 3, 5))),
]
CRIS_PROJECTOR_CASES = [
    Case('small',
         dict(type='TextDynamicConvProjector', in_channels=16,
              up_channels=[8, 8], channels=8, text_dims=10),
         lambda m: m(_maps(2, 16, 3, 5), _text(pooled_dims=10).pooled),
         _check_cris_map((2, 1, 12, 20))),
]
CRIS_HEAD_CASES = [
    Case('small',
         dict(type='CRISHead', in_channels=16, channels=8, text_dims=12,
              pooled_dims=10, num_decoder_layers=1, decoder_heads=2,
              decoder_ffn_channels=16, up_channels=[8, 8]),
         _run_head, _check_cris_map((2, 1, 16, 20))),
    Case('no-target',
         dict(type='CRISHead', in_channels=16, channels=8, text_dims=12,
              pooled_dims=10, num_decoder_layers=1, decoder_heads=2,
              decoder_ffn_channels=16, up_channels=[8, 8], loss_at='gt',
              no_target_cfg=dict(hidden_channels=8)),
         _run_head_loss, _check_no_target_loss),
]


# --------------------------------------------------------------------------
# SegVLM parts (map blocks) and the RAF loss
# --------------------------------------------------------------------------
SEGVLM_X = _maps(2, 16, 3, 5)


def _run_map_block(text: bool):
    pooled = _text(pooled_dims=10).pooled
    return lambda m: m(SEGVLM_X, pooled) if text else m(SEGVLM_X)


def _check_identity_start(m, out):
    assert out.shape == SEGVLM_X.shape
    torch.testing.assert_close(out, SEGVLM_X, atol=0, rtol=0)


SEGVLM_SE_CASES = [
    Case('plain', dict(type='SegVLMSEBlock', channels=16, ratio=4),
         _run_map_block(False), _check_cris_map(SEGVLM_X.shape)),
    Case('text', dict(type='SegVLMSEBlock', channels=16, ratio=4,
                      text_cond=True, text_dims=10),
         _run_map_block(True), _check_cris_map(SEGVLM_X.shape)),
    # zero-initialised W2 with the residual form: the identity at first
    Case('zero-init-residual',
         dict(type='SegVLMSEBlock', channels=16, ratio=4, zero_init=True,
              residual=True),
         _run_map_block(False), _check_identity_start),
]
DEFORMABLE_REFINE_CASES = [
    Case('torchvision', dict(type='DeformableRefine', channels=16),
         _run_map_block(False), _check_cris_map(SEGVLM_X.shape)),
    Case('mmcv-text',
         dict(type='DeformableRefine', channels=16, backend='mmcv',
              text_cond=True, text_dims=10, text_channels=4,
              se_text_cond=True),
         _run_map_block(True), _check_cris_map(SEGVLM_X.shape)),
]
SEGVLM_REFINE_CASES = [
    Case('two-text',
         dict(type='SegVLMRefineBlock', channels=16, num_blocks=2,
              text_cond=True, text_dims=10, text_channels=4),
         _run_map_block(True), _check_cris_map(SEGVLM_X.shape)),
]


def _run_raf(m):
    g = _gen(0)
    target = torch.randint(0, 2, (2, 6, 7), generator=g)
    target[0, :2] = 255
    return m(torch.randn(2, 1, 6, 7, generator=g), target)


def _check_raf(keys):

    def check(m, out):
        assert isinstance(out, dict) and set(out) == keys
        for v in out.values():
            assert v.ndim == 0 and torch.isfinite(v) and v >= 0

    return check


RAF_CASES = [
    Case('default', dict(type='RAFLoss'), _run_raf,
         _check_raf({'loss_raf_bce', 'loss_raf_focal', 'loss_raf_dice'}),
         parameter_free=True),
    Case('boundary-plain',
         dict(type='RAFLoss', lambda_boundary=1.0, dice_mode='plain'),
         _run_raf,
         _check_raf({'loss_raf_bce', 'loss_raf_focal', 'loss_raf_dice',
                     'loss_raf_boundary'}),
         parameter_free=True),
]


# --------------------------------------------------------------------------
# DualStreamDINOv2 (a frozen second tower feeding SpectralMoE adapters) and
# BackboneAuxLossHead (its aux losses into a stock EncoderDecoder)
# --------------------------------------------------------------------------
def _dual_stream_cfg(released: bool = False, trainable: str = 'frozen'):
    def tower(dims):
        return dict(type='DINOv2', arch=dict(embed_dims=dims, num_layers=2,
                                             num_heads=2, mlp_ratio=2),
                    patch_size=7, img_size=28)

    smoe = dict(type='SpectralMoEAdapter', insert=(0, 1), num_experts=3,
                token_length=6, rank=4, num_layers=2, second_dims=16,
                second_source='tokens', released_compat=released)
    return dict(
        type='DualStreamDINOv2',
        backbone=dict(tower(24), in_channels=4, out_indices=(0, 1),
                      adapters=[smoe], trainable=trainable),
        second=tower(16),
        second_bands=(2, 1, 0),
        out_scales=(2, 1))


def _run_dual_stream(m):
    # the losses ride on the tuple; list them so that the router, whose
    # only gradient with top-1 is the balance loss, is checked too
    out = m(_maps(2, 4, 28, 28))
    return dict(feats=out, aux_losses=out.aux_losses)


def _check_dual_stream(m, out):
    feats = out['feats']
    assert isinstance(feats, BackboneFeatures) and isinstance(feats, tuple)
    assert [tuple(f.shape) for f in feats] == [(2, 24, 8, 8), (2, 24, 4, 4)]
    assert set(feats.aux_losses) == {'loss_moe_balance'}
    assert sorted(feats.routing) == [0, 1]
    assert m.block_map == {0: 0, 1: 1}


DUAL_STREAM_CASES = [
    # SpectralMoE's policy: both towers frozen, only the adapters train
    Case('frozen', _dual_stream_cfg(), _run_dual_stream, _check_dual_stream,
         trainable=lambda m: _names_under(m, 'backbone.adapters.')),
    # released module (diag fusion: same 4 x 4 grid in both towers; shared
    # W_tf / W_df / s tied by the wrapper), main tower fully trained
    Case('released-full', _dual_stream_cfg(released=True, trainable='full'),
         _run_dual_stream, _check_dual_stream,
         trainable=lambda m: _names_under(m, 'backbone.')),
]


def _pyramid_cfg(trainable: str):
    return dict(
        type='PyramidDINOv2',
        backbone=dict(type='DINOv2',
                      arch=dict(embed_dims=24, num_layers=2, num_heads=2,
                                mlp_ratio=2),
                      patch_size=7, img_size=28, in_channels=3,
                      out_indices=(0, 1), trainable=trainable,
                      adapters=[dict(type='SERAAdapter', slot='post_block',
                                     insert=(1, ),
                                     text_dims=None, hidden_dims=8,
                                     num_heads=2)]),
        bands=(2, 1, 0),
        out_scales=(2, 0.5))


def _run_pyramid(m):
    out = m(_maps(2, 4, 28, 28))
    return dict(feats=out, aux_losses=out.aux_losses)


def _check_pyramid(m, out):
    feats = out['feats']
    assert isinstance(feats, BackboneFeatures)
    assert [tuple(f.shape) for f in feats] == [(2, 24, 8, 8), (2, 24, 2, 2)]
    assert sorted(feats.routing) == [1]


PYRAMID_CASES = [
    # one tower on three of four bands, its maps resampled to a pyramid
    Case('frozen', _pyramid_cfg('frozen'), _run_pyramid, _check_pyramid,
         trainable=lambda m: _names_under(m, 'backbone.adapters.')),
]


def _run_aux_head(m):
    feats = BackboneFeatures(
        [_maps(1, 2, 2, 2)],
        aux_losses=dict(loss_moe_balance=torch.tensor(0.5),
                        loss_other=torch.tensor(2.)))
    return m.loss(feats, [], None)


def _check_aux_head(m, out):
    assert out == dict(loss_moe_balance=torch.tensor(0.25),
                       loss_other=torch.tensor(1.))


AUX_LOSS_HEAD_CASES = [
    Case('carried', dict(type='BackboneAuxLossHead', loss_weight=0.5),
         _run_aux_head, _check_aux_head, parameter_free=True),
]


CASES: Dict[str, List[Case]] = {
    'NoisyTopKRouter': ROUTER_CASES,
    'SoftRouter': SOFT_ROUTER_CASES,
    **EXPERT_CASES,
    'SERAAdapter': ADAPTER_CASES,
    'SpectralMoEAdapter': SMOE_CASES,
    'LowRankTokenExpert': TOKEN_EXPERT_CASES,
    'DenseMoC': DENSE_MOC_CASES,
    'DETRISDenseAligner': DENSE_ALIGNER_CASES,
    'DETRISTextAdapter': TEXT_ADAPTER_CASES,
    'SERAFusion': FUSION_CASES,
    'DINOv2': DINOV2_CASES,
    'DINOv3': DINOV3_CASES,
    'CLIPViT': CLIP_VIT_CASES,
    'ETRISBridger': BRIDGER_CASES,
    'OpenCLIPTextEncoder': CLIP_CASES,
    'ReferHead': HEAD_CASES,
    'HierarchicalAlignNeck': CRIS_NECK_CASES,
    'VLGlobalAlignDecoder': CRIS_DECODER_CASES,
    'TextDynamicConvProjector': CRIS_PROJECTOR_CASES,
    'CRISHead': CRIS_HEAD_CASES,
    'ReferringEncoderDecoder': SEGMENTOR_CASES,
    'SegVLMSEBlock': SEGVLM_SE_CASES,
    'DeformableRefine': DEFORMABLE_REFINE_CASES,
    'SegVLMRefineBlock': SEGVLM_REFINE_CASES,
    'RAFLoss': RAF_CASES,
    'DualStreamDINOv2': DUAL_STREAM_CASES,
    'BackboneAuxLossHead': AUX_LOSS_HEAD_CASES,
    'PyramidDINOv2': PYRAMID_CASES,
}


def test_every_registered_component_has_a_contract():
    assert len(REGISTERED) >= 14, REGISTERED
    missing = sorted(set(REGISTERED) - set(CASES))
    assert not missing, (
        f'{missing} are registered in mmseg MODELS by mmseg_sera but have '
        'no entry in tests/test_models/test_contract.py CASES: add a tiny '
        'config, an input maker and output checks')
    stale = sorted(set(CASES) - set(REGISTERED))
    assert not stale, f'CASES names unregistered components: {stale}'


def _params(case_list):
    """One param per case; a registered component without cases still gets
    one (``case=None``), which fails."""
    return [
        pytest.param(name, case,
                     id=f'{name}-{case.id if case else "MISSING"}')
        for name in REGISTERED for case in (case_list.get(name) or [None])
    ]


@pytest.mark.parametrize('name,case', _params(CASES))
def test_component_contract(name: str, case: Optional[Case]):
    if case is None:
        pytest.fail(f'{name} has no contract case (see CASES)')
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        module = MODELS.build(dict(case.cfg))
    assert type(module) is MODELS.get(name), (type(module), name)
    module.train(case.train)

    all_params = dict(module.named_parameters())
    assert all_params or case.parameter_free, f'{name} has no parameters'
    trainable = (set(all_params) if case.trainable is None else
                 case.trainable(module))
    assert trainable <= set(all_params)
    actual = {n for n, p in all_params.items() if p.requires_grad}
    assert actual == trainable, (
        f'requires_grad differs from the policy: unexpected '
        f'{sorted(actual - trainable)}, missing {sorted(trainable - actual)}')

    out = case.run(module)
    case.check(module, out)
    for t in _float_tensors(out):
        assert torch.isfinite(t).all()

    exceptions = case.no_grad(module, out)
    assert exceptions <= trainable, sorted(exceptions - trainable)
    scalar = _scalar(out)
    if not trainable:
        assert scalar is None, 'outputs carry a graph with nothing to train'
        got = set()
    else:
        assert scalar is not None, 'no output carries a gradient'
        scalar.backward()
        got = {n for n, p in all_params.items() if p.grad is not None}
    expected = trainable - exceptions
    assert got == expected, (
        f'gradients on unexpected parameters {sorted(got - expected)}, '
        f'missing on {sorted(expected - got)}')
    for n in got:
        assert torch.isfinite(all_params[n].grad).all(), n
