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

**Calibration on GPU measurements.** :data:`CALIBRATION_FILE` (``estimate_calibration.json`` next to this module)
holds the points measured on a GPU by ``bench/gpu_check.py`` (``bench/calibrate.py`` turns its JSON into points):
each the settings of the measured run (:data:`INPUTS`), its family, method and precision, the measured peak
``torch.cuda.max_memory_allocated`` and where it came from (card, date, row). A point is *near* a run when it has the
same family, method, 16-bit or fp32 weights, gradient checkpointing, text-encoder mode (trained / resident without
gradients / cached and off the GPU: :func:`text_encoder_mode`) and latent caching (on or off), and its megapixels
per step (resolution² × batch) are within :data:`CALIBRATION_REACH` of the run's. The nearest such point (same
optimizer first) corrects the one term fitted from CPU measurements, the activations: the factor that makes the
estimate's allocator-visible parts (all but :data:`CUDA_RESERVE_GIB`) equal the measured allocation at the point's
own settings, within :data:`CALIBRATION_FACTOR_RANGE`. The estimate then says "calibrated" and from what
(:attr:`Estimate.calibration`); without a near point it says "uncalibrated". The table stays empty until a task with
a GPU runs the check and imports it; until then every estimate is uncalibrated.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from . import methods
from .config import SETTINGS, TrainConfig, default_config, text_encoders_train, text_outputs_cached
from .errors import TrainerError
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
# The settings the estimate reads (memory and time; the step count reads more, see webui/tab/build.py): a calibration
# point records these of its run, and the tab refreshes the estimate when one changes.
INPUTS = ("data.resolution", "data.cache_latents", "data.shuffle_caption", "data.caption_dropout", "data.tag_dropout",
          "data.max_token_length", "train.batch_size", "train.gradient_checkpointing", "train.mixed_precision",
          "train.offload_vae", "optim.optimizer", "optim.grad_accum", "optim.te_lr", "network.rank",
          "network.conv_rank", "network.train_unet")
CALIBRATION_FILE = Path(__file__).with_name("estimate_calibration.json")
CALIBRATION_REACH = 4.0  # a point corrects runs with up to 4× (or down to 1/4) its megapixels per step
CALIBRATION_FACTOR_RANGE = (0.25, 4.0)  # the activation factor a point may set (a wilder one is clamped)
UNCALIBRATED = ("uncalibrated: a planning figure from CPU measurements; no GPU measurement of a run like this yet "
                "(bench/gpu_check.py, bench/calibrate.py)")


@dataclass(frozen=True)
class Estimate:
    vram_gib: float
    parts: dict[str, float]  # GiB by part, for the breakdown
    seconds: float | None  # None without a measured rate
    note: str
    calibration: str | None = None  # what corrected the figure (a GPU measurement); None: uncalibrated

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def calibration_label(self) -> str:
        """One line for next to the figure: "calibrated on …" or "uncalibrated: …"."""
        return f"calibrated on {self.calibration}" if self.calibration else UNCALIBRATED


@dataclass(frozen=True)
class CalibrationPoint:
    """One GPU measurement of a run's peak memory (a row of ``bench/gpu_check.py``'s JSON)."""

    family: str  # a family name (families.RECORDS)
    method: str  # a method name (methods.METHODS)
    precision: str  # the run's train.mixed_precision as it ran: "bf16", "fp16" or "no" (fp32)
    settings: dict[str, Any]  # "section.field" → value for :data:`INPUTS` (train.mixed_precision aside)
    peak_allocated_gib: float  # torch.cuda.max_memory_allocated over the run, model on the card
    source: str  # where it came from: "NVIDIA H200, bench/gpu_check.py 2026-12-02, row sd1-lora-512-b1-bf16"
    peak_reserved_gib: float | None = None  # torch.cuda.max_memory_reserved (for reference)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the importer kept (not used here)

    def config(self) -> TrainConfig:
        """The measured run's config (the method's defaults with the point's settings)."""
        cfg = default_config(self.method)
        for key, value in {**self.settings, "train.mixed_precision": self.precision}.items():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        return cfg

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "extra" or v}


def text_encoder_mode(cfg: TrainConfig) -> str:
    """What the text encoders cost a run: "trained" (gradients reach them), "resident" (on the GPU, no gradients:
    captions change per step) or "cached" (outputs computed once, the encoders leave the GPU)."""
    if text_encoders_train(cfg):
        return "trained"
    return "cached" if text_outputs_cached(cfg) else "resident"


def _kind(cfg: TrainConfig, family: str) -> tuple:
    """What a calibration point must share with a run to correct its estimate."""
    return (family, cfg.method, cfg.train.mixed_precision != "no", cfg.train.gradient_checkpointing,
            text_encoder_mode(cfg), cfg.data.cache_latents != "off")


def _mpix(cfg: TrainConfig) -> float:
    return cfg.data.resolution ** 2 / 2**20 * cfg.train.batch_size


def parse_calibration(doc: Any, where: str = str(CALIBRATION_FILE)) -> tuple[CalibrationPoint, ...]:
    """The points of a calibration document (``{"points": [...]}``); TrainerError naming the file, the point and
    the field for anything malformed."""
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), list):
        raise TrainerError(f"{where}: expected a JSON object with a list \"points\" (bench/calibrate.py writes it).")
    points = []
    required = {"family", "method", "precision", "settings", "peak_allocated_gib", "source"}
    for i, raw in enumerate(doc["points"]):
        at = f"{where}: points[{i}]"
        if not isinstance(raw, dict):
            raise TrainerError(f"{at}: expected an object.")
        missing = sorted(required - set(raw))
        unknown = sorted(set(raw) - required - {"peak_reserved_gib", "extra"})
        if missing or unknown:
            raise TrainerError(f"{at}: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"]
                                                                         if unknown else []))
                + ". Rewrite it with bench/calibrate.py.")
        if raw["family"] not in RECORDS or raw["method"] not in methods.METHODS:
            raise TrainerError(f"{at}: unknown family {raw['family']!r} or method {raw['method']!r}.")
        if raw["precision"] not in ("bf16", "fp16", "no"):
            raise TrainerError(f"{at}: precision must be bf16, fp16 or no (fp32), not {raw['precision']!r}.")
        bad = [k for k in raw["settings"] if k not in INPUTS or k == "train.mixed_precision"] \
            if isinstance(raw["settings"], dict) else ["(not an object)"]
        if bad:
            raise TrainerError(f"{at}: settings {', '.join(map(str, bad))} are not settings the estimate reads "
                               f"({', '.join(k for k in INPUTS if k != 'train.mixed_precision')}).")
        peak = raw["peak_allocated_gib"]
        if not isinstance(peak, (int, float)) or isinstance(peak, bool) or not 0 < peak < 1e4:
            raise TrainerError(f"{at}: peak_allocated_gib must be a positive number of GiB, not {peak!r}.")
        points.append(CalibrationPoint(**raw))
    return tuple(points)


def load_calibration(path: str | Path = CALIBRATION_FILE) -> tuple[CalibrationPoint, ...]:
    """The calibration points of ``path`` (default: the table shipped with the library)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainerError(f"{path}: cannot read the estimate's calibration table ({e}).") from None
    return parse_calibration(doc, str(path))


@lru_cache(maxsize=1)
def _shipped_calibration() -> tuple[CalibrationPoint, ...]:
    return load_calibration(CALIBRATION_FILE)


def nearest_point(cfg: TrainConfig, family: str,
                  points: Sequence[CalibrationPoint]) -> CalibrationPoint | None:
    """The point that corrects ``cfg``'s estimate on ``family``: same kind (:func:`_kind`), megapixels per step
    within :data:`CALIBRATION_REACH`, the nearest (log scale; the same optimizer first); None: uncalibrated."""
    kind, mpix = _kind(cfg, family), _mpix(cfg)
    best, best_key = None, None
    for p in points:
        pc = p.config()
        if _kind(pc, p.family) != kind:
            continue
        distance = abs(math.log(mpix / _mpix(pc)))
        if distance > math.log(CALIBRATION_REACH) + 1e-9:
            continue
        key = (distance, pc.optim.optimizer.lower() != cfg.optim.optimizer.lower())
        if best_key is None or key < best_key:
            best, best_key = p, key
    return best


def activation_factor(point: CalibrationPoint) -> float:
    """The factor on the activation terms that makes the uncalibrated estimate at ``point``'s own settings, less the
    CUDA reserve, equal its measured allocation (clamped to :data:`CALIBRATION_FACTOR_RANGE`)."""
    raw = _estimate(point.config(), None, point.family, None)
    act = _activations(raw.parts)
    fixed = raw.vram_gib - act - raw.parts["CUDA context and slack"]
    low, high = CALIBRATION_FACTOR_RANGE
    return min(high, max(low, (point.peak_allocated_gib - fixed) / act)) if act > 0 else 1.0


_ACTIVATION_PARTS = ("activations", "text-encoder activations")


def _activations(parts: dict[str, float]) -> float:
    return sum(parts.get(k, 0.0) for k in _ACTIVATION_PARTS)


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


def estimate(cfg: TrainConfig, steps: int | None, family=DEFAULT.name, rate: MeasuredRate | None = None,
             calibration: Sequence[CalibrationPoint] | None = None) -> Estimate:
    """The estimate for ``cfg`` on ``family`` (a record or its name); ``steps``: the run's optimizer steps, when
    known. A measured rate of another family is not used for the time. ``calibration``: the GPU measurements that
    may correct the memory figure (default: the shipped table, :data:`CALIBRATION_FILE`; ``()``: none)."""
    name = _family_name(family)
    est = _estimate(cfg, steps, name, rate)
    points = _shipped_calibration() if calibration is None else calibration
    point = nearest_point(cfg, name, points)
    if point is None:
        return est
    factor = activation_factor(point)
    parts = {k: v * factor if k in _ACTIVATION_PARTS else v for k, v in est.parts.items()}
    pc = point.config()
    what = (f"{point.source} ({RECORDS[point.family].short} {point.method} {pc.data.resolution}² batch "
            f"{pc.train.batch_size} {point.precision}, {text_encoder_mode(pc)} text encoders: "
            f"{point.peak_allocated_gib:.2f} GiB allocated; activations ×{factor:.2f})")
    return Estimate(vram_gib=sum(parts.values()), parts=parts, seconds=est.seconds,
                    note=est.note.replace("rough estimate (±30 %)", "estimate calibrated on a GPU measurement"),
                    calibration=what)


def _estimate(cfg: TrainConfig, steps: int | None, name: str, rate: MeasuredRate | None) -> Estimate:
    """The uncalibrated estimate (the formula above)."""
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
