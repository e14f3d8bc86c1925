"""SDXL layouts for tests: the UNet's Linear/Conv2d modules derived from the architecture rules (no sgm needed), the
full-size text encoders on the meta device (transformers CLIP ViT-L + open_clip ViT-bigG text tower), and access to
sgm (the WebUI's ``repositories/generative-models``) for the tier that needs it.

The UNet rules (FORMATS.md §A.3.2, sgm configs/inference/sd_xl_base.yaml): model_channels 320, channel_mult
[1, 2, 4], 2 ResBlocks per level, transformer depth 0 / 2 / 10 per level (level 0 has no attention), middle block
ResBlock + transformer(10) + ResBlock, context 2048, Linear proj_in/proj_out, GEGLU feed-forward (inner 4·ch).
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from full_size_models import SD1Embedder
from torch import nn

CONTEXT = 2048
TIME = 1280  # time-embedding width (4 × model_channels)


class Target(NamedTuple):
    path: str
    kind: str  # "linear" | "conv"
    c_in: int
    c_out: int
    kernel: int


def _resblock(prefix: str, c_in: int, c_out: int) -> list[Target]:
    out = [Target(f"{prefix}.in_layers.2", "conv", c_in, c_out, 3), Target(f"{prefix}.emb_layers.1", "linear", TIME,
                                                                         c_out, 1),
           Target(f"{prefix}.out_layers.3", "conv", c_out, c_out, 3)]
    if c_in != c_out:
        out.append(Target(f"{prefix}.skip_connection", "conv", c_in, c_out, 1))
    return out


def _transformer(prefix: str, ch: int, depth: int) -> list[Target]:
    out = [Target(f"{prefix}.proj_in", "linear", ch, ch, 1)]
    for b in range(depth):
        p = f"{prefix}.transformer_blocks.{b}"
        for attn, ctx in (("attn1", ch), ("attn2", CONTEXT)):
            out += [Target(f"{p}.{attn}.to_q", "linear", ch, ch, 1), Target(f"{p}.{attn}.to_k", "linear", ctx, ch, 1),
                    Target(f"{p}.{attn}.to_v", "linear", ctx, ch, 1),
                    Target(f"{p}.{attn}.to_out.0", "linear", ch, ch, 1)]
        out += [Target(f"{p}.ff.net.0.proj", "linear", ch, 8 * ch, 1), Target(f"{p}.ff.net.2", "linear", 4 * ch, ch, 1)]
    out.append(Target(f"{prefix}.proj_out", "linear", ch, ch, 1))
    return out


@cache
def sdxl_unet_targets() -> tuple[Target, ...]:
    """Every Linear/Conv2d of SDXL's UNet inside input_blocks 1.., middle_block and output_blocks (the modules a
    kohya LoRA can target), with sgm's module paths, derived from the architecture rules."""
    mult, depth, model_ch = (1, 2, 4), (0, 2, 10), 320
    out: list[Target] = []
    chans = [model_ch]  # channels entering the skip stack (conv_in first)
    ch, n = model_ch, 1
    for level, m in enumerate(mult):
        for _ in range(2):
            out += _resblock(f"input_blocks.{n}.0", ch, model_ch * m)
            ch = model_ch * m
            if depth[level]:
                out += _transformer(f"input_blocks.{n}.1", ch, depth[level])
            chans.append(ch)
            n += 1
        if level < len(mult) - 1:
            out.append(Target(f"input_blocks.{n}.0.op", "conv", ch, ch, 3))
            chans.append(ch)
            n += 1
    out += _resblock("middle_block.0", ch, ch) + _transformer("middle_block.1", ch, 10) + _resblock("middle_block.2",
                                                                                                     ch, ch)
    n = 0
    for level in reversed(range(len(mult))):
        for j in range(3):
            c_in = ch + chans.pop()
            ch = model_ch * mult[level]
            out += _resblock(f"output_blocks.{n}.0", c_in, ch)
            k = 1
            if depth[level]:
                out += _transformer(f"output_blocks.{n}.1", ch, depth[level])
                k = 2
            if j == 2 and level > 0:
                out.append(Target(f"output_blocks.{n}.{k}.conv", "conv", ch, ch, 3))
            n += 1
    return tuple(out)


# ---- full-size text encoders on the meta device (installable code only)

CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=49408,
              max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(context_length=77, vocab_size=49408, width=1280, heads=20, layers=32, output_dim=1280)


# sgm ``FrozenCLIPEmbedder`` has the attribute layout of ldm's (``.transformer`` is an HF ``CLIPTextModel``)
ClipL = SD1Embedder


class ClipG(nn.Module):
    """Stand-in for sgm ``FrozenOpenCLIPEmbedder2``: ``.model`` is an open_clip text tower (GELU, as ViT-bigG-14)."""

    def __init__(self, **config):
        super().__init__()
        from open_clip.transformer import TextTransformer

        self.model = TextTransformer(act_layer=nn.GELU, **config)

    def encode_with_transformer(self, ids):  # present on the real class; the live-model check looks for it
        raise NotImplementedError


class Conditioner(nn.Module):
    """Stand-in for sgm ``GeneralConditioner``: ``embedders.0`` clip_l, ``embedders.1`` clip_g."""

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module):
        super().__init__()
        self.embedders = nn.ModuleList([clip_l, clip_g])


@cache
def meta_sdxl_text_encoders() -> Conditioner:
    with torch.device("meta"):
        return Conditioner(ClipL(**CLIP_L), ClipG(**CLIP_G))


# ---- sgm (the tier that needs the WebUI's generative-models checkout)

def sgm_root() -> Path:
    """The generative-models checkout under ``$SD_WEBUI_DIR``, importable; skips the test with the reason when it
    is not available."""
    webui = os.environ.get("SD_WEBUI_DIR")
    if not webui:
        pytest.skip("SD_WEBUI_DIR is not set (sgm tier: needs the WebUI's repositories/generative-models)")
    root = Path(webui) / "repositories" / "generative-models"
    if not (root / "sgm").is_dir():
        pytest.skip(f"no sgm checkout at {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import sgm  # noqa: F401  (sgm/__init__ imports every sgm module and their dependencies)
    except ImportError as e:
        pytest.skip(f"sgm cannot be imported in this environment: {e}")
    return root


def sgm_unet_config() -> dict:
    """sgm's own UNet parameters for SDXL base (configs/inference/sd_xl_base.yaml), attention set to plain softmax
    (no xformers) and no checkpointing."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(sgm_root() / "configs" / "inference" / "sd_xl_base.yaml")
    params = OmegaConf.to_container(cfg.model.params.network_config.params)
    params.update(spatial_transformer_attn_type="softmax", use_checkpoint=False)
    return params


def _sgm_config():
    from omegaconf import OmegaConf

    return OmegaConf.load(sgm_root() / "configs" / "inference" / "sd_xl_base.yaml")


@cache
def meta_sgm_unet() -> nn.Module:
    """sgm's full-size SDXL UNet on the meta device (no memory)."""
    sgm_root()
    from sgm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return UNetModel(**sgm_unet_config())


# ---- tiny SDXL text encoders (installable code only)

def tiny_clip_g_model(width: int = 32, layers: int = 3, embed_dim: int = 24):
    """An open_clip ``CLIP`` with a tiny text tower (and the smallest vision tower open_clip builds, which sgm deletes
    as it does for ViT-bigG)."""
    from open_clip.model import CLIP

    vision = {"image_size": 16, "patch_size": 16, "width": 16, "layers": 1, "head_width": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 4, "layers": layers}
    return CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)


def tiny_clip_l_model(width: int = 32, layers: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1))


def tiny_sdxl_text_encoders(seed: int = 7, clip_l_layers: int = 3, clip_g_layers: int = 3) -> Conditioner:
    """SDXL's two text embedders at tiny width with seeded random weights: ``embedders.0`` has ``.transformer`` (HF
    CLIP) and ``.tokenizer`` (the CLIP tokenizer, built offline), ``embedders.1`` has ``.model`` (open_clip CLIP with
    the vision tower deleted)."""
    from lib_train.models.build import clip_tokenizer, randomize_

    clip_l, clip_g = nn.Module(), ClipG.__new__(ClipG)
    nn.Module.__init__(clip_g)
    clip_l.transformer = tiny_clip_l_model(layers=clip_l_layers)
    clip_l.tokenizer = clip_tokenizer()
    model = tiny_clip_g_model(layers=clip_g_layers)
    del model.visual
    clip_g.model = model
    root = Conditioner(clip_l, clip_g)
    randomize_(root, seed)
    return root.eval().requires_grad_(False)


def diffusers_text_configs(root) -> tuple[dict, dict]:
    """``CLIPTextConfig`` arguments of SDXL's two text towers under ``root`` (``embedders.0.transformer``: HF CLIP,
    ``embedders.1.model``: open_clip), read from the modules themselves: what the diffusers interop workers build
    ``text_encoder`` / ``text_encoder_2`` from. Both end-of-text ids are clip_l's (49407), not the hub configs'
    legacy 2 (tests/test_sdxl_embedding_interop.py shows what that changes)."""
    l_cfg = root.embedders[0].transformer.config
    clip_l = {k: getattr(l_cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "intermediate_size", "vocab_size", "max_position_embeddings",
                                             "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                                             "pad_token_id")}
    g = root.embedders[1].model
    block = g.transformer.resblocks[0]
    clip_g = dict(hidden_size=g.transformer.width, num_hidden_layers=len(g.transformer.resblocks),
                  num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.c_fc.out_features,
                  vocab_size=g.token_embedding.num_embeddings, max_position_embeddings=g.positional_embedding.shape[0],
                  hidden_act="gelu" if isinstance(block.mlp.gelu, torch.nn.GELU) else "quick_gelu",
                  layer_norm_eps=block.ln_1.eps, projection_dim=g.text_projection.shape[1],
                  bos_token_id=clip_l["bos_token_id"], eos_token_id=clip_l["eos_token_id"], pad_token_id=0)
    return clip_l, clip_g


# ---- tiny sgm SDXL model (sgm tier)

TINY_CLIP_G_EMBED = 24  # clip_g text_projection width at tiny size (1280 at full size)


def tiny_sgm_conditioner_config(clip_l_layers: int = 12) -> tuple[list, "pytest.MonkeyPatch"]:
    """sgm's own conditioner config (sd_xl_base.yaml), with tiny text towers served by patched loaders: returns
    (emb_models, an active MonkeyPatch the caller undoes after building)."""
    import open_clip
    import transformers
    from omegaconf import OmegaConf

    from lib_train.models.build import clip_tokenizer

    clip_l = tiny_clip_l_model(layers=clip_l_layers)  # 12 layers: sgm's layer_idx 11 is real
    clip_g = tiny_clip_g_model(embed_dim=TINY_CLIP_G_EMBED)
    mp = pytest.MonkeyPatch()
    mp.setattr(transformers.CLIPTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: clip_tokenizer()))
    mp.setattr(transformers.CLIPTextModel, "from_pretrained", classmethod(lambda cls, *a, **k: clip_l))
    mp.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: (clip_g, None, None))
    emb = OmegaConf.to_container(_sgm_config().model.params.conditioner_config.params.emb_models)
    for e in emb[:2]:
        e["params"]["device"] = "cpu"
    return emb, mp


def tiny_sgm_sdxl(seed: int = 5, prediction: str = "eps"):
    """An sgm ``DiffusionEngine`` built from sgm's own classes and config (sd_xl_base.yaml) at tiny widths, with
    seeded random weights, in eval mode with frozen parameters: UNet 32 channels (8 heads, depth 1/2/2, context
    32 + 32, vector 24 + 1536), VAE 32 channels, clip_l 12 layers / clip_g 3 layers of width 32. ``prediction``
    "v" swaps the denoiser scaling to sgm's VScaling."""
    import contextlib
    import io

    from omegaconf import OmegaConf

    from lib_train.models.build import randomize_
    from lib_train.models.families import SDXL

    sgm_root()
    from sgm.models.diffusion import DiffusionEngine

    params = OmegaConf.to_container(_sgm_config().model.params)
    unet = params["network_config"]["params"]
    heads, head_channels = SDXL.unet_heads(32)  # the rule the headless loader reads tiny checkpoints with
    unet.update(model_channels=32, num_heads=heads, num_head_channels=head_channels, transformer_depth=[1, 2, 2],
                context_dim=64,
                adm_in_channels=TINY_CLIP_G_EMBED + 3 * 2 * 256, use_checkpoint=False,
                spatial_transformer_attn_type="softmax")
    vae = params["first_stage_config"]["params"]["ddconfig"]
    vae.update(ch=32, num_res_blocks=1, attn_type="vanilla")
    if prediction == "v":
        params["denoiser_config"]["params"]["scaling_config"]["target"] = (
            "sgm.modules.diffusionmodules.denoiser_scaling.VScaling")
    emb, mp = tiny_sgm_conditioner_config()
    params["conditioner_config"]["params"]["emb_models"] = emb
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = DiffusionEngine(**params)
    finally:
        mp.undo()
    randomize_(model, seed)
    return model.eval().requires_grad_(False)
