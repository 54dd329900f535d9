"""Distributed setup under torchrun, and the few collective helpers recipes need.

The same command runs on one process or many: `setup()` reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK), picks the device (cuda:LOCAL_RANK, else cpu) and opens the process group (NCCL on GPUs, gloo on
CPUs). `wrap_model` applies data parallelism from outside the model:
  ddp   DistributedDataParallel: every rank holds the whole model; gradients are all-reduced (averaged).
  fsdp  FSDP2's `fully_shard` per transformer block and at the root: parameters, gradients and optimizer state
        are sharded across ranks (ZeRO-3). It works on CPU with gloo, unlike the older FSDP wrapper.
Both average gradients over ranks; training/step.py's loss_scale compensates so the loss is the mean over
all target tokens of the global batch.

Checkpoints are written as full (unsharded) state on rank 0 by `full_model_state` and
`full_optimizer_state`, with optimizer state keyed by parameter name (torch.distributed.checkpoint's
state_dict API), so a checkpoint resumes under any world size and either mode.

Multi-node: run torchrun on every node with the same rendezvous, e.g. on 2 nodes of 8 GPUs:
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 --rdzv_id run1 \\
      -m lmforge.cli pretrain --data data/default --preset small --out runs/big
(`lmforge` itself can be given to torchrun by its path: torchrun ... $(which lmforge) pretrain ...)
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError


@dataclass
class Runtime:
    """Where this process runs: its rank among world_size processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: Any  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"--train.device {pref}: CUDA is not available here; use --train.device cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto") -> Runtime:
    """Read torchrun's environment, pick the device, and open the process group when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return Runtime(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, rt: Runtime, mode: str = "ddp") -> torch.nn.Module:
    """Apply DDP or FSDP2 to `model` (already on rt.device); unchanged when running on one process."""
    if not rt.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(rt.device.type, (rt.world_size,))
        for block in unwrap(model).model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise LmforgeError(f"unknown parallel mode {mode!r}; use ddp or fsdp")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so the module is itself)."""
    return getattr(model, "module", model)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when parameters are FSDP2 DTensor shards (the output matrix is not whole outside forward)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum a few floats over ranks (float64 on the wire); identity on one process."""
    if not rt.distributed:
        return list(values)

    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, rt: Runtime) -> Any:
    """rank 0's `obj` on every rank."""
    if not rt.distributed:
        return obj

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole state dict on CPU (on rank 0 when sharded; other ranks may get an empty dict). Collective."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, unsharded, on CPU. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what full_optimizer_state saved (every rank passes the full dict), under any parallel mode."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
