from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from lib_train.data.batches import PlanEntry, batches_per_epoch, make_entries, plan_epoch, step_formula, total_steps
from lib_train.data.buckets import assign_bucket, make_buckets
from lib_train.data.dataset import ImageItem

A, B, C = (512, 512), (640, 384), (384, 640)
ENTRIES = [PlanEntry(3, A), PlanEntry(3, A), PlanEntry(2, B), PlanEntry(5, B), PlanEntry(1, C),
           PlanEntry(0, C, is_reg=True), PlanEntry(4, A, is_reg=True)]


def test_same_seed_and_epoch_give_the_same_plan():
    first = plan_epoch(ENTRIES, batch_size=2, seed=7, epoch=3, flip_aug=True)
    random.seed(123)  # the global rng must not matter
    again = plan_epoch(ENTRIES, batch_size=2, seed=7, epoch=3, flip_aug=True)
    assert first == again
    assert plan_epoch(ENTRIES, batch_size=2, seed=7, epoch=4, flip_aug=True) != first
    assert plan_epoch(ENTRIES, batch_size=2, seed=8, epoch=3, flip_aug=True) != first


def test_every_sample_once_and_batches_never_mix_buckets():
    for batch_size in (1, 2, 3, 8):
        plan = plan_epoch(ENTRIES, batch_size=batch_size, seed=1, epoch=0)
        counts = Counter(s.index for batch in plan for s in batch)
        assert counts == Counter({i: e.samples for i, e in enumerate(ENTRIES) if e.samples})
        for batch in plan:
            assert 1 <= len(batch) <= batch_size
            assert len({ENTRIES[s.index].bucket for s in batch}) == 1
        assert len(plan) == batches_per_epoch(ENTRIES, batch_size=batch_size)


def test_order_is_shuffled_across_buckets():
    firsts = {ENTRIES[plan_epoch(ENTRIES, batch_size=1, seed=0, epoch=e)[0][0].index].bucket for e in range(100)}
    assert firsts == {A, B, C}


def test_flip_only_with_flip_aug():
    plain = plan_epoch(ENTRIES, batch_size=2, seed=0, epoch=0)
    assert not any(s.flip for b in plain for s in b)
    flips = [s.flip for e in range(5) for b in plan_epoch(ENTRIES, batch_size=2, seed=0, epoch=e, flip_aug=True)
             for s in b]
    assert 0.25 < sum(flips) / len(flips) < 0.75


def test_batches_per_epoch_rounds_per_bucket():
    # A: 3+3+4 = 10, B: 2+5 = 7, C: 1 -> batch 4: 3 + 2 + 1 = 6 (a plain 18/4 would give 5)
    assert batches_per_epoch(ENTRIES, batch_size=4) == 6
    assert total_steps(ENTRIES, batch_size=4, epochs=3) == 18
    assert total_steps(ENTRIES, batch_size=4, epochs=3, gradient_accumulation_steps=4) == 6


def test_step_formula_text():
    one_bucket = [PlanEntry(10, A)] * 12
    text = step_formula(one_bucket, batch_size=2, epochs=4)
    assert text == "12 images × 10 repeats × 4 epochs ÷ batch 2 = 240 steps"
    odd = [PlanEntry(1, A)] * 3 + [PlanEntry(1, B)] * 2
    assert step_formula(odd, batch_size=2, epochs=4) == \
        "5 images × 1 repeat × 4 epochs ÷ batch 2 = 10 steps (bucket rounding: +2 → 12)"
    mixed = [PlanEntry(10, A)] * 2 + [PlanEntry(3, A)] + [PlanEntry(23, A, is_reg=True)]
    text = step_formula(mixed, batch_size=1, epochs=2, gradient_accumulation_steps=2)
    assert text == "(2 images × 10 repeats + 1 image × 3 repeats + 23 reg samples) × 2 epochs ÷ batch 1 " \
                   "÷ accumulation 2 = 46 steps"


def test_make_entries_uses_samples_per_epoch_and_bucket():
    items = [ImageItem(Path(f"{i}.png"), "", 10, Path("."), is_reg, 1000, 600, s)
             for i, (is_reg, s) in enumerate(((False, 10), (True, 7)))]
    plans = [assign_bucket(it.width, it.height, make_buckets(512)) for it in items]
    assert make_entries(items, plans) == [PlanEntry(10, (640, 384), False), PlanEntry(7, (640, 384), True)]
