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
def test_other_families_are_refused_by_name(sd1, attrs, words):
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
