"""Several processes under torch's own launcher: ``torchrun --nproc_per_node N $(which tempflow) rollout ...``.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process's environment; without it a
stage is one process (rank 0 of 1) and nothing here imports ``torch.distributed``. A stage that
shards its work asks :func:`join` for its :class:`Ranks` (which starts the process group: gloo on
the CPU, nccl on GPUs), takes its share with :meth:`Ranks.share`, and writes its output through
:func:`stages.support.outputs.shared_output`: rank 0 holds the one output slot and renames it into place after every rank
has written into it, so no two processes race with temporaries of their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

from stages.support.errors import TempflowError

# torch.distributed is imported only when several processes run, for start-up time.

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's items: every ``world``-th, from its own index (round robin, order kept)."""
        return items[self.rank::self.world]


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise TempflowError(f"environment variable {name}={text!r} is not an integer (is this torchrun's?)") from None


def ranks() -> Ranks:
    """This process's place, from torchrun's environment; rank 0 of 1 without it."""
    world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise TempflowError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not describe a process of a group")
    return Ranks(rank, world, local)


def rank_device(device: str) -> str:
    """``cuda`` means this rank's own GPU (``cuda:LOCAL_RANK``) when several processes run."""
    here = ranks()
    return f"cuda:{here.local_rank}" if device == "cuda" and here.world > 1 else device


def join(device: str = "cpu") -> Ranks:
    """:func:`ranks`, with the process group started when there are several (once per process)."""
    here = ranks()
    if here.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return here


def broadcast(obj: T, here: Ranks) -> T:
    """Rank 0's ``obj`` on every rank (any picklable value; the others' are ignored)."""
    if here.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, here: Ranks) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank; also a barrier."""
    if here.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * here.world
    dist.all_gather_object(out, obj)
    return out
