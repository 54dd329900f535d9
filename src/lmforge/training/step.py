"""The arithmetic of one optimizer step, shared by every recipe: the loss, its normalisation under gradient
accumulation and data parallelism, and gradient clipping.

Normalisation. A step averages the loss over every target token it sees, across all micro-batches and all
ranks. Micro-batches can hold different numbers of targets (SFT masks prompts; padding), so averaging each
micro-batch's mean would weight tokens unequally. Instead each micro-batch contributes its *sum* of token
losses times `loss_scale(total_targets, world_size)`, where total_targets counts targets over all
micro-batches of the step on all ranks. DDP and FSDP average gradients over ranks, so the factor world_size
undoes that average; the result equals one big batch's mean loss exactly (up to float summation order).

The loss itself: `lm_loss_sum` runs the model to its final hidden states and computes cross-entropy with
`linear_cross_entropy`, which never materialises the [tokens, vocab] logits of the whole batch: it works in
chunks of tokens and computes the gradients of the hidden states and of the output matrix during the forward
pass (the gradient of a summed cross-entropy is softmax - onehot), so backward is two scalings. That saves the
fp32 logits, their softmax and their gradient (three [N, V] fp32 tensors) — most of the memory traffic of the
loss on a CPU and most of its memory on a GPU. With FSDP the output matrix is sharded outside the model's
forward, so `fused=False` takes the plain path (logits from the model, then F.cross_entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.data import IGNORE_INDEX
from lmforge.model import cpu_kernels

DEFAULT_CHUNK = 512  # tokens per chunk of the fused loss: [512, V] fp32 log-probs at a time (fastest on CPU)
GPU_CHUNK_BYTES = 2**28  # on a GPU, chunks of up to 256 MB of fp32 log-probs: few launches, no host syncs


def chunk_size(device_type: str, vocab: int) -> int:
    """Tokens per chunk of the fused loss: DEFAULT_CHUNK on CPU (cache-sized), larger on accelerators (each chunk
    is a few kernel launches; bigger chunks keep the GPU busy)."""
    if device_type == "cpu":
        return DEFAULT_CHUNK
    return max(DEFAULT_CHUNK, GPU_CHUNK_BYTES // (4 * vocab))


def count_targets(targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of target positions that count towards the loss."""
    return int((targets != ignore_index).sum())


def loss_scale(total_targets: int, world_size: int = 1) -> float:
    """Factor turning a micro-batch's summed token loss into its share of the step's mean loss.

    total_targets: targets in ALL micro-batches of the step on ALL ranks. world_size compensates for the
    gradient averaging of DDP/FSDP. Summing scale * loss_sum over micro-batches (and ranks, as DDP's mean times
    world_size) gives sum(token losses) / total_targets.
    """
    if total_targets <= 0:
        raise ValueError("a step needs at least one target token (every label is ignore_index)")
    return world_size / total_targets


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed token cross-entropy of logits [..., V] against targets [...], in fp32."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                           reduction="sum")


def _fused_kernel(h: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether lmforge's CPU kernel computes each chunk's loss and gradient (float32 or bfloat16 on a CPU that
    has it): one pass over the logits in place of log_softmax, exp, the one-hot subtraction and the cast."""
    return (h.device.type == "cpu" and h.dtype == w.dtype and h.dtype in (torch.float32, torch.bfloat16)
            and cpu_kernels.available())


def _kernel_chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, want_grad: bool):
    """(summed loss, gradient of the logits) of a chunk, in one pass over its logits (model/cpu_kernels.cpp),
    which it overwrites with the gradient."""
    return cpu_kernels.xent_grad_(logits, targets, ignore_index).sum(), logits


def _torch_chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, want_grad: bool):
    """(summed loss, gradient of the logits in their dtype, or None unless want_grad) of a chunk, in torch ops."""
    valid = targets != ignore_index
    # on CPU, skipping the masking when every target counts is cheaper than the check; on a GPU the check would
    # stall the stream (a host sync per chunk), so the chunk is always masked
    all_valid = bool(valid.all()) if logits.device.type == "cpu" else False
    safe = targets if all_valid else targets.masked_fill(~valid, 0)
    # log-softmax straight from the compute-dtype logits: one read, one fp32 write
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # c V
    picked = logp.gather(1, safe[:, None]).squeeze(1)
    loss = -(picked.sum() if all_valid else (picked * valid).sum())
    if not want_grad:
        return loss, None
    g = logp.exp_()  # softmax, in place
    g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
    if not all_valid:
        g.mul_(valid[:, None])
    return loss, g.to(logits.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), chunked, with gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk, compute_dtype):
        n = hidden.shape[0]
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = None  # fp32: the first chunk's product converted, the others' added to it (no zeros to fill)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_loss = _kernel_chunk if _fused_kernel(h, w) else _torch_chunk
        for s in range(0, n, chunk):
            hc = h[s:s + chunk]
            loss, g = chunk_loss(hc @ w.t(), targets[s:s + chunk], ignore_index, want_h or want_w)
            total += loss
            if want_h:
                grad_h[s:s + chunk] = g @ w
            if want_w:
                grad_w = (g.t() @ hc).float() if grad_w is None else grad_w.add_(g.t() @ hc)
        if want_w and grad_w is None:  # no tokens
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # the gradients were computed in forward: scaled here in place (a [V, C] weight's is tens of MB); a second
        # backward through a retained graph finds them modified and raises (autograd checks saved tensors' versions)
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h.mul_(grad_out).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of (hidden [..., C] @ weight [V, C].T) against targets [...], fp32 scalar.

    Equal to cross_entropy_sum(hidden @ weight.T, targets) (tested), but chunked over tokens (`chunk`, default
    `chunk_size` for the device). Under autocast the matmuls run in the autocast dtype, the softmax in fp32, as
    autocast would do them.
    """
    dev = hidden.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    chunk = chunk or chunk_size(dev, weight.shape[0])
    with torch.autocast(dev, enabled=False):
        return LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten(), ignore_index, chunk, compute)


def lm_loss_sum(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                ignore_index: int = IGNORE_INDEX, fused: bool = True, output_weight: torch.Tensor | None = None,
                **forward_kwargs) -> torch.Tensor:
    """Summed next-token cross-entropy of a causal LM on inputs [B, T] against targets [B, T].

    fused: use linear_cross_entropy on the model's final hidden states (pass `output_weight`, the lm_head
    matrix, when `model` is a wrapper such as DDP). fused=False: full logits, then F.cross_entropy.
    """
    if not fused:
        return cross_entropy_sum(model(inputs, **forward_kwargs), targets, ignore_index)
    hidden = model(inputs, return_hidden=True, **forward_kwargs)
    weight = output_weight if output_weight is not None else model.lm_head.weight
    return linear_cross_entropy(hidden, weight, targets, ignore_index)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (no clipping if max_norm <= 0); returns the norm before clipping.

    Works for plain, DDP and FSDP2 models (torch computes the norm over sharded DTensor gradients).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
