"""SpectralMoE parts: LowRankTokenExpert, SpectralMoEAdapter and the tying
of its shared parts (PEERS.md 5).

Each test pins one reading of the released module against a plausible
misreading: the sum-form logits, the ungated log-sum-exp combine, the
diagonal fusion, the zero-initialised routers, the parameter counts.
"""
import copy
import dataclasses
import math
import warnings

import pytest
import torch
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS
from torch import nn

import mmseg_sera  # noqa: F401  (registers the components)
from tests.conftest import count_host_reads
from mmseg_sera.models.adapters.spectral_moe import (COMBINE_EPS,
                                                     SpectralMoEAdapter,
                                                     tie_shared_parts)
from mmseg_sera.models.moe.token_experts import LowRankTokenExpert
from mmseg_sera.models.structures import TextFeatures

D, CT, E, T, R = 24, 16, 3, 6, 4
H, W = 4, 5
N = H * W


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _patches(B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, N, D, generator=_gen(seed))


def _text(B: int = 2, L: int = 5, seed: int = 1) -> TextFeatures:
    g = _gen(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 3:] = True  # sample 0: two padding words
    return TextFeatures(tokens=torch.randn(B, L, CT, generator=g), mask=mask,
                        pooled=torch.randn(B, CT, generator=g))


def _adapter(**kw) -> SpectralMoEAdapter:
    torch.manual_seed(0)
    cfg = dict(num_experts=E, token_length=T, rank=R, text_dims=CT)
    cfg.update(kw)
    return SpectralMoEAdapter(D, **cfg)


def _randomise_tokens(m: SpectralMoEAdapter, seed: int = 3) -> None:
    """Non-zero expert tokens (a fresh module has B = 0)."""
    with torch.no_grad():
        m.experts.tokens_b.copy_(
            torch.randn(m.experts.tokens_b.shape, generator=_gen(seed)))


# --------------------------------------------------------------------------
# LowRankTokenExpert
# --------------------------------------------------------------------------
def _expert_with_tokens(tokens: torch.Tensor, **kw) -> LowRankTokenExpert:
    """One expert whose tokens are ``tokens`` (T x D): A = I, B = tokens."""
    t, d = tokens.shape
    ex = LowRankTokenExpert(d, num_experts=1, token_length=t, rank=t, **kw)
    with torch.no_grad():
        ex.tokens_a.copy_(torch.eye(t)[None])
        ex.tokens_b.copy_(tokens[None])
    return ex


def test_logits_dot_and_released_sum_form_by_hand():
    x = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
    tokens = torch.tensor([[1., 0., -1.], [2., 1., 0.]])
    dot = _expert_with_tokens(tokens).logits(x)[:, 0]
    # x_m . T_t
    assert dot.tolist() == [[-2., 4.], [-2., 13.]]
    summed = _expert_with_tokens(tokens, released_compat=True).logits(x)[:, 0]
    # (sum_c x_c)(sum_d T_t,d): sums 6 and 15 times token sums 0 and 3
    assert summed.tolist() == [[0., 18.], [0., 45.]]
    assert not torch.equal(dot, summed)


@pytest.mark.parametrize('released', [False, True])
def test_expert_output_is_softmax_over_tokens_reading_tokens_2_to_T(
        released):
    torch.manual_seed(0)
    ex = LowRankTokenExpert(D, num_experts=E, token_length=T, rank=R,
                            released_compat=released)
    with torch.no_grad():
        ex.tokens_b.normal_()
    proj = nn.Linear(D, D)
    x = torch.randn(5, D)
    out = ex(x, proj)  # every expert
    assert out.shape == (5, E, D)
    for e in range(E):
        tok = ex.tokens_a[e] @ ex.tokens_b[e]  # T x D
        for m in range(5):
            if released:
                u = x[m].sum() * tok.sum(-1)
            else:
                u = tok @ x[m]
            s = torch.softmax(u / math.sqrt(D), dim=0)
            want = s[1:] @ proj(tok[1:])  # token 1 only in the softmax
            torch.testing.assert_close(out[m, e], want, rtol=1e-5,
                                       atol=1e-5)
    # a dispatch is a gather of those outputs, slot by slot
    idx = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1], [0, 2]])
    picked = ex(x, proj, idx)
    torch.testing.assert_close(picked, out.gather(
        1, idx[..., None].expand(5, 2, D)))
    # and the gated sum weighs them
    gates = torch.rand(5, 2, generator=_gen(4))
    torch.testing.assert_close(
        ex.mix(x, proj, idx, gates), (gates[..., None] * picked).sum(1),
        rtol=1e-5, atol=1e-6)


def test_expert_init_kaiming_a_zero_b_and_kept_by_init_weights():
    ex = LowRankTokenExpert(768, num_experts=6, token_length=100, rank=16)
    assert ex.tokens_a.shape == (6, 100, 16)
    assert ex.tokens_b.shape == (6, 16, 768)
    assert (ex.tokens_b == 0).all()
    # kaiming-uniform, a = sqrt(5), fan-in r = 16: U(-1/4, 1/4) per slice
    # (a 3-D tensor would get fan-in T r and a bound 40 times smaller)
    bound = 1 / math.sqrt(16)
    assert ex.tokens_a.abs().max() <= bound
    assert ex.tokens_a.abs().max() > 0.9 * bound
    with torch.no_grad():
        ex.tokens_b.fill_(1.0)
    ex.init_weights()
    assert (ex.tokens_b == 0).all()
    assert (ex.tokens() == 0).all()


def test_expert_rejects_bad_inputs():
    ex = LowRankTokenExpert(D, num_experts=E, token_length=T, rank=R)
    proj = nn.Linear(D, D)
    with pytest.raises(ValueError, match='units of shape'):
        ex(torch.randn(4, D + 1), proj)
    with pytest.raises(ValueError, match='leading dims'):
        ex(torch.randn(4, D), proj, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match='int64'):
        ex(torch.randn(4, D), proj, torch.zeros(4, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match='token_length'):
        LowRankTokenExpert(D, token_length=1)


# --------------------------------------------------------------------------
# a fresh adapter: B = 0, so every expert gives (1 - 1/T) b_tf
# --------------------------------------------------------------------------
def _fresh_expected(m: SpectralMoEAdapter, f: torch.Tensor,
                    delta: torch.Tensor) -> torch.Tensor:
    p = m.shared_parts
    return f + p.scale * ((delta + f) @ p.out_proj.weight.t() +
                          p.out_proj.bias)


@pytest.mark.parametrize('combine', ['gated_sum', 'released'])
@pytest.mark.parametrize('case', ['text', 'no-text', 'none', 'diag'])
def test_fresh_adapter_output_exactly(case, combine):
    kw = dict(combine=combine)
    if case == 'none':
        kw['fusion'] = 'none'
    if case == 'diag':
        kw.update(fusion='diag', second_source='tokens')
    m = _adapter(**kw).eval()
    f = _patches()
    call = dict(hw=(H, W))
    if case == 'text':
        # sample 1 has no valid word: its attention context is dropped
        text = _text()
        text.mask[1] = True
        call['text'] = text
    if case == 'diag':
        call['second'] = torch.randn(2, N, D, generator=_gen(5))
    out = m(f, **call).tokens
    b_tf = m.shared_parts.token_proj.bias.detach()
    one = (1 - 1 / T) * b_tf  # every expert, every token: S uniform
    delta = one.expand(2, N, D).clone()
    if case == 'text':
        delta[0] = 2 * one  # + attention over identical values
    if case == 'diag':
        delta = one.expand(2, N, D) / N  # A[n, n] = 1/N: all scores tie
    torch.testing.assert_close(out, _fresh_expected(m, f, delta),
                               rtol=1e-5, atol=1e-6)
    # identity plus a small full-rank linear term
    assert (out - f).abs().max() < 1e-2


# --------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------
def test_released_combine_ignores_gates_gated_sum_uses_them():
    x = torch.randn(2, 7, D, generator=_gen(6))
    for combine in ('released', 'gated_sum'):
        m = _adapter(combine=combine, top_k=2, gate_init='normal').eval()
        _randomise_tokens(m)
        route = m.router(x)
        scaled = dataclasses.replace(route, weights=3 * route.weights)
        a, b = m.expert_delta(x, route), m.expert_delta(x, scaled)
        if combine == 'released':
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            torch.testing.assert_close(b, 3 * a)


def test_released_combine_is_log_sum_exp_with_eps_for_zeros():
    m = _adapter(combine='released', top_k=2, gate_init='normal').eval()
    _randomise_tokens(m)
    x = torch.randn(2, 7, D, generator=_gen(7))
    route = m.router(x)
    proj = m.shared_parts.token_proj
    each = m.experts(x, proj, route.indices)  # 2 x 7 x 2 x D
    torch.testing.assert_close(m.expert_delta(x, route),
                               torch.logsumexp(each, dim=-2))
    # outputs of about -200: exp underflows to an exact 0 in float32, which
    # becomes log(eps) = -36.04 (not -inf, not -200)
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.fill_(-200.0)
    got = m.expert_delta(x, route)
    torch.testing.assert_close(
        got, torch.full_like(got, math.log(COMBINE_EPS)))


# --------------------------------------------------------------------------
# fusion
# --------------------------------------------------------------------------
def test_diag_gate_is_the_diagonal_of_the_full_softmax_with_its_gradient():
    m = _adapter(fusion='diag', second_source='tokens', diag_chunk=3)
    g = _gen(8)
    rows = torch.randn(2, 7, D, generator=g, requires_grad=True)
    cols = torch.randn(2, 7, D, generator=g, requires_grad=True)
    got = m.diag_gate(rows, cols)  # 3 chunks of rows, checkpointed
    full = torch.softmax(rows @ cols.transpose(1, 2) / math.sqrt(D), -1)
    want = full.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(got, want)
    w = torch.randn(2, 7, generator=g)
    ga = torch.autograd.grad((got * w).sum(), (rows, cols))
    gb = torch.autograd.grad((want * w).sum(), (rows, cols))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_diag_fusion_is_a_per_token_scalar_not_the_matrix_product():
    m = _adapter(fusion='diag', second_source='tokens')
    g = _gen(9)
    dv, dt = torch.randn(2, N, D, generator=g), torch.randn(2, N, D,
                                                            generator=g)
    got = m.fuse(dv, dt)
    A = torch.softmax(dt @ dv.transpose(1, 2) / math.sqrt(D), -1)
    torch.testing.assert_close(
        got, A.diagonal(dim1=1, dim2=2)[..., None] * dv)
    assert not torch.allclose(got, A @ dv, atol=1e-3)
    # per token, the result is parallel to delta_v
    cos = nn.functional.cosine_similarity(got, dv, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_diag_needs_equal_token_counts():
    m = _adapter(fusion='diag', second_source='tokens')
    with pytest.raises(ValueError, match='N2=12 and N=20'):
        m(_patches(), hw=(H, W), second=torch.randn(2, 12, D))


def test_xattn_fusion_by_hand_with_padding():
    m = _adapter()
    g = _gen(10)
    dv, dt = torch.randn(2, N, D, generator=g), torch.randn(2, 5, D,
                                                            generator=g)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    got = m.fuse(dv, dt, mask)
    scores = dv @ dt.transpose(1, 2) / math.sqrt(D)
    scores = scores.masked_fill(mask[:, None, :], float('-inf'))
    torch.testing.assert_close(got, dv + torch.softmax(scores, -1) @ dt,
                               rtol=1e-5, atol=1e-5)
    # a sample without a valid word adds nothing (and no NaN)
    mask[1] = True
    got = m.fuse(dv, dt, mask)
    torch.testing.assert_close(got[1], dv[1])
    assert torch.isfinite(got).all()


# --------------------------------------------------------------------------
# routers
# --------------------------------------------------------------------------
def test_zero_gates_tie_in_eval_normal_init_breaks_the_tie():
    tied = _adapter().eval()  # gate_init='zeros', as released
    out = tied(_patches(), hw=(H, W), text=_text())
    assert (out.routing[..., 0] == 1).all()  # every token -> expert 0
    free = _adapter(gate_init='normal').eval()
    out = free(_patches(), hw=(H, W), text=_text())
    assert len(out.routing.argmax(-1).unique()) > 1


def test_laplace_logits_are_minus_the_distance_to_the_gate_vectors():
    m = _adapter(gate_init='normal')
    x = torch.randn(2, N, D, generator=_gen(11))
    for router in (m.router, m.second_router):
        assert router.logit_fn == 'laplace'
        assert router.noise_floor == 0.01
        want = -torch.cdist(x, router.gate.weight[None].expand(2, E, D))
        torch.testing.assert_close(router.clean_logits(x), want, rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize('unbiased', [False, True])
def test_balance_loss_by_hand(unbiased):
    m = _adapter(gate_init='normal', loss_weight=0.5, num_layers=4,
                 unbiased_cv=unbiased).eval()
    f, text = _patches(), _text()
    out = m(f, hw=(H, W), text=text)
    t = m.shared_parts.second_proj(text.tokens)

    def cv2(v):
        v = v.double()
        var = ((v - v.mean())**2).sum() / (len(v) - 1 if unbiased else len(v))
        return var / v.mean()**2

    total = 0.
    for router, x in ((m.router, f), (m.second_router, t)):
        w = router(x).weights.reshape(-1, E)  # eval: no noise, hard counts
        importance = w.sum(0)
        load = (w > 0).sum(0).double()
        total += cv2(importance) + cv2(load)
    want = 0.5 / 4 * total
    got = out.aux_losses['loss_moe_balance']
    assert set(out.aux_losses) == {'loss_moe_balance'}
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------
@pytest.mark.parametrize('combine', ['gated_sum', 'released'])
def test_top1_router_learns_through_the_balance_loss_only(combine):
    m = _adapter(combine=combine).train()
    out = m(_patches(), hw=(H, W), text=_text())
    task = (out.tokens * torch.randn(out.tokens.shape, generator=_gen(12)))
    task.sum().backward(retain_graph=True)
    assert m.experts.tokens_b.grad.abs().sum() > 0
    for router in (m.router, m.second_router):
        # the top-1 gate is exactly 1: no task gradient reaches the router
        grad = router.gate.weight.grad
        assert grad is None or (grad == 0).all()
    m.zero_grad()
    out.aux_losses['loss_moe_balance'].backward()
    for router in (m.router, m.second_router):
        assert router.gate.weight.grad.abs().sum() > 0
        assert router.noise_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('released', [False, True])
def test_training_step_never_reads_the_device(released):
    """No host read of a tensor value in the forward and backward (the
    empty-sentence guard, the checkpointed diagonal, the combine). The
    routers run without noise here: NoisyTopKRouter's smooth load builds a
    validated ``torch.distributions.Normal``, whose checks read the device
    (4 reads per router call)."""
    m = _adapter(released_compat=released, noise=False, diag_chunk=7)
    tie_shared_parts(m)
    text = _text()
    text.mask[1] = True
    call = dict(second=torch.randn(2, N, D)) if released else dict(text=text)
    with count_host_reads() as reads:
        out = m.train()(_patches(), hw=(H, W), **call)
        (out.tokens.sum() + out.aux_losses['loss_moe_balance']).backward()
    assert reads == []


# --------------------------------------------------------------------------
# options and errors
# --------------------------------------------------------------------------
def test_released_compat_defaults_and_explicit_overrides():
    m = _adapter(released_compat=True)
    assert (m.fusion, m.combine, m.second_source) == ('diag', 'released',
                                                      'tokens')
    assert m.experts.released_compat and m.shared_out and m.unbiased_cv
    assert m.loss_weight == 1e3
    assert m.router.gate_init == 'zeros' and m.router.logit_fn == 'laplace'
    assert m.shared_parts.second_proj is None  # both streams D wide
    ours = _adapter()
    assert (ours.fusion, ours.combine, ours.second_source) == ('xattn',
                                                               'gated_sum',
                                                               'text')
    assert not ours.experts.released_compat and not ours.shared_out
    assert ours.loss_weight == 1e-2 and not ours.unbiased_cv
    mixed = _adapter(released_compat=True, fusion='xattn', loss_weight=1.0)
    assert mixed.fusion == 'xattn' and mixed.loss_weight == 1.0
    assert mixed.combine == 'released'


@pytest.mark.parametrize('kw,match', [
    (dict(fusion='full'), 'fusion must be one of'),
    (dict(combine='mean'), 'combine must be one of'),
    (dict(logit_fn='cosine'), 'logit_fn must be one of'),
    (dict(second_source='depth'), 'second_source must be one of'),
    (dict(expert_logits='einsum'), 'expert_logits must be one of'),
    (dict(fusion='diag'), "needs a same-grid second stream"),
    (dict(num_layers=0), 'num_layers must be positive'),
    (dict(loss_weight=-1.0), 'loss_weight must be >= 0'),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _adapter(**kw)


def test_bad_inputs_raise():
    f = _patches()
    with pytest.raises(ValueError, match='hw='):
        _adapter()(f, hw=(H, W + 1))
    with pytest.raises(ValueError, match='takes its second modality from'):
        _adapter()(f, hw=(H, W), second=torch.randn(2, N, D))
    with pytest.raises(ValueError, match='needs the second modality'):
        _adapter(second_source='tokens')(f, hw=(H, W), text=_text())
    with pytest.raises(ValueError, match=r'second must be 2 x N2 x 8'):
        _adapter(second_source='tokens', second_dims=8)(
            f, hw=(H, W), second=torch.randn(2, N, D))
    with pytest.raises(ValueError, match='text.tokens must be'):
        _adapter(text_dims=CT + 1)(f, hw=(H, W), text=_text())


def test_second_tokens_of_another_width_are_projected():
    m = _adapter(second_source='tokens', second_dims=8, fusion='diag')
    out = m(_patches(), hw=(H, W), second=torch.randn(2, N, 8))
    assert out.tokens.shape == (2, N, D)
    assert m.shared_parts.second_proj.in_features == 8


def test_fusion_none_has_no_second_router_and_ignores_text():
    m = _adapter(fusion='none').eval()
    assert m.second_router is None and m.shared_parts.second_proj is None
    f = _patches()
    a = m(f, hw=(H, W), text=_text()).tokens
    torch.testing.assert_close(a, m(f, hw=(H, W)).tokens, rtol=0, atol=0)


# --------------------------------------------------------------------------
# inside the DINOv2 backbone
# --------------------------------------------------------------------------
def _dinov2(**adapter_kw):
    adapter = dict(type='SpectralMoEAdapter', insert=(0, 1, 2),
                   num_experts=E, token_length=T, rank=R, text_dims=CT,
                   num_layers=3)
    adapter.update(adapter_kw)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(
            dict(type='DINOv2',
                 arch=dict(embed_dims=D, num_layers=3, num_heads=2,
                           mlp_ratio=2),
                 img_size=56, num_register_tokens=2, out_indices=(1, 2),
                 trainable='frozen', adapters=[adapter]))


@pytest.mark.parametrize('with_text', [True, False])
def test_runs_as_post_block_adapter_in_dinov2(with_text):
    backbone = _dinov2().train()
    x = torch.randn(2, 3, 56, 70, generator=_gen(13))  # 4 x 5 patches
    out = backbone.forward_features(x, text=_text() if with_text else None)
    assert [tuple(f.shape) for f in out.feats] == [(2, D, 4, 5)] * 2
    assert sorted(out.routing) == [0, 1, 2]
    assert all(r.shape == (2, N, E) for r in out.routing.values())
    loss = out.aux_losses['loss_moe_balance']
    assert loss.ndim == 0 and torch.isfinite(loss)
    (sum(f.sum() for f in out.feats) + loss).backward()
    grads = {n for n, p in backbone.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith('adapters.') for n in grads)
    assert 'adapters.0.experts.tokens_b' in grads
    text_parts = {n for n in grads if 'second' in n}
    assert bool(text_parts) == with_text


def test_tied_parts_in_dinov2_state_dict_and_copies():
    # an adapter alone keeps its own parts and says so
    with pytest.warns(UserWarning, match='tie_shared_parts'):
        _adapter(shared_out=True)(torch.randn(1, 12, D), hw=(3, 4))
    # the backbone's slots tie them when built
    backbone = _dinov2(shared_out=True)
    adapters = [backbone.adapters[str(i)] for i in range(3)]
    shared = adapters[0].shared_parts
    assert all(a.shared_parts is shared for a in adapters)
    assert [a.owns_shared for a in adapters] == [True, False, False]
    assert tie_shared_parts(backbone) is shared  # idempotent
    keys = [k for k in backbone.state_dict() if '.shared.' in k]
    assert keys and all(k.startswith('adapters.0.shared.') for k in keys)
    n_shared = sum(p.numel() for p in shared.parameters())
    per_layer = sum(p.numel() for n, p in adapters[1].named_parameters())
    total = sum(p.numel() for n, p in backbone.named_parameters()
                if n.startswith('adapters.'))
    assert total == 3 * per_layer + n_shared
    # one gradient for the shared parts, from every block
    x, text = torch.randn(2, 3, 56, 70, generator=_gen(14)), _text()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # tied: no warning
        feats = backbone(x, text)
    sum(f.sum() for f in feats).backward()
    assert shared.out_proj.weight.grad is not None
    # a state dict round trip into a fresh tied model, and a deep copy
    backbone.eval()
    want = backbone(x, text)
    fresh = _dinov2(shared_out=True)
    fresh.load_state_dict(backbone.state_dict(), strict=True)
    twin = copy.deepcopy(backbone)
    twin_adapters = [twin.adapters[str(i)] for i in range(3)]
    assert all(a.shared_parts is twin_adapters[0].shared_parts
               for a in twin_adapters)
    assert twin_adapters[0].shared_parts is not shared
    for model in (fresh.eval(), twin):
        for a, b in zip(model(x, text), want):
            torch.testing.assert_close(a, b)


def test_tie_refuses_different_shared_parts():
    group = nn.ModuleList([
        _adapter(shared_out=True),
        _adapter(shared_out=True, text_dims=CT + 2)
    ])
    with pytest.raises(ValueError, match='different shared parts'):
        tie_shared_parts(group)
    # per-layer adapters are left alone
    assert tie_shared_parts(nn.ModuleList([_adapter()])) is None


# --------------------------------------------------------------------------
# parameter counts (PEERS.md 5.2, 5.4), ViT-B: D = 768, 12 blocks
# --------------------------------------------------------------------------
EXPERTS_B = 6 * (100 * 16 + 16 * 768)  # 83,328 per layer
ROUTER_B = 2 * 768 * 6  # gate + noise, 9,216
SHARED_B = 2 * (768 * 768 + 768) + 1  # W_tf, W_df, s: 1,181,185
TEXT_PROJ_B = 512 * 768 + 768  # 393,984
QUERY_LINK_B = 2 * (768 * 256 + 256)  # Linear D->256, Linear 768->256


def _count_blocks(blocks: int, **kw) -> int:
    group = nn.ModuleList(
        SpectralMoEAdapter(768, **kw) for _ in range(blocks))
    tie_shared_parts(group)
    return sum(p.numel() for p in group.parameters())


def test_parameter_counts_vit_b():
    released = _count_blocks(12, released_compat=True)
    assert released == 12 * (EXPERTS_B + 2 * ROUTER_B) + SHARED_B
    assert released == 2_402_305
    # PEERS 5.2's 2,796,033 ("the same module on ViT-B") includes Rein's
    # query link, which is not built here (irrelevant for RIS)
    assert released + QUERY_LINK_B == 2_796_033
    visual = _count_blocks(12, fusion='none', shared_out=True)
    assert visual == 2_291_713
    text = _count_blocks(12, shared_out=True)
    assert text == released + TEXT_PROJ_B == 2_796_289
    # the two totals of PEERS differ by the biases only: both extra parts
    # have 393,216 weights (512 x 768 = 2 x 768 x 256); the text projection
    # has 768 biases, the query link 2 x 256
    assert text - (released + QUERY_LINK_B) == 768 - 2 * 256 == 256
    # six blocks: 1,736,449 visual-only; PEERS 5.4's 1,791,745 has both
    # routers (6 x 9,216 more)
    assert _count_blocks(6, fusion='none', shared_out=True) == 1_736_449
    assert _count_blocks(6, released_compat=True) == 1_791_745
    # our default keeps W_tf, W_df, s and the text projection per layer
    per_layer = _count_blocks(12)
    assert per_layer == 12 * (EXPERTS_B + 2 * ROUTER_B + SHARED_B +
                              TEXT_PROJ_B) == 20_123_148
