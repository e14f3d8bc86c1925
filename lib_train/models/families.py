"""The model-family table: one frozen :class:`Family` record per family this trainer trains, holding every rule that
differs between them. Callers ask the record; nothing outside this module compares family names.

A family's name (``"sd1"``, ``"sd2"``) is what files, resume states and the API store; :func:`get_family` turns it
back into the record. Behaviour that differs (tokenizing, encoding, LoRA naming, state-dict reading) sits in the
text-encoder kind a record points at (:mod:`.text_encoders`), not in branches on the name.

SDXL is one more record (:data:`SDXL`: clip_l + clip_g, pooled output, size conditioning, ``lora_te1_``/
``lora_te2_``, sgm UNet names, scale 0.13025, native 1024, a VAE that must not encode in fp16, gradient checkpointing
on by default; its conditioning is :mod:`.sdxl`). The switch :data:`TRAINS_SDXL` (on) lets it into :data:`FAMILIES`,
the families this version *trains*; off, SDXL names still resolve through :data:`RECORDS` and the tab, estimate and
CLI would list SD1/SD2 only. :func:`as_family` accepts a record or a trained family's name.

No torch import: the naming, metadata and estimate code read this table without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .text_encoders import HF_CLIP, OPEN_CLIP, Layer, TextEncoderKind

V = "v"  # the v-prediction type ("eps" is the other)

# How a family's UNet modules are named in kohya files (FORMATS §A.3.1 / §A.3.2).
DIFFUSERS_NAMES = "diffusers"  # ldm paths renamed to the diffusers layout (SD1/SD2)
SGM_NAMES = "sgm"  # the sgm paths themselves (SDXL)


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family."""

    kind: TextEncoderKind  # its module layout and behaviour
    checkpoint_prefix: str  # key prefix of its weights in a single-file checkpoint
    lora_prefix: str  # kohya stem prefix of its LoRA modules
    path: str = ""  # module path of the embedder under the family's text-encoder root ("" = the root itself)
    key: str = ""  # its name in SDXL embedding files ("clip_l", "clip_g"); "" for one-encoder families
    layer: Layer | None = None  # the conditioning layer; None: the ldm embedder's own rule (kind.encode)
    lora_last_layer: bool = True  # kohya targets the tower's last layer (SD2: no, its output is never used)

    def module(self, root):
        """The embedder under the family's text-encoder root (the root itself for one-encoder families)."""
        return root.get_submodule(self.path) if self.path else root

    def lora_layer_limit(self, num_layers: int) -> int | None:
        """Layers at or above this index carry no LoRA (None: every layer does)."""
        return None if self.lora_last_layer else num_layers - 1


@dataclass(frozen=True)
class ModelParams:
    """Parameters of the full-size frozen modules (counted from the real module code, tests/test_estimate.py)."""

    unet: int
    text_encoder: int
    vae: int


@dataclass(frozen=True)
class LoRAParams:
    """LoRA parameters per unit of rank with kohya's default targets (Linear/1x1); with LoCon (conv rank > 0) the
    ResBlock/Down/Upsample children add 1x1/Linear targets at the rank (``locon_linear``) and 3x3 ones at the conv
    rank (``conv``)."""

    unet: int
    text_encoder: int
    locon_linear: int
    conv: int


@dataclass(frozen=True)
class Family:
    name: str  # stored in files, resume states and API output
    label: str  # for people: "SD1.x"
    short: str  # "SD1": the Lora card's ``sd version`` (FORMATS §B.5) and error messages
    text_encoders: tuple[TextEncoder, ...]
    clip_skip_applies: bool  # does the WebUI's clip skip setting change this family's conditioning?
    base_model: str  # ``ss_base_model_version`` without the v-prediction suffix
    ss_v2: bool  # kohya's ``ss_v2`` flag
    modelspec_eps: str  # ``modelspec.architecture`` base for ε-prediction …
    modelspec_v: str  # … and for v-prediction
    native: int  # native resolution (modelspec) for ε-prediction …
    native_v: int  # … and for v-prediction
    params: ModelParams  # for the memory estimate
    lora_params_per_rank: LoRAParams
    unet_head_channels: int | None  # channels per UNet attention head; None: 8 heads (the configs' rule)
    linear_proj: bool  # the UNet's transformers use Linear proj_in/proj_out (else 1x1 convs)
    probe_v_prediction: bool  # full-size weights with no other hint get the WebUI's v-prediction probe
    default_prediction: str = "eps"
    latent_scale: float = 0.18215  # the VAE latent scaling (inference configs' scale_factor)
    v_base_model_suffix: bool = True  # ``ss_base_model_version`` gets "_v" for v-prediction (kohya: SD1/SD2 only)
    unet_lora_names: str = DIFFUSERS_NAMES  # DIFFUSERS_NAMES or SGM_NAMES
    size_conditioning: bool = False  # the UNet takes a vector y (pooled text + size embeddings, SDXL)
    modelspec_implementation: str = "diffusers"  # ``modelspec.implementation`` of a LoRA (kohya: its key naming)
    vae_fp16_safe: bool = True  # the VAE may encode in fp16 (SDXL's overflows: fp32 or bf16 only)
    # config settings whose default differs for this family ("section.field", value): applied where the user did
    # not set them (:func:`lib_train.config.apply_family_defaults`)
    config_defaults: tuple[tuple[str, object], ...] = ()

    # ---- text encoders

    @property
    def text_encoder(self) -> TextEncoder:
        """The single text encoder of a one-encoder family."""
        if len(self.text_encoders) != 1:
            raise ValueError(f"{self.label} has {len(self.text_encoders)} text encoders; use text_encoders")
        return self.text_encoders[0]

    @property
    def te_prefixes(self) -> tuple[str, ...]:
        """kohya stem prefixes of the text-encoder LoRA modules, one per text encoder."""
        return tuple(t.lora_prefix for t in self.text_encoders)

    def clip_skip(self, clip_skip: int) -> int:
        """The clip skip the conditioning uses for a ``model.clip_skip`` setting (1 where it does not apply)."""
        return clip_skip if self.clip_skip_applies else 1

    def encoder_layer(self, clip_skip: int) -> int | None:
        """``ss_clip_skip`` / ``modelspec.encoder_layer`` for a ``model.clip_skip`` setting; None when unset."""
        effective = self.clip_skip(clip_skip)
        return effective if effective > 1 else None

    # ---- UNet

    def unet_heads(self, model_channels: int) -> tuple[int, int]:
        """(num_heads, num_head_channels) of the ldm UNetModel: the family's channels per head, or 8 heads (also
        when the width is not a multiple of it, as in tiny test models)."""
        ch = self.unet_head_channels
        if ch is not None and model_channels % ch == 0:
            return -1, ch
        return 8, -1

    # ---- files

    def native_resolution(self, prediction: str) -> int:
        return self.native_v if prediction == V else self.native

    def ss_base_model_version(self, prediction: str) -> str:
        return self.base_model + ("_v" if prediction == V and self.v_base_model_suffix else "")

    def modelspec_architecture(self, prediction: str, kind: str = "lora") -> str:
        """``modelspec.architecture`` of a ``kind`` file ("lora", "textual-inversion") trained on this family."""
        return f"{self.modelspec_v if prediction == V else self.modelspec_eps}/{kind}"

    @property
    def sidecar_sd_version(self) -> str:
        return self.short

    # ---- detection

    def in_state_dict(self, sd: Mapping[str, object]) -> bool:
        """True when a checkpoint state dict holds this family's text encoder(s)."""
        return all(t.checkpoint_prefix + t.kind.token_embedding_key in sd for t in self.text_encoders)

    def matches_live(self, encoder) -> bool:
        """True when a live (unwrapped) text-encoder root is this family's: the ldm embedder (SD1/SD2), or an object
        holding the embedders at the records' paths (SDXL: sgm's ``GeneralConditioner``)."""
        try:
            return all(t.kind.matches_live(t.module(encoder)) for t in self.text_encoders)
        except AttributeError:  # get_submodule on a root without that path
            return False


SD1 = Family(
    name="sd1", label="SD1.x", short="SD1",
    text_encoders=(TextEncoder(HF_CLIP, "cond_stage_model.transformer.", "lora_te_"),),
    clip_skip_applies=True, base_model="sd_v1", ss_v2=False,
    modelspec_eps="stable-diffusion-v1", modelspec_v="stable-diffusion-v1", native=512, native_v=512,
    params=ModelParams(unet=859_520_964, text_encoder=123_060_480, vae=83_653_863),
    lora_params_per_rank=LoRAParams(unet=423_936, text_encoder=165_888, locon_linear=82_880, conv=544_000),
    unet_head_channels=None, linear_proj=False, probe_v_prediction=False,
)
SD2 = Family(
    name="sd2", label="SD2.x", short="SD2",
    text_encoders=(TextEncoder(OPEN_CLIP, "cond_stage_model.model.", "lora_te_", lora_last_layer=False),),
    clip_skip_applies=False, base_model="sd_v2", ss_v2=True,
    modelspec_eps="stable-diffusion-v2-512", modelspec_v="stable-diffusion-v2-768-v", native=512, native_v=768,
    params=ModelParams(unet=865_910_724, text_encoder=354_032_640, vae=83_653_863),
    lora_params_per_rank=LoRAParams(unet=432_128, text_encoder=423_936, locon_linear=82_880, conv=544_000),
    unet_head_channels=64, linear_proj=True, probe_v_prediction=True,
)

# SDXL base 1.0 and its fine-tunes (sgm ``DiffusionEngine``, configs/inference/sd_xl_base.yaml). Conditioning
# (FORMATS §E.4): clip_l ``hidden_states[11]`` (= [-2] of its 12 layers) without the final layer norm, clip_g the
# penultimate block's output without ``ln_final`` plus its pooled output; the WebUI's clip skip does not apply (its
# option ``sdxl_clip_l_skip`` is off by default; kohya ignores clip skip for SDXL), so ``ss_clip_skip`` is "None".
# kohya writes its LoRA with sgm UNet names and all 32 clip_g layers (layer 31 feeds the pooled output).
SDXL = Family(
    name="sdxl", label="SDXL", short="SDXL",
    text_encoders=(
        TextEncoder(HF_CLIP, "conditioner.embedders.0.transformer.", "lora_te1_", path="embedders.0", key="clip_l",
                    layer=Layer(-2, final_norm=False)),
        TextEncoder(OPEN_CLIP, "conditioner.embedders.1.model.", "lora_te2_", path="embedders.1", key="clip_g",
                    layer=Layer(-2, final_norm=False, pooled=True)),
    ),
    clip_skip_applies=False, base_model="sdxl_base_v1-0", ss_v2=False,
    modelspec_eps="stable-diffusion-xl-v1-base", modelspec_v="stable-diffusion-xl-v1-base", native=1024,
    native_v=1024,
    # counted on the meta device from sgm's classes (tests/test_sdxl_naming.py): UNet 2.57 G, clip_l 123.1 M +
    # clip_g 694.7 M, VAE as SD1
    params=ModelParams(unet=2_567_463_684, text_encoder=817_720_320, vae=83_653_863),
    lora_params_per_rank=LoRAParams(unet=2_659_840, text_encoder=903_168, locon_linear=58_560, conv=355_840),
    unet_head_channels=64, linear_proj=True, probe_v_prediction=False, latent_scale=0.13025,
    v_base_model_suffix=False, unet_lora_names=SGM_NAMES, size_conditioning=True,
    modelspec_implementation="https://github.com/Stability-AI/generative-models", vae_fp16_safe=False,
    config_defaults=(("train.gradient_checkpointing", True),),  # 2.6 G UNet parameters: memory first
)

# The switch: on since an SDXL bundle trains end to end (issue 10). Off, SDXL checkpoints and live models would be
# refused with a reason and no list of trainable families would name SDXL.
TRAINS_SDXL = True

RECORDS: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL)}  # every record, in detection order
FAMILIES: dict[str, Family] = {n: f for n, f in RECORDS.items() if f is not SDXL or TRAINS_SDXL}  # trained here
DEFAULT = SD1  # assumed where no model is loaded (the tab's estimate)

# The Lora card's ``sd version`` (FORMATS §B.5) of every record, SDXL included (a grid keeps choices for SDXL files
# although this version may not train them).
SIDECAR_SD_VERSIONS: dict[str, str] = {f.name: f.sidecar_sd_version for f in RECORDS.values()}


def get_family(name: str) -> Family:
    """The record of ``name``; ValueError naming the known families for any other name."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model family {name!r}; expected {names_text(repr)}") from None


def as_family(family: Family | str) -> Family:
    """A record as is; a name through :func:`get_family` (trained families only)."""
    return family if isinstance(family, Family) else get_family(family)


def family_or_default(name: str | None) -> Family:
    """The record of ``name``, or :data:`DEFAULT` for None or a name this version does not know."""
    return FAMILIES.get(name, DEFAULT) if isinstance(name, str) else DEFAULT


def names_text(show: Callable[[str], str] = str, joiner: str = " or ") -> str:
    """The family names for messages: "sd1 or sd2" (``show=repr``: "'sd1' or 'sd2'")."""
    return joiner.join(show(name) for name in FAMILIES)


def labels_text(joiner: str = " or ") -> str:
    """The families' labels for messages: "SD1.x or SD2.x" (``joiner="/"``: "SD1.x/SD2.x")."""
    return joiner.join(f.label for f in FAMILIES.values())


def family_from_state_dict(sd: Mapping[str, object]) -> Family | None:
    """The family whose text encoder(s) a checkpoint state dict holds; None when none matches."""
    return next((f for f in FAMILIES.values() if f.in_state_dict(sd)), None)


def family_from_live(encoder) -> Family | None:
    """The family of a live (unwrapped) ldm text embedder; None when none matches."""
    return next((f for f in FAMILIES.values() if f.matches_live(encoder)), None)


def family_name_from_metadata(meta: Mapping[str, str]) -> str:
    """The family key a LoRA file's ``ss_*`` metadata implies (files of other trainers too): ``"sdxl"`` for an SDXL
    base model version, the ``ss_v2`` family when ``ss_v2`` is "True", else SD1; "unknown" without metadata."""
    if str(meta.get("ss_base_model_version", "")).startswith(SDXL.name):
        return SDXL.name
    if meta.get("ss_v2") == "True":
        return next(f.name for f in FAMILIES.values() if f.ss_v2)
    return SD1.name if meta else "unknown"
