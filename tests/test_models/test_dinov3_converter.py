"""DINOv3 checkpoints into our layout, and features against the sources.

* timm layout: timm's own DINOv3 (``eva.py``, pretrained=False) with
  seeded random weights (LayerNorms, biases, LayerScale far from their
  init), converted, gives timm's features after intermediate blocks and
  the final norm, on non-square inputs, to 1e-4.
* official layout: a state dict written here with the official key names
  (``storage_tokens``, ``rope_embed.periods`` rounded to bfloat16,
  ``attn.qkv.bias_mask``, ``mlp.w1/w2/w3``, ``mask_token``), converted,
  gives the features of :func:`reference_forward`, written here from the
  official formulas on the raw official keys.
* the two differ on the same weights by the periods only: converting the
  official weights and forcing ``rope_periods='fp32'`` gives timm's.
"""
import importlib.util
import math
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from mmseg_sera.models import dinov3_checkpoint as conv3
from mmseg_sera.models.backbones import DINOv3

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(
        f'_{name}', ROOT / 'tools' / 'model_converters' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool3 = _tool('dinov3_to_sera')
tool2 = _tool('dinov2_to_sera')

C, L, HEADS = 32, 3, 2  # head width 16: 4 RoPE periods
X = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
X_ODD = torch.randn(1, 3, 61, 90,
                    generator=torch.Generator().manual_seed(1))
TAKE = (0, 2)


def _rand(shape, g, kind='weight') -> Tensor:
    r = torch.randn(shape, generator=g)
    if kind == 'norm':
        return 1 + 0.2 * r
    if kind == 'gamma':
        return 0.5 * r
    return 0.2 * r


def official_state_dict(*, ffn: str = 'mlp', mask: str = 'q_v',
                        seed: int = 0) -> Dict[str, Tensor]:
    """Random weights under the official DINOv3 key names (official
    ``SwiGLUFFN`` hidden width for ``ffn='swiglu'``, ratio 6)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        'cls_token': _rand((1, 1, C), g),
        'storage_tokens': _rand((1, 4, C), g),
        'mask_token': torch.zeros(1, C),
        'patch_embed.proj.weight': _rand((C, 3, 16, 16), g),
        'patch_embed.proj.bias': _rand((C, ), g),
        # stored rounded to bfloat16, as in the released files
        'rope_embed.periods': (100.**(2 * torch.arange(4.) / 8)).to(
            torch.bfloat16).float(),
        'norm.weight': _rand((C, ), g, 'norm'),
        'norm.bias': _rand((C, ), g),
    }
    m = torch.ones(3 * C)
    if mask == 'q_v':
        m[C:2 * C] = 0
    else:
        m.zero_()
    for i in range(L):
        b = f'blocks.{i}.'
        for n in ('norm1', 'norm2'):
            sd[b + n + '.weight'] = _rand((C, ), g, 'norm')
            sd[b + n + '.bias'] = _rand((C, ), g)
        sd[b + 'attn.qkv.weight'] = _rand((3 * C, C), g)
        sd[b + 'attn.qkv.bias'] = _rand((3 * C, ), g)
        sd[b + 'attn.qkv.bias_mask'] = m.clone()
        sd[b + 'attn.proj.weight'] = _rand((C, C), g)
        sd[b + 'attn.proj.bias'] = _rand((C, ), g)
        sd[b + 'ls1.gamma'] = _rand((C, ), g, 'gamma')
        sd[b + 'ls2.gamma'] = _rand((C, ), g, 'gamma')
        if ffn == 'mlp':
            sd[b + 'mlp.fc1.weight'] = _rand((4 * C, C), g)
            sd[b + 'mlp.fc1.bias'] = _rand((4 * C, ), g)
            sd[b + 'mlp.fc2.weight'] = _rand((C, 4 * C), g)
            sd[b + 'mlp.fc2.bias'] = _rand((C, ), g)
        else:
            h = int(6 * C * 2 / 3)
            h += (-h) % 8
            for n, shape in (('w1', (h, C)), ('w2', (h, C)), ('w3',
                                                              (C, h))):
                sd[b + f'mlp.{n}.weight'] = _rand(shape, g)
                sd[b + f'mlp.{n}.bias'] = _rand(shape[:1], g)
    return sd


def reference_forward(sd: Dict[str, Tensor], x: Tensor,
                      take: Sequence[int], periods: Tensor = None,
                      eps: float = 1e-5, prefix: bool = False) -> List:
    """DINOv3 features on the raw official keys: the LayerNorm'ed patch
    tokens after each block of ``take``, B x C x h x w (with ``prefix``:
    (map, the normed class and 4 storage tokens B x 5 x C) pairs).

    Patches floor(H/16) x floor(W/16); tokens [cls, 4 storage, patches];
    per block z += g1 * proj(attn(LN1 z)), z += g2 * ffn(LN2 z), with the
    qkv bias times its mask and q, k of the patch tokens rotated: for the
    patch at row r, column c of an h x w grid, y = (2r + 1) / h - 1,
    x = (2c + 1) / w - 1, angles 2 pi [y / P, x / P] (twice), each pair
    (t_i, t_{i + d/2}) rotated by its angle.
    """
    p = sd['patch_embed.proj.weight']
    H, W = x.shape[2] // 16 * 16, x.shape[3] // 16 * 16
    t = F.conv2d(x[:, :, :H, :W], p, sd['patch_embed.proj.bias'], stride=16)
    B, _, h, w = t.shape
    z = torch.cat([sd['cls_token'].expand(B, -1, -1),
                   sd['storage_tokens'].expand(B, -1, -1),
                   t.flatten(2).transpose(1, 2)], dim=1)
    P = 5
    per = sd['rope_embed.periods'] if periods is None else periods
    d = 4 * per.numel()
    heads = C // d
    ys = (2 * torch.arange(h).float() + 1) / h - 1
    xs = (2 * torch.arange(w).float() + 1) / w - 1
    yy, xx = ys[:, None].expand(h, w).reshape(-1), xs[None].expand(
        h, w).reshape(-1)
    ang = torch.cat([2 * math.pi * yy[:, None] / per,
                     2 * math.pi * xx[:, None] / per], dim=1)  # hw x d/2

    def rotate(v):  # B x heads x N x d
        a, b = v[..., P:, :d // 2], v[..., P:, d // 2:]
        cos, sin = torch.cos(ang), torch.sin(ang)
        rot = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        return torch.cat([v[..., :P, :], rot], dim=-2)

    def ln(v, name):
        return F.layer_norm(v, (C, ), sd[name + '.weight'],
                            sd[name + '.bias'], eps)

    out = []
    for i in range(max(take) + 1):
        b = f'blocks.{i}.'
        u = ln(z, b + 'norm1')
        bias = sd[b + 'attn.qkv.bias'] * sd[b + 'attn.qkv.bias_mask']
        qkv = (u @ sd[b + 'attn.qkv.weight'].T + bias).reshape(
            B, -1, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = rotate(qkv[0]), rotate(qkv[1]), qkv[2]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        a = a.transpose(1, 2).reshape(B, -1, C)
        a = a @ sd[b + 'attn.proj.weight'].T + sd[b + 'attn.proj.bias']
        z = z + sd[b + 'ls1.gamma'] * a
        u = ln(z, b + 'norm2')
        if b + 'mlp.w1.weight' in sd:
            g1 = u @ sd[b + 'mlp.w1.weight'].T + sd[b + 'mlp.w1.bias']
            g2 = u @ sd[b + 'mlp.w2.weight'].T + sd[b + 'mlp.w2.bias']
            f = (F.silu(g1) * g2) @ sd[b + 'mlp.w3.weight'].T \
                + sd[b + 'mlp.w3.bias']
        else:
            f = F.gelu(u @ sd[b + 'mlp.fc1.weight'].T + sd[b + 'mlp.fc1.bias'])
            f = f @ sd[b + 'mlp.fc2.weight'].T + sd[b + 'mlp.fc2.bias']
        z = z + sd[b + 'ls2.gamma'] * f
        if i in take:
            n = ln(z, 'norm')
            level = n[:, P:].transpose(1, 2).reshape(B, C, h, w)
            out.append((level, n[:, :P]) if prefix else level)
    return out


def ours(sd: Dict[str, Tensor], arch: Dict, **kwargs) -> DINOv3:
    m = DINOv3(arch=arch, out_indices=TAKE, out_norm='all', **kwargs)
    m.load_state_dict(sd)
    return m.eval()


def _close(a: Sequence[Tensor], b: Sequence[Tensor], atol=1e-4) -> float:
    assert len(a) == len(b)
    worst = 0.
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
        worst = max(worst, (x - y).abs().max().item())
    assert worst < atol, worst
    return worst


# --------------------------------------------------------------------------
# official layout
# --------------------------------------------------------------------------
@pytest.mark.parametrize('ffn, mask', [('mlp', 'q_v'), ('mlp', 'zeros'),
                                       ('swiglu', 'q_v')])
def test_official_layout_matches_reference(ffn, mask):
    sd = official_state_dict(ffn=ffn, mask=mask)
    assert conv3.detect_layout(sd) == 'official'
    out = conv3.convert_dinov3(sd)
    assert 'mask_token' not in out and 'storage_tokens' not in out
    assert torch.equal(out['rope_embed.periods'], sd['rope_embed.periods'])
    meta = conv3.describe(out, 'official')
    assert meta['rope_periods'] == 'stored' and meta['rope_periods_bf16']
    assert meta['num_heads'] == HEADS and meta['qkv_bias_mask'] == mask
    assert meta['ffn_type'] == ffn and meta['arch'] is None
    arch = dict(embed_dims=C, num_layers=L, num_heads=HEADS,
                mlp_ratio=6 if ffn == 'swiglu' else 4, ffn_type=ffn)
    m = ours(out, arch)
    with torch.no_grad():
        for x in (X, X_ODD):
            ref = reference_forward(sd, x, TAKE)
            _close(m(x), ref)
        # the class and storage tokens come with each level
        got = m.forward_features(X)
        ref = reference_forward(sd, X, TAKE, prefix=True)
        _close(got.prefix_tokens, [p for _, p in ref])
    # the reference is sensitive to what is checked: the fp32 periods move
    # the features by more than the tolerance
    with torch.no_grad():
        fp32 = reference_forward(sd, X, TAKE,
                                 periods=100.**(2 * torch.arange(4.) / 8))
        gap = max((a - b).abs().max().item()
                  for a, b in zip(fp32, reference_forward(sd, X, TAKE)))
    assert gap > 1e-4, gap


# --------------------------------------------------------------------------
# timm layout
# --------------------------------------------------------------------------
def timm_model(name: str, seed: int = 0):
    m = timm.create_model(name, pretrained=False, embed_dim=C, depth=L,
                          num_heads=HEADS, num_classes=0, img_size=64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            kind = 'norm' if 'norm' in n and n.endswith('weight') else (
                'gamma' if 'gamma' in n else 'weight')
            p.copy_(_rand(p.shape, g, kind))
    return m.eval()


def timm_features(m, x: Tensor) -> List[Tensor]:
    return m.forward_intermediates(x, indices=list(TAKE), norm=True,
                                   output_fmt='NCHW',
                                   intermediates_only=True)


@pytest.mark.parametrize('name, ffn', [
    ('vit_small_patch16_dinov3', 'mlp'),
    ('vit_small_patch16_dinov3_qkvb', 'mlp'),
    ('vit_small_plus_patch16_dinov3_qkvb', 'swiglu'),
])
def test_timm_layout_matches_timm(name, ffn):
    tm = timm_model(name)
    sd = tm.state_dict()
    assert conv3.detect_layout(sd) == 'timm'
    with pytest.raises(ValueError, match='num_heads'):
        conv3.convert_dinov3(sd)  # not a released size
    out = conv3.convert_dinov3(sd, num_heads=HEADS)
    meta = conv3.describe(out, 'timm')
    assert meta['rope_periods'] == 'fp32' and not meta['rope_periods_bf16']
    assert meta['qkv_bias_mask'] == ('q_v' if 'qkvb' in name else 'zeros')
    arch = dict(embed_dims=C, num_layers=L, num_heads=HEADS,
                mlp_ratio=6 if ffn == 'swiglu' else 4, ffn_type=ffn)
    m = ours(out, arch, rope_periods=meta['rope_periods'])
    with torch.no_grad():
        for x in (X, X_ODD[:, :, :48, :80]):
            _close(m(x), timm_features(tm, x))


def _official_to_timm(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The same weights under timm's names (written from the key table of
    the module docstring)."""
    out = {}
    for k, v in sd.items():
        if k in ('mask_token', 'rope_embed.periods') or k.endswith(
                'bias_mask'):
            continue
        if k.endswith('attn.qkv.bias'):
            out[k.replace('qkv.bias', 'q_bias')] = v[:C]
            out[k.replace('qkv.bias', 'v_bias')] = v[2 * C:]
            continue
        k = k.replace('ls1.gamma', 'gamma_1').replace('ls2.gamma', 'gamma_2')
        k = k.replace('storage_tokens', 'reg_token')
        out[k] = v
    return out


def test_official_and_timm_differ_by_the_periods_only():
    sd = official_state_dict(mask='q_v', seed=3)
    tm = timm_model('vit_small_patch16_dinov3_qkvb')
    missing, unexpected = tm.load_state_dict(_official_to_timm(sd),
                                             strict=False)
    assert not unexpected and not [k for k in missing if 'rope' not in k]
    arch = dict(embed_dims=C, num_layers=L, num_heads=HEADS)
    official = conv3.convert_dinov3(sd)
    with torch.no_grad():
        t = timm_features(tm.eval(), X)
        stored = ours(official, arch, rope_periods='stored')(X)
        fp32 = ours(official, arch, rope_periods='fp32')(X)
    gap = max((a - b).abs().max().item() for a, b in zip(stored, t))
    assert gap > 1e-4, gap  # the bf16 periods show
    _close(fp32, t)  # timm = the official weights with fp32 periods


# --------------------------------------------------------------------------
# errors and the command line
# --------------------------------------------------------------------------
def test_dinov2_and_dinov3_converters_refuse_each_other():
    from mmseg_sera.models.backbones import DINOv2
    v2 = DINOv2(arch=dict(embed_dims=C, num_layers=2, num_heads=2),
                num_register_tokens=4, img_size=56).state_dict()
    v2 = {k: v for k, v in v2.items() if k != 'pos_resampling'}
    v2['mask_token'] = torch.zeros(1, C)
    with pytest.raises(ValueError, match='pos_embed.*dinov2_to_sera'):
        conv3.convert_dinov3(v2)
    for sd in (official_state_dict(),
               _official_to_timm(official_state_dict())):
        with pytest.raises(ValueError, match='DINOv3.*dinov3_to_sera'):
            tool2.convert_dinov2(sd)


@pytest.mark.parametrize('edit, match', [
    (lambda sd: sd.update(reg_token=sd['storage_tokens']), 'mixes'),
    (lambda sd: sd.update({'blocks.0.attn.qkv.bias_mask':
                           torch.full((3 * C, ), math.nan)}), 'NaN'),
    (lambda sd: sd.update({'blocks.0.attn.q_norm.weight': torch.ones(2)}),
     'no place'),
    (lambda sd: sd.update({'cls_norm.weight': torch.ones(C)}), 'no place'),
])
def test_bad_state_dicts(edit, match):
    sd = official_state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        conv3.convert_dinov3(sd)


def test_layout_and_heads_errors():
    sd = official_state_dict()
    with pytest.raises(ValueError, match='--layout timm'):
        conv3.convert_dinov3(sd, src='timm')
    with pytest.raises(ValueError, match='contradicts the stored RoPE'):
        conv3.convert_dinov3(sd, num_heads=4)
    with pytest.raises(ValueError, match='not a DINOv3'):
        conv3.convert_dinov3({'cls_token': torch.zeros(1, 1, C),
                              'norm.weight': torch.zeros(C)})
    # the local class-token norm of the 7B / SAT-L files is dropped
    sd['local_cls_norm.weight'] = torch.ones(C)
    assert 'local_cls_norm.weight' not in conv3.convert_dinov3(sd)


def test_released_size_is_recognised_and_checked():
    # a timm-layout ViT-S/16 on the meta device: size from the arch table
    with torch.device('meta'):
        tm = timm.create_model('vit_small_patch16_dinov3', pretrained=False,
                               num_classes=0)
    sd = {k: torch.zeros(v.shape) for k, v in tm.state_dict().items()}
    out = conv3.convert_dinov3(sd)  # no num_heads needed: 384 / 12 / mlp
    meta = conv3.describe(out, 'timm')
    assert meta['arch'] == 'small' and meta['num_heads'] == 6
    assert meta['qkv_bias_mask'] == 'zeros'
    conv3.check_arch(meta, 'small')
    conv3.check_arch(meta, 's')
    with pytest.raises(ValueError, match="arch 'base' has 768 / 12 / 12"):
        conv3.check_arch(meta, 'base')
    with pytest.raises(ValueError, match='small'):
        conv3.check_arch(meta, 'small_plus')
    with torch.device('meta'):
        model = DINOv3(arch='small')
    assert set(out) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert out[k].shape == v.shape, k


def test_cli(tmp_path, capsys):
    sd = official_state_dict(ffn='swiglu')
    src, dst = tmp_path / 'official.pth', tmp_path / 'ours.pth'
    torch.save({'teacher': {'backbone.' + k: v for k, v in sd.items()}}, src)
    assert tool3.main([str(src), str(dst)]) == 0
    saved = torch.load(dst, weights_only=True)
    assert saved['meta']['rope_periods'] == 'stored'
    assert saved['meta']['source_layout'] == 'official'
    printed = capsys.readouterr().out
    assert 'rope_periods' in printed
    arch = dict(embed_dims=C, num_layers=L, num_heads=HEADS, mlp_ratio=6,
                ffn_type='swiglu')
    m = DINOv3(arch=arch, out_indices=TAKE, out_norm='all',
               init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    m.init_weights()
    with torch.no_grad():
        _close(m.eval()(X), reference_forward(sd, X, TAKE))
    with pytest.raises(SystemExit):
        tool3.main([str(src), str(dst), '--arch', 'base'])
    assert 'arch' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool3.main([str(src), str(dst), '--layout', 'timm'])


def test_official_check_tool_needs_the_official_package(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        '_dinov3_official_check',
        ROOT / 'tools' / 'analysis_tools' / 'dinov3_official_check.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(['--official-src', str(tmp_path)])
    assert 'dinov3/hub/backbones.py' in capsys.readouterr().err
