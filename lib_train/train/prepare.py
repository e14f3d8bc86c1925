"""Data preparation shared by every training method: scan, buckets, step count, all before any model work.

:func:`prepare_data` reports every dataset problem at once (:class:`~lib_train.errors.DatasetError`) and counts the
steps of the run; :func:`dataset_summary` turns the result into the lines the command line and the WebUI show.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from ..config import TrainConfig, bucket_sides
from ..data import (
    DatasetScan,
    ImageItem,
    PlanEntry,
    assign_bucket,
    bucket_info,
    make_buckets,
    make_entries,
    scan_dataset,
    step_formula,
)
from ..data.batches import batches_per_epoch
from ..errors import DatasetError, Problem
from ..models.conditioning import ImageSize


@dataclass
class PreparedData:
    scan: DatasetScan
    items: list[ImageItem]
    plans: list  # BucketPlan per item
    entries: list[PlanEntry]
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    formula: str
    bucket_info: dict
    fingerprint: str

    def image_size(self, index: int, flip: bool) -> ImageSize:
        """The sizes image ``index`` is conditioned on (families with size conditioning; kohya's rule,
        :meth:`~lib_train.models.conditioning.ImageSize.of_training_image`)."""
        return ImageSize.of_training_image(self.plans[index], flip)


@dataclass
class StepPlan:
    """How a scanned dataset is cut into steps under a config's bucket and batch settings."""

    items: list
    plans: list
    entries: list
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    formula: str


def plan_steps(cfg: TrainConfig, scan) -> StepPlan:
    """Buckets and step counts for the usable images of ``scan`` (no image is read: the scan has their sizes).
    Raises :class:`DatasetError` when no training image is usable."""
    d = cfg.data
    items = [it for it in scan.items if it.samples_per_epoch > 0]
    if not any(not it.is_reg for it in items):
        raise DatasetError([Problem(str(d.train_dir), "no usable training images were found; add .png/.jpg/.webp "
                                                      "images (in N_name sub-folders such as '10_mychar')")])
    min_side, max_side = bucket_sides(d)
    buckets = make_buckets(d.resolution, min_side=min_side, max_side=max_side,
                           step=d.bucket_step, enable_buckets=d.enable_buckets)
    plans = [assign_bucket(it.width, it.height, buckets, no_upscale=d.bucket_no_upscale and d.enable_buckets,
                           step=d.bucket_step, max_area=d.resolution * d.resolution) for it in items]
    entries = make_entries(items, plans)
    bs, accum = cfg.train.batch_size, cfg.optim.grad_accum
    per_epoch = batches_per_epoch(entries, batch_size=bs)
    steps_per_epoch = math.ceil(per_epoch / accum)
    if cfg.train.max_steps > 0:
        total_steps = cfg.train.max_steps
        total_epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        total_epochs = cfg.train.epochs
        total_steps = total_epochs * steps_per_epoch
    formula = step_formula(entries, batch_size=bs, epochs=total_epochs, gradient_accumulation_steps=accum)
    if cfg.train.max_steps > 0:
        formula += f"; stopping at max_steps = {total_steps}"
    return StepPlan(items, plans, entries, per_epoch, steps_per_epoch, total_steps, total_epochs, formula)


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Scan the dataset, assign buckets and count steps. Raises :class:`DatasetError` with every problem found."""
    d = cfg.data
    scan = scan_dataset(d.train_dir, reg_dir=d.reg_dir or None, caption_extension=d.caption_extension,
                        default_repeats=d.default_repeats, min_side=d.min_image_side)
    scan.raise_if_problems()
    sp = plan_steps(cfg, scan)
    items, plans = sp.items, sp.plans
    fingerprint = hashlib.sha256(json.dumps(
        [[str(it.path), it.caption, it.samples_per_epoch, it.is_reg, p.bucket, p.crop] for it, p in zip(items, plans)]
    ).encode()).hexdigest()
    return PreparedData(scan=scan, items=items, plans=plans, entries=sp.entries, batches_per_epoch=sp.batches_per_epoch,
                        steps_per_epoch=sp.steps_per_epoch, total_steps=sp.total_steps, total_epochs=sp.total_epochs,
                        formula=sp.formula, bucket_info=bucket_info(plans, [it.samples_per_epoch for it in items]),
                        fingerprint=fingerprint)


def dataset_summary(prep: PreparedData) -> list[str]:
    """Human-readable lines: folders, counts, buckets, warnings and the step formula."""
    scan = prep.scan
    lines = [f"Dataset: {scan.train_dir}"]
    for s in scan.folders:
        kind = "reg " if s.is_reg else ""
        lines.append(f"  {kind}folder {s.key}: {s.img_count} images × {s.repeats} repeats")
    buckets = prep.bucket_info.get("buckets", {})
    if buckets:
        sizes = ", ".join(f"{b['resolution'][0]}×{b['resolution'][1]} ({b['count']})" for b in buckets.values())
        lines.append(f"  buckets: {sizes}")
    for w in scan.warnings:
        lines.append(f"  warning: {w}")
    lines.append(f"Steps: {prep.formula}")
    return lines
