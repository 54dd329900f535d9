"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models") by module surgery from outside the model.

`apply_lora(model, targets)` swaps the named `nn.Linear` projections for `LoRALinear`, which keeps the frozen base
weight under its own name (`...q_proj.weight`, so the model's state dict and checkpoints are unchanged) and adds two
trainable factors: `lora_A` [r, in] and `lora_B` [out, r], with y = x W^T + b + (dropout(x) A^T B^T) * alpha / r.
B starts at zero (A Kaiming-uniform), so a fresh adapter leaves the model's outputs exactly as they were.

What lives here, and what does not:
- here: the wrapper, `apply_lora` (which also groups the adapters of projections reading one input, q/k/v and
  gate/up, so their down-projections run as one matmul: `SharedInput`), `merge_lora` (fold B A into W and restore
  plain nn.Linear), `lora_state_dict` / `load_lora_state_dict` in lmforge's own names
  (`model.layers.0.self_attn.q_proj.lora_A`), `lora_settings` (rank, alpha, dropout, targets), `lora_disabled(model)` (a context in which the adapters are bypassed: DPO's reference
  model is the base without the adapter, with no second copy in memory), `trainable_parameters`, and
  `lower_frozen_base` / `restore_frozen_base` (the frozen base in bf16 for training under bf16 autocast, full
  precision again for merging).
- checkpoint.py: PEFT's key names and adapter_config.json (`save_adapter`, `load_adapter`): the only module that
  knows Hugging Face names. To serve an adapter: `model = checkpoint.load_model(base)`,
  `checkpoint.load_adapter(model, adapter_dir)`, then either run it as is or `merge_lora(model)` for plain speed.

Targets are short names (q, k, v, o, gate, up, down) or the module names themselves (q_proj, ...); the default is
every attention and MLP projection, as QLoRA recommends. `split_targets` reads them as a command line gives them
(repeated flags, comma-separated lists). The embeddings and lm_head are never wrapped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import memory

# short name -> the projection's module name (HF Llama layout)
TARGET_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update. The base weight/bias are the original Parameters (shared, frozen)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        nn.Module.__init__(self)  # no fresh weight: adopt the base layer's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.use_rslora = int(rank), float(alpha), bool(use_rslora)
        # rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) so that large ranks keep learning
        self.scaling = self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.shared: SharedInput | None = None  # set by apply_lora for projections that read the same input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # a base frozen in bf16 (lower_frozen_base) outside autocast: compute in its dtype, answer in x's
            y = F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)
        else:
            y = F.linear(x, w, self.bias)
        if self.disabled:
            return y
        if self.shared is not None and not torch.compiler.is_compiling():
            # eager only: measured +5% tokens/s for LoRA SFT of preset tiny on CPU, while under torch.compile the
            # separate thin matmuls were faster (Inductor plans them better than the shared matmul's split)
            h = self.shared.down(self, x)
        else:
            if isinstance(self.lora_dropout, nn.Dropout):
                x = self.lora_dropout(x)
            h = F.linear(x, self.lora_A)
        # x [..., in] -> [..., r] -> [..., out]: the low-rank path never forms the [out, in] product, and the
        # scaling multiplies the narrow [..., r] activation rather than the [..., out] one
        return y + F.linear(h * self.scaling, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """B A * scaling, the [out, in] update that merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}")


class SharedInput:
    """The adapters of projections that read one input (q/k/v of an attention layer, gate/up of an MLP): their
    down-projections run as one matmul, x [..., in] @ [A_1; A_2; ...].T -> [..., n r], split per member, instead
    of n thin matmuls that each read x (and, in backward, n thin gradient matmuls and their sum).

    Members are called in order with the same tensor (the model's forward does that); the first computes all
    parts, the last drops them. A member called with another tensor (or alone) gets parts computed for that
    tensor, so the result is always what separate matmuls give. Only for adapters without dropout (PEFT draws an
    independent dropout mask per projection) and of one rank. A plain object, not a module: the model's
    parameters and state dict are unchanged. Used in eager mode; compiled graphs keep the separate matmuls.
    It holds per-forward state, so one model must not run forwards from two threads at once (lmforge never does).
    """

    def __init__(self, members: list[LoRALinear]):
        self.members = members
        self.x: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()

    def down(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """x @ member.lora_A.T, from the group's one matmul over x."""
        if self.x is not x:
            a = torch.cat([m.lora_A for m in self.members])  # [n r, in]
            self.parts = F.linear(x, a).split(member.rank, dim=-1)
            self.x = x
        h = self.parts[self.members.index(member)]
        if member is self.members[-1]:
            self.x, self.parts = None, ()  # no reference to the activation outlives the forward
        return h


# projections that read the same input in the model's forward (Attention: q, k, v; MLP: gate, up), in call order
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _share_inputs(model: nn.Module) -> int:
    """Group the adapters of SHARED_INPUTS siblings (all adapted, one rank, no dropout); returns the groups made."""
    groups = 0
    for parent in model.modules():
        for names in SHARED_INPUTS:
            mods = [getattr(parent, n, None) for n in names]
            present = [m for m in mods if isinstance(m, LoRALinear)]
            if len(present) < 2 or len({m.rank for m in present}) != 1 or \
                    any(isinstance(m.lora_dropout, nn.Dropout) for m in present):
                continue
            group = SharedInput(present)
            for m in present:
                m.shared = group
            groups += 1
    return groups


def split_targets(values: Iterable[str]) -> list[str]:
    """Target names as given on the command line: repeated values and comma-separated lists ("q,v"), in order."""
    return [t.strip() for value in values for t in str(value).split(",") if t.strip()]


def resolve_targets(targets: Iterable[str]) -> list[str]:
    """Module names (q_proj, ...) for short or full target names; unknown names are an error."""
    out = []
    for t in targets:
        name = TARGET_NAMES.get(t, t)
        if name not in TARGET_NAMES.values():
            raise LmforgeError(f"unknown LoRA target {t!r}; choose from {', '.join(TARGET_NAMES)} "
                               f"(or their module names {', '.join(TARGET_NAMES.values())})")
        if name not in out:
            out.append(name)
    if not out:
        raise LmforgeError("LoRA needs at least one target projection (e.g. q,v or the default q,k,v,o,gate,up,down)")
    return out


def apply_lora(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, use_rslora: bool = False, freeze_base: bool = True,
               seed: int | None = None, layers: Iterable[int] | None = None) -> list[str]:
    """Wrap every nn.Linear whose name ends in a target projection; return the wrapped module names.

    freeze_base: set requires_grad=False on every non-LoRA parameter (what LoRA training wants).
    seed: makes the A initialisation reproducible without touching the global RNG.
    layers: restrict to these layer indices (PEFT's layers_to_transform); None = all layers.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise LmforgeError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not math.isfinite(alpha) or alpha <= 0:  # NaN passes `alpha <= 0`, then poisons every output
        raise LmforgeError(f"LoRA alpha must be a finite positive number, got {alpha}")
    if not 0 <= dropout < 1:
        raise LmforgeError(f"LoRA dropout must be in [0, 1), got {dropout}")
    names = set(resolve_targets(targets))
    layer_set = None if layers is None else {int(i) for i in layers}
    chosen = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names or not isinstance(module, nn.Linear):
            continue
        if isinstance(module, LoRALinear):
            raise LmforgeError(f"{name} already has a LoRA adapter; merge it (merge_lora) before adding another")
        if layer_set is not None and _layer_index(name) not in layer_set:
            continue
        chosen.append(name)
    if not chosen:
        raise LmforgeError(f"no projection named {sorted(names)} found in the model; nothing to adapt")
    _ensure_fits(model, chosen, rank)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    g = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with g:
        if seed is not None:
            torch.manual_seed(seed)
        for name in chosen:
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout, use_rslora))
    _share_inputs(model)
    return chosen


def _ensure_fits(model: nn.Module, names: list[str], rank: int) -> None:
    """Refuse a rank whose factors cannot be allocated, before allocating (torch's own error names no cause)."""
    mods = [model.get_submodule(n) for n in names]
    w = mods[0].weight
    need = sum(rank * (m.in_features + m.out_features) for m in mods) * w.element_size()
    free = memory.available_bytes(w.device)
    if free is not None and need > free:
        raise LmforgeError(f"LoRA rank {rank} on {len(mods)} projections needs {memory.format_bytes(need)} for its "
                           f"factors, but {w.device} has {memory.format_bytes(free)} free; use a smaller rank "
                           f"(r is usually 4 to 64)")


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def lora_settings(model: nn.Module) -> dict:
    """rank, alpha, dropout, use_rslora, targets (module names) and layers of the model's adapters."""
    mods = list(lora_modules(model))
    if not mods:
        raise LmforgeError("the model has no LoRA adapters")
    first = mods[0][1]
    for name, m in mods:
        if (m.rank, m.alpha, m.use_rslora) != (first.rank, first.alpha, first.use_rslora):
            raise LmforgeError(f"{name} has a different LoRA rank/alpha than {mods[0][0]}; one adapter per model")
    p = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in mods}, key=list(TARGET_NAMES.values()).index)
    layers = sorted({i for n, _ in mods if (i := _layer_index(n)) is not None})
    return {"rank": first.rank, "alpha": first.alpha, "dropout": p, "use_rslora": first.use_rslora,
            "targets": targets, "layers": layers, "modules": [n for n, _ in mods]}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, in lmforge names: {'<module>.lora_A': [r, in], '<module>.lora_B': [out, r]}."""
    sd = {}
    for name, m in lora_modules(model):
        sd[f"{name}.lora_A"] = m.lora_A.detach()
        sd[f"{name}.lora_B"] = m.lora_B.detach()
    if not sd:
        raise LmforgeError("the model has no LoRA adapters to save")
    return sd


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter weights (lmforge names) into the model's LoRALinear modules; every key must match exactly."""
    expected = {}
    for name, m in lora_modules(model):
        expected[f"{name}.lora_A"] = m.lora_A
        expected[f"{name}.lora_B"] = m.lora_B
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise LmforgeError(f"{source} lacks {len(missing)} LoRA tensor(s) the model expects, e.g. {missing[:2]}")
    if unexpected:
        raise LmforgeError(f"{source} has {len(unexpected)} LoRA tensor(s) for modules this model does not adapt, "
                           f"e.g. {unexpected[:2]}; was it trained on another base model?")
    with torch.no_grad():
        for k, p in expected.items():
            t = state[k]
            if tuple(t.shape) != tuple(p.shape):
                raise LmforgeError(f"{source}: {k} has shape {tuple(t.shape)}, the model needs {tuple(p.shape)}; "
                                   "the adapter belongs to a different base model or rank")
            p.copy_(t.to(p.dtype))


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base: every adapter is bypassed (DPO's reference pass)."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def lower_frozen_base(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Store the frozen base weights (and biases) of every adapted projection in `dtype`; returns how many.

    Under autocast to `dtype` a matmul casts its fp32 weight to `dtype` at every call (autocast caches casts only
    of weights that train), so keeping the frozen copy in `dtype` computes exactly the same numbers without the
    per-step cast and with half the memory. The adapter factors stay fp32 (they train). Merging wants the full-
    precision weights back: `restore_frozen_base` before `merge_lora`. dtype None or fp32: nothing to do.
    """
    if dtype is None or dtype == torch.float32:
        return 0
    n = 0
    for _, m in lora_modules(model):
        for name in ("weight", "bias"):
            p = getattr(m, name)
            if p is not None and not p.requires_grad and p.dtype != dtype:
                setattr(m, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
                n += 1
    return n


def restore_frozen_base(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Put full-precision base weights (from `state`, the base model's state dict) back under every adapter
    whose base was lowered by `lower_frozen_base`; returns how many tensors were restored."""
    n = 0
    for name, m in lora_modules(model):
        for part in ("weight", "bias"):
            p, key = getattr(m, part), f"{name}.{part}"
            if p is not None and key in state and state[key].dtype != p.dtype:
                setattr(m, part, nn.Parameter(state[key].to(p.device), requires_grad=p.requires_grad))
                n += 1
    return n


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B A * alpha/r) and put plain nn.Linear layers back.

    The result is an ordinary Transformer: save_model writes it as a full Hugging Face directory.
    """
    for name, m in list(lora_modules(model)):
        parent, leaf = _parent(model, name)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        with torch.no_grad():  # in the adapter's precision (fp32), then back to the base weight's dtype
            merged = (m.weight.to(m.lora_A.dtype) + m.delta_weight()).to(m.weight.dtype)
        plain.weight = nn.Parameter(merged, requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            plain.bias = m.bias
        setattr(parent, leaf, plain)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
