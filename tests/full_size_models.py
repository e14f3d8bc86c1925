"""Full-size SD1.5 / SD2 modules built on the meta device (no memory, no weights) for name, count and shape tests.

The text encoders are plain holders with the attributes of the ldm embedders (``FrozenCLIPEmbedder.transformer``,
``FrozenOpenCLIPEmbedder.model``), so module paths match what the WebUI has in memory; the ldm embedders themselves
are not constructed because their constructors download weights.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
SD2_UNET = dict(SD15_UNET, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)

# transformers CLIPTextConfig of SD1's ViT-L/14 text tower.
SD1_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
# open_clip ViT-H-14 text tower (SD2).
SD2_TEXT = dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24, output_dim=1024)


class SD1Embedder(nn.Module):
    """Stand-in for ldm ``FrozenCLIPEmbedder``: ``.transformer`` is an HF ``CLIPTextModel``."""

    def __init__(self, **config):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.transformer = CLIPTextModel(CLIPTextConfig(**config))


class SD2Embedder(nn.Module):
    """Stand-in for ldm ``FrozenOpenCLIPEmbedder``: ``.model`` has ``transformer.resblocks``, ``token_embedding``,
    ``positional_embedding``, ``ln_final`` and ``attn_mask`` like the open_clip CLIP model (visual tower deleted)."""

    def __init__(self, **config):
        super().__init__()
        from open_clip.transformer import TextTransformer

        self.model = TextTransformer(**config)


def unet(config: dict) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**config)


# Cached: tests only read these modules (never apply a LoRA to them), so one copy per process is enough.
@cache
def meta_sd15_unet() -> nn.Module:
    with torch.device("meta"):
        return unet(SD15_UNET)


@cache
def meta_sd2_unet() -> nn.Module:
    with torch.device("meta"):
        return unet(SD2_UNET)


@cache
def meta_sd1_text_encoder() -> nn.Module:
    with torch.device("meta"):
        return SD1Embedder(**SD1_TEXT)


@cache
def meta_sd2_text_encoder() -> nn.Module:
    with torch.device("meta"):
        return SD2Embedder(**SD2_TEXT)
