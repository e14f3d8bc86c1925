"""The GPU check of issue 13: one command that measures training speed, memory and FLOP use on a CUDA card within a
short device lease, and proves itself on the CPU first (``--tiny --device cpu``).

It runs a fixed, prioritised matrix (:data:`MATRIX`) of full-size random-weight models, built in place by
``bench_train.py`` (SD1.5 from ldm, SDXL from sgm's own classes): SD1.5 LoRA at 512² batch 1 and 4, SDXL LoRA at
1024² batch 1 with the text encoders cached and trained, SD1.5 embedding at 512²; bf16, and fp16 for the key rows;
and, on SD1.5 batch 1 bf16 (and SDXL where it applies), each speed switch that exists today (:data:`SWITCHES`)
turned the other way. Each configuration runs in a fresh subprocess (``--one``), so its peak memory is its own and an
out-of-memory error ends only that row. For each it prints and writes to JSON:

- ``s_per_step``: the median wall time of optimizer steps ``WARMUP_STEPS+1..N`` (CUDA: read after a synchronize);
  ``images_per_s`` = batch / s_per_step;
- ``peak_allocated_gib`` / ``peak_reserved_gib``: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over
  the timed run (reset before it; the model is already on the card, so they include the weights). None on the CPU;
- ``flops_per_step``: the model FLOPs of one optimizer step, counted by ``torch.utils.flop_counter.FlopCounterMode``
  in a separate 2-step run after the timed one (step 2 alone: no latent or text caching in it), with gradient
  checkpointing off so that a recomputed forward is not counted (the usual "model FLOPs" of MFU figures);
  ``tflops_per_s`` = flops_per_step / s_per_step and ``peak_fraction`` = that over the card's dense bf16/fp16 peak
  (:data:`PEAK_TFLOPS`, ``--peak-tflops`` overrides; an unknown card gets no fraction and a note);
- ``estimate_gib``: ``lib_train.estimate.estimate`` for the run's config, with ``estimate_over_allocated`` /
  ``estimate_over_reserved`` (the estimate's planning figure against what the card held);
- the machine (torch, CUDA, cuDNN, device name and properties, driver) at the top of the JSON.

The matrix is planned against a time budget (``--budget``, default 420 s): the planned total is printed first, a
configuration whose predicted cost no longer fits is skipped with a note, and the JSON is rewritten after every row
(so a lease that ends early still leaves the rows done).

The device machine of a lease has no network, none of ldm, sgm, open_clip, pytorch_lightning 1.x and omegaconf, and
a transformers 5 that lib_train's text-encoder code does not run on: ``--make-kit DIR`` (here, with network) puts
the wheels it needs (:data:`KIT_WHEELS`) and a copy of sgm into DIR, and ``--kit DIR`` (there) installs the wheels
into a folder beside them and uses the sgm copy. bench/README.md gives the one device command.

Run from the repository root::

    python bench/gpu_check.py --list                                 # the plan, nothing run
    python bench/gpu_check.py --tiny --device cpu                     # the whole matrix on tiny models (script check)
    python bench/gpu_check.py --make-kit bench/.device                # here: wheels + sgm for a device machine
    python3 bench/gpu_check.py --kit bench/.device --json $OUT/gpu_check.json   # there: the measurement
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402  (bench/ is not a package; bench_train puts the repository on sys.path)

REPO = bt.REPO
GIB = 2**30
FLOP_STEPS = 2  # the FLOP-counting run: step 1 carries the caching, step 2 is counted
TINY_RESOLUTION_DIVISOR = 4  # --tiny trains at 1/4 of the matrix's resolutions (512² → 128²): a CPU check in minutes
DEFAULT_BUDGET_S = 420.0
# Predicted seconds of one configuration (process start, model build, training, FLOP count), by (device, tiny, family):
# planning figures until a configuration of the family has run, then its measured wall time is used.
PRIOR_COST_S = {("cuda", False, "sd1"): 30.0, ("cuda", False, "sdxl"): 60.0,
                ("cuda", True, "sd1"): 15.0, ("cuda", True, "sdxl"): 20.0,
                ("cpu", True, "sd1"): 25.0, ("cpu", True, "sdxl"): 35.0,
                ("cpu", False, "sd1"): 300.0, ("cpu", False, "sdxl"): 900.0}


# ------------------------------------------------------------------------------------------------ the card's peak

# Dense (no sparsity) 16-bit tensor-core peak in TFLOP/s by device-name fragment, most specific first: the vendors'
# datasheets, bf16 and fp16 with fp32 accumulation (what PyTorch's matmuls use; GeForce cards halve their rate for
# it). None: the card has no bf16 tensor cores. Nominal boost-clock figures: a matmul-only run on an H200 here reached
# about 790 of its 989 (/work/.library/device/KINDS.md).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float | None]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", {"bf16": 989.0, "fp16": 989.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0}),
    ("L40", {"bf16": 181.0, "fp16": 181.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0}),
    ("A10", {"bf16": 125.0, "fp16": 125.0}),
    ("RTX 6000 Ada", {"bf16": 364.0, "fp16": 364.0}),
    ("RTX A6000", {"bf16": 155.0, "fp16": 155.0}),
    ("RTX 4090", {"bf16": 165.0, "fp16": 165.0}),
    ("RTX 4080", {"bf16": 97.5, "fp16": 97.5}),
    ("RTX 3090 Ti", {"bf16": 80.0, "fp16": 80.0}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0}),
    ("RTX 3080", {"bf16": 59.5, "fp16": 59.5}),
    ("V100", {"bf16": None, "fp16": 125.0}),
    ("T4", {"bf16": None, "fp16": 65.0}),
)


def peak_tflops(device_name: str | None, precision: str, override: float | None = None) -> tuple[float | None, str]:
    """The card's dense peak for ``precision`` and where it came from; (None, why) when unknown."""
    if override:
        return override, "--peak-tflops"
    if not device_name:
        return None, "no GPU: no peak to compare with"
    for fragment, rates in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            rate = rates.get(precision)
            if rate is None:
                return None, f"{device_name} has no {precision} tensor-core peak in the table"
            return rate, f"datasheet dense {precision} peak of '{fragment}'"
    return None, (f"{device_name!r} is not in gpu_check.PEAK_TFLOPS: no fraction of peak (give --peak-tflops, the "
                  "card's dense bf16/fp16 TFLOP/s)")


# ----------------------------------------------------------------------------------------------- switches, matrix

@dataclass(frozen=True)
class Switch:
    """A speed switch as the matrix varies it: each value is either settings on top of the run's config
    ("section.field" → value) or a change to the built model (``hooks``: value → function(bundle) → None)."""

    what: str  # one line for the README / --list
    values: dict[str, dict]  # value → settings
    hooks: dict[str, Callable] = field(default_factory=dict)  # value → applied to the bundle after the build
    families: tuple[str, ...] = ("sd1", "sdxl")
    methods: tuple[str, ...] = ("lora", "embedding")


def _ldm_attention(bundle) -> None:
    """Undo the fused attention ``bundle_from_ldm`` installs (``lib_train.models.attention.restore_attention``):
    ldm's own einsum attention, with the fp32 q·k and softmax it keeps for backward (what the WebUI's built-in
    trainer runs)."""
    from lib_train.models.attention import restore_attention

    restored = restore_attention(bundle.unet)
    if not restored:
        raise RuntimeError("attention=ldm: no fused CrossAttention found to restore (lib_train.models.attention "
                           "changed how it installs SDPA?)")


# The speed switches that exist in lib_train today. A new one is one more entry here (and a value in each base of
# BASES), plus rows in MATRIX that turn it. Issue 13's switches: compile, cl (channels-last), fused, prefetch; the
# bases hold the values "auto" gives on CUDA (lib_train.train.speed.AUTO_ON), so each row turns one the other way.
SWITCHES: dict[str, Switch] = {
    "ckpt": Switch("gradient checkpointing (train.gradient_checkpointing)",
                   {"off": {"train.gradient_checkpointing": False}, "on": {"train.gradient_checkpointing": True}}),
    "latents": Switch("latent cache (data.cache_latents): memory = the VAE encodes once before step 1, off = every "
                      "step", {"memory": {"data.cache_latents": "memory"}, "off": {"data.cache_latents": "off"}}),
    "te": Switch("text encoders: cached = te_lr 0, outputs computed once and the encoders leave the GPU; trained = "
                 "UNet + text-encoder LoRA (te_lr 5e-5)", dict(bt.TE_MODES), methods=("lora",)),
    "attn": Switch("attention of the SD1 UNet: sdpa = the fused kernel lib_train installs headless, ldm = ldm's own",
                   {"sdpa": {}, "ldm": {}}, hooks={"ldm": _ldm_attention}, families=("sd1",)),
    "compile": Switch("torch.compile of the UNet's ResBlock / SpatialTransformer instances (train.compile)",
                      {"off": {"train.compile": "off"}, "on": {"train.compile": "on"}}),
    "cl": Switch("channels-last memory format of the UNet's convolutions (train.channels_last)",
                 {"on": {"train.channels_last": "on"}, "off": {"train.channels_last": "off"}}),
    "fused": Switch("fused AdamW kernel (optim.fused)", {"on": {"optim.fused": "on"}, "off": {"optim.fused": "off"}}),
    "prefetch": Switch("uncached latents: images decoded in a background thread while a step runs (data.prefetch); "
                       "only matters with latents=off", {"on": {"data.prefetch": "on"},
                                                         "off": {"data.prefetch": "off"}}),
}
SPEED_DEFAULTS = {"compile": "off", "cl": "on", "fused": "on", "prefetch": "on"}  # what auto gives on CUDA


@dataclass(frozen=True)
class Base:
    """A model, method, size and batch the issue asks for, and its switches' values when a row does not turn one."""

    family: str  # a key of bench_train.BENCH_FAMILIES
    method: str  # a key of bench_train.BENCH_METHODS
    resolution: int
    batch: int
    switches: dict[str, str]  # switch → value


BASES: dict[str, Base] = {
    "sd1-lora-512-b1": Base("sd1", "lora", 512, 1, {"ckpt": "off", "latents": "memory", "te": "trained",
                                                     "attn": "sdpa", **SPEED_DEFAULTS}),
    "sd1-lora-512-b4": Base("sd1", "lora", 512, 4, {"ckpt": "off", "latents": "memory", "te": "trained",
                                                     "attn": "sdpa", **SPEED_DEFAULTS}),
    # the SDXL "12 GB" character preset's memory-relevant settings: 1024², batch 1, rank 16, AdamW, checkpointing,
    # cached text outputs and latents
    "sdxl-lora-1024-b1": Base("sdxl", "lora", 1024, 1, {"ckpt": "on", "latents": "memory", "te": "cached",
                                                         **SPEED_DEFAULTS}),
    "sd1-embedding-512-b1": Base("sd1", "embedding", 512, 1, {"ckpt": "off", "latents": "memory", "attn": "sdpa",
                                                               **SPEED_DEFAULTS}),
}

# (base, precision, switches turned from the base's values), most important first: the budget skips from the end.
MATRIX: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("sd1-lora-512-b1", "bf16", {}),
    ("sd1-lora-512-b4", "bf16", {}),
    ("sdxl-lora-1024-b1", "bf16", {}),
    ("sdxl-lora-1024-b1", "bf16", {"te": "trained"}),
    ("sd1-embedding-512-b1", "bf16", {}),
    ("sd1-lora-512-b1", "fp16", {}),
    ("sdxl-lora-1024-b1", "fp16", {}),
    ("sd1-lora-512-b1", "bf16", {"te": "cached"}),
    ("sd1-lora-512-b1", "bf16", {"compile": "on"}),
    ("sd1-lora-512-b1", "bf16", {"cl": "off"}),
    ("sd1-lora-512-b1", "bf16", {"fused": "off"}),
    ("sd1-lora-512-b1", "bf16", {"latents": "off", "prefetch": "off"}),  # against the latents=off row below
    ("sd1-lora-512-b1", "bf16", {"attn": "ldm"}),
    ("sd1-lora-512-b1", "bf16", {"ckpt": "on"}),
    ("sd1-lora-512-b1", "bf16", {"latents": "off"}),
    ("sd1-lora-512-b4", "bf16", {"ckpt": "on"}),
    ("sdxl-lora-1024-b1", "bf16", {"ckpt": "off"}),
    ("sd1-lora-512-b4", "bf16", {"compile": "on"}),
    ("sdxl-lora-1024-b1", "bf16", {"compile": "on"}),
    ("sdxl-lora-1024-b1", "bf16", {"cl": "off"}),
)


@dataclass(frozen=True)
class CheckConfig:
    """One row: what the subprocess builds and trains."""

    id: str  # "sd1-lora-512-b1-bf16", "sd1-lora-512-b1-bf16-attn=ldm"
    base: str  # a key of BASES
    precision: str  # "bf16" or "fp16" (the CPU trains in fp32 whatever this says)
    switches: dict[str, str]  # every applicable switch's value for this row
    steps: int
    device: str
    tiny: bool = False
    webui_dir: str | None = None
    peak_tflops: float | None = None  # --peak-tflops

    @property
    def resolution(self) -> int:
        res = BASES[self.base].resolution
        return res // TINY_RESOLUTION_DIVISOR if self.tiny else res

    def bench_config(self) -> bt.BenchConfig:
        b = BASES[self.base]
        return bt.BenchConfig(resolution=self.resolution, checkpointing=self.switches.get("ckpt") == "on",
                              cache=self.switches.get("latents", "memory"), steps=self.steps, device=self.device,
                              precision=self.precision, method=b.method, vectors=1, family=b.family,
                              te=self.switches.get("te", "trained"), tiny=self.tiny, webui_dir=self.webui_dir,
                              batch_size=b.batch)

    def settings(self) -> dict:
        out: dict = {}
        for name, value in self.switches.items():
            out.update(SWITCHES[name].values[value])
        return out


def _applies(switch: Switch, base: Base) -> bool:
    return base.family in switch.families and base.method in switch.methods


def check_matrix() -> None:
    """The tables are consistent (a renamed setting or a typo fails here, before any device time is spent)."""
    from lib_train.config import SETTINGS

    for name, switch in SWITCHES.items():
        for value, settings in switch.values.items():
            unknown = [key for key in settings if key not in SETTINGS]
            if unknown:
                raise ValueError(f"switch {name}={value}: unknown setting(s) {unknown} (lib_train.config.SETTINGS)")
        for value in switch.hooks:
            if value not in switch.values:
                raise ValueError(f"switch {name}: hook for unknown value {value!r}")
    for key, base in BASES.items():
        for name, value in base.switches.items():
            if name not in SWITCHES or value not in SWITCHES[name].values or not _applies(SWITCHES[name], base):
                raise ValueError(f"base {key}: switch {name}={value} is unknown or does not apply")
        missing = [n for n, s in SWITCHES.items() if _applies(s, base) and n not in base.switches]
        if missing:
            raise ValueError(f"base {key}: no value for the switch(es) {missing}")
    for base, precision, turned in MATRIX:
        if base not in BASES or precision not in ("bf16", "fp16"):
            raise ValueError(f"matrix row {base} {precision}: unknown base or precision")
        for name, value in turned.items():
            if name not in BASES[base].switches or value not in SWITCHES[name].values:
                raise ValueError(f"matrix row {base} {precision}: switch {name}={value} is unknown or does not apply")


def plan(steps: int, device: str, tiny: bool, webui_dir: str | None, peak: float | None) -> list[CheckConfig]:
    out = []
    for base, precision, turned in MATRIX:
        cid = f"{base}-{precision}" + "".join(f"-{k}={v}" for k, v in turned.items())
        out.append(CheckConfig(cid, base, precision, {**BASES[base].switches, **turned}, steps, device, tiny,
                               webui_dir, peak))
    return out


# ------------------------------------------------------------------------------------------------ child process

def _cpu_attention_flops() -> dict:
    """FlopCounterMode counts the CUDA kernels of ``scaled_dot_product_attention`` (flash, memory-efficient, cuDNN)
    but not the CPU's fused one, so on the CPU (``--tiny --device cpu``) attention would count as zero: count it with
    the same formulas (the CPU op takes query, key, value first, as the CUDA ones do)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    pairs = (("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop))
    # the module's formulas come wrapped (tensors → shapes); FlopCounterMode wraps a custom one itself
    return {getattr(aten, op): getattr(formula, "__wrapped__", formula) for op, formula in pairs if hasattr(aten, op)}


def _flop_counter_events():
    """An ``Events`` that counts the FLOPs of optimizer step :data:`FLOP_STEPS` alone: it enters a
    ``FlopCounterMode`` at the end of the step before and leaves it at the end of that step (both at the same place
    of the loop, so the mode nests like a ``with`` block around one step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lib_train.train.events import Events

    class StepFlops(Events):
        def __init__(self) -> None:
            self.counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
            self.steps = 0
            self.active = False
            self.flops: int | None = None

        def progress(self, p) -> None:
            self.steps += 1
            if self.steps == FLOP_STEPS - 1:
                self.counter.__enter__()
                self.active = True
            elif self.steps == FLOP_STEPS:
                self.close()
                self.flops = self.counter.get_total_flops()

        def close(self) -> None:
            if self.active:
                self.active = False
                self.counter.__exit__(None, None, None)

    return StepFlops()


def count_step_flops(cfg, bundle, method: str) -> int:
    """Model FLOPs of one optimizer step of ``cfg`` on ``bundle``: a :data:`FLOP_STEPS`-step run of its own with
    step 2 counted by ``FlopCounterMode`` (step 1 also caches latents and text outputs; the counter's per-op
    overhead stays out of it), gradient checkpointing off (a recomputed forward is not model work)."""
    from lib_train.methods import METHODS

    cfg = copy.deepcopy(cfg)
    cfg.train.gradient_checkpointing = False
    cfg.train.max_steps = FLOP_STEPS
    prepare, train = METHODS[method].entry("prepare"), METHODS[method].entry("train")
    prep = prepare(cfg)
    events = _flop_counter_events()
    try:
        train(cfg, bundle, prep, events=events)
    finally:
        events.close()
    if events.flops is None:
        raise RuntimeError(f"the FLOP-counting run made {events.steps} of {FLOP_STEPS} steps")
    return events.flops


def _apply_settings(cfg, settings: dict) -> None:
    for key, value in settings.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)


def run_one(cc: CheckConfig) -> dict:
    """Build, train ``cc.steps`` timed steps, count one step's FLOPs; the measurements (this process only)."""
    import torch

    from lib_train.config import validate
    from lib_train.estimate import estimate
    from lib_train.methods import METHODS

    t_start = time.perf_counter()
    if cc.tiny and cc.device == "cpu":
        torch.set_num_threads(1)  # tiny models are per-op overhead; two threads fight a shared machine's load
    bc = cc.bench_config()
    base = BASES[cc.base]
    cuda = cc.device == "cuda"
    out: dict = {"id": cc.id, "config": asdict(cc), "label": bc.label, "status": "failed"}
    try:
        t0 = time.perf_counter()
        bundle = bt._build_bundle(bc)
        for name, value in cc.switches.items():
            hook = SWITCHES[name].hooks.get(value)
            if hook is not None:
                hook(bundle)
        out["build_s"] = time.perf_counter() - t0
        out["model_params"] = sum(p.numel() for p in bundle.model.parameters())
        out["frozen_dtype"] = str(bundle.dtype).replace("torch.", "")
        prepare, train = METHODS[base.method].entry("prepare"), METHODS[base.method].entry("train")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            cfg = bt._train_config(bc, bt._make_dataset(Path(tmp) / "data", bc.resolution), Path(tmp) / "out")
            _apply_settings(cfg, cc.settings())
            validate(cfg, headless=False)
            est = estimate(cfg, cc.steps, base.family)
            out["estimate_gib"] = est.vram_gib
            out["estimate_parts_gib"] = est.parts
            prep = prepare(cfg)
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            timer = bt._step_timer(sync)
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            result = train(cfg, bundle, prep, events=timer)
            if cuda:
                out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
                out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            out["status"], out["steps_done"], out["last_loss"] = result.status, result.step, result.last_loss
            out["texts_cached"] = any(s.startswith("Caching text encodings") for s in timer.statuses)
            ends = timer.step_ends
            durations = [b - a for a, b in zip(ends, ends[1:])]  # durations[i] is step i + 2
            timed = durations[bt.WARMUP_STEPS - 1:]
            out["step_seconds"] = [ends[0] - start] + durations if ends else []
            out["first_step_s"] = ends[0] - start if ends else None
            if timed:
                out["s_per_step"] = statistics.median(timed)
                out["s_per_step_min"], out["s_per_step_max"] = min(timed), max(timed)
                out["images_per_s"] = base.batch / out["s_per_step"]
            t0 = time.perf_counter()
            try:  # the timed run's figures stand even if counting fails (e.g. out of memory without checkpointing)
                out["flops_per_step"] = count_step_flops(cfg, bundle, base.method)
            except Exception as e:  # noqa: BLE001
                out["flops_per_step"], out["flops_error"] = None, f"{type(e).__name__}: {e}"[:2000]
            out["flop_count_s"] = time.perf_counter() - t0
    except BaseException as e:  # noqa: BLE001  (an OOM or any failure is this row's result; the parent goes on)
        out["status"] = "failed"
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        if cuda:  # the peak up to the failure
            out.setdefault("peak_allocated_gib", torch.cuda.max_memory_allocated() / GIB)
            out.setdefault("peak_reserved_gib", torch.cuda.max_memory_reserved() / GIB)
    out.setdefault("peak_allocated_gib", None)
    out.setdefault("peak_reserved_gib", None)
    hwm = bt._proc_status_kib("VmHWM")
    out["peak_rss_gib"] = hwm / 2**20 if hwm is not None else None
    out["machine"] = machine_facts(cc.device)
    _derive(out, cc)
    out["wall_s"] = time.perf_counter() - t_start
    return out


def _derive(r: dict, cc: CheckConfig) -> None:
    """The figures computed from the measured ones: achieved TFLOP/s, the fraction of peak, estimate ratios."""
    sps, flops = r.get("s_per_step"), r.get("flops_per_step")
    r["tflops_per_s"] = flops / sps / 1e12 if sps and flops else None
    name = r.get("machine", {}).get("device_name")
    peak, source = peak_tflops(name, cc.precision, cc.peak_tflops)
    r["peak_tflops"], r["peak_source"] = peak, source
    r["peak_fraction"] = r["tflops_per_s"] / peak if peak and r["tflops_per_s"] else None
    est = r.get("estimate_gib")
    for key in ("allocated", "reserved"):
        measured = r.get(f"peak_{key}_gib")
        r[f"estimate_over_{key}"] = est / measured if est and measured else None


def machine_facts(device: str) -> dict:
    import torch

    info = bt._machine(device)
    info["device"] = device
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    total_memory_gib=props.total_memory / GIB, multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
        driver_api = getattr(torch._C, "_cuda_getDriverVersion", None)
        info["cuda_driver_api"] = driver_api() if driver_api else None
        info["driver"] = _nvidia_driver()
    else:
        info["device_name"] = None
    return info


def _nvidia_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        proc = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None


# ----------------------------------------------------------------------------------------------- parent process

def _run_subprocess(cc: CheckConfig, timeout_s: float, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(asdict(cc))]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO), timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"id": cc.id, "config": asdict(cc), "status": "failed",
                "error": f"timed out after {timeout_s:.0f} s (the time budget) and was killed"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(bt.RESULT_PREFIX):
            return json.loads(line[len(bt.RESULT_PREFIX):])
    return {"id": cc.id, "config": asdict(cc), "status": "failed",
            "error": f"the subprocess exited with code {proc.returncode} and no result (see the messages above)"}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = ("configuration", "s/step", "img/s", "alloc GiB", "reserved GiB", "est GiB", "est/reserved",
           "TFLOP/step", "TFLOP/s", "% peak", "status")


def _row(r: dict) -> list[str]:
    flops = r.get("flops_per_step")
    frac = r.get("peak_fraction")
    status = r.get("status", "?")
    for key, what in (("error", ""), ("flops_error", "FLOPs not counted: ")):
        if r.get(key):
            status = f"{status}; {what}{r[key].splitlines()[0][:90]}"
    return [r["id"], _fmt(r.get("s_per_step"), ".3f"), _fmt(r.get("images_per_s"), ".2f"),
            _fmt(r.get("peak_allocated_gib"), ".2f"), _fmt(r.get("peak_reserved_gib"), ".2f"),
            _fmt(r.get("estimate_gib"), ".2f"), _fmt(r.get("estimate_over_reserved"), ".2f"),
            _fmt(flops / 1e12 if flops else None, ".4g"), _fmt(r.get("tflops_per_s"), ".3g"),
            _fmt(frac * 100 if frac is not None else None, ".1f"), status]


def format_table(results: list[dict]) -> str:
    return bt.text_table(COLUMNS, [_row(r) for r in results])


def _default_json() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else REPO / "bench" / "out" / "gpu_check.json"


def _write_json(path: Path, doc: dict) -> None:
    from lib_train.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2))


# ---------------------------------------------------------------------------------------- the device machine's kit

# What a device machine lacks for this check (its image: Python 3.12, torch, transformers, numpy, safetensors,
# einops, torchmetrics, lightning-utilities, but none of these), as exact pins: tests/env/requirements-*.txt's
# versions where they are installable on Python 3.12, each installed there with --no-deps.
KIT_WHEELS = (
    "stable-diffusion-sdkit==2.1.5",  # ldm (tests/env/requirements-ldm.txt)
    "pytorch_lightning==1.9.4",  # ldm's and sgm's base classes
    "setuptools==80.9.0",  # pkg_resources, which pytorch_lightning 1.9 imports (setuptools ≥ 81 dropped it)
    "omegaconf==2.2.3",
    "antlr4-python3-runtime==4.9.3",  # omegaconf's parser; an sdist only: built into a wheel here
    "open-clip-torch==2.20.0",
    "ftfy==6.3.1",
    "wcwidth==0.2.13",  # ftfy's
    "kornia==0.6.7",  # sgm imports it
    # lib_train's text-encoder code needs transformers 4.x (5.x renamed CLIPTextModel's parts); the WebUI's 4.30.2
    # needs tokenizers < 0.14, which has no Python 3.12 wheel, so the first 4.x whose tokenizers has one, with the
    # huggingface_hub it accepts (< 1.0)
    "transformers==4.36.2",
    "tokenizers==0.15.2",
    "huggingface_hub==0.20.3",
)
KIT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
KIT_PYTHON = "3.12"
KIT_WEBUI = "webui"  # the kit's stand-in WebUI folder: webui/repositories/generative-models/sgm
KIT_SITE = "site"  # where --kit installs the wheels (inside the kit folder, so it is ignored as the kit is)


def make_kit(kit: Path, webui_dir: str | None, python: str = KIT_PYTHON) -> int:
    """Here (with network): download :data:`KIT_WHEELS` for the device's Python (``python``) into ``kit/wheels`` and
    copy sgm (``repositories/generative-models/sgm`` of the WebUI found as ``python -m lib_train`` finds it) into
    ``kit/webui``."""
    from lib_train.errors import TrainerError
    from lib_train.models.sgm_import import SGM_SUBDIR, find_sgm_root

    try:
        sgm_root = find_sgm_root(webui_dir)
    except TrainerError as e:
        print(f"error: {e} Or give --webui-dir.", file=sys.stderr)
        return 2
    wheels = kit / "wheels"
    for stale in (wheels, kit / KIT_SITE):  # an earlier kit's wheels, or a site installed from them (not to carry)
        if stale.exists():
            shutil.rmtree(stale)
    wheels.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    for req in KIT_WHEELS:
        cmd = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
               "--implementation", "cp", *[a for p in KIT_PLATFORMS for a in ("--platform", p)], "-d", str(wheels),
               req]
        got = subprocess.run(cmd, capture_output=True, text=True)
        if got.returncode != 0:  # no wheel (an sdist only): build a pure-Python one here
            built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), req], capture_output=True,
                                   text=True)
            if built.returncode != 0:
                print(f"error: could not get a wheel of {req} for Python {python}:\n{got.stderr}{built.stderr}",
                      file=sys.stderr)
                return 1
        print(f"  {req}", file=sys.stderr)
    dest = kit / KIT_WEBUI / SGM_SUBDIR
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(sgm_root / "sgm", dest / "sgm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("LICENSE-CODE", "LICENSE"):
        if (sgm_root / name).is_file():
            shutil.copy2(sgm_root / name, dest / name)
    size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
    print(f"kit ready in {kit}: {len(list(wheels.iterdir()))} wheels, sgm from {sgm_root}; {size / 2**20:.1f} MiB "
          f"to carry")
    return 0


def use_kit(kit: Path) -> tuple[dict, str]:
    """There (no network): install the kit's wheels into ``kit/site`` (once; --no-index --no-deps) and put it first
    on this process's and the subprocesses' path; returns (environment, the kit's WebUI folder)."""
    wheels = sorted((kit / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: --kit {kit}: no wheels in {kit / 'wheels'}; make the kit here first: "
                         f"python bench/gpu_check.py --make-kit {kit}")
    site = kit / KIT_SITE
    stamp = site / ".installed"
    names = "\n".join(w.name for w in wheels)
    if not stamp.is_file() or stamp.read_text() != names:
        if site.exists():
            shutil.rmtree(site)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--target", str(site), *map(str, wheels)]
        t0 = time.perf_counter()
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"error: --kit {kit}: installing its wheels failed (see pip's messages above)")
        stamp.write_text(names)
        print(f"kit: {len(wheels)} wheels installed into {site} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    sys.path.insert(0, str(site.resolve()))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site.resolve())] + [p for p in [env.get("PYTHONPATH")] if p])
    return env, str((kit / KIT_WEBUI).resolve())


# ---------------------------------------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GPU check (issue 13): speed, memory and FLOP use of LoRA and embedding "
                                            "training on full-size random-weight SD1.5 and SDXL, within a time "
                                            "budget.")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    p.add_argument("--tiny", action="store_true", help="the families' small test layouts at 1/4 of the resolutions "
                                                       "(a check of the script; the numbers mean nothing)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration (default 15 on CUDA, "
                                                           f"3 on the CPU; the median uses steps "
                                                           f"{bt.WARMUP_STEPS + 1}..N)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole matrix (default {DEFAULT_BUDGET_S:.0f}); configurations that no "
                        "longer fit are skipped with a note")
    p.add_argument("--configs", default=None, help="comma-separated configuration ids to run (default: all; see "
                                                   "--list)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's dense bf16/fp16 peak in TFLOP/s (overrides the built-in table)")
    p.add_argument("--webui-dir", default=None, help="SDXL: the WebUI folder with repositories/generative-models "
                                                     "(default: SD_WEBUI_DIR or the WebUI this extension is in)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write the results here (default $OUT/gpu_check.json where OUT is set, else "
                        "bench/out/gpu_check.json); rewritten after every configuration")
    p.add_argument("--kit", metavar="DIR", default=None,
                   help="on a device machine without network: install DIR's wheels and use its sgm copy (made by "
                        "--make-kit)")
    p.add_argument("--make-kit", metavar="DIR", default=None,
                   help="with network: put the device machine's missing wheels and a copy of sgm into DIR, then exit")
    p.add_argument("--kit-python", default=KIT_PYTHON,
                   help=f"--make-kit: the Python version the wheels are for (default {KIT_PYTHON}, the device's)")
    p.add_argument("--one", metavar="CONFIG_JSON", help=argparse.SUPPRESS)  # internal: run one configuration
    return p


def _quiet_warnings() -> None:
    """The subprocess's stderr is the device run's log, read from its last 12,000 characters: keep the known
    per-call and import-time warnings of ldm, sgm and pytorch_lightning 1.9 out of it (sgm's attention warns on every
    call under newer torch)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(pkg_resources|rank_zero_only).*")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.one:
        _quiet_warnings()
        print(bt.RESULT_PREFIX + json.dumps(run_one(CheckConfig(**json.loads(args.one)))), flush=True)
        return 0
    if args.make_kit:
        return make_kit(Path(args.make_kit), args.webui_dir, args.kit_python)
    t_total = time.perf_counter()
    env, webui_dir = dict(os.environ), args.webui_dir
    if args.kit:
        env, kit_webui = use_kit(Path(args.kit))
        webui_dir = webui_dir or kit_webui
    check_matrix()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else (15 if device == "cuda" else 3)
    if steps < bt.WARMUP_STEPS + 1:
        print(f"error: --steps must be at least {bt.WARMUP_STEPS + 1} (steps 1-{bt.WARMUP_STEPS} are warm-up)",
              file=sys.stderr)
        return 2
    webui_dir = str(Path(webui_dir).resolve()) if webui_dir else None  # the subprocesses run in REPO
    matrix = plan(steps, device, args.tiny, webui_dir, args.peak_tflops)
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in {cc.id for cc in matrix}]
        if unknown:
            print(f"error: --configs: unknown id(s) {', '.join(unknown)}; --list shows them", file=sys.stderr)
            return 2
        matrix = [cc for cc in matrix if cc.id in wanted]
    notes: list[str] = []
    sgm_problem = bt._sgm_problem(webui_dir)
    cost = {fam: PRIOR_COST_S[(device, args.tiny, fam)] for fam in bt.BENCH_FAMILIES}
    planned = sum(cost[BASES[cc.base].family] for cc in matrix)
    print(f"gpu_check: {len(matrix)} configurations on {device}{' (tiny models)' if args.tiny else ''}, {steps} steps "
          f"each; planned ~{planned:.0f} s against a budget of {args.budget:.0f} s"
          + (" (configurations past the budget will be skipped)" if planned > args.budget else ""), file=sys.stderr)
    for cc in matrix:
        print(f"  {cc.id}  (~{cost[BASES[cc.base].family]:.0f} s)", file=sys.stderr)
    if args.list:
        return 0
    json_path = Path(args.json) if args.json else _default_json()
    results: list[dict] = []
    machine: dict = {}

    def doc() -> dict:
        return {"machine": machine, "device": device, "tiny": args.tiny, "steps": steps,
                "warmup_steps": bt.WARMUP_STEPS, "budget_s": args.budget, "planned_s": planned,
                "elapsed_s": time.perf_counter() - t_total, "notes": notes, "results": results}

    for i, cc in enumerate(matrix, 1):
        family = BASES[cc.base].family
        left = args.budget - (time.perf_counter() - t_total)
        if family == "sdxl" and sgm_problem:
            r = {"id": cc.id, "config": asdict(cc), "status": "skipped", "error": f"no sgm: {sgm_problem}"}
        elif cost[family] > left:
            r = {"id": cc.id, "config": asdict(cc), "status": "skipped",
                 "error": f"time budget: {max(left, 0):.0f} s left, this needs ~{cost[family]:.0f} s"}
        else:
            print(f"[{i}/{len(matrix)}] {cc.id}", file=sys.stderr, flush=True)
            r = _run_subprocess(cc, timeout_s=max(left, cost[family]) + 30, env=env)
            if r.get("wall_s"):
                cost[family] = r["wall_s"] + 3  # + the interpreter's start
            machine = machine or r.get("machine", {})
        if r["status"] == "skipped":
            notes.append(f"{cc.id} skipped: {r['error']}")
        results.append(r)
        wall = f"  ({r['wall_s']:.0f} s)" if r.get("wall_s") else ""
        print("  " + "  ".join(_row(r)[1:]) + wall, file=sys.stderr, flush=True)
        _write_json(json_path, doc())
    print(f"\ngpu_check on {device}{' (tiny models: the numbers mean nothing)' if args.tiny else ''}; {steps} steps, "
          f"median of steps {bt.WARMUP_STEPS + 1}..{steps}; FLOPs: one step counted separately, checkpointing off; "
          f"total {time.perf_counter() - t_total:.0f} s")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(format_table(results))
    for note in notes + sorted({r["peak_source"] for r in results if r.get("peak_source") and not r["peak_tflops"]}):
        print(f"note: {note}")
    print(f"JSON: {json_path}")
    _write_json(json_path, doc())
    return 0 if all(r["status"] in ("finished", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
