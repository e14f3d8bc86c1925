"""Sample images during a run: when they are made, what they are, and that they never change training."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Recorder, make_bundle, make_images, module_flags, state_hash, tiny_config
from PIL import Image

from lib_train.config import default_config, validate
from lib_train.errors import ConfigError
from lib_train.network.kohya_file import read_lora_file
from lib_train.train import sampling
from lib_train.train.lora_trainer import prepare_data, train_lora
from lib_train.train.ti_trainer import prepare_embedding_data, train_embedding


@pytest.fixture
def dataset(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=2)
    return tmp_path


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_ddim_timesteps_are_uniform_and_descending():
    assert sampling.ddim_timesteps(4) == [751, 501, 251, 1]
    assert sampling.ddim_timesteps(1) == [1]
    ts = sampling.ddim_timesteps(20)
    assert len(ts) == 20 and ts == sorted(ts, reverse=True) and ts[-1] == 1


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_with_a_perfect_model_recovers_the_clean_latents(prediction):
    import torch

    ac = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)  # SD's scaled-linear schedule
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=gen)
    ts = sampling.ddim_timesteps(10)

    def oracle(x, t):  # the exact ε (or v) of x for this x0
        a = ac[t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    noise = torch.randn(1, 4, 8, 8, generator=gen)
    start = ac[ts[0]].sqrt() * x0 + (1 - ac[ts[0]]).sqrt() * noise
    out = sampling.ddim_denoise(oracle, start, ac, ts, prediction)
    # a perfect model keeps ε fixed: the last update lands on sqrt(ac[0])·x0 + sqrt(1 - ac[0])·ε, ac[0] ≈ 0.99915
    assert torch.allclose(out, ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * noise, atol=1e-4)
    assert (start - x0).abs().max() > 1.0


def test_due_follows_the_cadence(tmp_path):
    cfg = default_config()
    assert not sampling.due(cfg, 10, final=True)  # no prompts: never
    cfg.sample.prompts = "a photo of [name]"
    assert sampling.due(cfg, 7, final=True)  # prompts alone: one set at the end
    assert not sampling.due(cfg, 5) and not sampling.due(cfg, 4, epoch_end=1)
    cfg.sample.every_steps, cfg.sample.every_epochs = 5, 2
    assert sampling.due(cfg, 10) and not sampling.due(cfg, 11)
    assert sampling.due(cfg, 3, epoch_end=2) and not sampling.due(cfg, 3, epoch_end=3)


def test_request_fills_the_name_and_defaults_the_size():
    cfg = default_config()
    cfg.data.resolution = 512
    cfg.sample.prompts = "a photo of [name]\n\n  [name] in a garden, watercolor  \n"
    cfg.sample.height = 768
    r = sampling.request_for(cfg, "zqchar")
    assert r.prompts == ("a photo of zqchar", "zqchar in a garden, watercolor")
    assert [(i.width, i.height) for i in r.images] == [(512, 768)] * 2
    assert sampling.request_for(cfg, "").prompts == ("a photo of", "in a garden, watercolor")


def test_bad_sample_settings_are_named(tmp_path):
    cfg = tiny_config(tmp_path, sample__every_epochs=1, sample__steps=0, sample__cfg_scale=0.5, sample__width=100)
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError) as e:
        validate(cfg, headless=False)
    fields = {p.where.split(" (")[0] for p in e.value.problems}  # "sample.steps (--sample-steps)"
    assert {"sample.prompts", "sample.steps", "sample.cfg_scale", "sample.width"} <= fields
    cfg.sample.prompts = "\n".join(f"p{i}" for i in range(17))
    with pytest.raises(ConfigError, match="at most 16"):
        validate(cfg, headless=False)


def test_lora_run_samples_every_epoch_with_previews_and_leaves_the_model(dataset):
    cfg = tiny_config(dataset, train__epochs=2, output__save_every_epochs=1, optim__lr=3e-2,
                      output__trigger_words="thing", sample__prompts="a photo of [name]\n[name], red",
                      sample__every_epochs=1, sample__steps=3)
    bundle = make_bundle("sd1")
    before, flags = state_hash(bundle.model), module_flags(bundle.model)
    rec = Recorder()
    result = train_lora(cfg, bundle, prepare_data(cfg), events=rec)
    assert result.status == "finished" and result.step == 8
    assert state_hash(bundle.model) == before and module_flags(bundle.model) == flags

    assert [step for step, _ in rec.sampled_sets] == [4, 8]  # after each epoch; the end of epoch 2 is the end
    out = dataset / "out"
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["tiny-000004-0.png", "tiny-000004-1.png", "tiny-000008-0.png", "tiny-000008-1.png"]
    assert all(Image.open(out / "samples" / n).size == (64, 64) for n in names)
    # the set made when a file is saved becomes that file's card picture
    assert (out / "tiny-000001.preview.png").read_bytes() == (out / "samples" / "tiny-000004-0.png").read_bytes()
    assert (out / "tiny.preview.png").read_bytes() == (out / "samples" / "tiny-000008-0.png").read_bytes()
    # training moved the LoRA, and the samples show it (same seed, same prompt)
    diff = np.abs(_pixels(out / "samples" / "tiny-000004-0.png") - _pixels(out / "samples" / "tiny-000008-0.png"))
    assert diff.max() > 0
    # prompts differ → images differ
    assert np.abs(_pixels(out / "samples" / "tiny-000008-0.png")
                  - _pixels(out / "samples" / "tiny-000008-1.png")).max() > 0


def test_samples_do_not_change_what_is_trained(tmp_path):
    results = []
    for with_samples in (False, True):
        root = tmp_path / str(with_samples)
        make_images(root / "data" / "2_thing", n=2)
        cfg = tiny_config(root, train__epochs=2, optim__lr=3e-2)
        if with_samples:
            cfg.sample.prompts, cfg.sample.every_steps, cfg.sample.steps = "thing", 1, 2
        train_lora(cfg, make_bundle("sd1"), prepare_data(cfg))
        results.append(read_lora_file(root / "out" / "tiny.safetensors")[0])
    plain, sampled = results
    assert plain.keys() == sampled.keys()
    assert all(np.array_equal(plain[k].float().numpy(), sampled[k].float().numpy()) for k in plain)


def test_samples_are_deterministic(tmp_path):
    images = []
    for run in ("a", "b"):
        root = tmp_path / run
        make_images(root / "data" / "1_thing", n=1)
        cfg = tiny_config(root, train__max_steps=1, sample__prompts="thing", sample__steps=2)
        train_lora(cfg, make_bundle("sd1"), prepare_data(cfg))
        images.append((root / "out" / "samples" / "tiny-000001-0.png").read_bytes())
    assert images[0] == images[1]


def test_a_failing_sampler_is_reported_and_training_goes_on(dataset):
    cfg = tiny_config(dataset, train__epochs=2, sample__prompts="thing", sample__every_epochs=1, sample__steps=1)
    calls = []

    def broken(run, request):
        calls.append(request)
        raise RuntimeError("sampler exploded")

    rec = Recorder()
    result = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=rec, sampler=broken)
    assert result.status == "finished" and len(calls) == 1  # turned off after the first failure
    assert rec.sampled_sets == [] and any("sampler exploded" in w for w in rec.warnings)
    assert not (dataset / "out" / "tiny.preview.png").exists()


def test_embedding_run_samples_with_the_vectors_being_trained(dataset):
    cfg = default_config("embedding")
    cfg.data.train_dir, cfg.data.resolution = str(dataset / "data"), 64
    cfg.data.min_bucket_side, cfg.data.max_bucket_side = 64, 128
    cfg.output.output_dir, cfg.output.name = str(dataset / "out"), "zqemb"
    cfg.train.max_steps, cfg.embedding.vectors = 2, 2
    cfg.sample.prompts, cfg.sample.every_steps, cfg.sample.steps = "a photo of [name]", 1, 2
    seen = []

    def spy(run, request):
        name, vectors = run.embedding
        seen.append((request.prompts, name, vectors.clone()))
        return sampling.ddim_sampler(run, request)

    result = train_embedding(cfg, make_bundle("sd1"), prepare_embedding_data(cfg), sampler=spy)
    assert result.status == "finished"
    assert [s[:2] for s in seen] == [(("a photo of zqemb",), "zqemb")] * 2
    assert seen[0][2].shape[0] == 2
    assert not np.array_equal(seen[0][2].numpy(), seen[1][2].numpy())  # step 1 and step 2 vectors
    assert (dataset / "out" / "zqemb.preview.png").is_file()
    assert sorted(p.name for p in (dataset / "out" / "samples").iterdir()) == ["zqemb-000001-0.png",
                                                                                "zqemb-000002-0.png"]
