"""The live estimate: its parameter counts come from the real module layouts, and it moves the right way."""

from __future__ import annotations

import pytest
import torch
from full_size_models import meta_sd1_text_encoder, meta_sd2_text_encoder, meta_sd2_unet, meta_sd15_unet

from lib_train.config import default_config
from lib_train.estimate import LORA_PARAMS_PER_RANK, MODEL_PARAMS, estimate, lora_params, rate_from_run
from lib_train.models.build import ldm_config
from lib_train.models.spec import sd15_spec
from lib_train.network.lora import LoRANetwork


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_counts_match_the_real_layouts(family):
    unet, te = ((meta_sd15_unet(), meta_sd1_text_encoder()) if family == "sd1"
                else (meta_sd2_unet(), meta_sd2_text_encoder()))
    assert _count(unet) == MODEL_PARAMS[family]["unet"]
    assert _count(te) == MODEL_PARAMS[family]["text_encoder"]
    per = LORA_PARAMS_PER_RANK[family]
    for rank in (1, 4):
        assert _count(LoRANetwork.for_model(unet, None, family=family, rank=rank, alpha=1)) == rank * per["unet"]
        assert _count(LoRANetwork.for_model(None, te, family=family, rank=rank, alpha=1,
                                            train_unet=False)) == rank * per["text_encoder"]
    locon = LoRANetwork.for_model(unet, None, family=family, rank=2, alpha=1, conv_rank=3, conv_alpha=1)
    assert _count(locon) == 2 * (per["unet"] + per["locon_linear"]) + 3 * per["conv"]


def test_vae_count_matches_ldm():
    from ldm.models.autoencoder import AutoencoderKL

    params = ldm_config(sd15_spec())["first_stage_config"]["params"]
    with torch.device("meta"):
        vae = AutoencoderKL(**params)
    assert _count(vae) == MODEL_PARAMS["sd1"]["vae"] == MODEL_PARAMS["sd2"]["vae"]


def test_estimate_moves_with_the_settings():
    cfg = default_config()
    cfg.data.resolution = 512
    base = estimate(cfg, 1000)
    assert 3.0 < base.vram_gib < 6.0 and base.seconds is None and "shown once a run" in base.note
    cfg.train.gradient_checkpointing = True
    assert estimate(cfg, 1000).vram_gib < base.vram_gib
    cfg.train.gradient_checkpointing = False
    cfg.train.batch_size = 4
    assert estimate(cfg, 1000).parts["activations"] == pytest.approx(4 * base.parts["activations"])
    cfg.train.batch_size, cfg.data.cache_latents = 1, "off"
    assert "VAE weights (fp32)" not in base.parts
    assert estimate(cfg, 1000).parts["VAE weights (fp32)"] > 0  # the VAE stays on the GPU
    cfg.data.cache_latents, cfg.train.mixed_precision = "memory", "no"
    fp32 = estimate(cfg, 1000)
    assert fp32.parts["UNet weights"] == pytest.approx(2 * base.parts["UNet weights"])
    assert fp32.parts["text-encoder weights"] == pytest.approx(2 * base.parts["text-encoder weights"])
    cfg.train.mixed_precision, cfg.optim.optimizer = "auto", "AdamW8bit"
    assert estimate(cfg, 1000).vram_gib < base.vram_gib
    emb = default_config("embedding")
    emb.data.resolution = 512
    assert "LoRA + gradients + optimizer" not in estimate(emb, 10).parts
    sd2 = estimate(cfg, 1000, family="sd2")
    assert sd2.parts["text-encoder weights"] > base.parts["text-encoder weights"]


def test_lora_params_follow_what_is_trained():
    cfg = default_config()
    cfg.network.rank = 16
    full = lora_params(cfg, "sd1")
    assert full == 16 * (423_936 + 165_888)
    cfg.optim.te_lr = 0
    assert lora_params(cfg, "sd1") == 16 * 423_936
    cfg.network.conv_rank = 8
    assert lora_params(cfg, "sd1") == 16 * (423_936 + 82_880) + 8 * 544_000
    cfg.network.conv_rank = 0
    cfg.network.train_unet = False
    assert lora_params(cfg, "sd1") == 0


def test_time_comes_from_a_measured_rate():
    rate = rate_from_run(512, 1, 1, steps=100, seconds=150.0, name="mychar")
    cfg = default_config()
    cfg.data.resolution = 512
    est = estimate(cfg, 200, rate=rate)
    assert est.seconds == pytest.approx(300.0) and "1.50 s/step" in est.note
    cfg.data.resolution, cfg.train.batch_size = 256, 2
    assert estimate(cfg, 200, rate=rate).seconds == pytest.approx(150.0)  # half the pixels per step
    assert rate_from_run(512, 1, 1, steps=0, seconds=10.0, name="x") is None
