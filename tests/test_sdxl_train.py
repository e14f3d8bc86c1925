"""SDXL LoRA training end to end.

CI tier (no sgm): the sizes each training image is conditioned on (kohya's rule, against the bucket geometry and the
pixels actually loaded, flip included), the loop passing them per sample, the metadata and sidecar from the SDXL
record, the family defaults (gradient checkpointing on for SDXL unless set), ``--webui-dir`` checks.
sgm tier (``SD_WEBUI_DIR``, tiny SDXL models from sgm's own classes): a headless command-line run on a tiny SDXL
checkpoint file (UNet + both text encoders, samples, the files and their metadata), a run on a bundle after which only
LoRA parameters changed and the model is exactly as before, the text cache (context + pooled) giving the loss of the
uncached path, and gradient checkpointing over sgm's UNet blocks and both text encoders.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import Recorder, make_bundle, make_images, module_flags, run_cli, state_hash, tiny_config
from PIL import Image
from safetensors import safe_open

from lib_train.config import apply_family_defaults, given_keys
from lib_train.data import assign_bucket, make_buckets
from lib_train.data.latent_cache import load_pixels
from lib_train.errors import TrainerError
from lib_train.models.conditioning import ImageSize
from lib_train.models.families import SD1, SDXL
from lib_train.network.kohya_file import read_lora_file
from lib_train.train.lora_trainer import prepare_data, train_lora
from lib_train.train.metadata import RunFacts, lora_metadata

# ---- CI tier: sizes


def test_sizes_of_a_training_image_follow_the_bucket_plan():
    import random

    buckets = make_buckets(512, min_side=256, max_side=1024, step=64)
    plan = assign_bucket(1000, 520, buckets)  # wide: resized to cover the bucket, cropped in the middle
    assert (plan.bucket, plan.resized, plan.crop) == ((640, 384), (738, 384), (49, 0))
    assert ImageSize.of_training_image(plan) == ImageSize(original=(520, 1000), crop_top_left=(0, 49),
                                                          target=(384, 640))
    assert ImageSize.of_training_image(plan, flip=True).crop_top_left == (0, 738 - 49 - 640)
    off_centre = plan.with_random_crop(random.Random(3))
    left = off_centre.crop[0]
    assert left != 49
    assert ImageSize.of_training_image(off_centre, flip=True).crop_top_left == (0, 738 - left - 640)
    tall = assign_bucket(300, 900, buckets)
    size = ImageSize.of_training_image(tall, flip=True)
    assert size.original == (900, 300) and size.target == (tall.bucket[1], tall.bucket[0])
    assert size.crop_top_left == (tall.crop[1], tall.resized[0] - tall.crop[0] - tall.bucket[0])
    assert ImageSize.plain(832, 1216) == ImageSize((1216, 832), (0, 0), (1216, 832))


def test_the_flipped_crop_is_where_the_pixels_come_from(tmp_path):
    """With a flip, the training image is the crop of the mirrored resized image at the mirrored left offset."""
    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 255, (96, 200, 3), dtype=np.uint8)).save(path)
    plan = assign_bucket(200, 96, [(128, 64), (64, 64)])
    assert (plan.resized, plan.crop) == ((133, 64), (2, 0))  # 5 columns cut: 2 left, 3 right (3 left once flipped)
    resized = Image.open(path).convert("RGB").resize(plan.resized, Image.Resampling.LANCZOS)
    for flip in (False, True):
        top, left = ImageSize.of_training_image(plan, flip).crop_top_left
        source = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized
        box = source.crop((left, top, left + plan.bucket[0], top + plan.bucket[1]))
        expected = torch.from_numpy(np.asarray(box, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        assert torch.equal(load_pixels(path, plan, flip), expected), flip


def test_the_loop_passes_each_samples_sizes(tmp_path, monkeypatch):
    """micro_step conditions every sample on its own image's sizes (SD1 ignores them; the values are checked)."""
    from lib_train.train.lora_trainer import LoRASession

    make_images(tmp_path / "data" / "1_a", n=2, size=(64, 64))
    make_images(tmp_path / "data" / "1_b", n=2, size=(200, 96), prefix="wide")
    cfg = tiny_config(tmp_path, data__flip=True, train__batch_size=2, optim__te_lr=0.0, data__resolution=64,
                      data__max_bucket_side=128)
    prep = prepare_data(cfg)
    seen = []
    real = LoRASession.condition

    def record(self, prompts, sizes=None):
        seen.append(list(sizes))
        return real(self, prompts, sizes)

    monkeypatch.setattr(LoRASession, "condition", record)
    from lib_train.train import loop

    batches = list(loop.micro_batches(cfg, prep))
    train_lora(cfg, make_bundle("sd1"), prep)
    assert len(seen) == len(batches)
    for sizes, mb in zip(seen, batches):
        assert sizes == [ImageSize.of_training_image(prep.plans[x.index], x.flip) for x in mb.samples]
    assert any(x.flip for mb in batches for x in mb.samples)
    assert any(s.crop_top_left != (0, 0) for batch in seen for s in batch)


def test_the_headless_sampler_conditions_on_the_samples_size_and_the_negative_prompt(tmp_path):
    from lib_train.train.sampling import SampleContext, SampleImage, SampleRequest, ddim_sampler

    bundle, calls = make_bundle("sd1"), []

    def condition(prompts, sizes=None):
        calls.append((list(prompts), sizes))
        return bundle.conditioning(prompts, sizes)

    ctx = SampleContext(cfg=tiny_config(tmp_path), bundle=bundle, device=torch.device("cpu"), autocast=None,
                        name_text="", embedding=None, condition=condition)
    request = SampleRequest((SampleImage(prompt="a cat", negative="", steps=2, cfg_scale=5.0, seed=1, width=128,
                                         height=64, sampler="DDIM"),))
    images = ddim_sampler(ctx, request)
    assert images[0].size == (128, 64)
    assert calls == [(["a cat"], [ImageSize.plain(128, 64)]), ([""], [ImageSize.plain(128, 64)])]


# ---- CI tier: files and defaults from the record


def _facts(family: str, prediction: str = "eps") -> RunFacts:
    return RunFacts(session_id=1, started_at=1.7e9, family=family, prediction=prediction, checkpoint_name="x",
                    checkpoint_hashes={}, optimizer="AdamW", num_train_images=1, num_reg_images=0,
                    batches_per_epoch=1, total_steps=1, total_epochs=1, dataset_dirs={}, reg_dataset_dirs={},
                    tag_frequency={}, bucket_info=None)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sdxl_metadata_comes_from_the_record(tmp_path, prediction):
    cfg = tiny_config(tmp_path, data__resolution=1024, model__clip_skip=2)
    meta = lora_metadata(cfg, _facts("sdxl", prediction), stem="n", epoch=1, step=1)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x1024"  # the training resolution (kohya's rule)
    assert meta["ss_clip_skip"] == "None" and "modelspec.encoder_layer" not in meta  # clip skip: not for SDXL
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v" else "epsilon")
    sd1 = lora_metadata(cfg, _facts("sd1"), stem="n", epoch=1, step=1)
    assert sd1["modelspec.implementation"] == "diffusers" and sd1["ss_clip_skip"] == "2"


def test_sidecar_says_sdxl(tmp_path):
    from lib_train.train.sidecar import write_lora_sidecar

    path = write_lora_sidecar(tmp_path / "n.safetensors", family="sdxl", activation_text="mychar")
    assert json.loads(path.read_text()) == {"sd version": "SDXL", "activation text": "mychar"}


def test_family_defaults_apply_where_the_user_set_nothing(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.train.gradient_checkpointing is False  # the declared default (SD1/SD2)
    notes = apply_family_defaults(cfg, SDXL, given=set())
    assert cfg.train.gradient_checkpointing is True
    assert notes == ["train.gradient_checkpointing (--gradient-checkpointing): on for SDXL models (set it to "
                     "override)"]
    cfg = tiny_config(tmp_path)
    given = given_keys({"train": {"gradient_checkpointing": False}})
    assert apply_family_defaults(cfg, SDXL, given) == [] and cfg.train.gradient_checkpointing is False
    assert given_keys({}, {"train.gradient_checkpointing": False}) == {"train.gradient_checkpointing"}
    cfg = tiny_config(tmp_path)
    assert apply_family_defaults(cfg, SD1, set()) == [] and cfg.train.gradient_checkpointing is False


def test_webui_dir_must_be_a_folder(tmp_path, capsys):
    from helpers import assert_clear_error

    make_images(tmp_path / "data" / "1_a", n=1)
    checkpoint = tmp_path / "x.safetensors"
    checkpoint.write_bytes(b"x")
    code, text = run_cli("lora", ["--checkpoint", checkpoint, "--data", tmp_path / "data", "--output",
                                  tmp_path / "out", "--name", "n", "--webui-dir", tmp_path / "nowhere"], capsys)
    assert_clear_error(code, text, ["--webui-dir", str(tmp_path / "nowhere"), "repositories/generative-models"])


# ---- sgm tier


@pytest.fixture(scope="module")
def tiny_sdxl_file(tmp_path_factory):
    """A tiny SDXL-layout checkpoint file written from sgm's own model (every UNet, VAE, text-encoder tensor)."""
    from safetensors.torch import save_file
    from sdxl_models import sgm_root, tiny_sgm_sdxl

    sgm_root()
    from lib_train.models.sdxl_load import REQUIRED

    model = tiny_sgm_sdxl(seed=21)
    sd = {k: t.contiguous() for k, t in model.state_dict().items() if k.startswith(REQUIRED)}
    path = tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors"
    save_file(sd, str(path))
    return path


def _sdxl_data(tmp_path):
    make_images(tmp_path / "data" / "2_thing", n=2, size=(64, 64))
    make_images(tmp_path / "data" / "1_wide", n=1, size=(160, 64), prefix="wide")


def test_headless_command_line_run_on_a_tiny_sdxl_file(tiny_sdxl_file, tmp_path, capsys):
    _sdxl_data(tmp_path)
    out = tmp_path / "out"
    args = ["--checkpoint", tiny_sdxl_file, "--webui-dir", os.environ["SD_WEBUI_DIR"], "--data", tmp_path / "data",
            "--output", out, "--name", "xl", "--resolution", "64", "--min-bucket", "64", "--max-bucket", "128",
            "--rank", "2", "--alpha", "1", "--epochs", "2", "--te-lr", "1e-3", "--flip", "--trigger", "mychar",
            "--sample-prompts", "mychar, a cat", "--sample-steps", "2", "--device", "cpu"]
    code, text = run_cli("lora", args, capsys)
    assert code == 0, text
    assert "SDXL model, eps-prediction" in text
    assert "train.gradient_checkpointing (--gradient-checkpointing): on for SDXL models" in text
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["xl-000001.safetensors", "xl.safetensors"]
    tensors, meta = read_lora_file(out / "xl.safetensors")
    stems = {k.split(".")[0] for k in tensors}
    te1 = [s for s in stems if s.startswith("lora_te1_")]
    te2 = [s for s in stems if s.startswith("lora_te2_")]
    unet = [s for s in stems if s.startswith("lora_unet_")]
    # clip_l 12 layers, clip_g 3 (all layers), 11 transformers × (2 blocks × 10 + proj_in/out) in the tiny UNet
    assert (len(te1), len(te2), len(unet)) == (12 * 6, 3 * 6, 11 * 22) and len(stems) == len(te1 + te2 + unet)
    assert len(tensors) == 3 * len(stems)
    assert any(tensors[k].abs().max() > 0 for k in tensors if k.startswith("lora_te2_") and "lora_up" in k)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_clip_skip"] == "None"
    assert meta["ss_gradient_checkpointing"] == "True" and meta["ss_sd_model_name"] == tiny_sdxl_file.name
    assert json.loads((out / "xl.json").read_text()) == {"sd version": "SDXL", "activation text": "mychar"}
    samples = sorted((out / "samples").glob("*.png"))
    assert samples and Image.open(samples[-1]).size == (64, 64) and (out / "xl.preview.png").is_file()
    saved = json.loads((out / "xl.config.json").read_text())  # the run's config keeps the family default it used
    assert saved["train"]["gradient_checkpointing"] is True


def test_sdxl_without_sgm_says_what_to_do(tiny_sdxl_file, tmp_path, capsys, monkeypatch):
    import sys

    from helpers import assert_clear_error

    from lib_train.models import sgm_import

    for name in [n for n in sys.modules if n == "sgm" or n.startswith("sgm.")]:
        monkeypatch.delitem(sys.modules, name)  # put back afterwards
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "generative-models" not in p])
    monkeypatch.delenv(sgm_import.ENV_VAR)
    monkeypatch.setattr(sgm_import, "EXTENSION_ROOT", tmp_path / "nowhere" / "extensions" / "trainer")
    _sdxl_data(tmp_path)
    code, text = run_cli("lora", ["--checkpoint", tiny_sdxl_file, "--data", tmp_path / "data", "--output",
                                  tmp_path / "out", "--name", "n", "--resolution", "64", "--min-bucket", "64",
                                  "--max-bucket", "128"], capsys)
    error = text[text.index("error: "):]  # after the dataset summary: sgm is looked for once the file says SDXL
    assert_clear_error(code, error, [f"{tiny_sdxl_file} is an SDXL checkpoint", "SD_WEBUI_DIR=",
                                     "model.webui_dir (--webui-dir)"])
    assert not (tmp_path / "out" / "n.safetensors").exists()


def test_headless_embedding_run_on_a_tiny_sdxl_file(tiny_sdxl_file, tmp_path, capsys):
    make_images(tmp_path / "data" / "2_thing", n=2, size=(64, 64))
    out = tmp_path / "out"
    code, text = run_cli("embedding", ["--checkpoint", tiny_sdxl_file, "--webui-dir", os.environ["SD_WEBUI_DIR"],
                                       "--data", tmp_path / "data", "--output", out, "--name", "zqemb",
                                       "--resolution", "64", "--min-bucket", "64", "--max-bucket", "128",
                                       "--init-text", "a man in a leather jacket", "--vectors", "2", "--epochs", "2",
                                       "--save-every-epochs", "1", "--pt", "--device", "cpu"], capsys)
    assert code == 0, text
    assert "only the .safetensors (clip_l + clip_g) is written" in text  # --pt has no SDXL form: said, not failed
    assert sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix != ".json") == [
        "zqemb-000004.safetensors", "zqemb.safetensors"]
    with safe_open(str(out / "zqemb.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        meta = f.metadata()
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert shapes["clip_l"][0] == shapes["clip_g"][0] == 2
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert meta["modelspec.title"] == "zqemb"


def _sdxl_bundle(seed: int = 9):
    from sdxl_models import tiny_sgm_sdxl

    from lib_train.models.bundle import ModelBundle

    return ModelBundle.from_sgm(tiny_sgm_sdxl(seed=seed), checkpoint_name="tiny-sdxl")


def _ti_config(tmp_path, **overrides):
    from helpers import apply_overrides

    from lib_train.config import default_config

    cfg = default_config("embedding")
    cfg.data.train_dir, cfg.output.output_dir, cfg.output.name = str(tmp_path / "data"), str(tmp_path / "out"), "zqemb"
    cfg.data.resolution, cfg.data.min_bucket_side, cfg.data.max_bucket_side = 64, 64, 128
    cfg.embedding.init_text, cfg.embedding.vectors, cfg.train.epochs = "a man in a leather jacket", 2, 1
    return apply_overrides(cfg, overrides)


def _ti_run(cfg, bundle, **kw):
    from lib_train.train.ti_trainer import prepare_embedding_data, train_embedding

    return train_embedding(cfg, bundle, prepare_embedding_data(cfg), **kw)


def test_an_sdxl_embedding_run_changes_only_its_vectors(tmp_path):
    from sdxl_models import sgm_root

    from lib_train.embedding.files import load_embedding
    from lib_train.embedding.vectors import init_vectors

    sgm_root()
    _sdxl_data(tmp_path)
    cfg = _ti_config(tmp_path, data__flip=True, train__gradient_checkpointing=True, train__batch_size=2)
    bundle = _sdxl_bundle()
    before, flags = state_hash(bundle.model), module_flags(bundle.model)
    start = {k: init_vectors(c, cfg.embedding.init_text, 2)
             for k, c in zip(("clip_l", "clip_g"), bundle.text_conditioners)}
    rec = Recorder()
    result = _ti_run(cfg, bundle, events=rec)
    assert result.status == "finished" and all(torch.isfinite(torch.tensor(rec.losses)))
    assert state_hash(bundle.model) == before and module_flags(bundle.model) == flags  # every weight and table row
    assert all(c.placeholders is None for c in bundle.text_conditioners)
    trained = load_embedding(result.final_file).parts
    assert list(trained) == ["clip_l", "clip_g"]
    for key in trained:  # both sets trained, from their own encoder's rows
        assert trained[key].shape == start[key].shape and not torch.equal(trained[key], start[key]), key


def test_an_sdxl_embedding_resumes_to_the_uninterrupted_vectors(tmp_path):
    from sdxl_models import sgm_root

    from lib_train.embedding.files import load_embedding
    from lib_train.train.events import Commands
    from lib_train.train.state import load_state

    sgm_root()
    _sdxl_data(tmp_path)
    common = dict(train__epochs=2, data__flip=True, output__save_every_epochs=0, embedding__template="style")
    ref = _ti_run(_ti_config(tmp_path, output__name="ref", **common), _sdxl_bundle())
    cfg = _ti_config(tmp_path, output__name="res", **common)
    commands = Commands()
    first = _ti_run(cfg, _sdxl_bundle(), events=Recorder(stop_at=2, commands=commands), commands=commands)
    assert first.status == "interrupted"
    resumed = _ti_run(cfg, _sdxl_bundle(), resume=load_state(first.state_dir))
    assert resumed.status == "finished" and resumed.step == ref.step
    a, b = load_embedding(resumed.final_file).parts, load_embedding(ref.final_file).parts
    assert all(torch.equal(a[k], b[k]) for k in ("clip_l", "clip_g"))
    # a file of another family is refused with what it holds and what this model needs
    sd1_file = tmp_path / "sd1.safetensors"
    from lib_train.embedding.files import save_safetensors

    save_safetensors(sd1_file, torch.zeros(2, 768), {})
    with pytest.raises(TrainerError, match=r"holds 2 vectors of width 768; this SDXL model .* needs 2 vectors: "
                                           r"clip_l width \d+, clip_g width \d+: use an embedding made for SDXL"):
        _ti_run(_ti_config(tmp_path, output__name="other", embedding__init_from=str(sd1_file)), _sdxl_bundle())


def test_a_run_changes_only_the_lora_and_restores_the_model(tmp_path):
    from sdxl_models import sgm_root

    sgm_root()
    _sdxl_data(tmp_path)
    cfg = tiny_config(tmp_path, data__flip=True, train__gradient_checkpointing=True, network__rank=2,
                      network__conv_rank=2, output__save_precision="fp32", train__batch_size=2)
    bundle = _sdxl_bundle()
    before, flags = state_hash(bundle.model), module_flags(bundle.model)
    rec = Recorder()
    result = train_lora(cfg, bundle, prepare_data(cfg), events=rec)
    assert result.status == "finished" and all(torch.isfinite(torch.tensor(rec.losses)))
    assert state_hash(bundle.model) == before and module_flags(bundle.model) == flags
    tensors, meta = read_lora_file(result.final_file)
    prefixes = {k.split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"} and meta["ss_network_args"]
    assert any(tensors[k].abs().max() > 0 for k in tensors if "lora_up" in k)


def test_a_v_prediction_sdxl_run(tmp_path):
    from sdxl_models import tiny_sgm_sdxl

    from lib_train.models.bundle import ModelBundle

    make_images(tmp_path / "data" / "1_thing", n=2)
    cfg = tiny_config(tmp_path, network__rank=2, optim__te_lr=0.0, train__min_snr_gamma=5.0)
    bundle = ModelBundle.from_sgm(tiny_sgm_sdxl(seed=4, prediction="v"))
    assert bundle.prediction == "v"
    rec = Recorder()
    result = train_lora(cfg, bundle, prepare_data(cfg), events=rec)
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    tensors, meta = read_lora_file(result.final_file)
    assert all(k.startswith("lora_unet_") for k in tensors)  # no text-encoder LoRA at te_lr 0
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_base_model_version"] == "sdxl_base_v1-0"


def _losses(tmp_path, name: str, cached: bool, monkeypatch) -> tuple[list[float], Recorder, list[int]]:
    from lib_train.models.bundle import ModelBundle
    from lib_train.train.lora_trainer import LoRASession

    calls = []
    real_text = ModelBundle.text_outputs
    with monkeypatch.context() as m:
        m.setattr(ModelBundle, "text_outputs", lambda self, captions: calls.append(len(captions)) or real_text(
            self, captions))
        if not cached:
            m.setattr(LoRASession, "static_texts", lambda self: [])
            real_init = LoRASession.__init__

            def init(self, *a, **k):
                real_init(self, *a, **k)
                self.cache_text = False

            m.setattr(LoRASession, "__init__", init)
        cfg = tiny_config(tmp_path, output__name=name, optim__te_lr=0.0, train__batch_size=2, data__flip=True,
                          data__max_token_length=150)
        rec, bundle = Recorder(), _sdxl_bundle()
        before = state_hash(bundle.model), module_flags(bundle.model)
        train_lora(cfg, bundle, prepare_data(cfg), events=rec)
        assert (state_hash(bundle.model), module_flags(bundle.model)) == before
    return rec.losses, rec, calls


def test_the_text_cache_gives_the_uncached_loss(tmp_path, monkeypatch):
    from sdxl_models import sgm_root

    sgm_root()
    _sdxl_data(tmp_path)
    (tmp_path / "data" / "2_thing" / "img0.txt").write_text("thing, " + "red tag, " * 40, encoding="utf-8")  # 2 chunks
    cached, rec, calls = _losses(tmp_path, "cached", True, monkeypatch)
    assert "Caching text encodings of 4 captions and prompts" in rec.statuses
    assert calls == [1, 1, 1, 1]  # "", the long caption and two others, each once, alone; nothing per step
    uncached, rec, calls = _losses(tmp_path, "uncached", False, monkeypatch)
    assert not any(s.startswith("Caching text encodings of") for s in rec.statuses)
    assert len(calls) == len(uncached) and 2 in calls  # every step encodes its batch
    assert len(cached) == len(uncached) > 0
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(uncached), rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_covers_the_sgm_unet_and_both_text_encoders():
    from sdxl_models import sgm_root

    sgm_root()
    from lib_train.network.lora import LoRANetwork
    from lib_train.train.checkpointing import GradientCheckpointing

    bundle = _sdxl_bundle()
    names = [type(m).__name__ for m in bundle.unet.modules()]
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        net = LoRANetwork.for_model(bundle.unet, bundle.text_encoder, family=SDXL, rank=2, alpha=1.0)
        for p in net.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_up" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        ckpt = GradientCheckpointing(bundle.unet, bundle.text_encoder) if on else None
        if ckpt is not None:
            # every sgm ResBlock and BasicTransformerBlock, clip_l's 12 CLIPEncoderLayers, clip_g's 3 resblocks
            assert ckpt.count == names.count("ResBlock") + names.count("BasicTransformerBlock") + 12 + 3
        try:
            with net:
                cond = bundle.conditioning(["a cat", "a dog"], ImageSize.plain(64, 64))
                x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
                loss = bundle.predict(x, torch.tensor([10, 500]), cond).float().pow(2).mean()
                loss.backward()
        finally:
            if ckpt is not None:
                ckpt.remove()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("te2" in n or "lora_te2" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7)


def test_an_fp16_sdxl_vae_encodes_in_fp32_and_stays_fp16():
    """SDXL's VAE overflows in fp16 (Family.vae_fp16_safe): a VAE held in fp16 (as the WebUI may hold it) computes
    latents in fp32 for the call and is left bit-identical in fp16; SD1's would compute in fp16."""
    from sdxl_models import sgm_root

    sgm_root()
    bundle = _sdxl_bundle()
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    bundle.vae.half()
    before = state_hash(bundle.vae)
    assert bundle.vae_compute_dtype == torch.float32
    latents = bundle.encode_pixels(pixels)
    images = bundle.decode_latents(latents)
    assert state_hash(bundle.vae) == before and all(p.dtype == torch.float16 for p in bundle.vae.parameters())
    bundle.vae.float()  # the same (fp16-rounded) weights in fp32 give the same latents and images
    assert torch.equal(bundle.encode_pixels(pixels), latents) and torch.equal(bundle.decode_latents(latents), images)
    sd1 = make_bundle("sd1")
    sd1.vae.half()
    assert sd1.vae_compute_dtype == torch.float16
