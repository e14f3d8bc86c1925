"""Which loaded models the WebUI layer trains and which it refuses (lib_train/webui/host.py ``classify_model``).

Runs without a WebUI on real (tiny) ldm models; the WebUI-only parts (``--lowvram``, FP8, SD Unet) are checked in
the real-WebUI tests' host report.
"""

from __future__ import annotations

import types

import pytest
import torch
from helpers import make_tiny_model

from lib_train.webui.host import classify_model


@pytest.fixture
def sd1():
    return make_tiny_model("sd1")


def test_sd1_and_sd2_ldm_models_are_trainable(sd1):
    assert classify_model(sd1) == ("sd1", "")
    assert classify_model(make_tiny_model("sd2")) == ("sd2", "")


def test_webui_wrapped_text_encoder_is_looked_through(sd1):
    class Wrapper(torch.nn.Module):  # the shape of the WebUI's FrozenCLIPEmbedderWithCustomWords
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

    sd1.cond_stage_model = Wrapper(sd1.cond_stage_model)
    assert classify_model(sd1) == ("sd1", "")


def test_no_model_says_to_load_one():
    family, reason = classify_model(None)
    assert family is None and "No checkpoint is loaded" in reason


@pytest.mark.parametrize("attrs, words", [
    ({"is_sdxl": True}, "SDXL"),
    ({"is_sdxl": True, "is_ssd": True}, "SSD-1B"),
    ({"is_sd3": True}, "SD3"),
])
@pytest.mark.parametrize("sdxl", ["sdxl_off", "sdxl_trains"])
def test_other_families_are_refused_by_name(sd1, attrs, words, sdxl, request):
    request.getfixturevalue(sdxl)
    for key, value in attrs.items():
        setattr(sd1, key, value)
    family, reason = classify_model(sd1)
    assert family is None and words in reason and "SD1.x or SD2.x" in reason


def test_inpainting_conditioning_is_refused(sd1):
    sd1.model.conditioning_key = "hybrid"
    family, reason = classify_model(sd1)
    assert family is None and "'hybrid'" in reason and "inpainting" in reason


def test_forge_and_non_ldm_models_are_refused():
    forge = types.SimpleNamespace(forge_objects=object(), is_sd1=True)
    family, reason = classify_model(forge)
    assert family is None and "Forge" in reason and "still load" in reason
    family, reason = classify_model(types.SimpleNamespace(unet=object()))
    assert family is None and "not an ldm LatentDiffusion" in reason


def test_unknown_text_encoder_is_refused(sd1):
    sd1.cond_stage_model = torch.nn.Linear(2, 2)  # neither HF CLIP (SD1) nor OpenCLIP (SD2), e.g. Alt-Diffusion
    family, reason = classify_model(sd1)
    assert family is None and "Linear" in reason


# ---- SDXL (sgm tier: real sgm DiffusionEngines at tiny width; skipped without SD_WEBUI_DIR)

@pytest.fixture
def sdxl_trains(monkeypatch):
    """The SDXL record among the trained families (as when lib_train.models.families.TRAINS_SDXL is on)."""
    from lib_train.models import families

    monkeypatch.setitem(families.FAMILIES, families.SDXL.name, families.SDXL)


@pytest.fixture
def sdxl_off(monkeypatch):
    """SDXL not trained (TRAINS_SDXL off)."""
    from lib_train.models import families

    monkeypatch.delitem(families.FAMILIES, families.SDXL.name, raising=False)


@pytest.fixture(scope="module")
def sdxl_base():
    from sdxl_models import tiny_sgm_sdxl

    return tiny_sgm_sdxl()


def tiny_sgm_refiner():
    """sgm's SDXL refiner (configs/inference/sd_xl_refiner.yaml: clip_g only, original size, crop, aesthetic score)
    built from sgm's own classes at tiny width."""
    import contextlib
    import io

    import open_clip
    from omegaconf import OmegaConf
    from sdxl_models import TINY_CLIP_G_EMBED, sgm_root, tiny_clip_g_model

    root = sgm_root()
    from sgm.models.diffusion import DiffusionEngine

    params = OmegaConf.to_container(OmegaConf.load(root / "configs" / "inference" / "sd_xl_refiner.yaml").model.params)
    unet = params["network_config"]["params"]
    unet.update(model_channels=32, num_head_channels=-1, num_heads=8, transformer_depth=[1, 1, 1, 1], context_dim=32,
                adm_in_channels=TINY_CLIP_G_EMBED + 5 * 256, use_checkpoint=False,
                spatial_transformer_attn_type="softmax")
    params["first_stage_config"]["params"]["ddconfig"].update(ch=32, num_res_blocks=1, attn_type="vanilla")
    params["conditioner_config"]["params"]["emb_models"][0]["params"]["device"] = "cpu"
    mp = pytest.MonkeyPatch()
    mp.setattr(open_clip, "create_model_and_transforms",
               lambda *a, **k: (tiny_clip_g_model(embed_dim=TINY_CLIP_G_EMBED), None, None))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return DiffusionEngine(**params).eval()
    finally:
        mp.undo()


def test_sdxl_base_is_refused_while_sdxl_is_not_trained(sdxl_base, sdxl_off):
    family, reason = classify_model(sdxl_base)
    assert family is None and "SDXL (base or refiner) models cannot be trained here yet" in reason


def test_sdxl_base_is_trainable_once_sdxl_is(sdxl_base, sdxl_trains):
    assert classify_model(sdxl_base) == ("sdxl", "")


def test_sdxl_look_alikes_are_refused_with_their_reason(sdxl_base, sdxl_trains, monkeypatch):
    monkeypatch.setattr(sdxl_base, "is_ssd", True, raising=False)  # what the WebUI sets (and deletes UNet blocks)
    family, reason = classify_model(sdxl_base)
    assert family is None and "SSD-1B" in reason and "SDXL base checkpoint" in reason
    monkeypatch.setattr(sdxl_base, "is_ssd", False)
    monkeypatch.setattr(sdxl_base, "is_sdxl_inpaint", True, raising=False)  # the WebUI's flag (9 input channels)
    family, reason = classify_model(sdxl_base)
    assert family is None and "inpainting" in reason
    monkeypatch.setattr(sdxl_base, "is_sdxl_inpaint", False)
    monkeypatch.setattr(sdxl_base, "is_sd3", True, raising=False)
    family, reason = classify_model(sdxl_base)
    assert family is None and "SD3" in reason


def test_sdxl_refiner_is_refused(sdxl_trains):
    family, reason = classify_model(tiny_sgm_refiner())
    assert family is None and "refiner" in reason and "SDXL base checkpoint" in reason


def test_sdxl_base_with_its_embedders_reordered_is_refused(sdxl_trains):
    from sdxl_models import tiny_sgm_sdxl

    model = tiny_sgm_sdxl(seed=2)
    e = model.conditioner.embedders
    e[0], e[1] = e[1], e[0]
    family, reason = classify_model(model)
    assert family is None and "not SDXL base's" in reason and "FrozenOpenCLIPEmbedder2(txt)" in reason


@pytest.mark.parametrize("option, clip_skip, refused", [
    (False, 1, False), (False, 3, False),  # the option off: clip skip does not touch SDXL
    (True, 2, False),  # on with clip skip 2: hidden_states[-2] is layer 11 of 12, SDXL's own layer
    (True, 1, True), (True, 3, True),
])
def test_clip_skip_sdxl_option_is_refused_when_it_changes_the_layer(sdxl_base, option, clip_skip, refused):
    from lib_train.webui.host import clip_l_skip_problem

    opts = types.SimpleNamespace(sdxl_clip_l_skip=option, CLIP_stop_at_last_layers=clip_skip)
    problem = clip_l_skip_problem(sdxl_base, opts)
    assert bool(problem) is refused
    if refused:
        assert "Clip skip SDXL" in problem and f"Clip skip {clip_skip}" in problem and "off" in problem
    assert clip_l_skip_problem(make_tiny_model("sd1"), opts) == ""  # SD1: the option does not apply
