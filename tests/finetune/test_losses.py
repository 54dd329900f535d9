"""The stage-2 loss functions against values computed by hand."""

import math

import pytest
import torch

from lmforge.data import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.finetune.losses import dpo_loss, preference_stats, sequence_logps, token_logps
from lmforge.training.step import count_targets, cross_entropy_sum


def test_token_logps_and_sft_masked_nll_by_hand():
    # vocabulary of 2; logits (0, log 3) -> p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, 0.0]]])
    targets = torch.tensor([[0, 1, -100]])
    lp = token_logps(logits, targets)
    assert torch.allclose(lp[0, :2], torch.tensor([math.log(1 / 4), math.log(3 / 4)]))
    # SFT's objective: the summed cross-entropy over targets that are not IGNORE_INDEX (training/step.py), and
    # the count of those targets that the step's scale divides by
    total, n = cross_entropy_sum(logits, targets), count_targets(targets)
    assert n == 2 and math.isclose(total.item(), math.log(4) + math.log(4 / 3), rel_tol=1e-6)
    masked = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    total, n = cross_entropy_sum(logits, masked), count_targets(masked)
    assert n == 1 and math.isclose(total.item(), math.log(4 / 3), rel_tol=1e-6)


def test_sequence_logps_sum_and_average():
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    targets = torch.tensor([[1, 1]])
    mask = torch.tensor([[True, True]])
    s = sequence_logps(logits, targets, mask)
    a = sequence_logps(logits, targets, mask, average=True)
    assert math.isclose(s.item(), 2 * math.log(0.75), rel_tol=1e-6)
    assert math.isclose(a.item(), math.log(0.75), rel_tol=1e-6)


def test_dpo_sigmoid_by_hand():
    # h = (-1 - -2) - (-1.5 - -1.5) = 1; loss = -log sigmoid(0.1) = log(1 + e^-0.1)
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-1.0, -2.0, -1.5, -1.5))
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-0.1)), rel_tol=1e-6)
    assert math.isclose(cr.item(), 0.05, rel_tol=1e-5) and math.isclose(rj.item(), -0.05, rel_tol=1e-5)
    # label smoothing 0.2: 0.8 * log(1 + e^-0.1) + 0.2 * log(1 + e^0.1)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    want = 0.8 * math.log(1 + math.exp(-0.1)) + 0.2 * math.log(1 + math.exp(0.1))
    assert math.isclose(loss.item(), want, rel_tol=1e-6)
    # equal policy and reference: loss log 2 and zero rewards
    loss, cr, rj = dpo_loss(rc, rr, rc, rr, beta=0.5)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and cr.item() == 0 and rj.item() == 0


def test_ipo_by_hand_and_gradient_sign():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert math.isclose(loss.item(), (1 - 5) ** 2, rel_tol=1e-6)  # (h - 1/(2 beta))^2, h = 1
    loss.sum().backward()
    assert pc.grad.item() < 0  # below the IPO target margin: raise the chosen log-prob


def test_preference_stats_and_errors():
    s = preference_stats(torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.2]))
    assert s["pref_accuracy"] == 0.5 and math.isclose(s["reward_margin"], (0.2 - 0.3) / 2, abs_tol=1e-6)
    with pytest.raises(LmforgeError, match="unknown DPO loss"):
        dpo_loss(*(torch.zeros(1),) * 4, loss_type="hinge2")
    with pytest.raises(LmforgeError, match="beta"):
        dpo_loss(*(torch.zeros(1),) * 4, beta=0)


def test_kto_loss_by_hand():
    from lmforge.finetune.losses import kto_loss, kto_stats

    pol = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -3.0])
    good = torch.tensor([True, False, True])
    pol_kl, ref_kl = torch.tensor([-4.0, -5.0]), torch.tensor([-4.5, -4.5])  # mean difference 0: z0 = 0
    losses, rewards, z0 = kto_loss(pol, ref, good, pol_kl, ref_kl, beta=2.0, desirable_weight=1.0,
                                   undesirable_weight=3.0)
    assert float(z0) == 0.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [1 - sig(2.0 * 0.5), 3.0 * (1 - sig(2.0 * (0 - -1.0))), 1 - sig(0.0)]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    assert rewards.tolist() == pytest.approx([1.0, -2.0, 0.0])
    losses.sum().backward()
    assert pol.grad[0] < 0 and pol.grad[1] > 0  # raise desirable log-probs, lower undesirable ones
    # z0 is the clamped mean KL estimate, a constant: it shifts the value, never takes gradient
    kl_pol = torch.tensor([0.0, 1.0], requires_grad=True)
    losses, _, z0 = kto_loss(pol.detach(), ref, good, kl_pol, torch.tensor([-1.0, 0.0]), beta=1.0)
    assert float(z0) == 1.0
    assert losses[0].item() == pytest.approx(1 - sig(0.5 - 1.0))
    assert not losses.requires_grad
    _, _, z0 = kto_loss(pol, ref, good, torch.tensor([-9.0]), torch.tensor([-1.0]))
    assert float(z0) == 0.0  # clamped at 0
    assert kto_stats(torch.tensor([1.0, -2.0, 0.0]), good) == {"reward_desirable": 0.5, "reward_undesirable": -2.0,
                                                               "reward_margin": 2.5}
    with pytest.raises(LmforgeError):
        kto_loss(pol, ref, good, pol_kl, ref_kl, beta=0.0)
