"""A rough GPU-memory and time estimate for a run's settings, shown live in the Trainer tab as settings change.

Memory = frozen weights in the compute dtype + trainable state + activations + a fixed CUDA reserve:

- weights: parameter counts of the SD1.5 / SD2 modules (UNet, text encoder, VAE) × 2 bytes (fp16/bf16; 4 with
  ``mixed_precision = "no"``). The VAE leaves the GPU once latents are cached (``cache_latents`` ≠ "off");
- trainable state: LoRA parameters (the family's ``lora_params_per_rank``, counted from the real module layouts by
  ``tests/test_estimate.py``) × (4 B weight + 4 B gradient + the optimizer's bytes per parameter); an embedding's
  vectors are negligible;
- activations: :data:`ACT_GIB_PER_MPIX` × megapixels × batch, a fit of ``bench/bench_train.py`` CPU measurements
  (fp32, fused attention: training overhead 1.1 GiB at 256², 3.0 GiB at 512², checkpointing 0.64 / 1.68 GiB), scaled
  by :data:`HALF_ACTIVATION_SHARE` for 16-bit autocast (norms and softmax statistics stay fp32);
- :data:`CUDA_RESERVE_GIB` for the CUDA context and allocator slack.

It is a planning figure (about ±30 %), not a measurement: the README's bench numbers are the measured ones. The time
estimate needs a measured rate (seconds per step per megapixel from a run on this machine); without one it says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import methods
from .config import TrainConfig
from .models.families import DEFAULT, FAMILIES
from .settings import resolve

GIB = 2**30
# Parameters of the frozen modules and LoRA parameters per unit of rank, by family name (the family table's counts;
# see families.ModelParams / families.LoRAParams).
MODEL_PARAMS = {name: asdict(f.params) for name, f in FAMILIES.items()}
LORA_PARAMS_PER_RANK = {name: asdict(f.lora_params_per_rank) for name, f in FAMILIES.items()}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "lion8bit": 1, "dadaptadam": 12, "prodigy": 16,
                         "adafactor": 4}
ACT_GIB_PER_MPIX = {False: 9.66e-6 * 2**20, True: 5.3e-6 * 2**20}  # fp32, by gradient checkpointing
HALF_ACTIVATION_SHARE = 0.6
CUDA_RESERVE_GIB = 0.8


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


def lora_params(cfg: TrainConfig, family: str) -> int:
    n, per = cfg.network, LORA_PARAMS_PER_RANK[family]
    total = 0
    if n.train_unet:
        total += n.rank * per["unet"]
        if n.conv_rank:
            total += n.rank * per["locon_linear"] + n.conv_rank * per["conv"]
    if cfg.optim.te_lr > 0:
        total += n.rank * per["text_encoder"]
    return total


def estimate(cfg: TrainConfig, steps: int | None, family: str = DEFAULT.name,
             rate: MeasuredRate | None = None) -> Estimate:
    """The estimate for ``cfg`` (``steps``: the run's optimizer steps, when known)."""
    half = cfg.train.mixed_precision != "no"
    wbytes = 2 if half else 4
    params = MODEL_PARAMS[family]
    weights = (params["unet"] + params["text_encoder"]) * wbytes
    if cfg.data.cache_latents == "off" or not cfg.train.offload_vae:
        weights += params["vae"] * wbytes
    parts = {"model weights": weights / GIB}
    method = methods.METHODS.get(cfg.method)
    if method is not None and method.trainable_params:  # an embedding's vectors are negligible
        opt = OPTIMIZER_STATE_BYTES.get(cfg.optim.optimizer.lower(), 8)
        trained = resolve(method.trainable_params)(cfg, family)
        parts[f"{method.noun} + gradients + optimizer"] = trained * (8 + opt) / GIB
    mpix = cfg.data.resolution ** 2 / 2**20 * cfg.train.batch_size
    act = ACT_GIB_PER_MPIX[cfg.train.gradient_checkpointing] * mpix * (HALF_ACTIVATION_SHARE if half else 1.0)
    parts["activations"] = act
    parts["CUDA context and slack"] = CUDA_RESERVE_GIB
    seconds = None
    if rate is not None and steps:
        seconds = rate.seconds_per_mpix_step * mpix * steps * cfg.optim.grad_accum
    note = ("rough estimate (±30 %); " + (f"time from {rate.source}" if rate else
                                          "time: shown once a run on this machine has measured its speed"))
    return Estimate(vram_gib=sum(parts.values()), parts=parts, seconds=seconds, note=note)


def rate_from_run(resolution: int, batch_size: int, grad_accum: int, steps: int, seconds: float,
                  name: str) -> MeasuredRate | None:
    """A :class:`MeasuredRate` from a run's training time (``seconds`` over ``steps`` optimizer steps)."""
    if steps < 1 or seconds <= 0:
        return None
    mpix = resolution ** 2 / 2**20 * batch_size * grad_accum
    per_step = seconds / steps
    return MeasuredRate(per_step / mpix, f"run '{name}' ({resolution}², batch {batch_size}): {per_step:.2f} s/step")
