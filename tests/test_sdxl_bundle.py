"""The model bundle over an sgm DiffusionEngine (ModelBundle.from_sgm) on a tiny SDXL built from sgm's own classes
(sgm tier: skipped without SD_WEBUI_DIR): the parts it exposes, prediction and schedule from the loaded model,
conditioning passed as context and y, deterministic latents, and a few LoRA steps (UNet + both text encoders) after
which only LoRA parameters changed and the model is restored exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import module_flags, state_hash
from sdxl_models import TINY_CLIP_G_EMBED, sgm_root, tiny_sgm_sdxl

from lib_train.models.bundle import ModelBundle, SDXLText
from lib_train.models.conditioning import ImageSize
from lib_train.models.families import SDXL
from lib_train.network.lora import LoRANetwork
from lib_train.network.naming import unet_stem_is_locon


@pytest.fixture(scope="module")
def model():
    return tiny_sgm_sdxl()


def test_the_bundle_exposes_the_engines_parts(model):
    bundle = ModelBundle.from_sgm(model, checkpoint_name="tiny-sdxl")
    assert bundle.family == SDXL.name and bundle.family_rules is SDXL
    assert bundle.unet is model.model.diffusion_model and bundle.vae is model.first_stage_model
    assert isinstance(bundle.encode_text, SDXLText) and list(bundle.text_encoder.embedders) == list(
        model.conditioner.embedders[:2])
    assert bundle.scale_factor == SDXL.latent_scale and bundle.resolution == 1024
    assert bundle.prediction == "eps" and ModelBundle.from_sgm(model, prediction="v").prediction == "v"
    assert ModelBundle.from_sgm(tiny_sgm_sdxl(prediction="v")).prediction == "v"
    from sgm.modules.diffusionmodules.discretizer import LegacyDDPMDiscretization

    expected = torch.tensor(LegacyDDPMDiscretization().alphas_cumprod, dtype=torch.float32)
    assert torch.allclose(bundle.alphas_cumprod, expected, rtol=1e-6, atol=0)
    model.alphas_cumprod = expected * 0.5  # what the WebUI sets is read first
    try:
        assert torch.equal(bundle.alphas_cumprod, expected * 0.5)
    finally:
        del model.alphas_cumprod


def test_conditioning_prediction_and_latents(model):
    bundle = ModelBundle.from_sgm(model)
    sizes = [ImageSize((64, 96), (0, 0), (64, 64)), ImageSize((64, 64), (0, 0), (64, 64))]
    cond = bundle.conditioning(["a cat", "a dog"], sizes)
    assert cond["crossattn"].shape == (2, 77, 64) and cond["vector"].shape == (2, TINY_CLIP_G_EMBED + 1536)
    webui_default = bundle.conditioning(["a cat"])  # original = target = 1024², crop (0, 0)
    with torch.no_grad():
        theirs = model.conditioner({"txt": ["a cat"], "original_size_as_tuple": torch.tensor([[1024, 1024]]),
                                    "crop_coords_top_left": torch.tensor([[0, 0]]),
                                    "target_size_as_tuple": torch.tensor([[1024, 1024]])})
    assert torch.equal(webui_default["crossattn"], theirs["crossattn"])
    assert torch.equal(webui_default["vector"], theirs["vector"])
    with torch.no_grad():  # sgm's own conditioner on the same per-image sizes (h, w / top, left)
        theirs = model.conditioner({"txt": ["a cat", "a dog"],
                                    "original_size_as_tuple": torch.tensor([[64, 96], [64, 64]]),
                                    "crop_coords_top_left": torch.tensor([[0, 0], [0, 0]]),
                                    "target_size_as_tuple": torch.tensor([[64, 64], [64, 64]])})
    assert torch.equal(cond["vector"], theirs["vector"]) and torch.equal(cond["crossattn"], theirs["crossattn"])
    text = bundle.text_outputs(["a cat", "a dog"])  # the cacheable half: context and pooled output
    assert set(text) == {"crossattn", "pooled"} and text["pooled"].shape == (2, TINY_CLIP_G_EMBED)
    assert torch.equal(bundle.condition(text, sizes)["vector"], cond["vector"])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    with torch.no_grad():
        ours = bundle.predict(x, t, cond)
        reference = model.model(x, t, cond)  # sgm OpenAIWrapper: context=crossattn, y=vector
    assert ours.shape == x.shape and torch.equal(ours, reference)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    from sgm.models.autoencoder import AutoencoderKL

    with torch.no_grad():
        mean = AutoencoderKL.encode(model.first_stage_model, pixels).mode() * model.scale_factor
    latents = bundle.encode_pixels(pixels)
    assert latents.shape == (1, 4, 8, 8) and torch.equal(latents, mean)
    assert torch.equal(bundle.encode_pixels(pixels), latents)  # deterministic


def test_a_few_lora_steps_change_only_the_lora_and_restore_the_model():
    model = tiny_sgm_sdxl(seed=9)
    bundle = ModelBundle.from_sgm(model)
    before, flags = state_hash(model), module_flags(model)
    net = LoRANetwork.for_model(bundle.unet, bundle.text_encoder, family=SDXL, rank=4, alpha=2.0, conv_rank=2)
    stems = net.stems()
    te1 = [s for s in stems if s.startswith("lora_te1_")]
    te2 = [s for s in stems if s.startswith("lora_te2_")]
    unet = [s for s in stems if s.startswith("lora_unet_")]
    assert len(te1) == 12 * 6 and len(te2) == 3 * 6  # clip_l 12 layers, clip_g 3 (all layers, q/k/v/out split)
    # transformers of depth 2 at input 4, 5, 7, 8, middle, output 0-5: 11 × (2 blocks × 10 + proj_in/out); LoCon as
    # full size (17 ResBlocks × 3 + 11 skip connections + 2 op + 2 conv)
    assert len([s for s in unet if not unet_stem_is_locon(s)]) == 11 * 22 and len(unet) == 11 * 22 + 66
    start = {k: v.clone() for k, v in net.kohya_state_dict(torch.float32).items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for p in net.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    ac = bundle.alphas_cumprod
    losses = []
    with net:
        for _ in range(3):
            t = torch.randint(0, 1000, (2,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = ac[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            cond = bundle.conditioning(["a cat", "a dog"], ImageSize.plain(64, 64))
            loss = torch.nn.functional.mse_loss(bundle.predict(x_t, t, cond).float(), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = {k for k, v in net.kohya_state_dict(torch.float32).items() if not torch.equal(v, start[k])}
    assert any(k.startswith("lora_te1_") for k in changed) and any(k.startswith("lora_te2_") for k in changed)
    assert any(k.startswith("lora_unet_") for k in changed)
    assert state_hash(model) == before and module_flags(model) == flags
    sd = net.kohya_state_dict()
    assert {k.split(".", 1)[1] for k in sd} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in sd)
    assert sgm_root()
