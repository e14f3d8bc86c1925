"""Module path → kohya LoRA key stem, for SD1.x / SD2.x and SDXL (FORMATS.md §A.3).

Pure string functions. A *stem* is the part of a kohya key before ``.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``; it is the diffusers-style module name with every "." replaced by "_" and a prefix:

- UNet (§A.3.1): the ldm path relative to ``UNetModel`` (``input_blocks.1.1.proj_in``) is renamed to the
  diffusers layout (``down_blocks.0.attentions.0.proj_in``) and prefixed ``lora_unet_``.
- Text encoder (§A.3.3): HF CLIP names under ``text_model.encoder.layers.{i}``, prefixed with the family's text-encoder
  prefix (``lora_te_``). The names come from the family's text-encoder kind
  (:meth:`lib_train.models.text_encoders.TextEncoderKind.lora_names`): SD1 paths are already HF names; SD2 open_clip
  resblocks are renamed (``mlp.c_fc`` → ``mlp.fc1``, ``mlp.c_proj`` → ``mlp.fc2``) and the fused ``attn``
  (``nn.MultiheadAttention``) gives four stems q/k/v/out. SD2 conditions on the penultimate resblock, so its last
  resblock (23 of 0..23) is never targeted.
- SDXL (§A.3.2): UNet stems are ``lora_unet_`` + the sgm path itself (:func:`sgm_unet_key_stem`); the two text
  encoders are named per encoder record (:func:`encoder_key_stems`): ``lora_te1_`` (clip_l, layers 0..11) and
  ``lora_te2_`` (clip_g, layers 0..31, q/k/v/out from the fused ``attn``).

Every function returns None (UNet) or an empty list (text encoder) for a module that is never targeted.
"""

from __future__ import annotations

import re

from ..models.families import SGM_NAMES, Family, TextEncoder, as_family, get_family, names_text

UNET_PREFIX = "lora_unet_"

# ResBlock child → diffusers ResnetBlock2D child (§A.3.1 "resnet suffix").
_RESNET_SUFFIX = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}

# Linear / Conv2d children of a SpatialTransformer that kohya targets (§A.2); the suffix is kept unchanged.
_TRANSFORMER_CHILD = re.compile(
    r"^(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))$"
)

_UNET_PATH = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$|^middle_block\.(\d+)\.(.+)$")

# Stems of ResBlock / Downsample / Upsample children: trained only with LoCon (conv rank set, §A.2). Diffusers names
# (SD1/SD2) say resnets/downsamplers/upsamplers; sgm names (SDXL) end in a ResBlock child, ``op`` or ``.{k}.conv``.
_LOCON_STEM = re.compile(r"_(resnets_\d+|downsamplers_0|upsamplers_0)_"
                         r"|^lora_unet_(input_blocks|middle_block|output_blocks)_.*"
                         r"_(in_layers_2|out_layers_3|emb_layers_1|skip_connection|op|\d+_conv)$")

# sgm UNet children kohya targets (§A.3.2): SpatialTransformer children (always), ResBlock children, the
# downsampler ``op`` and the upsampler ``conv`` (LoCon).
_SGM_BLOCK = re.compile(r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)\.(.+)$")
_SGM_LOCON_CHILD = re.compile(r"^(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)$")


def _stem(prefix: str, diffusers_path: str) -> str:
    return prefix + diffusers_path.replace(".", "_")


def _block_child(rest: str, block: str) -> str | None:
    """Rename the child ``rest`` of a ResBlock (``block`` ends in ``resnets.{j}``) or SpatialTransformer
    (``attentions.{j}``); None if the child is not a target."""
    if ".resnets." in block:
        suffix = _RESNET_SUFFIX.get(rest)
        return None if suffix is None else f"{block}.{suffix}"
    return f"{block}.{rest}" if _TRANSFORMER_CHILD.match(rest) else None


def unet_key_stem(ldm_path: str) -> str | None:
    """kohya stem for an SD1/SD2 ldm UNet module path (relative to ``UNetModel``), or None if never targeted.

    Implements FORMATS §A.3.1 for ``channel_mult=[1,2,4,4]``, ``num_res_blocks=2``:
    ``input_blocks.{n}.{k}`` (n = 1..11, i = (n-1)//3, j = (n-1)%3): j < 2 → ``down_blocks.{i}.resnets.{j}`` (k=0) /
    ``attentions.{j}`` (k=1); n = 3, 6, 9 ``.0.op`` → ``down_blocks.{n//3-1}.downsamplers.0.conv``.
    ``middle_block.{0,1,2}`` → ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``.
    ``output_blocks.{n}.{k}`` (i = n//3, j = n%3): k=0 → ``up_blocks.{i}.resnets.{j}``, k=1 → ``attentions.{j}``;
    a child named ``conv`` of blocks n = 2, 5, 8 is the upsampler ``up_blocks.{i}.upsamplers.0.conv`` (k=1 for n=2,
    k=2 otherwise). ``input_blocks.0`` (conv_in), ``time_embed``, ``out`` and norms are never targeted.

    >>> unet_key_stem("input_blocks.1.1.proj_in")
    'lora_unet_down_blocks_0_attentions_0_proj_in'
    """
    m = _UNET_PATH.match(ldm_path)
    if m is None:
        return None
    if m.group(5) is not None:
        k, rest = int(m.group(5)), m.group(6)
        block = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}.get(k)
        renamed = None if block is None else _block_child(rest, block)
        return None if renamed is None else _stem(UNET_PREFIX, renamed)

    side, n, k, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if side == "input_blocks":
        if not 1 <= n <= 11:
            return None
        i, j = divmod(n - 1, 3)
        if j == 2:
            ok = k == 0 and rest == "op"
            return _stem(UNET_PREFIX, f"down_blocks.{i}.downsamplers.0.conv") if ok else None
    else:
        if not 0 <= n <= 11:
            return None
        i, j = divmod(n, 3)
        if rest == "conv":
            ok = n in (2, 5, 8) and k == (1 if n == 2 else 2)
            return _stem(UNET_PREFIX, f"up_blocks.{i}.upsamplers.0.conv") if ok else None
    if k not in (0, 1):
        return None
    kind = "resnets" if k == 0 else "attentions"
    prefix = "down_blocks" if side == "input_blocks" else "up_blocks"
    renamed = _block_child(rest, f"{prefix}.{i}.{kind}.{j}")
    return None if renamed is None else _stem(UNET_PREFIX, renamed)


def sgm_unet_key_stem(sgm_path: str) -> str | None:
    """kohya stem for an SDXL (sgm ``UNetModel``) module path, or None if never targeted (FORMATS §A.3.2): the path
    itself with "." → "_" after ``lora_unet_``. Targets: a SpatialTransformer's ``proj_in``/``proj_out``/attention/
    feed-forward Linear children, a ResBlock's ``in_layers.2``/``out_layers.3``/``emb_layers.1``/``skip_connection``,
    a Downsample's ``op`` and an Upsample's ``conv`` (the last four groups: LoCon). ``input_blocks.0.0`` (conv_in),
    ``time_embed``, ``label_emb`` and ``out`` are never targeted.

    >>> sgm_unet_key_stem("input_blocks.4.1.transformer_blocks.1.attn1.to_q")
    'lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q'
    """
    m = _SGM_BLOCK.match(sgm_path)
    if m is None or m.group(1) == "input_blocks.0.0":
        return None
    rest = m.group(2)
    if _TRANSFORMER_CHILD.match(rest) or _SGM_LOCON_CHILD.match(rest):
        return _stem(UNET_PREFIX, sgm_path)
    return None


def unet_stem(family: Family | str, path: str) -> str | None:
    """kohya stem of a UNet module path of ``family`` (a record, or a trained family's name): diffusers names for
    SD1/SD2 (:func:`unet_key_stem`), sgm names for SDXL (:func:`sgm_unet_key_stem`)."""
    naming = sgm_unet_key_stem if as_family(family).unet_lora_names == SGM_NAMES else unet_key_stem
    return naming(path)


def unet_stem_is_locon(stem: str) -> bool:
    """True for stems of ResBlock / Downsample / Upsample children (resnets, downsamplers, upsamplers): kohya trains
    these only in LoCon mode (``conv_dim`` set, FORMATS §A.2); SpatialTransformer stems are always trained. Works
    on diffusers (SD1/SD2) and sgm (SDXL) stems."""
    return stem.startswith(UNET_PREFIX) and _LOCON_STEM.search(stem) is not None


def te_key_stems(family: str, path: str, num_layers: int = 24) -> list[str]:
    """kohya stems for a text-encoder module path relative to the ldm embedder; ``[]`` if never targeted.

    - SD1 (``FrozenCLIPEmbedder``):
      ``transformer.text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj`` and ``.mlp.fc1`` / ``.mlp.fc2`` → one
      stem each, e.g. ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.
    - SD2 (``FrozenOpenCLIPEmbedder``), resblocks ``0 .. num_layers-2`` only (0..22 for the real
      24-layer ViT-H; SD2 uses the penultimate layer's output and kohya never writes layer 23, §A.3.3;
      ``num_layers`` is the tower's resblock count and is ignored for SD1):
      ``model.transformer.resblocks.{i}.attn`` (the fused ``nn.MultiheadAttention``) → four stems, in this order,
      ``..._self_attn_q_proj``, ``_k_proj``, ``_v_proj``, ``_out_proj``; ``.mlp.c_fc`` → ``..._mlp_fc1``;
      ``.mlp.c_proj`` → ``..._mlp_fc2``. The MHA's child ``attn.out_proj`` returns ``[]``: it is trained through the
      MHA, as A1111 applies it (§A.3.3).
    """
    try:
        fam = get_family(family)
    except ValueError:
        raise ValueError(f"unknown text-encoder family {family!r}; expected {names_text(repr)}") from None
    return encoder_key_stems(fam.text_encoder, path, num_layers)


def encoder_key_stems(encoder: TextEncoder, path: str, num_layers: int) -> list[str]:
    """kohya stems for a module path relative to one text encoder's embedder (``encoder`` is a record of
    ``Family.text_encoders``); ``[]`` if never targeted. ``num_layers``: the tower's layer count (the last layer
    carries no LoRA where the record says so: SD2)."""
    names = encoder.kind.lora_names(path, encoder.lora_layer_limit(num_layers))
    return [_stem(encoder.lora_prefix, name) for name in names]
