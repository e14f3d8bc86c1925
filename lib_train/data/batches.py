"""Epoch planning: which samples form each batch, in which order, and how many steps a run takes.

An epoch holds every image ``samples_per_epoch`` times (its folder repeats; reg images per the reg rule in
``dataset.py``). Samples are grouped by bucket (a batch never mixes sizes), each bucket's samples are shuffled and cut
into batches of ``batch_size`` (the last one may be smaller), then the batches of all buckets are shuffled together.
Everything random is drawn from one ``random.Random`` seeded with ``(seed, epoch)``, so the plan of epoch e is the
same in every process: a run resumed at epoch e, batch k skips the first k batches of the same plan.

Step formula (kohya, PEERS.md §4.1)::

    batches_per_epoch = Σ_buckets ceil(samples_in_bucket / batch_size)
    total_steps       = epochs × ceil(batches_per_epoch / gradient_accumulation_steps)

This is ≥ ``images × repeats × epochs ÷ batch`` because each bucket's last batch may be partial.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .buckets import BucketPlan, Size
from .dataset import ImageItem


@dataclass(frozen=True)
class PlanEntry:
    """What the planner needs to know about one image (its index in the list is the item index)."""

    samples: int  # samples per epoch (0 = unused)
    bucket: Size
    is_reg: bool = False


class Sample(NamedTuple):
    """One element of a batch. ``seed`` seeds this sample's own augmentation rng (caption shuffle, random crop)."""

    index: int  # index into the entries / items list
    flip: bool  # horizontal flip (only ever True with flip_aug)
    seed: int


def make_entries(items: Sequence[ImageItem], plans: Sequence[BucketPlan]) -> list[PlanEntry]:
    """Pair scanned items with their bucket plans (same order)."""
    if len(items) != len(plans):
        raise ValueError("items and plans must have the same length")
    return [PlanEntry(it.samples_per_epoch, p.bucket, it.is_reg) for it, p in zip(items, plans)]


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    # A str seed is hashed with SHA-512 by random.Random: stable across processes and Python versions.
    return random.Random(f"lib_train.epoch_plan/{int(seed)}/{int(epoch)}")


def plan_epoch(
    entries: Sequence[PlanEntry],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    flip_aug: bool = False,
) -> list[list[Sample]]:
    """The batches of ``epoch`` (any integer, e.g. 0-based), deterministic in (entries, batch_size, seed, epoch)."""
    if batch_size < 1:
        raise ValueError("batch_size must be 1 or more")
    rng = _epoch_rng(seed, epoch)
    by_bucket: dict[Size, list[int]] = {}
    for index, entry in enumerate(entries):
        by_bucket.setdefault(entry.bucket, []).extend([index] * entry.samples)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return [[Sample(i, flip_aug and rng.random() < 0.5, rng.getrandbits(63)) for i in batch] for batch in batches]


def _bucket_counts(entries: Sequence[PlanEntry]) -> Counter:
    counts: Counter = Counter()
    for e in entries:
        counts[e.bucket] += e.samples
    return counts


def batches_per_epoch(entries: Sequence[PlanEntry], *, batch_size: int) -> int:
    """Σ_buckets ceil(samples_in_bucket / batch_size) (kohya train_util.py, PEERS.md §4.1)."""
    return sum(math.ceil(n / batch_size) for n in _bucket_counts(entries).values() if n)


def total_steps(entries: Sequence[PlanEntry], *, batch_size: int, epochs: int,
                gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps of the run: epochs × ceil(batches_per_epoch / gradient_accumulation_steps)."""
    return epochs * math.ceil(batches_per_epoch(entries, batch_size=batch_size) / gradient_accumulation_steps)


def step_formula(entries: Sequence[PlanEntry], *, batch_size: int, epochs: int,
                 gradient_accumulation_steps: int = 1) -> str:
    """Human-readable step count, e.g.
    ``12 images × 10 repeats × 4 epochs ÷ batch 2 = 240 steps (bucket rounding: +2 → 242)``.

    The left side is the plain product (rounded up); the exact count is :func:`total_steps`, shown after
    "bucket rounding" only when it differs.
    """
    groups = Counter(e.samples for e in entries if not e.is_reg and e.samples)
    terms = [f"{n} image{'s' if n != 1 else ''} × {r} repeat{'s' if r != 1 else ''}"
             for r, n in sorted(groups.items(), key=lambda g: -g[0])]
    reg_samples = sum(e.samples for e in entries if e.is_reg)
    if reg_samples:
        terms.append(f"{reg_samples} reg samples")
    samples = sum(e.samples for e in entries)
    head = terms[0] if len(terms) == 1 else "(" + " + ".join(terms) + ")" if terms else "0 images"
    text = f"{head} × {epochs} epoch{'s' if epochs != 1 else ''} ÷ batch {batch_size}"
    divisor = batch_size
    if gradient_accumulation_steps > 1:
        text += f" ÷ accumulation {gradient_accumulation_steps}"
        divisor *= gradient_accumulation_steps
    plain = math.ceil(samples * epochs / divisor)
    exact = total_steps(entries, batch_size=batch_size, epochs=epochs,
                        gradient_accumulation_steps=gradient_accumulation_steps)
    text += f" = {plain} steps"
    if exact != plain:
        text += f" (bucket rounding: {exact - plain:+d} → {exact})"
    return text
