"""torchrun / DDP plumbing shared by the trainer and the bank builder."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "init_distributed", "barrier", "broadcast_object", "gather_objects", "block_of"]


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain ``python`` launch is a world of one.

    One process per GPU with NCCL when CUDA is available, gloo on CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and local >= torch.cuda.device_count():
        raise SystemExit(f"process with LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPU(s): "
                         "start at most one process per GPU (--nproc-per-node), or hide the GPUs "
                         "(CUDA_VISIBLE_DEVICES=) to run CPU processes over gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, device)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a stop request seen by one process)."""
    if not _active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def block_of(n: int, world: World) -> range:
    """This rank's contiguous block of ``n`` items: rank r of W gets [r n // W, (r + 1) n // W), so the blocks
    tile 0..n-1 in order and differ in length by at most one (evaluation shards: a batch of consecutive
    images keeps per-image Philox offsets consecutive)."""
    return range(n * world.rank // world.size, n * (world.rank + 1) // world.size)
