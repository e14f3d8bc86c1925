"""Training benchmark (LoRA or textual inversion) on a random-weight, full-size SD1.5 or SDXL model.

``--family`` picks the model (:data:`BENCH_FAMILIES`): ``sd1`` (the default) the SD1.5 layout built with ldm, ``sdxl``
the SDXL base layout built from sgm's own classes (sgm from the WebUI's ``repositories/generative-models``, found as
``python -m lib_train`` finds it: ``--webui-dir``, ``SD_WEBUI_DIR`` or the WebUI this extension is installed in).
For each configuration of a matrix (resolution × gradient checkpointing × latent cache × text encoders trained or
cached, and for embeddings × vector count) it runs a short training on a synthetic dataset and reports:

- LoRA (``--method lora``, the default): ``train_lora``, rank 16, batch 1, AdamW, UNet + text-encoder LoRA with
  te_lr 5e-5 (``--te trained``), or UNet only with te_lr 0 (``--te cached``: the text encoders' outputs are computed
  once before step 1 and, on CUDA, the encoders leave the GPU);
- embedding (``--method embedding``): ``train_embedding``, batch 1, AdamW at lr 5e-3, the subject template, init
  text "person", ``--vectors`` vectors per token (default 1,8);

- ``s/step``: the median wall time of optimizer steps 3..N (steps 1-2 are warm-up: allocator, cuDNN autotuning);
  on CUDA the clock is read after ``torch.cuda.synchronize()``, so a step's time includes its queued GPU work;
- ``first step``: seconds from the call of ``train_lora`` to the end of the first step ("click to first step",
  without loading the model: LoRA attach, optimizer, latent caching, first step);
- ``peak RSS``: the process's resident-memory high-water mark (``VmHWM``) during the run. It is reset after the
  model is built (``/proc/self/clear_refs``), so it holds model + training; where the reset is refused it is the
  lifetime peak and the row says so;
- ``CUDA peak``: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` (CUDA only);
- ``CPU s/step`` (median CPU time of this process per timed step, all threads) and ``load`` (1-minute load average
  before/after): on a shared machine, wall time per step only means something next to these.

Each configuration runs in a fresh subprocess of this script (``--one CONFIG_JSON``): the peak-memory counters are
per process, and a fresh process is what a user's first run gets. Every subprocess builds its model once, in place
(never two copies: the default initialisation is skipped, SDXL's UNet and VAE are allocated unfilled, and
``randomize_`` then writes seeded values into every parameter), so the model is the same in each. On CUDA the frozen
weights are cast to fp16/bf16 and the VAE kept in fp32, as ``python -m lib_train lora`` does; the LoRA stays fp32
under autocast. ``--tiny`` builds the family's small test layout instead (same code path, numbers meaningless): a
check of the script in seconds.

Run from the repository root (never run by the test suite, asserts nothing)::

    python bench/bench_train.py --quick                 # LoRA, 256² only: 4 configurations
    python bench/bench_train.py --json bench.json       # the full LoRA matrix
    python bench/bench_train.py --resolutions 512 --cache memory --steps 6
    python bench/bench_train.py --method embedding --cache memory --checkpointing off   # TI: 256²/512² x 1/8 vectors
    SD_WEBUI_DIR=/path/to/webui python bench/bench_train.py --family sdxl   # 512², ckpt on, TE cached vs trained
    SD_WEBUI_DIR=/path/to/webui python bench/bench_train.py --family sdxl --tiny --quick --steps 3   # script check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULT_PREFIX = "BENCH_RESULT "  # the subprocess prints its result as one JSON line after this marker
WARMUP_STEPS = 2  # steps left out of the median
N_IMAGES = 4
CAPTIONS = ("bench subject, red noise", "bench subject, green noise", "bench subject, blue noise",
            "bench subject, grey noise, close-up")
MODEL_SEED = 1234


@dataclass(frozen=True)
class BenchMethod:
    """What the benchmark trains for one method (lib_train.methods names): settings on top of the method's
    defaults, and how rows and the table name it."""

    settings: dict  # "section.field" → value
    what: str  # the table's title; {lr} = the method's default learning rate
    row: str  # a row's label; {vectors} = the row's vectors per token
    varies_vectors: bool = False  # --vectors gives one row per vector count
    varies_te: bool = False  # --te gives one row per text-encoder mode (TE_MODES)


# --te: what the text encoders do in a LoRA run, as settings on top of the method's ("trained": its te_lr 5e-5, so
# each step runs both encoders forward and backward; "cached": te_lr 0, so the trainer encodes every caption once
# before step 1 and, on CUDA, moves the encoders off the GPU)
TE_MODES = {"trained": {}, "cached": {"optim.te_lr": 0.0}}

BENCH_METHODS = {
    "lora": BenchMethod({"network.rank": 16, "optim.te_lr": 5e-5},
                        "LoRA rank 16, batch 1, AdamW; te=trained: UNet + text-encoder LoRA (te_lr 5e-5), te=cached: "
                        "UNet LoRA only, text outputs cached", "LoRA", varies_te=True),
    "embedding": BenchMethod({"embedding.init_text": "person", "embedding.template": "subject"},
                             "embedding (textual inversion), batch 1, AdamW lr {lr}, subject template",
                             "TI {vectors} vec", varies_vectors=True),
}


@dataclass(frozen=True)
class BenchConfig:
    """One row of the matrix."""

    resolution: int  # square training resolution in pixels
    checkpointing: bool  # gradient checkpointing of the UNet and text-encoder blocks
    cache: str  # latent cache: "memory" (VAE runs once before training) or "off" (VAE runs every step)
    steps: int  # optimizer steps (the median uses steps WARMUP_STEPS+1..steps)
    device: str  # "cpu" or "cuda" (already resolved from "auto")
    precision: str  # the mixed_precision setting: "auto", "no", "fp16" or "bf16"
    method: str = "lora"  # "lora" or "embedding"
    vectors: int = 1  # embedding only: vectors per token
    family: str = "sd1"  # a key of BENCH_FAMILIES
    te: str = "trained"  # LoRA only: a key of TE_MODES
    tiny: bool = False  # the family's small test layout instead of the full size (a check of the script)
    webui_dir: str | None = None  # SDXL: the WebUI folder holding repositories/generative-models (sgm)
    batch_size: int = 1  # images per step (at most N_IMAGES)
    switches: tuple = ()  # speed switches set away from their default: ((setting key, value), ...) (SPEED_SWITCHES)

    @property
    def label(self) -> str:
        method = BENCH_METHODS[self.method]
        family = BENCH_FAMILIES[self.family].row + ("tiny " if self.tiny else "")
        what = method.row.format(vectors=self.vectors)
        te = f" te={self.te}" if method.varies_te else ""
        batch = f" batch {self.batch_size}" if self.batch_size != 1 else ""
        speed = "".join(f" {SPEED_SWITCHES[key]}={value}" for key, value in self.switches)
        return (f"{family}{what} {self.resolution}²{batch} ckpt={'on' if self.checkpointing else 'off'} "
                f"cache={self.cache}{te}{speed}")


# The speed switches (issue 13) as benchmark axes: setting key → the command-line option and a row's label. Each is
# auto/on/off (lib_train.config.SPEED_SWITCH); --compile on,off gives one row per value.
SPEED_SWITCHES = {"train.compile": "compile", "train.channels_last": "channels-last", "optim.fused": "fused",
                  "data.prefetch": "prefetch"}


# --------------------------------------------------------------------------------------------- child process

def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in KiB; None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0: write 5 to ``clear_refs``). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _skip_default_init():
    """Make ``torch.nn.init`` a no-op while the model is built: :func:`randomize_` overwrites every parameter
    afterwards, and the default (kaiming) init of ~1.07 G parameters (SD1.5) costs ~25 s on 2 CPU cores."""
    import torch

    names = [n for n in ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                         "xavier_uniform_", "xavier_normal_") if hasattr(torch.nn.init, n)]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _build_sd1(bc: BenchConfig):
    """The full-size SD1.5-layout model (``--tiny``: ``tiny_spec``) with seeded random weights, on ``bc.device``,
    wrapped in a bundle: frozen weights cast and fused attention installed by
    :func:`lib_train.models.load.bundle_from_ldm`, as ``python -m lib_train lora`` loads a checkpoint
    (:func:`~lib_train.models.load.load_bundle`)."""
    from lib_train.models.build import build_latent_diffusion, randomize_, tiny_spec
    from lib_train.models.load import bundle_from_ldm
    from lib_train.models.spec import sd15_spec

    with _skip_default_init():
        model = build_latent_diffusion(tiny_spec("sd1") if bc.tiny else sd15_spec())
    randomize_(model, MODEL_SEED)
    return bundle_from_ldm(model, family="sd1", device=bc.device, precision=bc.precision)


def _build_sdxl(bc: BenchConfig):
    """The full-size SDXL base-layout ``DiffusionEngine`` (``--tiny``: ``lib_train.models.build.tiny_sdxl_spec``)
    built from sgm's own classes by :func:`lib_train.models.sdxl_load.build_sdxl`, as the headless loader builds it,
    with seeded random weights, on ``bc.device``, wrapped in a bundle by :func:`lib_train.models.load.bundle_from_sgm`
    (frozen UNet and text encoders in the half dtype on CUDA, VAE fp32), as ``python -m lib_train lora`` loads an
    SDXL checkpoint.

    One copy only (~13.9 GB fp32 at full size): the UNet and VAE come unfilled (``init=False``: on the meta device,
    as the loader leaves them for the checkpoint's tensors) and get uninitialised memory, the text encoders skip
    their default init, and :func:`randomize_` writes every parameter in place."""
    from lib_train.models.build import randomize_, tiny_sdxl_spec
    from lib_train.models.load import bundle_from_sgm
    from lib_train.models.sdxl_load import build_sdxl
    from lib_train.models.spec import SDXLSpec

    with _skip_default_init():
        model = build_sdxl(tiny_sdxl_spec() if bc.tiny else SDXLSpec(), webui_dir=bc.webui_dir, init=False)
    _materialize(model)
    randomize_(model, MODEL_SEED)
    return bundle_from_sgm(model, device=bc.device, precision=bc.precision)


def _materialize(model) -> None:
    """Give every module that holds meta-device tensors uninitialised CPU memory for them, module by module (its
    other tensors are left as they are)."""
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            module.to_empty(device="cpu", recurse=False)


def _sgm_problem(webui_dir: str | None) -> str | None:
    """Why sgm (SDXL's model code) cannot be found here, or None when it can. Only looked for, not imported: this
    parent process stays small while each configuration's subprocess holds the model (~0.35 GB for sgm's imports),
    and a subprocess that fails to import it says why."""
    import importlib.util

    from lib_train.errors import TrainerError
    from lib_train.models.sgm_import import find_sgm_root

    if importlib.util.find_spec("sgm") is not None:
        return None
    try:
        find_sgm_root(webui_dir)
    except TrainerError as e:
        return f"{e} Or give --webui-dir /path/to/stable-diffusion-webui."
    return None


@dataclass(frozen=True)
class BenchFamily:
    """A model family the benchmark builds, and its matrix when the command line does not choose."""

    label: str  # the table's title names the model so
    row: str  # a row's label starts with it
    build: Callable  # BenchConfig → ModelBundle with seeded random weights, on the config's device
    resolutions: str  # default --resolutions
    checkpointing: str  # default --checkpointing
    cache: str  # default --cache
    te: str  # default --te
    methods: tuple[str, ...]  # the methods lib_train trains on this family
    problem: Callable[[str | None], str | None] = lambda webui_dir: None  # a missing prerequisite, said up front


BENCH_FAMILIES = {
    "sd1": BenchFamily("SD1.5 (ldm)", "", _build_sd1, resolutions="256,512", checkpointing="off,on",
                       cache="memory,off", te="trained", methods=("lora", "embedding")),
    # SDXL: 512² on the CPU (1024² is for a GPU); checkpointing on, as the SDXL family default; TE cached vs trained
    "sdxl": BenchFamily("SDXL base (sgm)", "SDXL ", _build_sdxl, resolutions="512", checkpointing="on",
                        cache="memory", te="cached,trained", methods=("lora", "embedding"), problem=_sgm_problem),
}


def _build_bundle(bc: BenchConfig):
    return BENCH_FAMILIES[bc.family].build(bc)


def _make_dataset(root: Path, resolution: int, seed: int = 0) -> Path:
    """``N_IMAGES`` random-noise PNGs of ``resolution``² with captions in ``root/1_bench``; returns ``root``."""
    import numpy as np
    from PIL import Image

    folder = root / "1_bench"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, caption in enumerate(CAPTIONS[:N_IMAGES]):
        pixels = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    return root


def _train_config(bc: BenchConfig, data_dir: Path, out_dir: Path):
    from lib_train.config import default_config, validate

    cfg = default_config(bc.method)
    cfg.data.train_dir = str(data_dir)
    cfg.data.resolution = bc.resolution
    cfg.data.enable_buckets = False  # square images: one bucket
    cfg.data.min_bucket_side = min(cfg.data.min_bucket_side, bc.resolution)
    cfg.data.max_bucket_side = max(cfg.data.max_bucket_side, bc.resolution)
    cfg.data.cache_latents = bc.cache
    cfg.optim.optimizer = "AdamW"
    settings = dict(BENCH_METHODS[bc.method].settings)
    if BENCH_METHODS[bc.method].varies_te:
        settings.update(TE_MODES[bc.te])
    for key, value in settings.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    if BENCH_METHODS[bc.method].varies_vectors:
        cfg.embedding.vectors = bc.vectors
    cfg.train.batch_size = bc.batch_size
    for key, value in bc.switches:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    cfg.train.max_steps = bc.steps
    cfg.train.mixed_precision = bc.precision
    cfg.train.gradient_checkpointing = bc.checkpointing
    cfg.output.output_dir = str(out_dir)
    cfg.output.name = "zqbench"  # a made-up word: an embedding named after a known word gets a warning
    cfg.output.overwrite = True
    cfg.output.save_every_epochs = 0  # no save inside the timed steps (the final save comes after the last one)
    validate(cfg, headless=False)
    return cfg


def _step_timer(sync):
    """An ``Events`` that records the wall clock and the process CPU time after every optimizer step (after
    ``sync()``)."""
    from lib_train.train.events import Events

    class StepTimer(Events):
        def __init__(self) -> None:
            self.step_ends: list[float] = []  # wall clock
            self.cpu_ends: list[float] = []  # CPU time of this process (all threads)
            self.statuses: list[str] = []  # the trainer's status lines (what it cached before step 1)

        def status(self, text: str) -> None:
            self.statuses.append(text)

        def progress(self, p) -> None:
            sync()
            self.step_ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

        def warning(self, text: str) -> None:
            print(f"  warning from the trainer: {text}", file=sys.stderr, flush=True)

    return StepTimer()


def run_one(bc: BenchConfig) -> dict:
    """Build the model, train ``bc.steps`` steps and return the measurements (this process only)."""
    import torch

    from lib_train.methods import METHODS

    prepare, train = METHODS[bc.method].entry("prepare"), METHODS[bc.method].entry("train")
    cuda = bc.device == "cuda"
    t0 = time.perf_counter()
    bundle = _build_bundle(bc)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in bundle.model.parameters())
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        cfg = _train_config(bc, _make_dataset(Path(tmp) / "data", bc.resolution), Path(tmp) / "out")
        prep = prepare(cfg)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        timer = _step_timer(sync)
        rss_model_kib = _proc_status_kib("VmRSS")
        peak_reset = _reset_peak_rss()
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        result = train(cfg, bundle, prep, events=timer)
        cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
    ends = timer.step_ends
    durations = [b - a for a, b in zip(ends, ends[1:])]  # durations[i] is step i + 2
    timed = durations[WARMUP_STEPS - 1:]
    cpu = [b - a for a, b in zip(timer.cpu_ends, timer.cpu_ends[1:])][WARMUP_STEPS - 1:]
    hwm_kib = _proc_status_kib("VmHWM")
    return {
        "config": asdict(bc),
        "status": result.status,
        "steps_done": result.step,
        "s_per_step_median": statistics.median(timed) if timed else None,
        "s_per_step_min": min(timed) if timed else None,
        "s_per_step_max": max(timed) if timed else None,
        "cpu_s_per_step_median": statistics.median(cpu) if cpu else None,
        "step_seconds": [ends[0] - start] + durations if ends else [],
        "first_step_s": ends[0] - start if ends else None,
        "build_s": build_s,
        "peak_rss_gib": hwm_kib / 2**20 if hwm_kib is not None else None,
        "peak_rss_since_model": peak_reset,
        "rss_model_gib": rss_model_kib / 2**20 if rss_model_kib is not None else None,
        "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB, lifetime
        "cuda_peak_gib": cuda_peak / 2**30 if cuda_peak is not None else None,
        "load_average": [load_before, os.getloadavg()[0]],  # 1-minute load before and after: other processes
        "frozen_dtype": str(bundle.dtype).replace("torch.", ""),
        "model_params": n_params,
        "texts_cached": any(s.startswith("Caching text encodings") for s in timer.statuses),
        "speed_switches_on": next((s.split(": ", 1)[1] for s in timer.statuses if s.startswith("Speed switches on")),
                                  None),
        "last_loss": result.last_loss,
        "machine": _machine(bc.device),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu": _cpu_name()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------- parent process

def _run_subprocess(bc: BenchConfig) -> dict:
    """Run one configuration in a fresh interpreter; its stderr streams through, its result comes on stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(asdict(bc))]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return {"config": asdict(bc), "status": f"failed (exit code {proc.returncode}; see the messages above)"}


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = ("configuration", "s/step", "min-max", "CPU s/step", "first step s", "peak RSS GiB", "CUDA peak GiB",
           "build s", "load")


def bench_config(d: dict) -> BenchConfig:
    """A :class:`BenchConfig` from its JSON form (the switches come back as lists)."""
    return BenchConfig(**{**d, "switches": tuple(tuple(s) for s in d.get("switches", ()))})


def _row(r: dict) -> list[str]:
    bc = bench_config(r["config"])
    if r.get("s_per_step_median") is None:
        return [bc.label, r.get("status", "?")] + [""] * (len(COLUMNS) - 2)
    rss = _fmt(r["peak_rss_gib"]) + ("" if r["peak_rss_since_model"] else " (lifetime)")
    return [bc.label, _fmt(r["s_per_step_median"], ".3f"),
            f"{_fmt(r['s_per_step_min'])}-{_fmt(r['s_per_step_max'])}", _fmt(r["cpu_s_per_step_median"], ".1f"),
            _fmt(r["first_step_s"], ".1f"), rss, _fmt(r["cuda_peak_gib"]), _fmt(r["build_s"], ".1f"),
            "/".join(_fmt(x, ".1f") for x in r["load_average"])]


def text_table(columns, rows: list[list[str]]) -> str:
    """A plain-text table: the column names, a rule, then the rows, each column as wide as its widest cell."""
    rows = [list(columns)] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(results: list[dict]) -> str:
    return text_table(COLUMNS, [_row(r) for r in results])


def repeat_table(results: list[dict]) -> str:
    """One row per configuration over its repeats: the median of the per-run medians, their spread, and the ratio
    to the first configuration (the runs interleave, so a drift of the host's speed touches each alike)."""
    by_label: dict[str, list[float]] = {}
    for r in results:
        if r.get("s_per_step_median") is not None:
            by_label.setdefault(bench_config(r["config"]).label, []).append(r["s_per_step_median"])
    rows, first = [], None
    for label, values in by_label.items():
        med = statistics.median(values)
        first = first or med
        rows.append([label, f"{med:.3f}", f"{min(values):.3f}-{max(values):.3f}", str(len(values)),
                     f"{med / first:.3f}"])
    return text_table(("configuration", "median s/step", "spread", "runs", "vs first"), rows)


def _csv(text: str, allowed: dict) -> list:
    values = []
    for part in text.split(","):
        part = part.strip()
        if part not in allowed:
            raise argparse.ArgumentTypeError(f"{part!r}: choose from {', '.join(allowed)}")
        values.append(allowed[part])
    return values


def _resolutions(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 256,512") from None
    bad = [v for v in values if v < 64 or v % 64]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad}: resolutions must be multiples of 64")
    return values


def _checkpointing(text: str) -> list[bool]:
    return _csv(text, {"off": False, "on": True})


def _cache(text: str) -> list[str]:
    return _csv(text, {"memory": "memory", "off": "off"})


def _te(text: str) -> list[str]:
    return _csv(text, {mode: mode for mode in TE_MODES})


def _switch(text: str) -> list[str]:
    return _csv(text, {v: v for v in ("auto", "on", "off")})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training benchmark (LoRA or embedding) on a random-weight full-size "
                                            "SD1.5 or SDXL model.")
    p.add_argument("--family", default="sd1", choices=tuple(BENCH_FAMILIES),
                   help="the model: sd1 = SD1.5 (default), sdxl = SDXL base (needs the WebUI's sgm: --webui-dir or "
                        "SD_WEBUI_DIR); the defaults of --resolutions, --checkpointing, --cache and --te are the "
                        "family's")
    p.add_argument("--webui-dir", default=None, help="sdxl: the WebUI folder with repositories/generative-models")
    p.add_argument("--tiny", action="store_true", help="the family's small test layout (checks the script in "
                                                       "seconds; the numbers mean nothing)")
    p.add_argument("--method", default="lora", choices=tuple(BENCH_METHODS), help="what to train (default lora)")
    p.add_argument("--vectors", default="1,8", help="embedding only: comma-separated vector counts (default 1,8)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    p.add_argument("--precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                   help="mixed precision (CPU always trains in fp32)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration (default 5 on CPU, "
                                                           "30 on CUDA; the median uses steps 3..N)")
    p.add_argument("--quick", action="store_true", help="256² only")
    p.add_argument("--resolutions", default=None, type=_resolutions,
                   help="comma-separated square resolutions, multiples of 64 (default sd1 256,512; sdxl 512)")
    p.add_argument("--checkpointing", default=None, type=_checkpointing,
                   help="gradient checkpointing settings to run: off, on or off,on (default sd1 off,on; sdxl on)")
    p.add_argument("--cache", default=None, type=_cache,
                   help="latent cache modes to run: memory, off or memory,off (default sd1 memory,off; sdxl memory)")
    p.add_argument("--te", default=None, type=_te,
                   help="LoRA: text encoders trained (te_lr 5e-5) or cached (te_lr 0, outputs computed once): "
                        "trained, cached or both (default sd1 trained; sdxl cached,trained)")
    for key, option in SPEED_SWITCHES.items():
        p.add_argument(f"--{option}", default=None, type=_switch, metavar="VALUES",
                       help=f"speed switch {key}: auto, on, off or a comma list (one row per value; default: the "
                            "setting's default, auto)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole matrix this many times, interleaved (A B A B ...), for medians over repeats")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    p.add_argument("--one", metavar="CONFIG_JSON", help=argparse.SUPPRESS)  # internal: run one configuration
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.one:
        print(RESULT_PREFIX + json.dumps(run_one(bench_config(json.loads(args.one)))), flush=True)
        return 0
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else (30 if device == "cuda" else 5)
    if steps < WARMUP_STEPS + 1:
        print(f"error: --steps must be at least {WARMUP_STEPS + 1} (steps 1-{WARMUP_STEPS} are warm-up)",
              file=sys.stderr)
        return 2
    family, method = BENCH_FAMILIES[args.family], BENCH_METHODS[args.method]
    if args.method not in family.methods:
        print(f"error: --method {args.method} does not train {family.label} models; use --method "
              f"{' or '.join(family.methods)}", file=sys.stderr)
        return 2
    problem = family.problem(args.webui_dir)
    if problem:
        print(f"error: --family {args.family}: {problem}", file=sys.stderr)
        return 2
    resolutions = [256] if args.quick else args.resolutions or _resolutions(family.resolutions)
    checkpointing = args.checkpointing or _checkpointing(family.checkpointing)
    caches = args.cache or _cache(family.cache)
    te_modes = (args.te or _te(family.te)) if method.varies_te else ["trained"]
    try:
        vectors = [int(v) for v in args.vectors.split(",")] if method.varies_vectors else [1]
    except ValueError:
        print(f"error: --vectors {args.vectors!r}: give comma-separated integers, e.g. 1,8", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("error: --repeat must be at least 1", file=sys.stderr)
        return 2
    webui_dir = str(Path(args.webui_dir).resolve()) if args.webui_dir else None  # the subprocess runs in REPO
    import itertools

    axes = [[(key, v) for v in getattr(args, option.replace("-", "_"))] for key, option in SPEED_SWITCHES.items()
            if getattr(args, option.replace("-", "_"))]
    combos = [tuple(c) for c in itertools.product(*axes)] if axes else [()]
    matrix = [BenchConfig(res, ckpt, cache, steps, device, args.precision, args.method, vec, args.family, te,
                          args.tiny, webui_dir, switches=sw)
              for res in resolutions for vec in vectors for ckpt in checkpointing for cache in caches
              for te in te_modes for sw in combos] * max(1, args.repeat)
    print(f"{len(matrix)} configurations, {steps} steps each, device {device}, precision {args.precision}",
          file=sys.stderr, flush=True)
    results = []
    t0 = time.perf_counter()
    for i, bc in enumerate(matrix, 1):
        print(f"[{i}/{len(matrix)}] {bc.label}", file=sys.stderr, flush=True)
        results.append(_run_subprocess(bc))
        print("  " + "  ".join(_row(results[-1])[1:]), file=sys.stderr, flush=True)
    machine = next((r["machine"] for r in results if "machine" in r), {})
    from lib_train.config import method_default
    from lib_train.settings import format_default

    what = method.what.format(lr=format_default(method_default(args.method, "optim.lr")))
    params = next((r["model_params"] for r in results if "model_params" in r), None)
    size = "tiny" if args.tiny else "full-size"
    if params is not None:
        size += f", {params / 1e9:.2f} G parameters" if params >= 1e8 else f", {params / 1e6:.1f} M parameters"
    print(f"\n{family.label}, random weights ({size}); {what}; {steps} steps, median of steps "
          f"{WARMUP_STEPS + 1}..{steps}; device {device}, precision {args.precision}; "
          f"total {time.perf_counter() - t0:.0f}s")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(format_table(results))
    if args.repeat > 1:
        print(f"\nover the {args.repeat} interleaved repeats (median of the rows' medians; spread = min-max):")
        print(repeat_table(results))
    if args.json:
        from lib_train.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"machine": machine, "results": results}, indent=2))
    return 0 if all(r.get("s_per_step_median") is not None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
