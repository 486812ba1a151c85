"""Splitting a sampling stage's work across the ranks of a launched job, and merging it on rank 0.

`score`, `rollout` and `evaluate` cut their work into units whose result does not depend on which
process computes them (rollout chunks, runs of evaluation problems that fill one generation batch,
scoring batches), each seeded by the unit itself. Rank r of W takes units r, r + W, r + 2W, ...;
the results go to rank 0 with `torch.distributed.gather_object`, which puts them back in unit order
(`merge`) and writes the stage's outputs once. So 1 and W processes give the same outputs.

The exchange always runs on gloo, on the CPU, also on GPU machines: what travels is Python objects
(completion strings, a few floats per prompt), and gloo needs no device placement. The stage's own
tensors stay on the rank's GPU (`join` selects cuda:LOCAL_RANK).

With one process (`WORLD_SIZE` unset or 1: the stage runs in its flow's own process) nothing here
touches torch.distributed: `join` returns rank 0 of 1 and `gather` is a list of one.

What is not covered: a rank that finishes its units waits in `gather` for the slowest one, and rank 0
grades and writes alone after the gather.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long a rank waits in a collective for the others. Rank 0 grades between the gathers of two
# benchmarks (evaluate) while the other ranks already wait: torch's default of 30 min is too short
# for a large grading pass, and a failing rank ends the whole job anyway (torchrun stops the others).
TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that merges and writes."""
        return self.rank == 0

    def share(self, units: Sequence[T]) -> list[T]:
        """This rank's units: every `world`-th one from `rank` (round robin balances uneven units)."""
        return list(units[self.rank :: self.world])

    def gather(self, part: Any) -> list[Any] | None:
        """Every rank's `part`, by rank, on rank 0; None on the others."""
        if self.world == 1:
            return [part]
        parts = [None] * self.world if self.main else None
        dist.gather_object(part, parts, dst=0)
        return parts

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


ONE = Ranks()


def join() -> Ranks:
    """This process's ranks, from the environment torchrun and accelerate set (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); joins the job's gloo process group the first time."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ONE
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    return Ranks(rank, world)


def merge(parts: Sequence[dict[int, T]], n_units: int) -> list[T]:
    """The units' results in unit order, from every rank's {unit index: result}; each unit exactly once."""
    merged: dict[int, T] = {}
    for part in parts:
        for index, result in part.items():
            if index in merged:
                raise RuntimeError(f"unit {index} came back from two ranks")
            merged[index] = result
    if sorted(merged) != list(range(n_units)):
        missing = sorted(set(range(n_units)) - set(merged))
        raise RuntimeError(f"{len(missing)} of {n_units} units came back from no rank (first: {missing[:5]})")
    return [merged[i] for i in range(n_units)]
