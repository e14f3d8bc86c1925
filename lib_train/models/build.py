"""Build an ldm ``LatentDiffusion`` (the object the WebUI holds as ``shared.sd_model``) from a :class:`ModelSpec`,
entirely offline.

The ldm text embedders download their weights and tokenizer from a hub in ``__init__``. The two ``Offline*``
subclasses below build the same objects (same class, same attributes, same forward) from a spec instead: the text
model from its config with random weights (the checkpoint's weights are loaded afterwards), the CLIP tokenizer from
the BPE vocabulary file that ``open-clip-torch`` ships.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from .families import SD1, get_family
from .spec import ModelSpec, TextSpec

# v1-inference.yaml / v2-inference.yaml values that are not architecture (schedule, conditioning); the latent scale
# factor is the family's (families.Family.latent_scale).
LINEAR_START = 0.00085
LINEAR_END = 0.012
TIMESTEPS = 1000


def _bpe_path() -> str:
    import open_clip.tokenizer

    return os.path.join(os.path.dirname(open_clip.tokenizer.__file__), "bpe_simple_vocab_16e6.txt.gz")


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> Path:
    """Write ``vocab.json`` / ``merges.txt`` of the CLIP ViT-L/14 tokenizer, derived from open_clip's BPE file.

    open_clip's ``SimpleTokenizer`` and the HF ``CLIPTokenizer`` use the same byte-level BPE with the same token ids;
    only the two special tokens are spelled differently (``<start_of_text>`` vs ``<|startoftext|>``).
    """
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer(_bpe_path())
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    out = Path(os.environ.get("TRAINER_CACHE_DIR", Path.home() / ".cache" / "sd-webui-trainer")) / "clip-tokenizer-v2"
    out.mkdir(parents=True, exist_ok=True)
    from ..atomic import atomic_write_bytes, atomic_write_text

    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    if not vocab_file.exists() or not merges_file.exists():
        atomic_write_text(vocab_file, json.dumps(vocab, ensure_ascii=False))
        # CLIP uses the first 49152 - 256 - 2 merges after the BPE file's first (header) line; HF's merges.txt has
        # its own "#version" header.
        lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        atomic_write_bytes(merges_file, ("#version: 0.2\n" + "\n".join(lines) + "\n").encode("utf-8"))
    return out


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The HF ``CLIPTokenizer`` of SD1 (identical ids to ``openai/clip-vit-large-patch14``), built offline."""
    from transformers import CLIPTokenizer

    d = clip_tokenizer_files()
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


def _clip_text_config(text: TextSpec):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=text.intermediate,
        num_hidden_layers=text.layers, num_attention_heads=text.heads, max_position_embeddings=text.context_length,
        hidden_act="quick_gelu", projection_dim=text.projection_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


def clip_text_model(text: TextSpec):
    """An HF ``CLIPTextModel`` of ``text``'s layout with random weights."""
    from transformers import CLIPTextModel

    return CLIPTextModel(_clip_text_config(text))


def open_clip_text_model(text: TextSpec):
    """open_clip's ``CLIP`` with ``text``'s text tower and random weights, its vision tower deleted (as the ldm and
    sgm embedders do after loading pretrained weights)."""
    from open_clip.model import CLIP

    # The vision tower is deleted right away; build the smallest one open_clip accepts.
    tiny_vision = {"image_size": 16, "patch_size": 16, "width": 16, "layers": 1, "head_width": 16}
    text_cfg = {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                "heads": text.heads, "layers": text.layers}
    if text.intermediate != 4 * text.width:  # open_clip 2.20 builds text towers with an MLP ratio of 4 only
        raise ValueError(f"open_clip text towers need intermediate = 4 x width, got {text.intermediate}")
    model = CLIP(embed_dim=text.projection_dim, vision_cfg=tiny_vision, text_cfg=text_cfg)
    del model.visual
    return model


def finish_offline_embedder(embedder, device: str, max_length: int, freeze: bool, **attrs) -> None:
    """Set what the ldm / sgm text embedders set in ``__init__`` besides their modules: device, max length, frozen
    parameters, and their layer choice (``attrs``)."""
    embedder.device = device
    embedder.max_length = max_length
    if freeze:
        embedder.freeze()
    for name, value in attrs.items():
        setattr(embedder, name, value)


def _offline_classes():
    from ldm.modules.encoders.modules import AbstractEncoder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

    class OfflineFrozenCLIPEmbedder(FrozenCLIPEmbedder):
        """ldm ``FrozenCLIPEmbedder`` (SD1) built from a spec instead of a hub download."""

        def __init__(self, text: dict, device: str = "cpu", max_length: int = 77, freeze: bool = True,
                     layer: str = "last", layer_idx=None):
            AbstractEncoder.__init__(self)
            self.tokenizer = clip_tokenizer()
            self.transformer = clip_text_model(TextSpec(**text))
            finish_offline_embedder(self, device, max_length, freeze, layer=layer, layer_idx=layer_idx)

    class OfflineFrozenOpenCLIPEmbedder(FrozenOpenCLIPEmbedder):
        """ldm ``FrozenOpenCLIPEmbedder`` (SD2) built from a spec: open_clip's ``CLIP`` with the vision tower
        removed, exactly as the ldm class does after loading pretrained weights."""

        def __init__(self, text: dict, device: str = "cpu", max_length: int = 77, freeze: bool = True,
                     layer: str = "penultimate"):
            AbstractEncoder.__init__(self)
            self.model = open_clip_text_model(TextSpec(**text))
            finish_offline_embedder(self, device, max_length, freeze, layer=layer,
                                    layer_idx={"last": 0, "penultimate": 1}[layer])

    return OfflineFrozenCLIPEmbedder, OfflineFrozenOpenCLIPEmbedder


def __getattr__(name: str):  # module attribute access for instantiate_from_config targets
    if name in ("OfflineFrozenCLIPEmbedder", "OfflineFrozenOpenCLIPEmbedder"):
        a, b = _cached_offline_classes()
        return a if name == "OfflineFrozenCLIPEmbedder" else b
    raise AttributeError(name)


@lru_cache(maxsize=1)
def _cached_offline_classes():
    return _offline_classes()


def ldm_config(spec: ModelSpec, parameterization: str = "eps") -> dict:
    """The ``LatentDiffusion`` constructor arguments for ``spec`` (the values of the official inference configs)."""
    u, v = spec.unet, spec.vae
    unet_params = dict(
        image_size=32, in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
        attention_resolutions=list(u.attention_resolutions), num_res_blocks=u.num_res_blocks,
        channel_mult=list(u.channel_mult), num_heads=u.num_heads, num_head_channels=u.num_head_channels,
        use_spatial_transformer=True, use_linear_in_transformer=u.use_linear_in_transformer,
        transformer_depth=u.transformer_depth, context_dim=u.context_dim, use_checkpoint=False, legacy=False,
    )
    ddconfig = dict(double_z=True, z_channels=v.z_channels, resolution=256, in_channels=3, out_ch=3, ch=v.ch,
                    ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks, attn_resolutions=[], dropout=0.0)
    family = get_family(spec.family)
    kind = family.text_encoder.kind
    cond = {"target": f"{__name__}.{kind.offline_class}",
            "params": {"text": dict(spec.text.__dict__), **kind.offline_params}}
    return dict(
        linear_start=LINEAR_START, linear_end=LINEAR_END, num_timesteps_cond=1, log_every_t=200,
        timesteps=TIMESTEPS, first_stage_key="jpg", cond_stage_key="txt", image_size=64, channels=4,
        cond_stage_trainable=False, conditioning_key="crossattn", monitor=None, scale_factor=family.latent_scale,
        use_ema=False, parameterization=parameterization,
        unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL",
                            "params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig,
                                       "lossconfig": {"target": "torch.nn.Identity"}}},
        cond_stage_config=cond,
    )


def unfilled(target: str, params: dict):
    """The module ``target(**params)`` (a dotted class path) built on the meta device: no memory, no random
    initialisation, every weight still to be created from a checkpoint's tensor in the dtype the module is set to
    (:func:`lib_train.models.checkpoint.load_checkpoint`). Only for parts without buffers (the ldm UNet and VAE)."""
    module_name, cls = target.rsplit(".", 1)
    with torch.device("meta"):
        module = getattr(importlib.import_module(module_name), cls)(**params)
    if next(module.buffers(), None) is not None:
        raise ValueError(f"{target} has buffers; build it with its initialisation")
    return module


def build_latent_diffusion(spec: ModelSpec, parameterization: str = "eps", *, init: bool = True):
    """An ldm ``LatentDiffusion`` with the architecture of ``spec``, in eval mode: randomly initialised, or with
    ``init=False`` the UNet and VAE left :func:`unfilled` (on the meta device; load a checkpoint's weights next).

    ldm prints progress lines while it builds; they are swallowed here.
    """
    from ldm.models.diffusion.ddpm import LatentDiffusion

    config = ldm_config(spec, parameterization)
    if not init:
        for part in ("unet_config", "first_stage_config"):
            config[part] = {"target": f"{__name__}.unfilled", "params": {"target": config[part]["target"],
                                                                         "params": config[part]["params"]}}
    with contextlib.redirect_stdout(io.StringIO()):
        model = LatentDiffusion(**config)
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_spec(family: str = SD1.name) -> ModelSpec:
    """A small model with the full SD key layout (every module type and block of the real architecture) for tests and
    quick checks: UNet width 32, text width 32 with 2 layers (3 for open_clip), VAE width 32 with 8× downsampling."""
    from .spec import UNetSpec, VAESpec

    fam = get_family(family)
    heads, head_ch = fam.unet_heads(32)
    return ModelSpec(
        family=fam.name,
        unet=UNetSpec(model_channels=32, context_dim=32, use_linear_in_transformer=fam.linear_proj, num_heads=heads,
                      num_head_channels=head_ch),
        text=TextSpec(width=32, heads=4, projection_dim=32, **fam.text_encoder.kind.tiny_text),
        vae=VAESpec(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1),
    )


def tiny_sdxl_spec():
    """SDXL's layout at test size (the widths of tests/sdxl_models.py's tiny sgm model), for quick checks: UNet 32
    channels, depth 1/2/2 and middle 2, context 32 + 32; clip_l 12 layers and clip_g 3 layers of width 32; VAE 32
    channels."""
    from .families import SDXL
    from .spec import SDXLSpec, SDXLUNetSpec, TextSpec, VAESpec

    heads, head_channels = SDXL.unet_heads(32)
    projection = 24  # clip_g's pooled width (1280 at full size), the first part of the vector y
    unet = SDXLUNetSpec(model_channels=32, transformer_depth=[1, 2, 2], transformer_depth_middle=2, context_dim=64,
                        adm_in_channels=projection + 3 * 2 * 256, num_heads=heads, num_head_channels=head_channels)
    return SDXLSpec(unet=unet, clip_l=TextSpec(width=32, layers=12, heads=4, intermediate=64, projection_dim=32),
                    clip_g=TextSpec(width=32, layers=3, heads=4, intermediate=128, projection_dim=projection),
                    vae=VAESpec(ch=32, num_res_blocks=1))


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a seeded random value so that a random-weight model is numerically well-behaved.

    Default init leaves norm layers at exactly 1/0 and zero-initialises the UNet's output convolutions, which makes a
    random model's output and its LoRA gradients degenerate; here norm scales are 1 ± 0.1, biases small, and weights
    scaled by 1/sqrt(fan_in).
    """
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, norms) and name == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                elif p.ndim <= 1:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) / max(1.0, fan_in) ** 0.5)
