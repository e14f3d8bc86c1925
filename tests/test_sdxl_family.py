"""The SDXL record of the family table (lib_train/models/families.py) and SDXL checkpoint detection
(lib_train/models/spec.py): file strings per FORMATS §B, text-encoder records, the training rules (implementation
string, VAE precision, family defaults), the TRAINS_SDXL switch (on), and the variants refused with a reason (refiner,
SSD-1B, inpainting, SD3)."""

from __future__ import annotations

import pytest
import torch
from sdxl_models import meta_sdxl_text_encoders

from lib_train.errors import TrainerError
from lib_train.models import families, spec
from lib_train.models.families import (FAMILIES, RECORDS, SD1, SD2, SDXL, SIDECAR_SD_VERSIONS, TRAINS_SDXL, as_family,
                                       family_name_from_metadata, get_family)
from lib_train.models.spec import detect_family, sdxl_problem
from lib_train.models.text_encoders import HF_CLIP, OPEN_CLIP, Layer


def test_the_sdxl_record_reproduces_kohyas_file_strings():
    assert (SDXL.name, SDXL.label, SDXL.short, SDXL.sidecar_sd_version) == ("sdxl", "SDXL", "SDXL", "SDXL")
    # kohya: sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, no "_v" suffix (that is SD1/SD2's rule)
    assert SDXL.ss_base_model_version("eps") == SDXL.ss_base_model_version("v") == "sdxl_base_v1-0"
    assert SDXL.ss_v2 is False
    assert SDXL.modelspec_architecture("eps") == "stable-diffusion-xl-v1-base/lora"
    assert SDXL.modelspec_architecture("v", "textual-inversion") == "stable-diffusion-xl-v1-base/textual-inversion"
    assert SDXL.native_resolution("eps") == SDXL.native_resolution("v") == 1024
    assert SDXL.latent_scale == 0.13025
    assert SDXL.clip_skip_applies is False and SDXL.clip_skip(2) == 1 and SDXL.encoder_layer(2) is None
    assert SDXL.te_prefixes == ("lora_te1_", "lora_te2_")
    assert SDXL.unet_lora_names == families.SGM_NAMES and SD1.unet_lora_names == SD2.unet_lora_names == "diffusers"
    assert SDXL.size_conditioning and not SD1.size_conditioning
    # the metadata rule A1111 uses (network.py: ss_base_model_version startswith "sdxl_") gives SDXL
    assert family_name_from_metadata({"ss_base_model_version": SDXL.ss_base_model_version("eps")}) == SDXL.name
    assert SIDECAR_SD_VERSIONS[SDXL.name] == "SDXL"


def test_the_two_text_encoder_records():
    clip_l, clip_g = SDXL.text_encoders
    assert (clip_l.kind, clip_l.checkpoint_prefix, clip_l.lora_prefix, clip_l.path, clip_l.key) == (
        HF_CLIP, "conditioner.embedders.0.transformer.", "lora_te1_", "embedders.0", "clip_l")
    assert (clip_g.kind, clip_g.checkpoint_prefix, clip_g.lora_prefix, clip_g.path, clip_g.key) == (
        OPEN_CLIP, "conditioner.embedders.1.model.", "lora_te2_", "embedders.1", "clip_g")
    # sgm config: clip_l layer "hidden", layer_idx 11 (= [-2] of 12 layers), no final norm; clip_g "penultimate",
    # legacy False (no ln_final on the hidden state), always_return_pooled
    assert clip_l.layer == Layer(-2, final_norm=False) and clip_g.layer == Layer(-2, final_norm=False, pooled=True)
    assert clip_l.lora_last_layer and clip_g.lora_last_layer and not SD2.text_encoder.lora_last_layer
    with pytest.raises(ValueError, match="2 text encoders"):
        SDXL.text_encoder
    root = meta_sdxl_text_encoders()
    assert clip_l.module(root) is root.embedders[0] and clip_g.module(root) is root.embedders[1]
    assert SDXL.matches_live(root) and not SD1.matches_live(root) and not SD2.matches_live(root)
    assert not SDXL.matches_live(root.embedders[0])


def test_the_switch_puts_sdxl_among_the_trained_families():
    assert TRAINS_SDXL is True, "SDXL trains end to end (tests/test_sdxl_train.py)"
    assert list(RECORDS) == ["sd1", "sd2", "sdxl"] and list(FAMILIES) == ["sd1", "sd2", "sdxl"]
    assert get_family(SDXL.name) is SDXL and as_family(SDXL) is SDXL and as_family("sdxl") is SDXL
    with pytest.raises(ValueError, match="'sd1' or 'sd2' or 'sdxl'"):
        get_family("sd3")


def test_the_sdxl_rules_for_training():
    # kohya writes the sgm repository as the implementation of SDXL LoRA (its key naming); SD1/SD2: "diffusers"
    assert SDXL.modelspec_implementation == "https://github.com/Stability-AI/generative-models"
    assert SD1.modelspec_implementation == SD2.modelspec_implementation == "diffusers"
    assert not SDXL.vae_fp16_safe and SD1.vae_fp16_safe and SD2.vae_fp16_safe
    assert dict(SDXL.config_defaults) == {"train.gradient_checkpointing": True}
    assert SD1.config_defaults == SD2.config_defaults == ()


def _sdxl_sd(in_channels: int = 4, **drop) -> dict:
    """The marker keys of an SDXL base checkpoint (shapes only where detection reads them)."""
    u, e = "model.diffusion_model.", "conditioner.embedders."
    sd = {u + "input_blocks.0.0.weight": torch.empty(320, in_channels, 3, 3, device="meta"),
          u + "middle_block.1.transformer_blocks.0.attn1.to_q.weight": torch.empty(1280, 1280, device="meta"),
          e + "0.transformer.text_model.embeddings.token_embedding.weight": torch.empty(49408, 768, device="meta"),
          e + "1.model.token_embedding.weight": torch.empty(49408, 1280, device="meta"),
          e + "1.model.ln_final.weight": torch.empty(1280, device="meta")}
    return {k: v for k, v in sd.items() if not any(k.endswith(d) for d in drop)}


def test_sdxl_detection_and_the_refused_variants(monkeypatch):
    assert sdxl_problem(_sdxl_sd()) is None
    assert detect_family(_sdxl_sd()) == "sdxl"
    monkeypatch.setattr(spec, "TRAINS_SDXL", False)  # the switch off: refused with the reason
    with pytest.raises(TrainerError, match="SDXL model; this version trains SD1.x and SD2.x"):
        detect_family(_sdxl_sd())
    monkeypatch.setattr(spec, "TRAINS_SDXL", True)
    refiner = {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(384, 4, 3, 3, device="meta"),
               "conditioner.embedders.0.model.ln_final.weight": torch.empty(1280, device="meta"),
               "conditioner.embedders.0.model.token_embedding.weight": torch.empty(49408, 1280, device="meta")}
    cases = [(refiner, "SDXL refiner"), (_sdxl_sd(in_channels=9), "SDXL inpainting"),
             (_sdxl_sd(**{"attn1.to_q.weight": 1}), "SSD-1B"),
             (_sdxl_sd(**{"token_embedding.weight": 1}), "not SDXL's two text encoders"),
             ({"model.diffusion_model.x_embedder.proj.weight": torch.empty(1)}, "SD3"),
             ({"model.diffusion_model.joint_blocks.0.x": torch.empty(1)}, "SD3")]
    for sd, reason in cases:
        with pytest.raises(TrainerError, match=reason):
            detect_family(sd)
