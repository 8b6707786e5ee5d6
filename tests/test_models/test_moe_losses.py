"""The MoE auxiliary losses against values computed by hand."""
import pytest
import torch

from mmseg_sera.models.moe.losses import (balance_loss, cv_squared,
                                          token_assignment_loss, z_loss)


def test_z_loss_hand_value():
    # squares 1 + 4 + 0 + 9 + 0 + 1 = 15 over B E = 6 -> 2.5
    logits = torch.tensor([[1., -2., 0.], [3., 0., -1.]])
    assert z_loss(logits).item() == pytest.approx(2.5)
    # leading dims are flattened: same value as B x N x E
    assert z_loss(logits.view(1, 2, 3)).item() == pytest.approx(2.5)


def test_z_loss_gradient_is_2r_over_n():
    logits = torch.tensor([[1., -2.], [0.5, 4.]], requires_grad=True)
    z_loss(logits).backward()
    # d/dr mean(r^2) = 2 r / 4
    torch.testing.assert_close(logits.grad, logits.detach() / 2)


def test_cv_squared_hand_value():
    # mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5, CV^2 = 3.5 / 9
    x = torch.tensor([1., 2., 3., 6.])
    assert cv_squared(x).item() == pytest.approx(7 / 18, rel=1e-6)


def test_cv_squared_edge_cases():
    assert cv_squared(torch.tensor([5.])).item() == 0.0
    assert cv_squared(torch.tensor([2., 2., 2.])).item() == 0.0
    # all zero: eps keeps it finite
    assert cv_squared(torch.zeros(4)).item() == 0.0
    with pytest.raises(ValueError, match='1-D'):
        cv_squared(torch.ones(2, 2))


def test_balance_loss_hand_value():
    # importance u = [0.5, 1.5, 0], mean 2/3, var 7/18, CV^2 = 7/18 / (4/9)
    w = torch.tensor([[0.5, 0.5, 0.], [0., 1., 0.]])
    assert balance_loss(w).item() == pytest.approx(0.875, rel=1e-6)


def test_token_assignment_loss_hand_value():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3],
                          [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    indices = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 0]])
    # f = [2, 1, 1] / 4, P = [1.5, 1.25, 1.25] / 4
    # 3 * (0.5 * 0.375 + 0.25 * 0.3125 + 0.25 * 0.3125) = 1.03125
    assert token_assignment_loss(probs, indices).item() == pytest.approx(
        1.03125, rel=1e-6)


def test_token_assignment_loss_uniform_and_collapsed():
    E = 4
    uniform = torch.full((6, E), 1 / E)
    idx = torch.tensor([[0], [1], [1], [1], [3], [2]])
    assert token_assignment_loss(uniform, idx).item() == pytest.approx(1.0)
    collapsed = torch.zeros(5, E)
    collapsed[:, 2] = 1
    idx = torch.full((5, 1), 2)
    assert token_assignment_loss(collapsed, idx).item() == pytest.approx(E)


def test_token_assignment_loss_gradient_goes_to_probs():
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2]],
                         requires_grad=True)
    indices = torch.tensor([[0], [1], [0]])
    token_assignment_loss(probs, indices).backward()
    # dL/dp_{m,e} = E * f_e / M with f = [2/3, 1/3], E = 2, M = 3
    expected = torch.tensor([[4 / 9, 2 / 9]]).expand(3, 2)
    torch.testing.assert_close(probs.grad, expected)


def test_token_assignment_loss_bad_input():
    with pytest.raises(ValueError, match='indices'):
        token_assignment_loss(torch.ones(3, 2) / 2, torch.zeros(4, 1).long())
    # an out-of-range expert is checked on the device (no host read)
    for bad in (5, -1):
        with pytest.raises(RuntimeError, match=r'expert indices must be in'):
            token_assignment_loss(torch.ones(3, 2) / 2,
                                  torch.full((3, 1), bad))
