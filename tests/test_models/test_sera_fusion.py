"""SERAFusion neck and the four fusion experts."""
import pytest
import torch

from mmseg_sera.models.moe.experts import (BoundaryExpert, ContextExpert,
                                           ShapeExpert, SpatialExpert,
                                           _pad_replicate, coord_grid)
from mmseg_sera.models.moe.losses import (balance_loss, token_assignment_loss,
                                          z_loss)
from mmseg_sera.models.necks.sera_fusion import SERAFusion
from mmseg_sera.models.structures import NeckOutput, TextFeatures

IN, D, CT = (12, 20), 16, 8
B, H, W = 2, 4, 5
N = H * W


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = tuple(torch.randn(B, c, H, W, generator=g) for c in IN)
    text = TextFeatures(
        tokens=torch.randn(B, 3, CT, generator=g),
        mask=torch.zeros(B, 3, dtype=torch.bool),
        pooled=torch.randn(B, CT, generator=g))
    return feats, text


def _neck(**kw) -> SERAFusion:
    torch.manual_seed(0)
    cfg = dict(channels=D, text_dims=CT, context_heads=2)
    cfg.update(kw)
    return SERAFusion(IN, **cfg)


def _force_routes(neck: SERAFusion):
    """Router logits driven only by the sentence: the text ``10 e_0`` picks
    expert 0, ``10 e_1`` picks expert 2 (after the router's LayerNorm)."""
    with torch.no_grad():
        neck.router.gate.weight.zero_()
        neck.router.gate.weight[0, D + 0] = 1.0
        neck.router.gate.weight[2, D + 1] = 1.0
    feats, text = _inputs()
    pooled = torch.zeros(B, CT)
    pooled[0, 0] = 10.0
    pooled[1, 1] = 10.0
    return feats, TextFeatures(text.tokens, text.mask, pooled)


def _count_calls(neck: SERAFusion):
    calls = {e: [] for e in range(len(neck.experts))}
    for e, expert in enumerate(neck.experts):
        expert.register_forward_hook(
            lambda m, inp, out, e=e: calls[e].append(inp[0].shape[0]))
    return calls


@pytest.mark.parametrize('routing', ['sample', 'token'])
@pytest.mark.parametrize('top_k', [1, 2, 4])
def test_output_shapes(routing, top_k):
    neck = _neck(routing=routing, top_k=top_k)
    feats, text = _inputs()
    out = neck(feats, text)
    assert isinstance(out, NeckOutput)
    assert len(out.feats) == 1 and out.feats[0].shape == (B, D, H, W)
    lead = (B, ) if routing == 'sample' else (B, N)
    assert out.routing['weights'].shape == lead + (4, )
    assert out.routing['indices'].shape == lead + (top_k, )
    assert ((out.routing['weights'] > 0).sum(-1) == top_k).all()
    assert set(out.aux_losses) == {
        'loss_moe_z', 'loss_moe_balance', 'loss_moe_token'
    }


def test_top1_forced_router_equals_single_expert_and_skips_others():
    neck = _neck(top_k=1).eval()
    feats, text = _force_routes(neck)
    calls = _count_calls(neck)
    out = neck(feats, text)
    assert out.routing['indices'].tolist() == [[0], [2]]
    assert calls == {0: [1], 1: [], 2: [1], 3: []}  # one sample each
    with torch.no_grad():
        x = neck.fuse(feats, text)
        ref0 = neck.experts[0](x[0:1])
        ref1 = neck.experts[2](x[1:2])
    torch.testing.assert_close(out.feats[0][0:1], ref0)
    torch.testing.assert_close(out.feats[0][1:2], ref1)


def test_per_token_forced_router_skips_unrouted_experts():
    neck = _neck(top_k=1, routing='token').eval()
    feats, text = _force_routes(neck)
    calls = _count_calls(neck)
    out = neck(feats, text)
    idx = out.routing['indices']
    assert (idx[0] == 0).all() and (idx[1] == 2).all()
    assert calls == {0: [1], 1: [], 2: [1], 3: []}
    with torch.no_grad():
        x = neck.fuse(feats, text)
    torch.testing.assert_close(out.feats[0][0:1], neck.experts[0](x[0:1]))
    torch.testing.assert_close(out.feats[0][1:2], neck.experts[2](x[1:2]))


@pytest.mark.parametrize('routing', ['sample', 'token'])
@pytest.mark.parametrize('top_k', [2, 4])
def test_output_is_weighted_sum_of_experts(routing, top_k):
    neck = _neck(top_k=top_k, routing=routing).eval()
    feats, text = _inputs()
    calls = _count_calls(neck)
    out = neck(feats, text)
    if top_k == 4:  # every expert on the full batch, no gather
        assert all(c == [B] for c in calls.values())
    w = out.routing['weights']
    with torch.no_grad():
        x = neck.fuse(feats, text)
        expected = torch.zeros_like(x)
        for e, expert in enumerate(neck.experts):
            grid = [1, 1] if routing == 'sample' else [H, W]
            we = w[..., e].reshape(B, 1, *grid)
            expected += we * expert(x)
    torch.testing.assert_close(out.feats[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('routing', ['sample', 'token'])
def test_aux_losses_equal_pure_functions(routing):
    weights = dict(z=0.5, balance=0.25, token=2.0)
    neck = _neck(top_k=2, routing=routing, loss_weights=weights).eval()
    feats, text = _inputs()
    out = neck(feats, text)
    with torch.no_grad():
        x = neck.fuse(feats, text)
        route = neck.router(neck.router_input(x, text))
    expected = {
        'loss_moe_z': 0.5 * z_loss(route.logits),
        'loss_moe_balance': 0.25 * balance_loss(route.weights),
        'loss_moe_token': 2.0 * token_assignment_loss(route.probs,
                                                      route.indices),
    }
    for k, v in expected.items():
        assert torch.isfinite(out.aux_losses[k])
        torch.testing.assert_close(out.aux_losses[k], v)
    assert out.aux_losses['loss_moe_z'] > 0


def test_default_loss_weights_and_unknown_key():
    assert _neck().loss_weights == dict(z=1e-3, balance=1e-2, token=1e-2)
    with pytest.raises(ValueError, match='loss_weights'):
        _neck(loss_weights=dict(zloss=1.0))


def test_eval_deterministic_train_noisy():
    neck = _neck(top_k=2)
    feats, text = _inputs()
    neck.eval()
    a, b = neck(feats, text), neck(feats, text)
    assert torch.equal(a.feats[0], b.feats[0])
    assert torch.equal(a.routing['weights'], b.routing['weights'])
    neck.train()
    c, d = neck(feats, text), neck(feats, text)
    assert not torch.equal(c.routing['weights'], d.routing['weights'])


@pytest.mark.parametrize('routing', ['sample', 'token'])
def test_train_step_grads_reach_router_and_routed_experts(routing):
    neck = _neck(top_k=2, routing=routing).train()
    feats, text = _inputs()
    out = neck(feats, text)
    loss = (out.feats[0] * torch.randn_like(out.feats[0])).sum() + sum(
        out.aux_losses.values())
    loss.backward()
    assert neck.router.gate.weight.grad.abs().sum() > 0
    routed = set(out.routing['indices'].flatten().tolist())
    for e, expert in enumerate(neck.experts):
        grads = [p.grad for p in expert.parameters()]
        if e in routed:
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)
    assert all(p.grad is not None for p in neck.lateral_convs.parameters())


def test_fixed_filters_are_buffers():
    neck = _neck()
    params = {n for n, _ in neck.named_parameters()}
    buffers = dict(neck.named_buffers())
    state = neck.state_dict()
    for name in ('experts.2.sobel', 'experts.3.blur', 'experts.3.laplacian'):
        assert name in buffers and name in state and name not in params
        assert not buffers[name].requires_grad
    assert neck.expert_names == [
        'SpatialExpert', 'ContextExpert', 'BoundaryExpert', 'ShapeExpert'
    ]


def test_custom_experts_and_registry():
    from mmseg.registry import MODELS
    neck = MODELS.build(
        dict(type='SERAFusion', in_channels=IN, channels=D, text_dims=CT,
             num_experts=2, top_k=1,
             experts=[dict(type='BoundaryExpert'),
                      dict(type='DWConvSpatialExpert', alpha=0.5)]))
    assert neck.expert_names == ['BoundaryExpert', 'DWConvSpatialExpert']
    feats, text = _inputs()
    assert neck(feats, text).feats[0].shape == (B, D, H, W)
    with pytest.raises(ValueError, match='num_experts'):
        _neck(num_experts=3, experts=[dict(type='BoundaryExpert')] * 2)
    with pytest.raises(ValueError, match='channels'):
        _neck(num_experts=1, top_k=1,
              experts=[dict(type='BoundaryExpert', channels=D + 1)])


def test_bad_inputs():
    neck = _neck()
    feats, text = _inputs()
    with pytest.raises(ValueError, match='levels'):
        neck(feats[:1], text)
    with pytest.raises(ValueError, match='text'):
        neck(feats, None)
    with pytest.raises(ValueError, match='level 1'):
        neck((feats[0], feats[1][..., :-1]), text)
    with pytest.raises(ValueError, match='top_k'):
        _neck(top_k=5)


def test_bf16_autocast_forward():
    neck = _neck(top_k=2).train()
    feats, text = _inputs()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = neck(feats, text)
    assert torch.isfinite(out.feats[0].float()).all()
    assert all(torch.isfinite(v) for v in out.aux_losses.values())


# ------------------------------------------------------------------ experts
def test_coord_grid():
    g = coord_grid(3, 5)
    assert g.shape == (1, 2, 3, 5)
    assert g[0, :, 0, 0].tolist() == [-1.0, -1.0]
    assert g[0, :, 2, 4].tolist() == [1.0, 1.0]
    assert g[0, 0, 1].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert coord_grid(1, 1).abs().sum() == 0


def test_spatial_expert_adds_the_same_positional_map_to_every_sample():
    torch.manual_seed(0)
    ex = SpatialExpert(D, alpha=0.1)
    x = torch.randn(3, D, H, W)
    delta = ex(x) - x
    expected = 0.1 * ex.coord_proj(coord_grid(H, W))
    torch.testing.assert_close(delta, expected.expand_as(delta))
    assert isinstance(ex.alpha, torch.nn.Parameter)
    fixed = SpatialExpert(D, learnable_alpha=False)
    assert 'alpha' not in dict(fixed.named_parameters())


def test_sobel_gradients_on_a_ramp():
    ex = BoundaryExpert(1)
    ramp = torch.arange(W, dtype=torch.float32).expand(1, 1, H, W)
    g = ex.gradients(ramp)[0, 0]
    # interior: d/dx of the column index is 1; replicate padding halves
    # the one-sided differences at the left/right border
    assert torch.allclose(g[0][:, 1:-1], torch.ones(H, W - 2))
    assert torch.allclose(g[0][:, 0], torch.full((H, ), 0.5))
    assert torch.allclose(g[1], torch.zeros(H, W))
    flat = ex.gradients(torch.full((1, 1, H, W), 3.0))
    assert flat.abs().max() == 0  # no fake edge at the frame


@pytest.mark.parametrize('p', [1, 2, 3])
def test_pad_replicate_equals_torch_replicate_padding(p):
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    ref = torch.nn.functional.pad(x, (p, p, p, p), mode='replicate')
    out = _pad_replicate(x, p)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    grad_ref, = torch.autograd.grad(ref, x, g)
    grad, = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(grad, grad_ref)


def test_shape_expert_filters_and_residual():
    torch.manual_seed(0)
    ex = ShapeExpert(D)
    with torch.no_grad():
        ex.proj.weight.zero_()
        ex.proj.bias.zero_()
    x = torch.randn(2, D, H, W)
    assert torch.equal(ex(x), x)  # residual, GELU(0) = 0
    with torch.no_grad():
        ex.proj.weight.normal_()
    # constant input: blur = constant, Laplacian = 0
    c = torch.full((1, D, H, W), 2.0)
    expected = c + torch.nn.functional.gelu(
        ex.proj(torch.cat([c, torch.zeros_like(c)], 1)))
    torch.testing.assert_close(ex(c), expected)
    learn = ShapeExpert(D, learnable_blur=True, blur_kernel_size=3)
    assert learn.blur.requires_grad and learn.blur.shape == (D, 1, 3, 3)
    torch.testing.assert_close(learn.blur[0, 0].sum(), torch.tensor(1.0))


def test_context_expert_mixes_positions_and_is_batch_independent():
    torch.manual_seed(0)
    ex = ContextExpert(D, num_heads=2).eval()
    x = torch.randn(2, D, H, W)
    y = ex(x)
    assert y.shape == x.shape
    torch.testing.assert_close(ex(x[1:]), y[1:])
    x2 = x.clone()
    # one position changes every output position (not a constant shift:
    # the pre-norm LayerNorm would remove it)
    x2[0, :, 0, 0] += 3.0 * torch.randn(D)
    assert not torch.allclose(ex(x2)[0, :, -1, -1], y[0, :, -1, -1])


def test_zero_experts_is_fusion_only():
    import torch
    from mmseg_sera.models.necks.sera_fusion import SERAFusion
    from mmseg_sera.models.structures import TextFeatures
    torch.manual_seed(0)
    neck = SERAFusion(in_channels=[8, 8], channels=16, text_dims=12,
                      num_experts=0).eval()
    assert not hasattr(neck, 'router') and len(neck.experts) == 0
    feats = [torch.randn(2, 8, 3, 5), torch.randn(2, 8, 3, 5)]
    text = TextFeatures(tokens=torch.randn(2, 4, 12),
                        mask=torch.zeros(2, 4, dtype=torch.bool),
                        pooled=torch.randn(2, 12))
    out = neck(feats, text)
    assert out.aux_losses == {} and out.routing == {}
    torch.testing.assert_close(out.feats[0], neck.fuse(feats, text))
