"""Headless SDXL loading.

CI tier (no sgm): finding sgm (:mod:`lib_train.models.sgm_import`) — an explicit folder, ``SD_WEBUI_DIR``, the
WebUI the extension is installed in — and its messages when nothing is found or a found checkout cannot be imported.
sgm tier (``SD_WEBUI_DIR``): a tiny SDXL-layout checkpoint file written from sgm's own model, loaded back through
the headless loader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lib_train.errors import TrainerError
from lib_train.models import sgm_import


def _fake_webui(root: Path, sgm_init: str) -> Path:
    pkg = root / "repositories" / "generative-models" / "sgm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(sgm_init)
    return root


@pytest.fixture
def no_sgm(monkeypatch, tmp_path):
    """sgm not importable and no checkout anywhere: sgm modules unloaded, generative-models off sys.path, no
    SD_WEBUI_DIR, the extension "installed" in an empty folder (restored afterwards)."""
    for name in [n for n in sys.modules if n == "sgm" or n.startswith("sgm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "generative-models" not in p])
    monkeypatch.delenv(sgm_import.ENV_VAR, raising=False)
    monkeypatch.setattr(sgm_import, "EXTENSION_ROOT", tmp_path / "nowhere" / "extensions" / "trainer")
    yield
    for name in [n for n in sys.modules if n == "sgm" or n.startswith("sgm.")]:
        del sys.modules[name]  # the fake ones


def test_nothing_found_says_what_to_do(no_sgm, tmp_path):
    with pytest.raises(TrainerError) as err:
        sgm_import.import_sgm(tmp_path / "not-a-webui")
    text = str(err.value)
    assert text.startswith(sgm_import.NOT_FOUND)
    assert "run from an extension installed in the WebUI, or set SD_WEBUI_DIR=/path/to/stable-diffusion-webui" in text
    assert str(tmp_path / "not-a-webui" / "repositories" / "generative-models") in text


def test_search_order_explicit_env_extension(no_sgm, tmp_path, monkeypatch):
    explicit, env, installed = (_fake_webui(tmp_path / n, "") for n in ("explicit", "env", "installed"))
    monkeypatch.setattr(sgm_import, "EXTENSION_ROOT", installed / "extensions" / "sd-webui-trainer")
    sub = sgm_import.SGM_SUBDIR
    assert sgm_import.find_sgm_root() == installed / sub
    monkeypatch.setenv(sgm_import.ENV_VAR, str(env))
    assert sgm_import.find_sgm_root() == env / sub
    assert sgm_import.find_sgm_root(explicit) == explicit / sub
    assert sgm_import.find_sgm_root(tmp_path / "empty") == env / sub  # a folder without the checkout is skipped


def test_found_but_a_package_is_missing(no_sgm, tmp_path):
    webui = _fake_webui(tmp_path / "webui", "import kornia_not_installed_here\n")
    entry = str(webui / sgm_import.SGM_SUBDIR)
    with pytest.raises(TrainerError) as err:
        sgm_import.import_sgm(webui)
    text = str(err.value)
    assert f"sgm (found at {entry}) cannot be imported" in text
    assert "the Python package 'kornia_not_installed_here' is missing" in text
    assert "pip install kornia_not_installed_here" in text
    assert entry not in sys.path and "sgm" not in sys.modules  # nothing half-done left behind


def test_found_and_imported_from_the_checkout(no_sgm, tmp_path):
    webui = _fake_webui(tmp_path / "webui", "FAKE = True\n")
    assert sgm_import.import_sgm(webui).FAKE
    assert sys.path[0] == str(webui / sgm_import.SGM_SUBDIR)
    sgm_import.import_sgm(tmp_path / "elsewhere")  # importable now: no second entry
    assert sys.path.count(str(webui / sgm_import.SGM_SUBDIR)) == 1


# ---- sgm tier: a tiny SDXL-layout checkpoint through the headless loader

@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """(the tiny sgm engine, its checkpoint file): every UNet, VAE and text-encoder tensor, as a WebUI-saved SDXL
    file holds them (no denoiser buffers)."""
    from safetensors.torch import save_file
    from sdxl_models import sgm_root, tiny_sgm_sdxl

    sgm_root()
    from lib_train.models.sdxl_load import REQUIRED

    model = tiny_sgm_sdxl(seed=11)
    sd = {k: t.contiguous() for k, t in model.state_dict().items() if k.startswith(REQUIRED)}
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    save_file(sd, str(path))
    return model, path


@pytest.fixture
def sdxl_on(monkeypatch):
    from lib_train.models import spec

    monkeypatch.setattr(spec, "TRAINS_SDXL", True)  # on already (families.TRAINS_SDXL); kept explicit here


def _load(path, prediction="auto"):
    from lib_train.models.sdxl_load import load_sdxl_checkpoint

    return load_sdxl_checkpoint(path, prediction=prediction, webui_dir=None)


def test_switch_off_refuses_sdxl(tiny_file, monkeypatch):
    from lib_train.models import spec
    from lib_train.models.checkpoint import load_checkpoint

    monkeypatch.setattr(spec, "TRAINS_SDXL", False)
    with pytest.raises(TrainerError, match="This checkpoint is an SDXL model; this version trains SD1.x and SD2.x"):
        load_checkpoint(tiny_file[1])


def test_spec_config_and_parts(tiny_file, sdxl_on):
    import torch
    from sgm.models.diffusion import DiffusionEngine
    from sgm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2

    from lib_train.models.bundle import ModelBundle
    from lib_train.models.families import SDXL
    from lib_train.models.spec import SDXLSpec

    original, path = tiny_file
    model, info = _load(path)
    spec = info.spec
    assert isinstance(spec, SDXLSpec) and spec.family == SDXL.name and not spec.is_full_size
    u = spec.unet
    assert (u.model_channels, u.channel_mult, u.attention_resolutions, u.transformer_depth,
            u.transformer_depth_middle, u.context_dim, u.adm_in_channels) == (32, [1, 2, 4], [4, 2], [1, 2, 2], 2,
                                                                              64, 24 + 1536)
    assert (spec.clip_l.width, spec.clip_l.layers, spec.clip_g.width, spec.clip_g.layers) == (32, 12, 32, 3)
    assert (info.prediction, info.prediction_source, info.name) == ("eps", "default", "tiny-sdxl.safetensors")
    assert isinstance(model, DiffusionEngine) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert isinstance(model.conditioner.embedders[0], FrozenCLIPEmbedder)
    assert isinstance(model.conditioner.embedders[1], FrozenOpenCLIPEmbedder2)
    assert len(model.conditioner.embedders) == 5 and model.scale_factor == SDXL.latent_scale
    bundle = ModelBundle.from_sgm(model, prediction=info.prediction, checkpoint_name=info.name)
    assert bundle.family == SDXL.name and bundle.unet is model.model.diffusion_model
    assert torch.equal(bundle.alphas_cumprod, ModelBundle.from_sgm(original).alphas_cumprod)
    from lib_train.models.sdxl_load import build_sdxl

    fresh = build_sdxl(spec)  # random weights (the loader leaves UNet and VAE unfilled until the strict load)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert all(torch.isfinite(t).all() for t in fresh.state_dict().values() if t.is_floating_point())


def test_state_dict_round_trips_bit_exactly(tiny_file, sdxl_on):
    import torch
    from safetensors.torch import load_file

    from lib_train.models.sdxl_load import build_sdxl, load_sdxl_weights

    original, path = tiny_file
    model, info = _load(path)
    ours, theirs = model.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    sd = dict(load_file(str(path)), model_ema_decay=torch.zeros(1))
    fresh = build_sdxl(info.spec, init=False)
    load_sdxl_weights(fresh, sd)  # each file tensor leaves the dict once copied (the file's copy is freed)
    assert list(sd) == ["model_ema_decay"]
    assert all(torch.equal(t, theirs[k]) for k, t in fresh.state_dict().items())


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_loading_straight_into_the_training_dtype_equals_load_then_cast(tiny_file, sdxl_on, dtype_name):
    """frozen_dtype (a GPU run's half precision): UNet and text encoders are made in it and the file's tensors copied
    straight in; bit for bit what loading in fp32 and casting gives; the VAE stays fp32."""
    import torch

    from lib_train.models.checkpoint import load_checkpoint

    dtype = getattr(torch, dtype_name)
    _original, path = tiny_file
    direct, _ = load_checkpoint(path, frozen_dtype=dtype)
    cast, _ = load_checkpoint(path)
    cast.model.to(dtype)
    cast.conditioner.to(dtype)
    a, b = direct.state_dict(), cast.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert next(direct.model.parameters()).dtype == dtype
    assert next(direct.conditioner.parameters()).dtype == dtype
    assert {p.dtype for p in direct.first_stage_model.parameters()} == {torch.float32}


def test_conditioning_and_predict_equal_the_original(tiny_file, sdxl_on):
    import torch

    from lib_train.models.bundle import ModelBundle

    original, path = tiny_file
    model, info = _load(path)
    ours, theirs = ModelBundle.from_sgm(model, prediction=info.prediction), ModelBundle.from_sgm(original)
    captions = ["a photo of a cat", "", "a dog, " * 40]
    from lib_train.models.conditioning import ImageSize

    sizes = [ImageSize(original, (0, 8), (64, 64)) for original in ((64, 96), (96, 64), (64, 64))]
    with torch.no_grad():
        c_ours, c_theirs = ours.conditioning(captions, sizes), theirs.conditioning(captions, sizes)
        assert torch.equal(c_ours["crossattn"], c_theirs["crossattn"])
        assert torch.equal(c_ours["vector"], c_theirs["vector"])
        batch = {"txt": captions[:1], "original_size_as_tuple": torch.tensor([[64, 64]]),
                 "crop_coords_top_left": torch.tensor([[0, 0]]), "target_size_as_tuple": torch.tensor([[64, 64]])}
        sgm_ours, sgm_theirs = model.conditioner(batch), original.conditioner(batch)  # sgm's own forward too
        assert all(torch.equal(sgm_ours[k], sgm_theirs[k]) for k in ("crossattn", "vector"))
        x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([5, 500, 999])
        assert torch.equal(ours.predict(x, t, c_ours), original.model(x, t, c_theirs))
        pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        assert torch.equal(ours.encode_pixels(pixels), theirs.encode_pixels(pixels))


def test_prediction_override_and_sidecar_yaml(tiny_file, sdxl_on, tmp_path):
    import shutil

    from sgm.modules.diffusionmodules.denoiser_scaling import EpsScaling, VScaling

    from lib_train.models.bundle import ModelBundle

    _, path = tiny_file
    model, info = _load(path, prediction="v")
    assert (info.prediction, info.prediction_source) == ("v", "flag")
    assert isinstance(model.denoiser.scaling, VScaling) and ModelBundle.from_sgm(model).prediction == "v"
    copy = tmp_path / "vpred.safetensors"
    shutil.copy(path, copy)
    (tmp_path / "vpred.yaml").write_text(
        "scaling_config:\n  target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n")
    assert _load(copy)[1].prediction == "v"
    model, info = _load(copy, prediction="eps")
    assert info.prediction == "eps" and isinstance(model.denoiser.scaling, EpsScaling)
    import torch
    from safetensors.torch import load_file, save_file

    marked = tmp_path / "marked.safetensors"  # v-prediction fine-tunes (NoobAI-style) carry a v_pred tensor
    save_file(dict(load_file(str(path)), v_pred=torch.tensor([])), str(marked))
    model, info = _load(marked)
    assert (info.prediction, info.prediction_source) == ("v", "v_pred marker in the checkpoint")
    assert isinstance(model.denoiser.scaling, VScaling)


def test_strict_keys_are_named(tiny_file, sdxl_on, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = tiny_file
    sd = load_file(str(path))
    gone = "first_stage_model.decoder.conv_out.bias"
    extra = "conditioner.embedders.1.model.extra_projection"
    broken = {k: t for k, t in sd.items() if k != gone}
    broken[extra] = sd["conditioner.embedders.1.model.text_projection"].clone()
    broken["model_ema.decay"] = sd[gone].clone()  # outside the model's prefixes: ignored
    bad = tmp_path / "broken.safetensors"
    save_file(broken, str(bad))
    with pytest.raises(TrainerError) as err:
        _load(bad)
    text = str(err.value)
    assert f"missing weights this model needs: {gone}" in text
    assert f"tensors this SDXL layout does not have: {extra}" in text and "model_ema" not in text

    odd = "model.diffusion_model.out.2.bias"
    wrong = dict(sd, **{odd: sd[odd][:2].clone()})
    save_file(wrong, str(bad))
    with pytest.raises(TrainerError) as err:
        _load(bad)
    assert f"tensors of another shape than the layout read from the file: {odd} is [2], expected [4]" in str(err.value)


def test_load_bundle_headless(tiny_file, sdxl_on):
    import torch

    from lib_train.config import TrainConfig
    from lib_train.models.load import load_bundle

    original, path = tiny_file
    cfg = TrainConfig()
    cfg.model.checkpoint = str(path)
    lines = []
    bundle = load_bundle(cfg, "cpu", lines.append)
    assert lines[0] == f"Loading {path} ..." and lines[1].startswith("  SDXL model, eps-prediction (default)")
    assert bundle.family == "sdxl" and bundle.dtype == torch.float32 and bundle.checkpoint_name == path.name
    assert bundle.checkpoint_hashes()["sha256"]


# ---- sgm tier, full size on the meta device (no memory)

def test_full_size_layout_config_and_spec_on_meta(sdxl_on):
    import contextlib
    import io

    import torch
    from omegaconf import OmegaConf
    from sdxl_models import sgm_root

    root = sgm_root()
    from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper
    from sgm.util import instantiate_from_config

    from lib_train.models.families import SDXL
    from lib_train.models.sdxl_load import REQUIRED, sgm_config
    from lib_train.models.spec import SDXLSpec, detect_family, infer_spec

    ours = sgm_config(SDXLSpec())
    yaml = OmegaConf.to_container(OmegaConf.load(root / "configs" / "inference" / "sd_xl_base.yaml").model.params)
    # the yaml's values, apart from the headless choices (attention, checkpointing, offline text embedders)
    unet = dict(yaml["network_config"]["params"], use_checkpoint=False, spatial_transformer_attn_type="softmax")
    assert {k: ours["network_config"]["params"][k] for k in unet} == unet
    assert ours["network_config"]["target"] == yaml["network_config"]["target"]
    vae = yaml["first_stage_config"]
    vae["params"]["ddconfig"]["attn_type"] = "vanilla"
    assert ours["first_stage_config"] == vae
    assert ours["scale_factor"] == yaml["scale_factor"] and ours["denoiser_config"]["target"] == yaml[
        "denoiser_config"]["target"]
    emb_ours, emb_yaml = ours["conditioner_config"]["params"]["emb_models"], yaml["conditioner_config"]["params"][
        "emb_models"]
    assert emb_ours[2:] == emb_yaml[2:] and [e["input_key"] for e in emb_ours] == [e["input_key"] for e in emb_yaml]
    assert [e["params"]["layer"] for e in emb_ours[:2]] == [e["params"]["layer"] for e in emb_yaml[:2]]

    # the engine's parts as DiffusionEngine builds them (its denoiser computes its schedule in numpy: not on meta)
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        model = torch.nn.Module()
        model.model = OpenAIWrapper(instantiate_from_config(ours["network_config"]))
        model.conditioner = instantiate_from_config(ours["conditioner_config"])
        model.first_stage_model = instantiate_from_config(ours["first_stage_config"])
    sd = {k: t for k, t in model.state_dict().items() if k.startswith(REQUIRED)}
    counts = {p: sum(k.startswith(p) for k in sd) for p in ("model.diffusion_model.", "first_stage_model.",
                                                             "conditioner.embedders.0.", "conditioner.embedders.1.")}
    # WEBUI.md §8b: SDXL base 1.0 holds 2515 tensors (UNet 1680, VAE 248, CLIP-L 197, OpenCLIP bigG 390); the
    # transformers pinned here may keep clip_l's position_ids out of the state dict (the loader accepts both)
    clip_l = counts.pop("conditioner.embedders.0.")
    assert counts == {"model.diffusion_model.": 1680, "first_stage_model.": 248, "conditioner.embedders.1.": 390}
    assert clip_l in (196, 197)
    assert detect_family(sd) == SDXL.name
    spec = infer_spec(sd)
    assert spec == SDXLSpec() and spec.is_full_size
    n_unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    n_text = sum(p.numel() for e in model.conditioner.embedders[:2] for n, p in e.named_parameters()
                 if not n.endswith("logit_scale"))  # open_clip's CLIP-loss temperature: no part of the text tower
    assert (n_unet, n_text) == (SDXL.params.unet, SDXL.params.text_encoder)
