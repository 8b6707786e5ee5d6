"""SERAAdapter and the two light adapter experts."""
import pytest
import torch
from torch import nn

from mmseg_sera.models.adapters.sera_adapter import SERAAdapter
from mmseg_sera.models.moe.experts import (DWConvBoundaryExpert,
                                           DWConvSpatialExpert)
from mmseg_sera.models.structures import TextFeatures

C, D, CT, CP, L = 24, 16, 12, 10, 5
H, W = 3, 5  # non-square grid


def _text(B: int = 2, seed: int = 0) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 3:] = True  # sample 0: two padding tokens
    return TextFeatures(
        tokens=torch.randn(B, L, CT, generator=g),
        mask=mask,
        pooled=torch.randn(B, CP, generator=g))


def _adapter(**kw) -> SERAAdapter:
    torch.manual_seed(0)
    cfg = dict(text_dims=CT, pooled_dims=CP, hidden_dims=D, num_heads=2)
    cfg.update(kw)
    return SERAAdapter(C, **cfg)


def _activate(adapter: SERAAdapter) -> SERAAdapter:
    """Give the up-projection non-zero weights so the output depends on the
    rest of the adapter."""
    with torch.no_grad():
        adapter.up_proj.weight.normal_(std=0.5)
    return adapter


def test_fresh_adapter_is_identity():
    adapter = _adapter(init_cfg=dict(type='Constant', val=0.7, layer='Linear'))
    adapter.init_weights()  # a parent's init_cfg must not undo the zero init
    x = torch.randn(2, H * W, C)
    for text in (_text(), None):
        out = adapter(x, (H, W), text)
        assert torch.equal(out.tokens, x)
        assert out.aux_losses == {}


def test_one_sgd_step_breaks_identity():
    adapter = _adapter()
    x, text = torch.randn(2, H * W, C), _text()
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    out = adapter(x, (H, W), text)
    (out.tokens * torch.randn_like(x)).sum().backward()
    assert adapter.up_proj.weight.grad.abs().sum() > 0
    assert adapter.up_proj.bias.grad.abs().sum() > 0
    opt.step()
    adapter.eval()
    assert not torch.allclose(adapter(x, (H, W), text).tokens, x)


def test_routing_is_soft_and_expression_aware():
    adapter = _adapter().eval()
    x, text = torch.randn(2, H * W, C), _text()
    r1 = adapter(x, (H, W), text).routing
    assert r1.shape == (2, 2)
    torch.testing.assert_close(r1.sum(-1), torch.ones(2))
    assert (r1 > 0).all()
    text2 = TextFeatures(text.tokens, text.mask, text.pooled * -3 + 1)
    r2 = adapter(x, (H, W), text2).routing
    assert not torch.allclose(r1, r2)
    # without route_with_text the sentence embedding does not matter
    blind = _adapter(route_with_text=False).eval()
    torch.testing.assert_close(
        blind(x, (H, W), text).routing, blind(x, (H, W), text2).routing)


def test_fusion_equation():
    adapter = _activate(_adapter()).eval()
    x, text = torch.randn(2, H * W, C), _text()
    # F = G + 0.25 w_s S + 0.15 w_b B rebuilt from the parts
    y = adapter.down_proj(x).transpose(1, 2).reshape(2, D, H, W)
    g = adapter.multi_scale_features(y)
    w = adapter.route(g, text)
    f = (g + 0.25 * w[:, 0, None, None, None] * adapter.spatial_expert(g) +
         0.15 * w[:, 1, None, None, None] * adapter.boundary_expert(g))
    t = adapter.cross_attend(f.flatten(2).transpose(1, 2), text)
    expected = x + adapter.up_proj(t)
    torch.testing.assert_close(adapter(x, (H, W), text).tokens, expected)


def test_text_none_routes_on_visual_part_with_zero_text():
    adapter = _activate(_adapter()).eval()
    x = torch.randn(2, H * W, C)
    out = adapter(x, (H, W), None)
    assert out.tokens.shape == x.shape and torch.isfinite(out.tokens).all()
    y = adapter.down_proj(x).transpose(1, 2).reshape(2, D, H, W)
    g = adapter.multi_scale_features(y)
    z = torch.cat([g.mean((2, 3)), torch.zeros(2, D)], dim=1)
    torch.testing.assert_close(out.routing, torch.softmax(
        adapter.router.gate(z), -1))
    assert not torch.allclose(out.tokens, adapter(x, (H, W), _text()).tokens)


def test_padding_tokens_are_ignored():
    adapter = _activate(_adapter()).eval()
    x, text = torch.randn(2, H * W, C), _text()
    ref = adapter(x, (H, W), text).tokens
    tokens = text.tokens.clone()
    tokens[0, 3:] = torch.randn(2, CT) * 100  # padding of sample 0
    out = adapter(x, (H, W), TextFeatures(tokens, text.mask,
                                          text.pooled)).tokens
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    tokens[0, 1] += 5.0  # a real word of sample 0 does matter
    out = adapter(x, (H, W), TextFeatures(tokens, text.mask,
                                          text.pooled)).tokens
    assert not torch.allclose(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


def test_fully_padded_sample_stays_finite():
    adapter = _activate(_adapter()).eval()
    x, text = torch.randn(2, H * W, C), _text()
    text.mask[1] = True
    out = adapter(x, (H, W), text)
    assert torch.isfinite(out.tokens).all()
    # the padded sample gets no attention update, the other one its own
    f = torch.randn(2, H * W, adapter.hidden_dims)
    with torch.no_grad():
        attended = adapter.cross_attend(f, text)
        alone = adapter.cross_attend(
            f[:1], TextFeatures(text.tokens[:1], text.mask[:1],
                                text.pooled[:1]))
    assert torch.equal(attended[1], f[1])
    assert not torch.allclose(attended[0], f[0])
    torch.testing.assert_close(attended[:1], alone)


@pytest.mark.parametrize('hw', [(3, 5), (5, 3), (1, 7), (4, 4)])
@pytest.mark.parametrize('multi_scale', ['sum', 'concat'])
def test_shapes(hw, multi_scale):
    adapter = _activate(_adapter(multi_scale=multi_scale))
    x = torch.randn(3, hw[0] * hw[1], C)
    out = adapter(x, hw, _text(3))
    assert out.tokens.shape == x.shape
    assert out.routing.shape == (3, 2)


def test_bad_inputs():
    adapter = _adapter()
    with pytest.raises(ValueError, match='hw'):
        adapter(torch.randn(2, H * W, C), (H, W + 1), None)
    with pytest.raises(ValueError, match='B x N x 24'):
        adapter(torch.randn(2, H * W, C + 1), (H, W), None)
    bad = _text()
    bad = TextFeatures(bad.tokens[..., :-1], bad.mask, bad.pooled)
    with pytest.raises(ValueError, match='text.tokens'):
        adapter(torch.randn(2, H * W, C), (H, W), bad)
    with pytest.raises(ValueError, match='num_heads'):
        SERAAdapter(C, hidden_dims=10, num_heads=3)


def test_registered():
    from mmseg.registry import MODELS
    adapter = MODELS.build(
        dict(type='SERAAdapter', embed_dims=C, text_dims=CT, hidden_dims=D,
             num_heads=2))
    assert isinstance(adapter, SERAAdapter) and adapter.pooled_dims == CT


def test_light_experts_formulas():
    torch.manual_seed(1)
    g = torch.randn(2, D, H, W)
    spatial = DWConvSpatialExpert(D, alpha=0.3)
    with torch.no_grad():
        spatial.dwconv.weight.zero_()
        spatial.dwconv.bias.fill_(1.0)
    # phi(DWConv(G)) + 0.3 G with DWConv(G) == 1
    torch.testing.assert_close(spatial(g), nn.functional.gelu(
        torch.ones_like(g)) + 0.3 * g)
    boundary = DWConvBoundaryExpert(D, beta=0.1).eval()
    with torch.no_grad():
        boundary.dwconv.weight.zero_()
        boundary.dwconv.weight[:, 0, 1, 1] = 2.0  # DWConv(G) = 2 G
        boundary.dwconv.bias.zero_()
    # ReLU(BN(G + 0.1 * 2 G)); fresh BN in eval: identity up to eps
    expected = torch.relu(1.2 * g / (1 + 1e-5)**0.5)
    torch.testing.assert_close(boundary(g), expected)


def test_image_only_adapter_has_no_text_parts():
    import pytest
    import torch
    from mmseg_sera.models.adapters.sera_adapter import SERAAdapter
    from mmseg_sera.models.structures import TextFeatures
    torch.manual_seed(0)
    adapter = SERAAdapter(24, text_dims=None, hidden_dims=8, num_heads=2)
    names = [n for n, _ in adapter.named_parameters()]
    assert not any(n.startswith(('text_proj', 'cross_attn', 'query_norm',
                                 'route_text_proj')) for n in names)
    x = torch.randn(2, 12, 24)
    out = adapter(x, hw=(3, 4))
    torch.testing.assert_close(out.tokens, x)  # fresh adapter: identity
    (out.tokens.sum() + out.routing.sum()).backward()
    # every parameter takes part (DDP without find_unused_parameters)
    assert all(p.grad is not None for p in adapter.parameters())
    text = TextFeatures(tokens=torch.randn(2, 3, 16),
                        mask=torch.zeros(2, 3, dtype=torch.bool),
                        pooled=torch.randn(2, 16))
    with pytest.raises(ValueError, match='text_dims=None'):
        adapter(x, hw=(3, 4), text=text)


def test_balance_loss_penalises_one_expert_for_all():
    adapter = _adapter(balance_weight=0.5)
    x, text = torch.randn(4, H * W, C), _text(B=4)
    out = adapter(x, (H, W), text)
    u = out.routing.sum(0)
    expected = 0.5 * u.var(unbiased=False) / u.mean()**2
    torch.testing.assert_close(out.aux_losses['loss_adapter_balance'],
                               expected)
    # collapsed routing costs the full weight: u = [B, 0] -> CV^2 = 1
    with torch.no_grad():
        adapter.router.gate.weight.zero_()
        adapter.router.gate.bias.copy_(torch.tensor([30.0, -30.0]))
    loss = adapter(x, (H, W), text).aux_losses['loss_adapter_balance']
    torch.testing.assert_close(loss, torch.tensor(0.5))
    # the gradient reaches the router, and only in training
    with torch.no_grad():
        adapter.router.gate.weight.normal_()
        adapter.router.gate.bias.copy_(torch.tensor([1.0, -1.0]))
    adapter(x, (H, W), text).aux_losses['loss_adapter_balance'].backward()
    assert adapter.router.gate.weight.grad.abs().sum() > 0
    assert adapter.eval()(x, (H, W), text).aux_losses == {}
    assert _adapter()(x, (H, W), text).aux_losses == {}
    with pytest.raises(ValueError, match='balance_weight'):
        _adapter(balance_weight=-1)
