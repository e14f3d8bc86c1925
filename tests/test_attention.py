"""The fused attention installed on headless ldm models computes what ldm's own attention computes."""

from __future__ import annotations

import torch
from helpers import make_tiny_model

from lib_train.models.attention import use_sdpa


def test_sdpa_matches_ldm_attention_and_keeps_lora_gradients():
    model = make_tiny_model("sd1")
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ref = unet(x, t, context=ctx)
    assert use_sdpa(unet) == 32  # 16 transformers × (attn1 + attn2)
    with torch.no_grad():
        out = unet(x, t, context=ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)

    from lib_train.network.lora import LoRANetwork

    net = LoRANetwork.for_model(unet, None, family="sd1", rank=2, alpha=2.0, train_text_encoder=False)
    with net.apply():
        unet(x, t, context=ctx).square().mean().backward()
    assert all(p.grad is not None for p in net.unet_parameters())
