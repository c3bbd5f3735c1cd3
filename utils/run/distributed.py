"""Data-parallel runs under ``torchrun``: process group, rank helpers, shards, all-reduce.

``python train_blend.py ...`` runs in one process as always (every helper here is then a no-op).
``torchrun --nproc_per_node N train_blend.py ...`` starts N processes; ``init`` (called once by the
entry script's run function) sees ``WORLD_SIZE > 1`` and joins the process group: NCCL on CUDA
(each rank on ``cuda:LOCAL_RANK``), gloo otherwise (CPU). Then

- ``--bs`` stays the *global* batch size: each rank trains on ``bs / N`` images per step, so the
  optimisation (lr, steps per epoch) is the same as in one process (``--bs`` must divide by N);
- every epoch all ranks draw the same seeded permutation of the training set (the order is taken
  from rank 0) and rank r takes positions r, r+N, r+2N, ... of it, padded by wrapping around so
  every rank runs the same number of steps (DDP needs that);
- gradients are averaged by ``DistributedDataParallel``; BatchNorm statistics are per rank (there
  is no SyncBatchNorm on CPU), and ``sync_buffers`` copies rank 0's running statistics to every
  rank before an evaluation, so all ranks evaluate the same model;
- evaluation counts and training loss/accuracy are summed over ranks (``all_reduce_sum``); fixed-order
  passes (robust accuracy, the target estimate, training-set logits) give each rank every N-th batch
  (``owns_batch``) and sum the results;
- only rank 0 writes files (``is_main``; ``RunDir`` and ``save_checkpoint`` check it) and prints;
- a run drops its DDP wrapper before ``finish`` (see there).
"""
from __future__ import annotations

import builtins
import gc
import os
import warnings
import weakref

import torch
import torch.distributed as dist

from utils.run.errors import UserError
from utils.run.progress import n_batches


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when started by torchrun (or any launcher setting WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the process group when launched with WORLD_SIZE > 1; returns this rank's device.

    Idempotent; on a single process it only returns ``device``.
    """
    if not launched():
        return device
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; "
                                "use --nproc_per_node <= the number of GPUs")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            backend = "nccl"
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise UserError(f"multi-process runs support cuda and cpu devices, not {device.type}; run one process")
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
        if not is_main():
            _quiet_print()
    elif device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


_WRAPPERS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # the DDP wrappers ``wrap`` made, while alive


def finish() -> None:
    """Leave the process group at the end of a run.

    A DDP wrapper holds the group and sits in a reference cycle, so dropping its last name does not free it. Left to
    the interpreter's exit, the group's gloo threads are torn down during finalisation and the process aborts
    ("terminate called without an active exception": 2 of 20 two-process runs here, and once in CI). So the caller
    drops its wrappers first and this collects them while the interpreter is whole; one still referenced is
    reported, not raised, because the other ranks are waiting in the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        alive = len(_WRAPPERS)
        dist.barrier()
        dist.destroy_process_group()
        if alive:
            warnings.warn(f"{alive} DistributedDataParallel wrapper(s) still referenced when the process group was "
                          "destroyed: the process may abort at exit; drop them before dist.finish()", stacklevel=2)


def _quiet_print() -> None:
    """Non-main ranks print nothing (``print(..., force=True)`` still does); errors still reach stderr."""
    original = builtins.print

    def print_main_only(*args, force: bool = False, **kwargs):
        if force:
            original(*args, **kwargs)

    builtins.print = print_main_only


def local_batch_size(batch_size: int) -> int:
    n = world_size()
    if batch_size % n:
        raise UserError(f"--bs {batch_size} is the global batch size and must divide by the {n} processes; "
                        f"use a multiple of {n}")
    return batch_size // n


def epoch_shard(n: int, generator: torch.Generator) -> torch.Tensor:
    """This rank's dataset indices for one shuffled epoch: the same seeded permutation on every rank
    (rank 0's draw, broadcast), padded by wrap-around to a multiple of the world size, then strided."""
    world = world_size()
    perm = torch.randperm(n, generator=generator)
    if world == 1:
        return perm
    perm = broadcast(perm)
    pad = (-n) % world
    if pad:
        perm = torch.cat([perm, perm[:pad]])
    return perm[rank()::world]


def eval_shard(n: int) -> torch.Tensor | None:
    """This rank's test indices (contiguous blocks, no padding: counts are summed); None on one process."""
    world = world_size()
    if world == 1:
        return None
    bounds = [n * r // world for r in range(world + 1)]
    return torch.arange(bounds[rank()], bounds[rank() + 1])


def owns_batch(b: int) -> bool:
    """Whether this rank computes batch ``b`` of a fixed-order pass (round robin; always True on one process).

    Robust accuracy, the target estimate and the training-set logits split their batches this way: every
    batch keeps the composition it has in one process, so the summed result equals the one-process one.
    """
    return b % world_size() == rank()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world_size() == 1:
        return t
    buf = t.detach().clone().to(_comm_device())
    dist.broadcast(buf, src)
    return buf.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (a copy; the input is untouched). Identity on one process."""
    if world_size() == 1:
        return t
    buf = t.detach().clone().to(_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of all ranks (e.g. a pending signal number, so every rank stops at the same batch)."""
    if world_size() == 1:
        return value
    buf = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return int(buf.item())


def mean_over_ranks(values: dict) -> dict:
    """Average a dict of floats over ranks (every rank contributes the same number of samples)."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    t = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def sync_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if world_size() == 1:
        return
    for b in model.buffers():
        b.data.copy_(broadcast(b.data))


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` under torchrun, else ``model``."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    _WRAPPERS.add(ddp)
    return ddp


class Batches:
    """One pass of batches (a generator) that also knows how many batches it holds, so a bar shows a total."""

    def __init__(self, batches, count: int):
        self._batches, self._count = batches, count

    def __iter__(self):
        return iter(self._batches)

    def __len__(self) -> int:
        return self._count


def epoch_batches(data, batch_size: int, generator: torch.Generator, augment=None,
                  indices: torch.Tensor | None = None) -> Batches:
    """One shuffled training epoch of ``data`` (anything with ``batches``), or of its ``indices``; this rank's share.

    One process: ``data.batches(batch_size, shuffle=True, ...)`` exactly as before. Under torchrun:
    the global permutation is sharded (``epoch_shard``) and each rank yields ``batch_size / N`` batches.
    """
    extra = {"augment": augment} if augment is not None else {}  # ImageSet.batches has no augment argument
    if world_size() == 1:
        n = len(data) if indices is None else len(indices)
        return Batches(data.batches(batch_size, shuffle=True, generator=generator, indices=indices, **extra),
                       n_batches(n, batch_size))
    idx = epoch_shard(len(data) if indices is None else len(indices), generator)
    if indices is not None:
        idx = indices[idx.to(indices.device)]
    local = local_batch_size(batch_size)
    return Batches(data.batches(local, shuffle=False, indices=idx, **extra), n_batches(len(idx), local))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a DDP wrapper (what PGD attacks and checkpoints hold), else ``model``."""
    return getattr(model, "module", model)
