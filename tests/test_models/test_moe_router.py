"""NoisyTopKRouter and SoftRouter."""
import pytest
import torch

from mmseg_sera.models.moe.router import (NoisyTopKRouter, RouterOutput,
                                          SoftRouter)

D, E = 6, 5


def _check_topk(out: RouterOutput, k: int, extreme: bool = False) -> None:
    w = out.weights
    assert w.dtype == torch.float32
    assert torch.isfinite(w).all() and torch.isfinite(out.probs).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(w.shape[:-1]))
    kept = torch.gather(w, -1, out.indices)
    assert out.indices.shape[-1] == k
    srt = out.indices.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()  # K distinct experts
    outside = torch.ones_like(w, dtype=torch.bool)
    outside.scatter_(-1, out.indices, False)
    assert (w[outside] == 0).all()  # zero outside the top-K
    assert (kept[..., :-1] >= kept[..., 1:]).all()  # sorted, top-1 first
    if extreme:
        # kept logits 1e4 apart: exp(-1e4) underflows to an exact 0
        assert ((w != 0).sum(-1) >= 1).all()
    else:  # exactly K non-zero weights
        assert ((w != 0).sum(-1) == k).all() and (kept > 0).all()


@pytest.mark.parametrize('k', [1, 2, E])
def test_exactly_k_weights_summing_to_one(k):
    torch.manual_seed(0)
    router = NoisyTopKRouter(D, E, k)
    z = torch.randn(7, D)
    for mode in (router.train, router.eval):
        mode()
        out = router(z)
        assert out.weights.shape == (7, E) and out.indices.shape == (7, k)
        _check_topk(out, k)
    # any leading dims (per-token routing: B x N x D)
    out = router(torch.randn(2, 3, D))
    assert out.weights.shape == (2, 3, E) and out.indices.shape == (2, 3, k)
    _check_topk(out, k)


def test_eval_matches_hand_computed_topk_softmax():
    torch.manual_seed(1)
    router = NoisyTopKRouter(D, E, 2).eval()
    z = torch.randn(4, D)
    out = router(z)
    r = z @ router.gate.weight.t()
    torch.testing.assert_close(out.logits, r)
    for m in range(4):
        order = sorted(range(E), key=lambda e: -r[m, e].item())[:2]
        a, b = r[m, order[0]].item(), r[m, order[1]].item()
        # softmax over the two kept logits, by hand
        wa = 1 / (1 + torch.exp(torch.tensor(b - a))).item()
        assert out.indices[m].tolist() == order
        assert out.weights[m, order[0]].item() == pytest.approx(wa, rel=1e-5)
        assert out.weights[m, order[1]].item() == pytest.approx(1 - wa,
                                                                rel=1e-5)


def test_noise_only_in_training():
    torch.manual_seed(2)
    router = NoisyTopKRouter(D, E, 2)
    z = torch.randn(16, D)
    router.train()
    a, b = router(z), router(z)
    assert not torch.equal(a.noisy_logits, b.noisy_logits)
    assert not torch.equal(a.weights, b.weights)
    torch.testing.assert_close(a.logits, b.logits)  # clean logits: no noise
    router.eval()
    c, d = router(z), router(z)
    assert torch.equal(c.weights, d.weights)
    assert torch.equal(c.noisy_logits, c.logits)
    # noise=False: deterministic in training too
    quiet = NoisyTopKRouter(D, E, 2, noise=False).train()
    assert torch.equal(quiet(z).weights, quiet(z).weights)


def test_noise_std_is_softplus_plus_floor():
    torch.manual_seed(3)
    router = NoisyTopKRouter(D, E, 1, noise_floor=0.5).train()
    z = torch.randn(4000, D)
    out = router(z)
    # noise_proj starts at zero: std = softplus(0) + 0.5 = 0.6931 + 0.5
    std = (out.noisy_logits - out.logits).std().item()
    assert std == pytest.approx(0.6931 + 0.5, rel=0.05)


@pytest.mark.parametrize('training', [True, False])
def test_extreme_logits_stay_finite(training):
    torch.manual_seed(4)
    router = NoisyTopKRouter(D, E, 2)
    router.train(training)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(E, D).sign() * 1e4)
        router.noise_proj.weight.fill_(1e4)
    z = torch.randn(9, D)
    out = router(z)
    assert out.logits.abs().max() > 1e4
    _check_topk(out, 2, extreme=True)
    assert torch.isfinite(out.load).all()


@pytest.mark.parametrize('logit_fn', ['dot', 'laplace', 'gaussian'])
def test_bf16_autocast(logit_fn):
    torch.manual_seed(5)
    router = NoisyTopKRouter(D, E, 3, logit_fn=logit_fn).train()
    with torch.no_grad():
        router.gate.weight.mul_(1e5)  # logits around +-1e4 (dot)
    z = torch.randn(8, D)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = router(z)
        out16 = router(z.bfloat16())
    assert out.logits.abs().max() > 1e3
    _check_topk(out, 3, extreme=True)
    _check_topk(out16, 3, extreme=True)
    assert out.logits.dtype == torch.float32


def test_gradients_reach_gate_through_kept_softmax():
    torch.manual_seed(6)
    router = NoisyTopKRouter(D, E, 2, noise=False).train()
    z = torch.randn(1, D)
    out = router(z)
    target = torch.randn(1, E)
    (out.weights * target).sum().backward()
    grad = router.gate.weight.grad
    kept = set(out.indices[0].tolist())
    for e in range(E):
        if e in kept:
            assert grad[e].abs().sum() > 0
        else:  # dropped experts: no gradient through the kept softmax
            assert grad[e].abs().sum() == 0


def test_smooth_load_is_differentiable_in_training():
    torch.manual_seed(7)
    router = NoisyTopKRouter(D, E, 2).train()
    out = router(torch.randn(10, D))
    assert out.load.shape == (E, )
    assert ((out.load >= 0) & (out.load <= 10)).all()
    out.load.var().backward()
    assert router.noise_proj.weight.grad.abs().sum() > 0
    # eval: hard counts, K per unit
    out = router.eval()(torch.randn(10, D))
    assert out.load.sum().item() == 20
    assert out.importance.sum().item() == pytest.approx(10)


@pytest.mark.parametrize('logit_fn,power', [('laplace', 1), ('gaussian', 2)])
def test_distance_logits(logit_fn, power):
    torch.manual_seed(8)
    router = NoisyTopKRouter(D, E, 1, logit_fn=logit_fn).eval()
    z = torch.randn(3, D)
    dist = torch.cdist(z, router.gate.weight.detach())
    torch.testing.assert_close(router(z).logits, -dist**power, atol=1e-4,
                               rtol=1e-4)


def test_init_survives_parent_style_init_cfg():
    router = NoisyTopKRouter(
        D, E, 2, init_cfg=dict(type='Constant', val=3.0, layer='Linear'))
    router.init_weights()
    assert (router.noise_proj.weight == 0).all()
    assert router.gate.weight.std().item() < 0.1  # N(0, 0.02), not 3.0
    zero = NoisyTopKRouter(D, E, 2, gate_init='zeros')
    assert (zero.gate.weight == 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match='top_k'):
        NoisyTopKRouter(D, E, E + 1)
    with pytest.raises(ValueError, match='logit_fn'):
        NoisyTopKRouter(D, E, 1, logit_fn='cosine')
    with pytest.raises(ValueError, match=r'\.\.\. x 6'):
        NoisyTopKRouter(D, E, 1)(torch.randn(2, D + 1))


def test_soft_router():
    torch.manual_seed(9)
    router = SoftRouter(D, 3)
    z = torch.randn(4, D)
    out = router(z)
    expected = torch.softmax(router.gate(z), dim=-1)
    torch.testing.assert_close(out.weights, expected)
    torch.testing.assert_close(out.probs, expected)
    assert out.top_k == 3 and out.indices.shape == (4, 3)
    assert (torch.gather(out.weights, 1, out.indices[:, :1]) ==
            out.weights.max(-1, keepdim=True).values).all()
    out.weights[:, 0].sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0
