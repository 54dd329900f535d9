"""The preference losses of stage 2, as pure functions of tensors (no model, no data), tested against hand-computed
values.

- `token_logps`: log p(target) per position, computed from fp32 log-softmax (bf16 logits lose the small
  differences DPO depends on).
- `sequence_logps`: log p(response | prompt) per sequence, summed (DPO) or averaged over tokens (IPO).
- `dpo_loss`: Direct Preference Optimization (Rafailov et al. 2023, eq. 7), the sigmoid loss with optional label
  smoothing (conservative DPO), and IPO (Azar et al. 2023, eq. 17) as an option; returns per-pair losses and the
  implicit rewards beta * (log pi - log pi_ref) that the log reports.
- `kto_loss`: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, eq. 8) on unpaired desirable/undesirable
  completions, with the reference point z0 = KL(pi || pi_ref) estimated, as TRL's KTOTrainer does, from
  mismatched prompt/completion pairs of the same batch, clamped at 0 and not differentiated.

SFT's objective is not here: it is next-token cross-entropy on the assistant tokens, the same arithmetic as
pretraining's, so it is training/step.py's `lm_loss_sum` (fused, never holding the batch's logits) on targets
whose untrained positions are IGNORE_INDEX (data/sft.py's collate), scaled by `loss_scale`: 1 / (trainable tokens
in the whole optimizer step), so every assistant token weighs the same however the step is split into
micro-batches (per-micro-batch means would make examples in short micro-batches count more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits: logits [B, T, V], targets [B, T] -> [B, T] (fp32). Ignored targets may be any id."""
    B, T, V = logits.shape
    safe = targets.clamp(0, V - 1)  # masked positions may hold -100 or a pad id; their value is masked later
    # cross_entropy runs log-softmax in one fused kernel without materialising [B, T, V] log-probs twice
    return -F.cross_entropy(logits.float().reshape(B * T, V), safe.reshape(B * T), reduction="none").view(B, T)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability of the masked targets: [B]. average=True divides by each row's token count."""
    lp = token_logps(logits, targets)
    m = mask.to(lp.dtype)
    total = (lp * m).sum(-1)
    if average:
        return total / m.sum(-1).clamp(min=1)
    return total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses [B] and implicit rewards (chosen [B], rejected [B]).

    Inputs are sequence log-probs [B] of the chosen and rejected responses under the policy and the frozen
    reference. With h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
      sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing; 0 is plain DPO)
      ipo:     (h - 1 / (2 beta))^2      (give it token-averaged log-probs, as the IPO paper's practice does)
    """
    if beta <= 0:
        raise LmforgeError(f"DPO beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise LmforgeError(f"DPO label smoothing must be in [0, 0.5), got {label_smoothing}")
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise LmforgeError(f"unknown DPO loss {loss_type!r}; choose one of: {', '.join(DPO_LOSS_TYPES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def preference_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Mean chosen/rejected reward, their margin, and preference accuracy (share of pairs with chosen > rejected)."""
    return {"reward_chosen": float(chosen_rewards.mean()), "reward_rejected": float(rejected_rewards.mean()),
            "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
            "pref_accuracy": float((chosen_rewards > rejected_rewards).float().mean())}


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, policy_kl: torch.Tensor,
             reference_kl: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses [B], implicit rewards beta * (log pi - log ref) [B], and the KL estimate z0 (scalar).

    policy, reference: sequence log-probs [B] of each completion given its prompt; desirable: bool [B];
    policy_kl, reference_kl: sequence log-probs [M] of mismatched (prompt, another completion) pairs. With
    r = log pi(y|x) - log ref(y|x) and z0 = max(0, mean(policy_kl - reference_kl)), detached:
      desirable    lambda_D * (1 - sigmoid(beta * (r - z0)))
      undesirable  lambda_U * (1 - sigmoid(beta * (z0 - r)))
    (the paper's lambda_y - v(x, y), less the constant lambda_y * 0 it leaves out, as TRL writes it).
    """
    if beta <= 0:
        raise LmforgeError(f"KTO beta must be positive, got {beta}")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise LmforgeError("KTO's desirable and undesirable weights must be positive")
    z0 = (policy_kl - reference_kl).mean().clamp(min=0).detach()
    r = policy - reference
    value = torch.where(desirable, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))
    weight = torch.where(desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    return weight * (1 - value), beta * r.detach(), z0


def kto_stats(rewards: torch.Tensor, desirable: torch.Tensor) -> dict[str, float]:
    """Mean reward of desirable and of undesirable completions and their margin (NaN-free: absent kinds count 0)."""
    d = rewards[desirable]
    u = rewards[~desirable]
    rd = float(d.mean()) if d.numel() else 0.0
    ru = float(u.mean()) if u.numel() else 0.0
    return {"reward_desirable": rd, "reward_undesirable": ru, "reward_margin": rd - ru}
