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
