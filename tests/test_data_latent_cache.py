from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import save_image
from PIL import Image

from lib_train.data.buckets import assign_bucket, make_buckets
from lib_train.data.latent_cache import LatentCache, load_pixels
from lib_train.errors import TrainerError


class Counted:
    """A fake VAE encode: returns a fixed tensor and counts its calls."""

    def __init__(self, seed: int = 0):
        self.calls = 0
        self.value = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.value.clone()


def test_memory_mode_computes_once(tmp_path):
    img = save_image(tmp_path / "a.png")
    cache = LatentCache("memory", None, vae_id="vae-a")
    key = cache.key_for(img, (512, 512), (0, 0), False)
    enc = Counted()
    first = cache.get_or_compute(key, enc)
    second = cache.get_or_compute(key, enc)
    assert enc.calls == 1 and torch.equal(first, second) and first.device.type == "cpu"


def test_off_mode_computes_every_time(tmp_path):
    img = save_image(tmp_path / "a.png")
    cache = LatentCache("off", None, vae_id="v")
    enc = Counted()
    key = cache.key_for(img, (512, 512), (0, 0), False)
    cache.get_or_compute(key, enc)
    cache.get_or_compute(key, enc)
    assert enc.calls == 2


def test_disk_round_trip_and_reuse_across_instances(tmp_path):
    img = save_image(tmp_path / "a.png")
    cache_dir = tmp_path / "cache"
    first = LatentCache("disk", cache_dir, vae_id="v")
    key = first.key_for(img, (640, 384), (3, 0), True)
    enc = Counted()
    stored = first.get_or_compute(key, enc)
    assert enc.calls == 1 and list(cache_dir.glob("*.safetensors")) == [cache_dir / f"{key}.safetensors"]
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp")]

    later = LatentCache("disk", cache_dir, vae_id="v")  # a new run / process
    assert later.key_for(img, (640, 384), (3, 0), True) == key

    def must_not_run():
        raise AssertionError("cached latents were recomputed")

    assert torch.equal(later.get_or_compute(key, must_not_run), stored)


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    img = save_image(tmp_path / "a.png")
    cache = LatentCache("disk", tmp_path / "cache", vae_id="v")
    key = cache.key_for(img, (512, 512), (0, 0), False)
    enc = Counted()
    cache.get_or_compute(key, enc)
    path = tmp_path / "cache" / f"{key}.safetensors"
    path.write_bytes(path.read_bytes()[:20])  # truncated by a crash or a full disk
    out = cache.get_or_compute(key, enc)
    assert enc.calls == 2 and torch.equal(out, enc.value)
    assert torch.equal(LatentCache("disk", tmp_path / "cache", "v").get_or_compute(key, Counted(9)), enc.value)


def test_key_follows_content_size_crop_flip_and_vae(tmp_path):
    img = save_image(tmp_path / "a.png", seed=1)
    copy = tmp_path / "copy.png"
    copy.write_bytes(img.read_bytes())
    cache = LatentCache("memory", None, vae_id="v1")
    key = cache.key_for(img, (512, 512), (0, 0), False)
    assert cache.key_for(copy, (512, 512), (0, 0), False) == key  # same bytes, same latents
    variants = {cache.key_for(img, (576, 448), (0, 0), False), cache.key_for(img, (512, 512), (0, 4), False),
                cache.key_for(img, (512, 512), (0, 0), True),
                LatentCache("memory", None, vae_id="v2").key_for(img, (512, 512), (0, 0), False)}
    assert key not in variants and len(variants) == 4
    save_image(img, seed=2)  # the user edits the image
    assert cache.key_for(img, (512, 512), (0, 0), False) != key


def test_bad_mode_or_missing_folder():
    with pytest.raises(TrainerError, match="memory"):
        LatentCache("ram", None, vae_id="v")
    with pytest.raises(TrainerError, match="folder"):
        LatentCache("disk", None, vae_id="v")


def test_load_pixels_resize_crop_flip(tmp_path):
    img = save_image(tmp_path / "a.png", (330, 100))
    plan = assign_bucket(330, 100, make_buckets(128, min_side=64, max_side=256, step=64))
    assert (plan.bucket, plan.resized) == ((192, 64), (211, 64))
    x = load_pixels(img, plan, flip=False)
    assert x.shape == (3, 64, 192) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.1
    flipped = load_pixels(img, plan, flip=True)
    assert torch.equal(flipped, torch.flip(x, dims=[2]))
    # the red channel is a left-to-right ramp in the test image: the left edge is darker than the right
    assert x[0, :, :10].mean() < x[0, :, -10:].mean()
    same_size = assign_bucket(192, 64, [(192, 64)])
    img2 = save_image(tmp_path / "b.png", (192, 64))
    expected = np.asarray(Image.open(img2), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(load_pixels(img2, same_size, False), torch.from_numpy(expected).permute(2, 0, 1))


def test_load_pixels_detects_changed_file(tmp_path):
    img = save_image(tmp_path / "a.png", (200, 100))
    plan = assign_bucket(200, 100, make_buckets(128, min_side=64, max_side=256))
    save_image(img, (100, 100))
    with pytest.raises(TrainerError, match="scan the dataset again"):
        load_pixels(img, plan, flip=False)
