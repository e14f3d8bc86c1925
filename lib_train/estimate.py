"""A rough GPU-memory and time estimate for a run's settings, shown live in the Trainer tab as settings change.

Memory = frozen weights + trainable state + activations + a fixed CUDA reserve, for any family record
(:data:`lib_train.models.families.RECORDS`: SD1, SD2 and SDXL, whether or not this version trains it yet):

- **weights**: the family's parameter counts (``Family.params``, counted from the real module code: SD1/SD2 in
  ``tests/test_estimate.py``, SDXL's sgm UNet 2,567,463,684, clip_l 123,060,480 + clip_g 694,659,840 and the VAE
  83,653,863 in ``tests/test_sdxl_naming.py``) × 2 bytes (fp16/bf16; 4 with ``mixed_precision = "no"``).
  The UNet is always resident. The text encoders are resident while anything needs them per step (a LoRA that trains
  them, an embedding, captions that change per step through shuffling or dropout); otherwise their outputs are cached
  up front, as latents are, and the encoders leave the GPU (:func:`text_outputs_cached`). The VAE stays fp32 (SDXL's
  overflows in fp16; headless training keeps every family's VAE fp32) and leaves the GPU once latents are cached
  (``cache_latents`` ≠ "off" and ``offload_vae``); its encoding is transient and, at a given resolution, smaller
  than the UNet's training activations, so it adds no term;
- **trainable state**: LoRA parameters (the family's ``lora_params_per_rank``: SDXL 2,659,840 per rank in the UNet
  and 903,168 in both text encoders, LoCon 58,560 + 355,840 per rank over 66 more UNet modules) × (4 B weight + 4 B
  gradient + the optimizer's :data:`OPTIMIZER_STATE_BYTES`); an embedding's vectors are negligible;
- **UNet activations**: :data:`ACT_GIB_PER_MPIX` × :data:`UNET_ACTIVATION_SCALE` × megapixels × batch.
  ``ACT_GIB_PER_MPIX`` is a fit of ``bench/bench_train.py`` CPU measurements on full-size SD1.5 (fp32, fused
  attention: training overhead 1.1 GiB at 256², 3.0 GiB at 512², checkpointing 0.64 / 1.68 GiB). Other families
  scale it by the tensors their UNet keeps for backward relative to SD1.5's, counted on the meta device from the real
  layouts (ldm for SD1/SD2, sgm's ``UNetModel`` for SDXL; ``tests/test_sdxl_estimate.py`` recounts them): at 1024²
  SD1.5 keeps 5.74 GiB (1.54 with checkpointing), SD2 5.40 (1.19), SDXL 9.93 (1.11): SDXL has no attention at its
  largest latent size, so checkpointing saves more there. 16-bit autocast keeps :data:`HALF_ACTIVATION_SHARE` of it
  (norms and softmax statistics stay fp32);
- **text-encoder activations** when the encoders get gradients: :data:`TE_ACT_GIB_PER_CHUNK` × 75-token chunks
  (``max_token_length`` / 75) × batch, counted the same way (clip_l 0.038 GiB per chunk, clip_g 0.118, SD2's OpenCLIP
  0.071; with checkpointing about 0.14 of that: layer inputs plus one layer);
- :data:`CUDA_RESERVE_GIB` for the CUDA context and allocator slack.

Checked against published SDXL LoRA figures (kohya-ss, 1024², batch 1, UNet only, gradient checkpointing, cached
text-encoder outputs and latents): sd-scripts' "Tips for SDXL training" say such a LoRA "can be done with 8GB GPU
memory (10GB recommended)" with an 8-bit optimizer or Adafactor and dim 4-8, and the kohya_ss GUI's SDXL LoRA guide
(docs/LoRA/top_level.md) asks for at least 12 GB. This estimate gives 8.2 GiB at rank 8 with AdamW8bit, 8.4 GiB at
rank 16 and 8.6 GiB with AdamW: between the two, on the high side of the first, because its activation figure comes
from CPU peak RSS (no GPU measurement of SDXL exists here yet; bench/README.md).

It is a planning figure (about ±30 %), not a measurement: the README's bench numbers are the measured ones. The time
estimate needs a measured rate (seconds per step per megapixel from a run on this machine, of the same family);
without one it says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import methods
from .config import SETTINGS, TrainConfig, text_encoders_train, text_outputs_cached
from .models.families import DEFAULT, RECORDS
from .settings import resolve

GIB = 2**30
# Parameters of the frozen modules and LoRA parameters per unit of rank, by family name (the family records' counts;
# see families.ModelParams / families.LoRAParams). Every record, so the estimate covers a family before it trains.
MODEL_PARAMS = {name: asdict(f.params) for name, f in RECORDS.items()}
LORA_PARAMS_PER_RANK = {name: asdict(f.lora_params_per_rank) for name, f in RECORDS.items()}
# Optimizer state in bytes per trained parameter: AdamW two fp32 moments; AdamW8bit two 8-bit moments; Lion one
# moment; DAdaptAdam moments + s; Prodigy moments + s + the initial weights; Adafactor (no first moment, as
# configured) a factored second moment, rows + columns per matrix: 4 / rank bytes per LoRA parameter (1 covers
# rank ≥ 4).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "lion8bit": 1, "dadaptadam": 12, "prodigy": 16,
                         "adafactor": 1}
ACT_GIB_PER_MPIX = {False: 9.66e-6 * 2**20, True: 5.3e-6 * 2**20}  # fp32 SD1.5, by gradient checkpointing
# UNet activations relative to SD1.5's at the same pixel count, and text-encoder activations in fp32 GiB per 75-token
# chunk and sample, by gradient checkpointing (off, on): the records' ActivationCosts.
UNET_ACTIVATION_SCALE = {name: dict(enumerate(f.activations.unet_scale)) for name, f in RECORDS.items()}
TE_ACT_GIB_PER_CHUNK = {name: dict(enumerate(f.activations.te_gib_per_chunk)) for name, f in RECORDS.items()}
HALF_ACTIVATION_SHARE = 0.6
CUDA_RESERVE_GIB = 0.8
VAE_BYTES = 4  # the VAE stays fp32 (SDXL's overflows in fp16)
CHUNK_TOKENS = 75


@dataclass(frozen=True)
class Estimate:
    vram_gib: float
    parts: dict[str, float]  # GiB by part, for the breakdown
    seconds: float | None  # None without a measured rate
    note: str


@dataclass(frozen=True)
class MeasuredRate:
    """Seconds per optimizer step per megapixel of (resolution² × batch), from a finished run on this machine."""

    seconds_per_mpix_step: float
    source: str  # e.g. "run 'mychar' (512², batch 1): 1.10 s/step"
    family: str | None = None  # the family the run trained (None: unknown, used for any family)


def _family_name(family) -> str:
    """A family record or name → its name (any record, SDXL included)."""
    name = getattr(family, "name", family)
    if name not in RECORDS:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(RECORDS)}")
    return name


def lora_params(cfg: TrainConfig, family) -> int:
    n, per = cfg.network, LORA_PARAMS_PER_RANK[_family_name(family)]
    total = 0
    if n.train_unet:
        total += n.rank * per["unet"]
        if n.conv_rank:
            total += n.rank * per["locon_linear"] + n.conv_rank * per["conv"]
    if cfg.optim.te_lr > 0:
        total += n.rank * per["text_encoder"]
    return total


def estimate(cfg: TrainConfig, steps: int | None, family=DEFAULT.name, rate: MeasuredRate | None = None) -> Estimate:
    """The estimate for ``cfg`` on ``family`` (a record or its name); ``steps``: the run's optimizer steps, when
    known. A measured rate of another family is not used for the time."""
    name = _family_name(family)
    half = cfg.train.mixed_precision != "no"
    wbytes = 2 if half else 4
    share = HALF_ACTIVATION_SHARE if half else 1.0
    ckpt = cfg.train.gradient_checkpointing
    params = MODEL_PARAMS[name]
    parts = {"UNet weights": params["unet"] * wbytes / GIB}
    if not text_outputs_cached(cfg):
        parts["text-encoder weights"] = params["text_encoder"] * wbytes / GIB
    if cfg.data.cache_latents == "off" or not cfg.train.offload_vae:
        parts["VAE weights (fp32)"] = params["vae"] * VAE_BYTES / GIB
    method = methods.METHODS.get(cfg.method)
    if method is not None and method.trainable_params:  # an embedding's vectors are negligible
        opt = OPTIMIZER_STATE_BYTES.get(cfg.optim.optimizer.lower(), 8)
        trained = resolve(method.trainable_params)(cfg, name)
        parts[f"{method.noun} + gradients + optimizer"] = trained * (8 + opt) / GIB
    mpix = cfg.data.resolution ** 2 / 2**20 * cfg.train.batch_size
    parts["activations"] = ACT_GIB_PER_MPIX[ckpt] * UNET_ACTIVATION_SCALE[name][ckpt] * mpix * share
    if text_encoders_train(cfg):
        chunks = max(1, cfg.data.max_token_length // CHUNK_TOKENS)
        parts["text-encoder activations"] = (TE_ACT_GIB_PER_CHUNK[name][ckpt] * chunks * cfg.train.batch_size
                                             * share)
    parts["CUDA context and slack"] = CUDA_RESERVE_GIB
    if rate is not None and rate.family not in (None, name):
        rate = None
    seconds = None
    if rate is not None and steps:
        seconds = rate.seconds_per_mpix_step * mpix * steps * cfg.optim.grad_accum
    note = ("rough estimate (±30 %); " + (f"time from {rate.source}" if rate else
                                          "time: shown once a run on this machine has measured its speed"))
    return Estimate(vram_gib=sum(parts.values()), parts=parts, seconds=seconds, note=note)


def rate_from_run(resolution: int, batch_size: int, grad_accum: int, steps: int, seconds: float,
                  name: str, family: str | None = None) -> MeasuredRate | None:
    """A :class:`MeasuredRate` from a run's training time (``seconds`` over ``steps`` optimizer steps) on
    ``family`` (None: unknown)."""
    if steps < 1 or seconds <= 0:
        return None
    mpix = resolution ** 2 / 2**20 * batch_size * grad_accum
    per_step = seconds / steps
    return MeasuredRate(per_step / mpix, f"run '{name}' ({resolution}², batch {batch_size}): {per_step:.2f} s/step",
                        family)
