"""Which records each optimizer step takes, and at what learning rate.

The data order is a seeded permutation per epoch; under several processes each takes every N-th record of
it (padded by wrapping to a multiple of N, like DistributedSampler, so all do the same number of steps).
Where a run stands in it (`Position`) is what a checkpoint records and a resumed run starts from.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

WARMUP_RATIO = 0.03


@dataclass
class Position:
    """Where a run stands: optimizer steps done, the epoch, and how many records of this process's share
    of that epoch those steps consumed."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    loss: float | None = None  # mean training loss of the last step that had one (the model card's)


@dataclass(frozen=True)
class MicroBatch:
    records: list[int]  # indices into the dataset's records
    step: int  # the 0-based optimizer step it belongs to
    index: int  # which of that step's `count` micro-batches
    count: int
    after: Position  # where the run stands once the step is done (loss not filled in)

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def shard_order(n: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """This process's record indices for `epoch`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    total = math.ceil(n / world) * world
    order += order[: total - n]
    while len(order) < total:  # fewer records than processes
        order += order[: total - len(order)]
    return order[rank::world]


def micro_batches(n: int, batch_size: int, grad_accum: int, seed: int, rank: int, world: int,
                  start: Position) -> Iterator[MicroBatch]:
    """Every micro-batch from `start` on, forever; the last step of an epoch may have fewer records."""
    per_step = batch_size * grad_accum
    step, epoch, offset = start.step, start.epoch, start.offset
    while True:
        order = shard_order(n, epoch, seed, rank, world)
        while offset < len(order):
            items = order[offset : offset + per_step]
            offset += len(items)
            chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
            after = Position(step + 1, epoch, offset)
            for index, records in enumerate(chunks):
                yield MicroBatch(records, step, index, len(chunks), after)
            step += 1
        epoch, offset = epoch + 1, 0


def lr_schedule(optimizer: torch.optim.Optimizer, total: int, start: int = 0):
    """Linear warm-up over the first 3% of `total` steps (at least one), then cosine towards 0: torch's
    LinearLR then CosineAnnealingLR, moved on to step `start`.

    torch's schedulers compute a step's rate from the one before, so a resumed run builds the schedule for
    its own length and replays it up to where it stands: the same rates as an uninterrupted run, bit for
    bit, or the new length's after a change of --max-steps. (transformers' get_cosine_schedule_with_warmup
    would do too, but importing it imports peft and bitsandbytes, and its first step has a rate of 0.)"""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warmup = max(1, math.ceil(WARMUP_RATIO * total))
    schedule = SequentialLR(optimizer, [LinearLR(optimizer, 1 / warmup, 1.0, warmup - 1),
                                        CosineAnnealingLR(optimizer, max(1, total - warmup))], milestones=[warmup])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of")  # replaying without optimizer steps is the point
        for _ in range(start):
            schedule.step()
    return schedule
