"""Architecture of an SD1.x / SD2.x / SDXL checkpoint, read from its state dict.

A :class:`ModelSpec` holds everything needed to rebuild the ldm ``LatentDiffusion`` a checkpoint was made for: the
UNet, VAE and text-encoder hyper-parameters; an :class:`SDXLSpec` the same for sgm's ``DiffusionEngine``.
:func:`infer_spec` reads them from tensor shapes, so the same code loads a full-size SD1.5 / SD2 / SDXL checkpoint
and the tiny random-weight models the tests build (same key layout, smaller widths).

Head counts cannot be read from weights. We follow the official configs (SD1 UNet: 8 heads; SD2 UNet: 64 channels per
head; CLIP text: 64 channels per head) and, for widths too small for that (test models), fall back to the rules in
:meth:`.families.Family.unet_heads` / :func:`text_heads`, which the test-model builder uses too.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Mapping

from ..errors import TrainerError
from .families import SD1, SD2, SDXL, TRAINS_SDXL, family_from_state_dict, get_family, labels_text

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass
class UNetSpec:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    num_heads: int = 8
    num_head_channels: int = -1


@dataclass
class TextSpec:
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab_size: int = 49408
    context_length: int = 77
    projection_dim: int = 768  # open_clip (SD2) only: text_projection columns


@dataclass
class VAESpec:
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4


@dataclass
class ModelSpec:
    family: str = SD1.name  # a key of families.FAMILIES
    unet: UNetSpec = field(default_factory=UNetSpec)
    text: TextSpec = field(default_factory=TextSpec)
    vae: VAESpec = field(default_factory=VAESpec)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_full_size(self) -> bool:
        return self.unet.model_channels == 320 and self.text.width in (768, 1024)


@dataclass
class SDXLUNetSpec:
    """sgm ``UNetModel`` hyper-parameters (configs/inference/sd_xl_base.yaml values by default)."""

    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2])
    transformer_depth: list[int] = field(default_factory=lambda: [1, 2, 10])  # per level
    transformer_depth_middle: int = 10
    context_dim: int = 2048  # clip_l 768 + clip_g 1280
    adm_in_channels: int = 2816  # the vector y: pooled clip_g 1280 + 3 x 2 x 256 size features
    num_heads: int = -1
    num_head_channels: int = 64


@dataclass
class SDXLSpec:
    """Everything needed to rebuild the sgm ``DiffusionEngine`` of an SDXL base-layout checkpoint."""

    family: str = SDXL.name
    unet: SDXLUNetSpec = field(default_factory=SDXLUNetSpec)
    clip_l: TextSpec = field(default_factory=TextSpec)  # CLIP ViT-L/14 text (HF layout)
    clip_g: TextSpec = field(default_factory=lambda: TextSpec(width=1280, layers=32, heads=20, intermediate=5120,
                                                              projection_dim=1280))  # OpenCLIP ViT-bigG/14 text
    vae: VAESpec = field(default_factory=VAESpec)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_full_size(self) -> bool:
        return self.unet.model_channels == 320 and (self.clip_l.width, self.clip_g.width) == (768, 1280)


def text_heads(width: int) -> int:
    """CLIP text heads: 64 channels per head (ViT-L 768 → 12, ViT-H 1024 → 16); 8 channels per head below 64."""
    return width // 64 if width >= 64 and width % 64 == 0 else max(1, width // 8)


def sd15_spec() -> ModelSpec:
    """The full-size SD1.5 layout (v1-inference.yaml)."""
    return ModelSpec(family=SD1.name)


def sd2_spec() -> ModelSpec:
    """The full-size SD2.x layout (v2-inference.yaml; the 768-v model has the same weights layout)."""
    return ModelSpec(
        family=SD2.name,
        unet=UNetSpec(context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64),
        text=TextSpec(width=1024, layers=24, heads=16, intermediate=4096, projection_dim=1024),
    )


SD3_MARKERS = (UNET_PREFIX + "x_embedder.proj.weight",)  # the WebUI's SD3 test (sd_models.py), plus joint_blocks


def sdxl_problem(sd: Mapping[str, object]) -> str | None:
    """Why a checkpoint with sgm conditioner keys (``conditioner.embedders.*``) is not an SDXL base-layout model
    this trainer can take, or None when it is (clip_l at ``embedders.0``, clip_g at ``embedders.1``, 4 input
    channels, the full UNet). The WebUI's own tests (sd_models_config.py, sd_models.py) tell the variants apart:
    the refiner has only an OpenCLIP ViT-bigG at ``embedders.0`` (and a 2560-wide vector: size + aesthetic score),
    SSD-1B has no middle-block transformer, SDXL inpainting has 9 input channels."""
    u = UNET_PREFIX
    if "conditioner.embedders.0.model.ln_final.weight" in sd:
        return ("This checkpoint is an SDXL refiner (one OpenCLIP ViT-bigG text encoder, aesthetic-score "
                "conditioning); LoRAs are trained on the SDXL base model or its fine-tunes.")
    if not SDXL.in_state_dict(sd):
        return ("This checkpoint has SDXL-style conditioner keys but not SDXL's two text encoders (CLIP ViT-L at "
                "conditioner.embedders.0, OpenCLIP ViT-bigG at conditioner.embedders.1); it is not supported.")
    weight = sd.get(u + "input_blocks.0.0.weight")
    if weight is not None and tuple(weight.shape)[1:2] == (9,):  # type: ignore[attr-defined]
        return "This checkpoint is an SDXL inpainting model; train on the normal (4-channel) SDXL model instead."
    if u + "middle_block.1.transformer_blocks.0.attn1.to_q.weight" not in sd:
        return ("This checkpoint is SSD-1B or another reduced SDXL (transformer blocks removed); it is not "
                "supported. Train on the full SDXL base model or its fine-tunes.")
    return None


def detect_family(sd: Mapping[str, object]) -> str:
    """The family name (a key of ``families.FAMILIES``) from the text-encoder keys; TrainerError for SD3,
    inpainting, the SDXL variants of :func:`sdxl_problem`, SDXL itself while ``families.TRAINS_SDXL`` is off, and
    non-SD files."""
    keys = sd.keys()
    only = f"this version trains {labels_text(' and ')} models only."
    if any(k in sd for k in SD3_MARKERS) or any(k.startswith(UNET_PREFIX + "joint_blocks.") for k in keys):
        raise TrainerError(f"This checkpoint is an SD3 model; {only}")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        problem = sdxl_problem(sd)
        if problem is not None:
            raise TrainerError(problem)
        if not TRAINS_SDXL:
            raise TrainerError(f"This checkpoint is an SDXL model; {only}")
        return SDXL.name
    if UNET_PREFIX + "input_blocks.0.0.weight" not in sd:
        hint = ""
        if any(k.startswith("lora_") for k in keys):
            hint = " It looks like a LoRA file; pass the base model (e.g. v1-5-pruned-emaonly.safetensors) instead."
        elif any(k.startswith(("down_blocks.", "unet.")) for k in keys):
            hint = " It looks like a diffusers-format file; use a single-file A1111/ldm checkpoint."
        raise TrainerError(f"This file is not a Stable Diffusion checkpoint (no UNet weights found).{hint}")
    family = family_from_state_dict(sd)
    if family is None:
        raise TrainerError("This checkpoint has no text encoder that this version knows (expected the CLIP text "
                           "encoder of SD1.x or the OpenCLIP encoder of SD2.x).")
    in_ch = _shape(sd, UNET_PREFIX + "input_blocks.0.0.weight")[1]
    if in_ch != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(in_ch, f"a {in_ch}-channel")
        raise TrainerError(f"This checkpoint is {kind} model; train on the normal (4-channel) base model instead.")
    return family.name


def _shape(sd: Mapping[str, object], key: str) -> tuple[int, ...]:
    try:
        return tuple(sd[key].shape)  # type: ignore[attr-defined]
    except KeyError:
        raise TrainerError(f"The checkpoint is incomplete: the tensor '{key}' is missing.") from None


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_spec(sd: Mapping[str, object]) -> ModelSpec | SDXLSpec:
    """Read the architecture from a checkpoint state dict (keys as saved by ldm / the WebUI; SDXL:
    :func:`infer_sdxl_spec`)."""
    name = detect_family(sd)
    if name == SDXL.name:  # reached only with families.TRAINS_SDXL on
        return infer_sdxl_spec(sd)
    family = get_family(name)
    keys = list(sd.keys())
    u = UNET_PREFIX
    model_channels = _shape(sd, u + "input_blocks.0.0.weight")[0]
    n_input = len(_indices(keys, re.escape(u) + r"input_blocks\.(\d+)\."))
    downs = _indices(keys, re.escape(u) + r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = len(downs) + 1
    num_res_blocks = (n_input - 1 - len(downs)) // levels
    channel_mult, attention_res = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        out_ch = _shape(sd, u + f"input_blocks.{first}.0.out_layers.3.weight")[0]
        channel_mult.append(out_ch // model_channels)
        if u + f"input_blocks.{first}.1.proj_in.weight" in sd:
            attention_res.insert(0, 2 ** level)  # the official configs list them as [4, 2, 1]
    first_attn = next(n for n in range(1, n_input) if u + f"input_blocks.{n}.1.proj_in.weight" in sd)
    depth = len(_indices(keys, re.escape(u) + rf"input_blocks\.{first_attn}\.1\.transformer_blocks\.(\d+)\."))
    proj_in = _shape(sd, u + f"input_blocks.{first_attn}.1.proj_in.weight")
    context_dim = _shape(sd, u + f"input_blocks.{first_attn}.1.transformer_blocks.0.attn2.to_k.weight")[1]
    heads, head_ch = family.unet_heads(model_channels)
    unet = UNetSpec(
        in_channels=4, out_channels=_shape(sd, u + "out.2.weight")[0], model_channels=model_channels,
        channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_resolutions=attention_res,
        transformer_depth=depth, context_dim=context_dim, use_linear_in_transformer=len(proj_in) == 2,
        num_heads=heads, num_head_channels=head_ch,
    )

    te = family.text_encoder

    def count(prefix: str) -> int:
        return len(_indices(keys, re.escape(prefix) + r"(\d+)\."))

    fields = te.kind.text_spec(lambda key: _shape(sd, key), count, te.checkpoint_prefix)
    text = TextSpec(heads=text_heads(fields["width"]), **fields)

    return ModelSpec(family=family.name, unet=unet, text=text, vae=_vae_spec(sd, keys))


def _vae_spec(sd: Mapping[str, object], keys: list[str]) -> VAESpec:
    """The VAE's hyper-parameters (the same ``AutoencoderKL`` layout in ldm and sgm checkpoints)."""
    v = VAE_PREFIX
    ch = _shape(sd, v + "encoder.conv_in.weight")[0]
    vae_levels = _indices(keys, re.escape(v) + r"encoder\.down\.(\d+)\.")
    ch_mult = [_shape(sd, v + f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in vae_levels]
    return VAESpec(ch=ch, ch_mult=ch_mult,
                   num_res_blocks=len(_indices(keys, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\.")),
                   z_channels=_shape(sd, v + "decoder.conv_in.weight")[1],
                   embed_dim=_shape(sd, v + "quant_conv.weight")[0] // 2)


def infer_sdxl_spec(sd: Mapping[str, object]) -> SDXLSpec:
    """The architecture of an SDXL base-layout checkpoint (sgm keys; :func:`sdxl_problem` has ruled out the
    variants): per-level transformer depths, the context and vector widths, both text towers and the VAE, read from
    tensor shapes, so full-size files and the tiny test models load through the same code. Heads follow
    :meth:`.families.Family.unet_heads` / :func:`text_heads` (64 channels per head at full size)."""
    keys = list(sd.keys())
    u, ue = UNET_PREFIX, re.escape(UNET_PREFIX)
    model_channels = _shape(sd, u + "input_blocks.0.0.weight")[0]
    n_input = len(_indices(keys, ue + r"input_blocks\.(\d+)\."))
    levels = len(_indices(keys, ue + r"input_blocks\.(\d+)\.0\.op\.weight")) + 1
    num_res_blocks = (n_input - 1 - (levels - 1)) // levels
    channel_mult, attention_res, depth = [], [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        channel_mult.append(_shape(sd, u + f"input_blocks.{first}.0.out_layers.3.weight")[0] // model_channels)
        blocks = _indices(keys, ue + rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        if blocks:
            attention_res.insert(0, 2 ** level)  # as the config lists them: [4, 2]
        depth.append(len(blocks) or 1)  # a level without attention: unused (the config says 1)
    first_attn = next(1 + lv * (num_res_blocks + 1) for lv in range(levels) if 2 ** lv in attention_res)
    heads, head_ch = SDXL.unet_heads(model_channels)
    unet = SDXLUNetSpec(
        model_channels=model_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
        attention_resolutions=attention_res, transformer_depth=depth,
        transformer_depth_middle=len(_indices(keys, ue + r"middle_block\.1\.transformer_blocks\.(\d+)\.")),
        context_dim=_shape(sd, u + f"input_blocks.{first_attn}.1.transformer_blocks.0.attn2.to_k.weight")[1],
        adm_in_channels=_shape(sd, u + "label_emb.0.0.weight")[1], num_heads=heads, num_head_channels=head_ch)

    def count(prefix: str) -> int:
        return len(_indices(keys, re.escape(prefix) + r"(\d+)\."))

    texts = []
    for te in SDXL.text_encoders:
        fields = te.kind.text_spec(lambda key: _shape(sd, key), count, te.checkpoint_prefix)
        texts.append(TextSpec(heads=text_heads(fields["width"]), **fields))
    return SDXLSpec(unet=unet, clip_l=texts[0], clip_g=texts[1], vae=_vae_spec(sd, keys))
