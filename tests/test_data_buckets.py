from __future__ import annotations

import math
import random

import pytest

from lib_train.data.buckets import assign_bucket, bucket_info, make_buckets
from lib_train.errors import TrainerError


@pytest.mark.parametrize("resolution", [512, 768, (768, 512), 1024])
def test_buckets_are_step_multiples_within_area_and_range(resolution):
    buckets = make_buckets(resolution, min_side=256, max_side=1024, step=64)
    res = (resolution, resolution) if isinstance(resolution, int) else resolution
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= res[0] * res[1]
        assert (h, w) in buckets  # both orientations
    side = int((res[0] * res[1]) ** 0.5) // 64 * 64
    assert (side, side) in buckets


def test_kohya_default_buckets_for_512():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (256, 1024) in buckets and (640, 384) in buckets and (576, 448) in buckets
    assert (576, 512) not in buckets  # 294912 px > 512²


def test_closest_aspect_and_cover_resize_with_centre_crop():
    buckets = make_buckets(512)
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(300, 4000), rng.randint(300, 4000)
        plan = assign_bucket(w, h, buckets)
        ratio = w / h
        assert plan.ar_error == min(abs(b[0] / b[1] - ratio) for b in buckets)
        if 0.5 <= ratio <= 2.0:  # within ~16% of the image's own ratio (neighbouring 512² ratios are ≤ 32% apart)
            assert abs(math.log(plan.bucket[0] / plan.bucket[1] / ratio)) < 0.16
        bw, bh = plan.bucket
        rw, rh = plan.resized
        assert rw >= bw and rh >= bh and (rw == bw or rh == bh)  # covers the bucket, tight on one side
        assert abs(rw / rh - ratio) < 0.02 * ratio + 2 / min(rw, rh)  # aspect kept (to rounding)
        left, top = plan.crop
        assert (left, top) == ((rw - bw) // 2, (rh - bh) // 2)
        assert plan.crop_box == (left, top, left + bw, top + bh)


def test_random_crop_stays_inside_and_is_reproducible():
    plan = assign_bucket(1000, 500, make_buckets(512))
    a = [plan.with_random_crop(random.Random(3)).crop for _ in range(2)]
    assert a[0] == a[1]
    crops = {plan.with_random_crop(random.Random(s)).crop for s in range(50)}
    assert len(crops) > 5
    for left, top in crops:
        assert 0 <= left <= plan.resized[0] - plan.bucket[0] and 0 <= top <= plan.resized[1] - plan.bucket[1]


def test_no_upscale_small_image_gets_own_bucket():
    buckets = make_buckets(512)
    plan = assign_bucket(300, 200, buckets, no_upscale=True)
    assert plan.bucket == (256, 192)
    assert not plan.upscaled and plan.resized[0] <= 300 and plan.resized[1] <= 200
    upscaled = assign_bucket(300, 200, buckets)  # without the flag the same image is enlarged
    assert upscaled.upscaled


def test_no_upscale_large_image_fits_area():
    buckets = make_buckets(512)
    for w, h in ((2000, 1000), (4000, 3000), (513, 512), (700, 300)):
        plan = assign_bucket(w, h, buckets, no_upscale=True)
        bw, bh = plan.bucket
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
        assert not plan.upscaled


def test_buckets_off_is_one_square():
    buckets = make_buckets(512, enable_buckets=False)
    assert buckets == [(512, 512)]
    plan = assign_bucket(1000, 600, buckets)
    assert plan.bucket == (512, 512) and plan.resized == (853, 512) and plan.crop == (170, 0)


def test_bucket_info_shape():
    buckets = make_buckets(512)
    plans = [assign_bucket(w, h, buckets) for w, h in ((512, 512), (1000, 600), (600, 1000), (1000, 600))]
    info = bucket_info(plans, counts=[10, 10, 2, 10])
    assert set(info) == {"buckets", "mean_img_ar_error"}
    assert info["buckets"] == {"0": {"resolution": [384, 640], "count": 2},
                               "1": {"resolution": [512, 512], "count": 10},
                               "2": {"resolution": [640, 384], "count": 20}}
    assert info["mean_img_ar_error"] == pytest.approx(sum(p.ar_error for p in plans) / 4)


@pytest.mark.parametrize("kwargs", [dict(min_side=1024, max_side=512), dict(step=60), dict(min_side=768)])
def test_impossible_settings_raise(kwargs):
    with pytest.raises(TrainerError):
        make_buckets(512, **kwargs)


def test_buckets_off_needs_step_multiple():
    with pytest.raises(TrainerError, match="multiples of 64"):
        make_buckets(500, enable_buckets=False)
    assert make_buckets(500)  # with buckets only the area counts
