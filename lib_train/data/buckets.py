"""Aspect-ratio buckets (pure, no torch): which size each image trains at, and how it is resized and cropped.

Same scheme as kohya's BucketManager (defaults 256 / 1024 / 64, train_util.py):

* Buckets are (w, h) pairs, both multiples of ``step`` within [min_side, max_side], with w·h ≤ the area of the
  training resolution (512×512 -> 262144 px); for every width the tallest height that fits is taken, both
  orientations, plus the largest square.
* An image goes to the bucket whose aspect ratio w/h is closest to its own; it is scaled (aspect kept) to cover the
  bucket and the overflow is cropped (centred by default).
* ``no_upscale``: an image with fewer pixels than the bucket area gets its own bucket, its size rounded down to
  ``step``; a larger one is first scaled to the area limit. Either way the scale factor is ≤ 1.
* Buckets off: one bucket, the resolution itself (resize to cover, centre crop).

Sizes are (width, height) in pixels throughout.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..errors import TrainerError

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketPlan:
    """How one image becomes a ``bucket``-sized training input.

    Resize the (oriented) ``source`` image to ``resized`` (aspect kept, covering the bucket), then crop the box
    ``(left, top, left + bucket_w, top + bucket_h)`` with ``crop = (left, top)``.
    """

    source: Size
    bucket: Size
    resized: Size
    crop: tuple[int, int]
    ar_error: float  # |bucket w/h - source w/h| (kohya's per-image aspect error)

    @property
    def upscaled(self) -> bool:
        return self.resized[0] > self.source[0] or self.resized[1] > self.source[1]

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` in ``resized`` pixels (PIL's crop box)."""
        left, top = self.crop
        return left, top, left + self.bucket[0], top + self.bucket[1]

    def with_random_crop(self, rng: random.Random) -> BucketPlan:
        """The same plan with crop offsets drawn uniformly from the possible range."""
        dx, dy = self.resized[0] - self.bucket[0], self.resized[1] - self.bucket[1]
        return replace(self, crop=(rng.randint(0, dx), rng.randint(0, dy)))


def _as_size(resolution: int | Sequence[int]) -> Size:
    if isinstance(resolution, int):
        return resolution, resolution
    w, h = resolution
    return int(w), int(h)


def make_buckets(
    max_resolution: int | Sequence[int],
    *,
    min_side: int = 256,
    max_side: int = 1024,
    step: int = 64,
    enable_buckets: bool = True,
) -> list[Size]:
    """Sorted bucket sizes for the training resolution ``max_resolution`` (an int means a square).

    With buckets on, only the resolution's area matters. With ``enable_buckets=False`` the single bucket is the
    resolution itself, whose sides must be multiples of ``step``. Raises TrainerError naming the setting when the
    ranges are impossible.
    """
    res_w, res_h = _as_size(max_resolution)
    if step <= 0 or step % 8:
        raise TrainerError(f"bucket step {step} must be a positive multiple of 8 (the VAE's downscale factor); use 64")
    if res_w <= 0 or res_h <= 0:
        raise TrainerError(f"resolution {res_w}×{res_h} must be positive; use e.g. 512 or 768")
    if not enable_buckets:
        if res_w % step or res_h % step:
            raise TrainerError(f"resolution {res_w}×{res_h} must have sides that are multiples of {step} when "
                               "buckets are off; use e.g. 512 or 768")
        return [(res_w, res_h)]
    lo = math.ceil(min_side / step) * step
    hi = max_side // step * step
    if lo > hi:
        raise TrainerError(f"min bucket side {min_side} is above max bucket side {max_side}; lower the minimum "
                           f"or raise the maximum (kohya's defaults are 256 and 1024)")
    max_area = res_w * res_h
    sizes: set[Size] = set()
    square = math.isqrt(max_area) // step * step
    if lo <= square <= hi:
        sizes.add((square, square))
    for w in range(lo, hi + 1, step):
        h = min(hi, max_area // w // step * step)
        if h >= lo:
            sizes.update({(w, h), (h, w)})
    if not sizes:
        raise TrainerError(f"no bucket fits: resolution {res_w}×{res_h} is too small for a minimum bucket side of "
                           f"{min_side}; lower the minimum bucket side or raise the resolution")
    return sorted(sizes)


def _cover(source: Size, bucket: Size) -> Size:
    """Smallest aspect-preserving resize of ``source`` that covers ``bucket``."""
    w, h = source
    scale = max(bucket[0] / w, bucket[1] / h)
    return max(bucket[0], round(w * scale)), max(bucket[1], round(h * scale))


def _plan(source: Size, bucket: Size) -> BucketPlan:
    resized = _cover(source, bucket)
    crop = ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
    ar_error = abs(bucket[0] / bucket[1] - source[0] / source[1])
    return BucketPlan(source, bucket, resized, crop, ar_error)


def assign_bucket(
    width: int,
    height: int,
    buckets: Sequence[Size],
    *,
    no_upscale: bool = False,
    step: int = 64,
    max_area: int | None = None,
) -> BucketPlan:
    """Choose the bucket for a ``width``×``height`` image and plan its resize and centre crop.

    ``max_area`` (only used with ``no_upscale``) defaults to the largest bucket's area. Ties between equally close
    aspect ratios go to the first bucket in ``buckets``.
    """
    if width <= 0 or height <= 0:
        raise TrainerError(f"an image of {width}×{height} pixels cannot be trained on; remove it")
    source = (width, height)
    if not no_upscale:
        if not buckets:
            raise TrainerError("no buckets to choose from; check the resolution and bucket settings")
        ratio = width / height
        best = min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))
        return _plan(source, best)
    area_limit = max_area if max_area is not None else max(b[0] * b[1] for b in buckets)
    scale = min(1.0, math.sqrt(area_limit / (width * height)))
    bucket = (int(width * scale) // step * step, int(height * scale) // step * step)
    if min(bucket) == 0:
        raise TrainerError(f"an image of {width}×{height} pixels has a side below the bucket step {step} with "
                           "no-upscale on; remove it, or turn no-upscale off")
    return _plan(source, bucket)


def bucket_info(plans: Sequence[BucketPlan], counts: Sequence[int] | None = None) -> dict:
    """kohya's ``ss_bucket_info``: ``{"buckets": {"0": {"resolution": [w, h], "count": n}, ...},
    "mean_img_ar_error": x}``.

    ``counts[i]`` is how many samples image i gives per epoch (its repeats; default 1), as kohya counts bucket
    entries; buckets are numbered in sorted (w, h) order; the aspect error is averaged over images, not samples.
    """
    counts = [1] * len(plans) if counts is None else list(counts)
    if len(counts) != len(plans):
        raise ValueError("counts must have one entry per plan")
    per_bucket: dict[Size, int] = {}
    for plan, n in zip(plans, counts):
        per_bucket[plan.bucket] = per_bucket.get(plan.bucket, 0) + n
    buckets = {str(i): {"resolution": [b[0], b[1]], "count": per_bucket[b]} for i, b in enumerate(sorted(per_bucket))}
    mean_error = sum(p.ar_error for p in plans) / len(plans) if plans else 0.0
    return {"buckets": buckets, "mean_img_ar_error": mean_error}
