"""SpectralMoE's released DepthMoE weights onto our SpectralMoEAdapter
slots of a DINOv3 tower (the release's backbone is a DINOv3-L).

A state dict in the released layout (per-layer ParameterLists, D x E
gates, one shared W_tf / W_df / scale) is written here with seeded random
values, converted, and loaded strictly into the adapters; each value is
found where the key map puts it, and the adapter computes the released
formulas on them (a per-expert reference written here from the released
expressions)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmseg_sera.models.backbones import DINOv3
from mmseg_sera.models.spectral_moe_checkpoint import (convert_depthmoe,
                                                       released_adapter_cfg)

ROOT = Path(__file__).resolve().parents[2]
D, L, E, T, R = 32, 3, 3, 6, 4


def released_state_dict(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer in range(L):
        for e in range(E):
            sd[f'experts_a.{layer}.{e}'] = torch.randn(T, R, generator=g)
            sd[f'experts_b.{layer}.{e}'] = 0.3 * torch.randn(R, D,
                                                             generator=g)
        for m in (0, 1):
            sd[f'w_gate.{layer}.{m}'] = torch.randn(D, E, generator=g)
            sd[f'w_noise.{layer}.{m}'] = torch.randn(D, E, generator=g)
    for name in ('mlp_token2feat', 'mlp_delta_f'):
        sd[f'{name}.weight'] = 0.2 * torch.randn(D, D, generator=g)
        sd[f'{name}.bias'] = 0.1 * torch.randn(D, generator=g)
    sd['scale'] = torch.tensor(0.7)
    sd['transform.weight'] = torch.randn(8, D, generator=g)
    sd['transform.bias'] = torch.randn(8, generator=g)
    sd['merge.weight'] = torch.randn(8, 24, generator=g)
    sd['merge.bias'] = torch.randn(8, generator=g)
    sd['mean'], sd['std'] = torch.tensor([0.]), torch.tensor([1.])
    return sd


def tower(sd):
    cfg = released_adapter_cfg(sd)
    cfg.pop('embed_dims')
    return DINOv3(arch=dict(embed_dims=D, num_layers=L, num_heads=2),
                  out_indices=(L - 1, ),
                  adapters=[dict(cfg, insert=tuple(range(L)))]).eval()


def test_key_map_and_strict_load():
    sd = released_state_dict()
    cfg = released_adapter_cfg(sd)
    assert (cfg['num_experts'], cfg['token_length'], cfg['rank'],
            cfg['num_layers'], cfg['embed_dims']) == (E, T, R, L, D)
    out = convert_depthmoe({'state_dict': {'backbone.depthmoe.' + k: v
                                           for k, v in sd.items()}})
    m = tower(sd)
    own = {k for k in m.state_dict() if k.startswith('adapters.')}
    assert set(out) == own
    missing, unexpected = m.load_state_dict(out, strict=False)
    assert not unexpected and not [k for k in missing
                                   if k.startswith('adapters.')]
    a1 = m.adapters['1']
    assert torch.equal(a1.experts.tokens_a[2], sd['experts_a.1.2'])
    assert torch.equal(a1.experts.tokens_b[0], sd['experts_b.1.0'])
    assert torch.equal(a1.router.gate.weight, sd['w_gate.1.0'].t())
    assert torch.equal(a1.second_router.noise_proj.weight,
                       sd['w_noise.1.1'].t())
    shared = a1.shared_parts
    assert shared is m.adapters['0'].shared_parts
    assert torch.equal(shared.token_proj.weight, sd['mlp_token2feat.weight'])
    assert torch.equal(shared.out_proj.bias, sd['mlp_delta_f.bias'])
    assert shared.scale.item() == pytest.approx(0.7)
    # blocks: the released layers on other blocks, shared parts on the first
    moved = convert_depthmoe(sd, blocks=[2, 4, 6], prefix='x.')
    assert 'x.2.shared.scale' in moved and 'x.6.router.gate.weight' in moved


def _released_layer(sd, layer, f, g):
    """The released forward_delta_feat in eval mode (top-1, 'laplace'
    gating, sum-form expert logits, log-sum-exp combine, diagonal fusion),
    then f + scale * delta_f; f, g: B x N x D."""
    B, N, _ = f.shape

    def stream(x, m):
        x = x.reshape(-1, D)
        logits = -torch.cdist(x, sd[f'w_gate.{layer}.{m}'].t())
        top = logits.argmax(1)
        out = torch.empty_like(x)
        for e in range(E):
            tok = sd[f'experts_a.{layer}.{e}'] @ sd[f'experts_b.{layer}.{e}']
            u = x.sum(1, keepdim=True) * tok.sum(1)[None]  # the sum form
            s = torch.softmax(u / math.sqrt(D), -1)[:, 1:]
            proj = F.linear(tok[1:], sd['mlp_token2feat.weight'],
                            sd['mlp_token2feat.bias'])
            d = s @ proj
            out[top == e] = d[top == e].exp().log()  # combine, top-1
        return out.reshape(B, N, D)

    dv, dd = stream(f, 0), stream(g, 1)
    a = torch.softmax(dd @ dv.transpose(1, 2) / math.sqrt(D), -1)
    delta = torch.diagonal(a, dim1=1, dim2=2)[..., None] * dv
    delta_f = F.linear(delta + f, sd['mlp_delta_f.weight'],
                       sd['mlp_delta_f.bias'])
    return f + sd['scale'] * delta_f


def test_converted_adapter_computes_the_released_layer():
    sd = released_state_dict(seed=1)
    m = tower(sd)
    m.load_state_dict(convert_depthmoe(sd), strict=False)
    g = torch.Generator().manual_seed(2)
    f = torch.randn(2, 12, D, generator=g)
    depth = torch.randn(2, 12, D, generator=g)
    with torch.no_grad():
        for layer in range(L):
            got = m.adapters[str(layer)](f, hw=(3, 4), second=depth).tokens
            torch.testing.assert_close(got,
                                       _released_layer(sd, layer, f, depth),
                                       rtol=1e-4, atol=1e-4)
    # routing is not trivial: the tokens use more than one expert
    with torch.no_grad():
        idx = m.adapters['0'].router(f.reshape(-1, D)).indices
    assert len(set(idx.flatten().tolist())) > 1


@pytest.mark.parametrize('edit, match', [
    (lambda sd: sd.update(head=torch.zeros(1)), 'not those of the released'),
    (lambda sd: sd.pop('w_noise.1.1'), 'missing w_noise.1.1'),
    (lambda sd: sd.update({'experts_a.2.1': torch.zeros(T, R + 1)}),
     'different ranks'),
    (lambda sd: sd.pop('scale'), 'scale'),
])
def test_bad_released_state_dicts(edit, match):
    sd = released_state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        convert_depthmoe(sd)


def test_bad_blocks():
    with pytest.raises(ValueError, match='distinct blocks'):
        convert_depthmoe(released_state_dict(), blocks=[0, 0, 1])


def test_cli(tmp_path):
    spec = importlib.util.spec_from_file_location(
        '_spectralmoe_to_sera',
        ROOT / 'tools' / 'model_converters' / 'spectralmoe_to_sera.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    sd = released_state_dict()
    src, dst = tmp_path / 'released.pth', tmp_path / 'ours.pth'
    torch.save({'state_dict': {'backbone.depthmoe.' + k: v
                               for k, v in sd.items()},
                'meta': {}}, src)
    assert tool.main([str(src), str(dst),
                      '--prefix', 'backbone.backbone.adapters.']) == 0
    saved = torch.load(dst, weights_only=True)
    assert saved['meta']['adapter_cfg']['released_compat'] is True
    assert 'backbone.backbone.adapters.0.shared.scale' in saved['state_dict']
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / 'missing.pth'), str(dst)])


def test_released_check_tool_needs_the_released_file(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        '_spectralmoe_released_check',
        ROOT / 'tools' / 'analysis_tools' / 'spectralmoe_released_check.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit):
        tool.main(['--released-file', str(tmp_path / 'depthmoe.py')])
    assert 'depthmoe.py' in capsys.readouterr().err


def test_loads_into_a_dual_stream_on_dinov3():
    """The release's setting: the adapters on a DINOv3 tower fed by a
    second (DINOv2, depth-encoder) tower's block tokens."""
    from mmseg.registry import MODELS
    sd = released_state_dict(seed=3)
    cfg = released_adapter_cfg(sd)
    cfg.pop('embed_dims')
    m = MODELS.build(dict(
        type='DualStreamDINOv2',
        backbone=dict(type='DINOv3',
                      arch=dict(embed_dims=D, num_layers=L, num_heads=2),
                      out_indices=(L - 1, ),
                      adapters=[dict(cfg, insert=tuple(range(L)))]),
        second=dict(type='DINOv2',
                    arch=dict(embed_dims=D, num_layers=L, num_heads=2),
                    patch_size=16, img_size=64)))
    missing, unexpected = m.load_state_dict(
        convert_depthmoe(sd, prefix='backbone.adapters.'), strict=False)
    assert not unexpected
    assert not [k for k in missing if '.adapters.' in k]
    m.eval()
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 64, 80))
    assert feats[0].shape == (1, D, 4, 5)
    assert torch.equal(m.backbone.adapters['2'].router.gate.weight,
                       sd['w_gate.2.0'].t())
