"""Side by side with kohya's sd-scripts: the same LoRA training run by kohya's ``train_network.py`` (SDXL:
``sdxl_train_network.py``) and by ``python -m lib_train lora``, interleaved and repeated, on the same checkpoint file,
images and captions, with the same settings. Prints the s/step ratio and the peak-memory ratio (ours / kohya).

kohya is never vendored or installed by this project: give a checkout and a Python that runs it (``--kohya-dir`` /
``KOHYA_DIR``, ``--kohya-python`` / ``KOHYA_PYTHON``; bench/README.md, "Side by side with kohya", has the recipe).
This script runs with this repository's Python (the one with ``ldm``); our command runs with the same interpreter.

How it measures (details in bench/README.md):

- **s/step.** Both tools show a tqdm progress bar that is updated once per optimizer step. The child's output is read
  as it arrives and each new step count on the training bar is stamped with this process's clock; a step's time is
  the difference of two stamps. Per run: the median of steps ``WARMUP_STEPS + 1 .. N``. Per tool and case: the
  median over the repeats of those run medians. Loading, latent caching and saving lie outside the timed steps.
- **Peak memory.** CPU: the child's resident set. "training" is ``VmHWM`` reset (``/proc/PID/clear_refs``) when
  step 1 ends and read when step N ends, so it covers steps 2..N (weights, activations, gradients, optimizer
  state); "lifetime" is ``ru_maxrss`` from ``wait4``, which includes loading the checkpoint. CUDA:
  ``torch.cuda.max_memory_allocated()`` inside each child, through a ``sitecustomize`` hook on ``PYTHONPATH`` that
  resets the counter on a signal sent when step 1 ends and writes the counters when the child exits.
- **Order.** ``A B A B ...``: for each repeat, every case runs ours then kohya's, so a slow phase of a shared machine
  hits both.

Examples (from the repository root)::

    KOHYA_DIR=/work/kohya KOHYA_PYTHON=/work/kohya-venv/bin/python \\
        python bench/bench_kohya.py --work /work/bench-kohya --resolutions 256 --te unet,unet+te --repeats 3
    python bench/bench_kohya.py --list --device cuda --family sd1,sdxl     # the GPU rows' command lines
    python bench/bench_kohya.py --dry-run --device cuda --family sd1,sdxl  # ... and both tools' parsers check them
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

WARMUP_STEPS = 2  # steps 1..2 are left out of a run's median
OUR_NAME, KOHYA_NAME = "ours", "kohya"
CUDA_PEAK_ENV = "BENCH_KOHYA_CUDA_PEAK"  # the sitecustomize hook writes its counters to this file
PROFILE_ENV = "BENCH_KOHYA_PROFILE"  # ... and its profile of steps PROFILE_STEPS to this one
PROFILE_STEPS = (3, 5)  # --profile: from the end of step 3 to the end of step 5 (steps 4 and 5)
KOHYA_TOKENIZERS = {  # kohya's --tokenizer_cache_dir holds a saved CLIPTokenizer per hub id ("/" -> "_")
    "openai_clip-vit-large-patch14": {},  # SD1, and SDXL's first encoder
    "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k": {"pad_token": "!"},  # SDXL's second encoder (open_clip pads with 0)
}
GIB = 2**30


# --------------------------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    """One configuration both tools train."""

    family: str  # "sd1" or "sdxl"
    resolution: int  # square, one size (no bucketing difference)
    te: str  # "unet" (UNet-only LoRA) or "unet+te" (UNet and text-encoder LoRA)
    device: str  # "cpu" or "cuda"
    precision: str  # "no" (fp32) or "bf16"/"fp16" (mixed precision on CUDA)
    steps: int  # max_train_steps
    checkpointing: bool = False  # gradient checkpointing, on in both or off in both

    @property
    def id(self) -> str:
        return (f"{self.family}-{self.resolution}-{self.te}-{self.device}-{self.precision}"
                f"-ckpt={'on' if self.checkpointing else 'off'}")


def shared_settings(case: Case) -> dict:
    """The settings both tools get, by name. Every name has a translation in :data:`OUR_FLAGS` and
    :data:`KOHYA_FLAGS`; the test checks that both command lines carry each value."""
    return {
        "resolution": case.resolution,
        "buckets": False,  # square images of one size: one bucket either way
        "cache_latents": "memory",
        "rank": 16,
        "alpha": 8.0,
        "optimizer": "AdamW",
        "optimizer_args": "weight_decay=0.01",  # torch's AdamW default, said explicitly
        "lr": 1e-4,
        "te_lr": 0.0 if case.te == "unet" else 5e-5,
        "scheduler": "constant",
        "warmup_steps": 0,
        "max_steps": case.steps,
        "batch_size": 1,
        "seed": 42,
        "mixed_precision": case.precision,
        "gradient_checkpointing": case.checkpointing,
        "max_grad_norm": 1.0,
        "noise_offset": 0.0,
        "min_snr_gamma": 0.0,  # off
        "caption_dropout": 0.0,
        "max_token_length": 75,
        "clip_skip": 1,
        "save_precision": "fp16",
        "attention": "sdpa",
    }


def _num(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _bool_flag(flag: str) -> Callable:
    return lambda v, case: [flag] if v else []


# setting -> (value, case) -> the argv words that say it to each tool
OUR_FLAGS: dict[str, Callable] = {
    "resolution": lambda v, case: ["--resolution", str(v)],
    "buckets": lambda v, case: ["--buckets", "true" if v else "false"],
    "cache_latents": lambda v, case: ["--cache-latents", v],
    "rank": lambda v, case: ["--rank", str(v)],
    "alpha": lambda v, case: ["--alpha", _num(v)],
    "optimizer": lambda v, case: ["--optimizer", v],
    "optimizer_args": lambda v, case: ["--optimizer-args", v],
    "lr": lambda v, case: ["--lr", _num(v)],
    "te_lr": lambda v, case: ["--te-lr", _num(v)],
    "scheduler": lambda v, case: ["--scheduler", v],
    "warmup_steps": lambda v, case: ["--warmup", str(v)],
    "max_steps": lambda v, case: ["--steps", str(v)],
    "batch_size": lambda v, case: ["--batch-size", str(v)],
    "seed": lambda v, case: ["--seed", str(v)],
    "mixed_precision": lambda v, case: ["--mixed-precision", v],
    "gradient_checkpointing": lambda v, case: ["--gradient-checkpointing", "true" if v else "false"],
    "max_grad_norm": lambda v, case: ["--max-grad-norm", _num(v)],
    "noise_offset": lambda v, case: ["--noise-offset", _num(v)],
    "min_snr_gamma": lambda v, case: ["--min-snr-gamma", _num(v)],
    "caption_dropout": lambda v, case: ["--caption-dropout", _num(v)],
    "max_token_length": lambda v, case: ["--max-token-length", str(v)],
    "clip_skip": lambda v, case: ["--clip-skip", str(v)],
    "save_precision": lambda v, case: ["--save-precision", v],
    # headless, lib_train always runs torch's scaled_dot_product_attention (lib_train/models/attention.py)
    "attention": lambda v, case: [],
}

KOHYA_FLAGS: dict[str, Callable] = {
    "resolution": lambda v, case: ["--resolution", f"{v},{v}"],
    "buckets": _bool_flag("--enable_bucket"),
    "cache_latents": lambda v, case: ["--cache_latents"],  # in memory (--cache_latents_to_disk would be "disk")
    "rank": lambda v, case: ["--network_dim", str(v)],
    "alpha": lambda v, case: ["--network_alpha", _num(v)],
    "optimizer": lambda v, case: ["--optimizer_type", v],
    "optimizer_args": lambda v, case: ["--optimizer_args", *v.split()],
    "lr": lambda v, case: ["--learning_rate", _num(v), "--unet_lr", _num(v)],
    # UNet only: no text-encoder LoRA at all; kohya's SDXL script then also caches the encoders' outputs, which
    # lib_train does by itself whenever no text encoder trains (its SD1 script has no such cache)
    "te_lr": lambda v, case: (["--text_encoder_lr", _num(v)] if v > 0 else ["--network_train_unet_only"]
                              + (["--cache_text_encoder_outputs"] if case.family == "sdxl" else [])),
    "scheduler": lambda v, case: ["--lr_scheduler", v],
    "warmup_steps": lambda v, case: ["--lr_warmup_steps", str(v)],
    "max_steps": lambda v, case: ["--max_train_steps", str(v)],
    "batch_size": lambda v, case: ["--train_batch_size", str(v)],
    "seed": lambda v, case: ["--seed", str(v)],
    "mixed_precision": lambda v, case: ["--mixed_precision", v],
    "gradient_checkpointing": _bool_flag("--gradient_checkpointing"),
    "max_grad_norm": lambda v, case: ["--max_grad_norm", _num(v)],
    "noise_offset": lambda v, case: ["--noise_offset", _num(v)],  # 0 = off in kohya too
    "min_snr_gamma": lambda v, case: ["--min_snr_gamma", _num(v)] if v else [],  # absent = off
    "caption_dropout": lambda v, case: ["--caption_dropout_rate", _num(v)],
    # kohya's flag takes only 150 or 225; absent = 75 tokens
    "max_token_length": lambda v, case: [] if v == 75 else ["--max_token_length", str(v)],
    # absent = the last layer's output (kohya's clip_skip 1 goes through another code path that gives the same)
    "clip_skip": lambda v, case: [] if v == 1 else ["--clip_skip", str(v)],
    "save_precision": lambda v, case: ["--save_precision", v],
    "attention": lambda v, case: ["--sdpa"],
}


@dataclass(frozen=True)
class Paths:
    checkpoint: str
    data: str  # holds 1_bench/ with the images and captions
    out: str  # this run's output folder
    tokenizers: str = ""  # kohya's --tokenizer_cache_dir
    webui_dir: str = ""  # ours, SDXL: the WebUI folder with sgm


def our_command(case: Case, paths: Paths, python: str = sys.executable) -> list[str]:
    """``python -m lib_train lora ...`` for ``case``."""
    cmd = [python, "-m", "lib_train", "lora", "--checkpoint", paths.checkpoint, "--data", paths.data,
           "--output", paths.out, "--name", "bench", "--overwrite", "--save-every-epochs", "0",
           "--device", case.device]
    if case.family == "sdxl" and paths.webui_dir:
        cmd += ["--webui-dir", paths.webui_dir]
    for name, value in shared_settings(case).items():
        cmd += OUR_FLAGS[name](value, case)
    return cmd


def kohya_script(case: Case) -> str:
    return "sdxl_train_network.py" if case.family == "sdxl" else "train_network.py"


def kohya_command(case: Case, paths: Paths, python: str, kohya_dir: str) -> list[str]:
    """kohya's training script for ``case``, as plain ``python SCRIPT`` (no ``accelerate launch``)."""
    cmd = [python, str(Path(kohya_dir) / kohya_script(case)),
           "--pretrained_model_name_or_path", paths.checkpoint, "--train_data_dir", paths.data,
           "--caption_extension", ".txt", "--output_dir", paths.out, "--output_name", "bench",
           "--save_model_as", "safetensors", "--network_module", "networks.lora",
           "--max_data_loader_n_workers", "0"]  # one process, as ours
    if paths.tokenizers:
        cmd += ["--tokenizer_cache_dir", paths.tokenizers]
    if case.family == "sdxl":
        cmd += ["--no_half_vae"]  # the VAE in fp32, as lib_train keeps it (latents are cached before step 1)
    for name, value in shared_settings(case).items():
        cmd += KOHYA_FLAGS[name](value, case)
    return cmd


def child_env(device: str, threads: int | None, extra: dict | None = None) -> dict:
    """The environment of both children: offline, unbuffered, the same thread count."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1",  # every step drawn, even at 0.1 s/step
                "COLUMNS": "200"})  # rich (kohya's log) wraps at COLUMNS
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------------------------- parsing output

# a tqdm bar: "[desc: ] NN%|bar| n/total [elapsed<remaining, rate, postfix]"
_BAR = re.compile(r"(?:(?P<desc>[^\r\n|]*?):\s*)?\d+%\|[^|\r\n]*\|\s*(?P<n>\d+)/(?P<total>\d+) \[(?P<rest>[^\r\n]*)")


def training_step(tool: str, text: str, total: int) -> int | None:
    """The step count shown by ``text`` (one line of a child's output, split on CR and LF) if it is the training
    progress bar of ``tool`` (kohya: the bar named "steps"; ours: the bar counted in "step"), else None."""
    m = _BAR.search(text)
    if not m or int(m["total"]) != total:
        return None
    desc = (m["desc"] or "").strip()
    if tool == KOHYA_NAME:
        return int(m["n"]) if desc == "steps" else None
    return int(m["n"]) if not desc and ("step/s" in m["rest"] or "s/step" in m["rest"]) else None


_MODULES = {
    KOHYA_NAME: re.compile(r"create LoRA for (Text Encoder(?: \d)?|U-Net): (\d+) modules"),
}


class BarReader:
    """Reads a child's output as it arrives and stamps each new step of the tool's training bar.

    tqdm starts each redraw with a carriage return and ends it with nothing, so a bar's text is complete when its
    write arrives but is only terminated by the next write: the unterminated tail is read too, not just whole lines
    (otherwise each step would be stamped when the next one ends)."""

    def __init__(self, tool: str, total: int) -> None:
        self.tool, self.total = tool, total
        self.stamps: dict[int, float] = {}
        self._pending = b""

    def feed(self, chunk: bytes, now: float) -> list[int]:
        """Take ``chunk`` (arrived at ``now``); return the steps it completed, in order."""
        self._pending += chunk
        *lines, self._pending = re.split(rb"[\r\n]", self._pending)
        new = []
        for raw in [*lines, self._pending]:
            n = training_step(self.tool, raw.decode("utf-8", "replace"), self.total)
            if n is not None and n > 0 and n not in self.stamps:
                self.stamps[n] = now
                new.append(n)
        return new


def lora_modules(tool: str, log: str) -> dict:
    """kohya's "create LoRA for U-Net: N modules" lines (what each part got), for the report."""
    pattern = _MODULES.get(tool)
    return {m[1]: int(m[2]) for m in pattern.finditer(log)} if pattern else {}


def lora_file_counts(path: Path) -> dict | None:
    """What a run's LoRA file holds: its UNet and text-encoder modules (kohya names, ``lora_down`` keys) and its
    parameter count, so that both tools can be seen to train the same network. None when there is no file."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    counts = {"unet": 0, "te": 0, "params": 0}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith(".lora_down.weight") or key.endswith(".lora_up.weight"):
                counts["params"] += _numel(f.get_slice(key))
                if key.endswith(".lora_down.weight"):
                    counts["unet" if key.startswith("lora_unet") else "te"] += 1
    return counts


def _numel(tensor_slice) -> int:
    n = 1
    for d in tensor_slice.get_shape():
        n *= d
    return n


def step_durations(stamps: dict[int, float]) -> list[float]:
    """Step ``n``'s time for n = 2..N: stamp(n) - stamp(n-1), where both were seen."""
    return [stamps[n] - stamps[n - 1] for n in sorted(stamps) if n - 1 in stamps and n >= 2]


def run_median(stamps: dict[int, float], warmup: int = WARMUP_STEPS) -> float | None:
    """A run's s/step: the median time of steps warmup+1..N."""
    timed = [stamps[n] - stamps[n - 1] for n in sorted(stamps) if n > warmup and n - 1 in stamps]
    return statistics.median(timed) if timed else None


def median_of(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def ratio(ours: float | None, kohya: float | None) -> float | None:
    return ours / kohya if ours is not None and kohya else None


def summarize(case_id: str, runs: list[dict]) -> dict:
    """One case's result: per tool the median over repeats of each run's s/step and of its peaks; ours/kohya
    ratios of those medians; and the spread of the per-repeat ratios (run i of ours vs run i of kohya)."""
    by_tool = {tool: [r for r in runs if r["case"] == case_id and r["tool"] == tool and r.get("ok")]
               for tool in (OUR_NAME, KOHYA_NAME)}
    out: dict = {"case": case_id, "repeats": {t: len(rs) for t, rs in by_tool.items()}}
    for key in ("s_per_step", "cpu_s_per_step", "peak_train_gib", "peak_lifetime_gib", "cuda_peak_train_gib", "cuda_peak_gib",
                "first_step_s"):
        ours = median_of([r.get(key) for r in by_tool[OUR_NAME]])
        kohya = median_of([r.get(key) for r in by_tool[KOHYA_NAME]])
        out[key] = {OUR_NAME: ours, KOHYA_NAME: kohya, "ratio": ratio(ours, kohya)}
    pairs = {}
    for r in by_tool[OUR_NAME]:
        pairs.setdefault(r["repeat"], {})[OUR_NAME] = r.get("s_per_step")
    for r in by_tool[KOHYA_NAME]:
        pairs.setdefault(r["repeat"], {})[KOHYA_NAME] = r.get("s_per_step")
    pair_ratios = [ratio(p.get(OUR_NAME), p.get(KOHYA_NAME)) for _, p in sorted(pairs.items())]
    out["pair_ratios"] = [x for x in pair_ratios if x is not None]
    return out


# --------------------------------------------------------------------------------------------- running a child

def _read_status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) the process has used so far, from ``/proc/PID/stat``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None


def _reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


SITECUSTOMIZE = '''\
"""Written by bench/bench_kohya.py: CUDA peak-memory counters of this process, and (--profile) a torch.profiler
window over some of its steps, for the benchmark only."""
import atexit, json, os, signal, sys

_HANDLED = []  # the signals this hook handles


def _handle(signum, handler):
    signal.signal(signum, handler)
    _HANDLED.append(signum)


@atexit.register  # registered first, so it runs after the hook's other exit functions
def _late_signals_ignored():
    # a signal the parent sends as the last steps appear may reach a child that is already exiting; Python's
    # finalisation puts a handled signal back to its default action (terminate) but leaves an ignored one ignored
    for signum in _HANDLED:
        signal.signal(signum, signal.SIG_IGN)


_OUT = os.environ.get("BENCH_KOHYA_CUDA_PEAK")
if _OUT:
    _STATE = {}

    def _torch_cuda():
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        return torch

    def _reset(signum, frame):  # sent when step 1 has ended: the training-phase peak starts here
        torch = _torch_cuda()
        if torch is not None:
            _STATE["lifetime_before_reset"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            _STATE["reset"] = True

    _handle(signal.SIGUSR1, _reset)

    @atexit.register
    def _write():
        torch = _torch_cuda()
        if torch is not None:
            _STATE["peak_allocated"] = torch.cuda.max_memory_allocated()
            _STATE["peak_reserved"] = torch.cuda.max_memory_reserved()
        with open(_OUT, "w") as f:
            json.dump(_STATE, f)

_PROFILE = os.environ.get("BENCH_KOHYA_PROFILE")
if _PROFILE:
    _PROF = {}

    # two signals, not one sent twice: two pending deliveries of one signal merge into one (real-time ones do not,
    # and a lower number's handler runs first when both are pending)
    def _start(signum, frame):  # profile the CPU ops from here ...
        import torch
        if "prof" not in _PROF:
            _PROF["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            _PROF["prof"].start()

    def _stop(signum, frame):  # ... to here, and write the per-op totals
        prof = _PROF.pop("prof", None)
        if prof is None:
            return
        prof.stop()
        rows = [{"name": e.key, "count": e.count, "self_us": e.self_cpu_time_total, "total_us": e.cpu_time_total}
                for e in prof.key_averages()]
        with open(_PROFILE + ".part", "w") as f:
            json.dump(rows, f)
        os.replace(_PROFILE + ".part", _PROFILE)

    _handle(signal.SIGRTMIN + 1, _start)
    _handle(signal.SIGRTMIN + 2, _stop)
'''


def run_child(cmd: list[str], *, tool: str, steps: int, env: dict, cwd: str, log_path: Path,
              cuda_hook: Path | None = None, timeout: float = 3600,
              profile: tuple[int, int] | None = None) -> dict:
    """Run one training child, stamping each training-bar step as its output arrives; return its measurements.
    ``cuda_hook``: the folder holding the sitecustomize hook (CUDA counters; needed for ``profile`` too).
    ``profile`` = (a, b): the child's CPU ops are profiled from the end of step a to the end of step b."""
    env = dict(env)
    peak_file = profile_file = None
    if cuda_hook is not None:
        peak_file = log_path.with_suffix(".cuda.json")
        peak_file.unlink(missing_ok=True)
        env["PYTHONPATH"] = os.pathsep.join([str(cuda_hook), *filter(None, [env.get("PYTHONPATH")])])
        env[CUDA_PEAK_ENV] = str(peak_file)
        if profile is not None:
            profile_file = log_path.with_suffix(".profile.json")
            profile_file.unlink(missing_ok=True)
            env[PROFILE_ENV] = str(profile_file)
    reader = BarReader(tool, steps)
    stamps = reader.stamps
    cpu_stamps: dict[int, float] = {}  # the child's CPU seconds at each step's stamp
    hwm_train_kib = None
    reset_ok = False
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(("$ " + shlex.join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        fd = proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            if not chunk:
                break
            log.write(chunk)
            log.flush()  # the log can be followed while the child runs
            for n in reader.feed(chunk, now):
                cpu = _cpu_seconds(proc.pid)
                if cpu is not None:
                    cpu_stamps[n] = cpu
                if n == 1:  # step 1 holds first-use allocations; the training-phase peak starts after it
                    reset_ok = _reset_hwm(proc.pid)
                    if cuda_hook is not None:
                        os.kill(proc.pid, signal.SIGUSR1)
                if profile_file is not None and n in profile:
                    os.kill(proc.pid, signal.SIGRTMIN + (1 if n == profile[0] else 2))
                if reset_ok:
                    hwm_train_kib = _read_status_kib(proc.pid, "VmHWM")
            if now - start > timeout:
                proc.kill()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    cuda = {}
    if peak_file is not None and peak_file.exists():
        cuda = json.loads(peak_file.read_text())
    text = log_path.read_text("utf-8", "replace")
    result = {
        "tool": tool, "ok": proc.returncode == 0 and len(stamps) == steps, "returncode": proc.returncode,
        "steps_seen": len(stamps), "s_per_step": run_median(stamps), "step_seconds": step_durations(stamps),
        "cpu_s_per_step": run_median(cpu_stamps),  # CPU time, all threads: less moved by other jobs than wall time
        "first_step_s": stamps[1] - start if 1 in stamps else None, "wall_s": wall,
        "peak_train_gib": hwm_train_kib / 2**20 if hwm_train_kib else None,  # KiB -> GiB
        "peak_lifetime_gib": usage.ru_maxrss / 2**20,  # Linux: KiB
        "cpu_s": usage.ru_utime + usage.ru_stime, "load": [load_before, os.getloadavg()[0]],
        "lora_modules": lora_modules(tool, text), "log": str(log_path),
    }
    if cuda.get("peak_allocated") is not None:
        result["cuda_peak_train_gib"] = cuda["peak_allocated"] / GIB if cuda.get("reset") else None
        result["cuda_peak_gib"] = max(cuda["peak_allocated"], cuda.get("lifetime_before_reset", 0)) / GIB
        result["cuda_reserved_gib"] = cuda.get("peak_reserved", 0) / GIB
    if profile_file is not None:
        result["profile"] = str(profile_file) if profile_file.exists() else None
        result["profile_steps"] = list(profile)
    if not result["ok"]:
        tail = "\n".join(text.replace("\r", "\n").splitlines()[-15:])
        result["error"] = f"exit code {proc.returncode}, {len(stamps)}/{steps} steps seen; log {log_path}:\n{tail}"
    return result


# --------------------------------------------------------------------------------------------- preparation

WEIGHT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.", "first_stage_model.")


def random_model(family: str, *, tiny: bool = False, webui_dir: str | None = None):
    """The random-weight model both tools train on, built as bench_train.py builds it (same seed): SD1.5,
    ``build_latent_diffusion(sd15_spec())``; SDXL, sgm's ``DiffusionEngine`` of the base layout
    (``build_sdxl(SDXLSpec())``, sgm from ``webui_dir``); ``randomize_`` writes every parameter. ``tiny``: the
    family's test layout (for the tests; kohya converts full-size layouts only)."""
    from bench_train import MODEL_SEED, _materialize, _skip_default_init
    from lib_train.models.build import build_latent_diffusion, randomize_, tiny_sdxl_spec, tiny_spec
    from lib_train.models.spec import SDXLSpec, sd15_spec

    with _skip_default_init():
        if family == "sdxl":
            from lib_train.models.sdxl_load import build_sdxl

            model = build_sdxl(tiny_sdxl_spec() if tiny else SDXLSpec(), webui_dir=webui_dir, init=False)
            _materialize(model)
        else:
            model = build_latent_diffusion(tiny_spec("sd1") if tiny else sd15_spec())
    randomize_(model, MODEL_SEED)
    return model


def make_checkpoint(path: Path, family: str = "sd1", *, tiny: bool = False, webui_dir: str | None = None) -> None:
    """Write :func:`random_model` as a checkpoint file: the model's own state-dict keys (the ldm / sgm layout that
    distributed files have), the weights in fp16 as distributed files are, the noise-schedule buffers as they are."""
    import torch
    from safetensors.torch import save_file

    model = random_model(family, tiny=tiny, webui_dir=webui_dir)
    sd = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if key.startswith(WEIGHT_PREFIXES) and value.is_floating_point():
            value = value.to(torch.float16)
        sd[key] = value.contiguous()
    del model
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"bench": f"random-weight {family} layout, bench/bench_kohya.py"})
    os.replace(tmp, path)


TOKENIZER_SCRIPT = """
import json, sys
from transformers import CLIPTokenizer
vocab, merges, out, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
CLIPTokenizer(vocab, merges, model_max_length=77, **extra).save_pretrained(out)
"""


def make_kohya_tokenizers(cache_dir: Path, kohya_python: str) -> list[str]:
    """Fill kohya's ``--tokenizer_cache_dir`` offline: a ``CLIPTokenizer`` per hub id kohya asks for, built in
    kohya's Python (its transformers writes the files it reads back) from the vocabulary and merges that
    lib_train derives from open_clip's BPE file. Returns the folders written."""
    from lib_train.models.build import clip_tokenizer_files

    files = clip_tokenizer_files()
    written = []
    for name, extra in KOHYA_TOKENIZERS.items():
        out = cache_dir / name
        if (out / "tokenizer_config.json").exists():
            continue
        subprocess.run([kohya_python, "-c", TOKENIZER_SCRIPT, str(files / "vocab.json"), str(files / "merges.txt"),
                        str(out), json.dumps(extra)], check=True, env=child_env("cpu", None))
        written.append(str(out))
    return written


def make_dataset(root: Path, resolution: int) -> Path:
    from bench_train import _make_dataset

    if not (root / "1_bench").is_dir():
        _make_dataset(root, resolution)
    return root


# --------------------------------------------------------------------------------------------- the matrix

CPU_MATRIX = [("sd1", 256, "unet"), ("sd1", 256, "unet+te"), ("sd1", 512, "unet"), ("sd1", 512, "unet+te")]
GPU_MATRIX = [("sd1", 512, "unet"), ("sd1", 512, "unet+te"), ("sdxl", 1024, "unet")]


def build_cases(device: str, families: list[str], resolutions: list[int] | None, te_modes: list[str],
                steps: int, precision: str, checkpointing: bool | None) -> list[Case]:
    matrix = GPU_MATRIX if device == "cuda" else CPU_MATRIX
    cases = []
    for family, res, te in matrix:
        if family not in families or te not in te_modes or (resolutions and res not in resolutions):
            continue
        ckpt = checkpointing if checkpointing is not None else family == "sdxl"  # SDXL: on, as lib_train's default
        cases.append(Case(family, res, te, device, precision if device == "cuda" else "no", steps, ckpt))
    return cases


def _versions(python: str, kohya_dir: str | None = None) -> dict:
    code = ("import json, platform, torch, transformers; print(json.dumps({'python': platform.python_version(), "
            "'torch': torch.__version__, 'transformers': transformers.__version__, "
            "'threads': torch.get_num_threads()}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                             env=child_env("cpu", None)).stdout
        info = json.loads(out.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        info = {"error": str(e)}
    if kohya_dir:
        info["commit"] = _kohya_commit(kohya_dir)
    return info


def _kohya_commit(kohya_dir: str) -> str:
    marker = Path(kohya_dir) / ".bench-commit"  # a checkout made with `git archive` has no .git: see README
    if marker.exists():
        return marker.read_text().strip()
    try:
        return subprocess.run(["git", "-C", kohya_dir, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def check_ours_parses(cmd: list[str]) -> dict:
    """Our CLI's own parser and config builder on ``cmd`` (after ``python -m lib_train``): the settings it would
    train with, as ``section.field`` → value."""
    from lib_train import cli
    from lib_train.methods import METHODS

    args = cli._parser().parse_args(cmd[3:])
    cfg = cli.build_config(args, METHODS[args.command])
    return {f"{section}.{name}": value for section, fields in asdict(cfg).items() if isinstance(fields, dict)
            for name, value in fields.items()}


KOHYA_PARSE_SCRIPT = """
import json, os, sys
sys.path.insert(0, os.getcwd())
script, argv = sys.argv[1], json.loads(sys.argv[2])
module = __import__(script[:-3])
args = module.setup_parser().parse_args(argv)
plain = (str, int, float, bool, type(None))
ok = lambda v: isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v))
print("PARSED " + json.dumps({k: v for k, v in vars(args).items() if ok(v)}))
"""


def check_kohya_parses(cmd: list[str], kohya_python: str, kohya_dir: str) -> dict:
    """kohya's own argument parser (``setup_parser()`` of the script) on ``cmd``; its parsed values."""
    proc = subprocess.run([kohya_python, "-c", KOHYA_PARSE_SCRIPT, Path(cmd[1]).name, json.dumps(cmd[2:])],
                          capture_output=True, text=True, cwd=kohya_dir, env=child_env("cpu", None), timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("PARSED "):
            return json.loads(line[len("PARSED "):])
    raise RuntimeError(f"kohya's parser refused the command (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


KOHYA_PARSE_FIELDS = (("steps", "max_train_steps"), ("lr", "unet_lr"), ("te_lr", "text_encoder_lr"),
                      ("unet only", "network_train_unet_only"), ("rank", "network_dim"),
                      ("precision", "mixed_precision"), ("sdpa", "sdpa"),
                      ("checkpointing", "gradient_checkpointing"), ("TE outputs cached", "cache_text_encoder_outputs"))


def describe_kohya_parse(parsed: dict) -> str:
    """One line of what kohya's own parser made of our command. A field its script does not define (the SD1
    ``train_network.py`` has no ``--cache_text_encoder_outputs``) is said to be absent, not a KeyError."""
    return ", ".join(f"{label} {parsed[key] if key in parsed else '(no such flag in this script)'}"
                     for label, key in KOHYA_PARSE_FIELDS)


# --------------------------------------------------------------------------------------------- report

def _f(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_summary(summaries: list[dict]) -> str:
    from bench_train import text_table

    columns = ("case", "n", "ours s/step", "kohya s/step", "ratio", "pair ratios", "CPU s/step ours/kohya (ratio)",
               "ours peak GiB (train/life)",
               "kohya peak GiB (train/life)", "peak ratio (train/life)", "CUDA peak ours/kohya")
    rows = []
    for s in summaries:
        st, pt, pl = s["s_per_step"], s["peak_train_gib"], s["peak_lifetime_gib"]
        cu = s["cuda_peak_train_gib"]
        rows.append([
            s["case"], f"{s['repeats'][OUR_NAME]}/{s['repeats'][KOHYA_NAME]}", _f(st[OUR_NAME], ".3f"),
            _f(st[KOHYA_NAME], ".3f"), _f(st["ratio"]),
            ("-".join(_f(x) for x in (min(s["pair_ratios"]), max(s["pair_ratios"]))) if s["pair_ratios"] else "-"),
            f"{_f(s['cpu_s_per_step'][OUR_NAME], '.1f')}/{_f(s['cpu_s_per_step'][KOHYA_NAME], '.1f')} "
            f"({_f(s['cpu_s_per_step']['ratio'])})",
            f"{_f(pt[OUR_NAME])}/{_f(pl[OUR_NAME])}", f"{_f(pt[KOHYA_NAME])}/{_f(pl[KOHYA_NAME])}",
            f"{_f(pt['ratio'])}/{_f(pl['ratio'])}",
            f"{_f(cu[OUR_NAME])}/{_f(cu[KOHYA_NAME])}" if cu[OUR_NAME] or cu[KOHYA_NAME] else "-",
        ])
    return text_table(columns, rows)


def profile_table(runs: list[dict], top: int = 30) -> list[tuple[str, float | None, float | None]]:
    """(op, ours, kohya): each op's self CPU time per profiled step (median over the runs that have a profile),
    the ``top`` ops by their larger figure, then a row for all others and the total."""
    per_tool: dict[str, dict[str, list[float]]] = {OUR_NAME: {}, KOHYA_NAME: {}}
    counts = {OUR_NAME: 0, KOHYA_NAME: 0}
    for r in runs:
        if not r.get("profile"):
            continue
        steps = r["profile_steps"][1] - r["profile_steps"][0]
        counts[r["tool"]] += 1
        seen = per_tool[r["tool"]]
        for row in json.loads(Path(r["profile"]).read_text()):
            seen.setdefault(row["name"], []).append(row["self_us"] / 1e6 / steps)
    med = {tool: {name: statistics.median(v + [0.0] * (counts[tool] - len(v))) for name, v in ops.items()}
           for tool, ops in per_tool.items()}
    names = sorted(set(med[OUR_NAME]) | set(med[KOHYA_NAME]),
                   key=lambda n: -max(med[OUR_NAME].get(n, 0.0), med[KOHYA_NAME].get(n, 0.0)))
    rows = [(n, med[OUR_NAME].get(n, 0.0) if counts[OUR_NAME] else None,
             med[KOHYA_NAME].get(n, 0.0) if counts[KOHYA_NAME] else None) for n in names[:top]]

    def total(tool: str, only=None) -> float | None:
        return sum(v for n, v in med[tool].items() if only is None or n in only) if counts[tool] else None

    rest = set(names[top:])
    rows.append(("(all other ops)", total(OUR_NAME, rest), total(KOHYA_NAME, rest)))
    rows.append(("(total self time)", total(OUR_NAME), total(KOHYA_NAME)))
    return rows


def format_profile(rows: list[tuple[str, float | None, float | None]]) -> str:
    from bench_train import text_table

    return text_table(("op", "ours s", "kohya s", "ours - kohya"),
                      [[n, _f(a, ".3f"), _f(b, ".3f"), _f(a - b if a is not None and b is not None else None, "+.3f")]
                       for n, a, b in rows])


# --------------------------------------------------------------------------------------------- main

def _csv(text: str, allowed: Sequence[str]) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{', '.join(bad)}: choose from {', '.join(allowed)}")
    return parts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="kohya sd-scripts vs python -m lib_train lora: same settings, "
                                            "interleaved runs, s/step and peak-memory ratios (ours/kohya).")
    p.add_argument("--kohya-dir", default=os.environ.get("KOHYA_DIR"), help="kohya sd-scripts checkout "
                                                                            "(default $KOHYA_DIR)")
    p.add_argument("--kohya-python", default=os.environ.get("KOHYA_PYTHON"),
                   help="the Python that runs kohya (default $KOHYA_PYTHON)")
    p.add_argument("--our-python", default=sys.executable, help="the Python that runs python -m lib_train "
                                                                "(default: this one)")
    p.add_argument("--work", default=str(REPO / "bench" / "out" / "kohya"),
                   help="folder for the checkpoint, datasets, tokenizers, logs and results (default bench/out/kohya)")
    p.add_argument("--checkpoint", help="the SD1.5 checkpoint both train on (default WORK/sd15-random.safetensors, "
                                        "written once when missing)")
    p.add_argument("--sdxl-checkpoint", help="the SDXL checkpoint (default WORK/sdxl-random.safetensors, written once "
                                             "when missing: needs sgm, --webui-dir, and ~15 GB of RAM)")
    p.add_argument("--webui-dir", default=os.environ.get("SD_WEBUI_DIR", ""), help="SDXL, ours: the WebUI folder "
                                                                                   "with sgm")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "no"), help="CUDA only (CPU: fp32)")
    p.add_argument("--family", default="sd1", type=lambda t: _csv(t, ("sd1", "sdxl")), help="sd1, sdxl or both")
    p.add_argument("--resolutions", default=None, type=lambda t: [int(x) for x in t.split(",")],
                   help="keep only these rows of the matrix (CPU: 256,512; CUDA: 512 SD1.5, 1024 SDXL)")
    p.add_argument("--te", default="unet,unet+te", type=lambda t: _csv(t, ("unet", "unet+te")),
                   help="UNet-only LoRA, UNet+text-encoder LoRA, or both (default both)")
    p.add_argument("--checkpointing", default=None, choices=("on", "off"),
                   help="gradient checkpointing in both (default: off for SD1.5, on for SDXL)")
    p.add_argument("--steps", type=int, default=None, help="max_train_steps per run (default 8 on CPU, 30 on CUDA); "
                                                           f"the median uses steps {WARMUP_STEPS + 1}..N")
    p.add_argument("--repeats", type=int, default=3, help="runs per tool and case (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="OMP/MKL threads of both children (default: all cores)")
    p.add_argument("--list", action="store_true", help="print both command lines of each case and exit")
    p.add_argument("--dry-run", action="store_true", help="check each case's command lines with both tools' own "
                                                          "argument parsers (kohya's needs --kohya-python) and exit")
    p.add_argument("--json", help="results file (default WORK/results.json)")
    p.add_argument("--profile", action="store_true",
                   help=f"profile each run's CPU ops (torch.profiler, started and stopped from outside by signals) "
                        f"over steps {PROFILE_STEPS[0] + 1}-{PROFILE_STEPS[1]} and print the ops' per-step self time, "
                        f"ours vs kohya; those runs' step times include the profiler's overhead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    steps = args.steps or (30 if args.device == "cuda" else 8)
    least = PROFILE_STEPS[1] + 1 if args.profile else WARMUP_STEPS + 2
    if steps < least:
        print(f"error: --steps must be at least {least}{' with --profile' if args.profile else ''}", file=sys.stderr)
        return 2
    ckpt_flag = None if args.checkpointing is None else args.checkpointing == "on"
    cases = build_cases(args.device, args.family, args.resolutions, args.te, steps, args.precision, ckpt_flag)
    if not cases:
        print("error: no case of the matrix matches --family/--resolutions/--te", file=sys.stderr)
        return 2
    work = Path(args.work).resolve()
    checkpoints = {"sd1": args.checkpoint or str(work / "sd15-random.safetensors"),
                   "sdxl": args.sdxl_checkpoint or str(work / "sdxl-random.safetensors")}
    kohya_dir = args.kohya_dir or "KOHYA_DIR"
    kohya_python = args.kohya_python or "KOHYA_PYTHON"

    def paths_for(case: Case, tool: str, repeat: int) -> Paths:
        return Paths(checkpoints[case.family], str(work / f"data-{case.resolution}"),
                     str(work / "runs" / case.id / f"{tool}-{repeat}"), str(work / "tokenizers"), args.webui_dir)

    if args.list or args.dry_run:
        for case in cases:
            p = paths_for(case, "x", 0)
            ours, kohya = our_command(case, p, args.our_python), kohya_command(case, p, kohya_python, kohya_dir)
            print(f"# {case.id}\n{shlex.join(ours)}\n(cd {kohya_dir} && {shlex.join(kohya)})\n")
            if args.dry_run:
                cfg = check_ours_parses(ours)
                print(f"  ours parses: steps {cfg['train.max_steps']}, lr {cfg['optim.lr']}, te_lr "
                      f"{cfg['optim.te_lr']}, rank {cfg['network.rank']}, precision {cfg['train.mixed_precision']}, "
                      f"checkpointing {cfg['train.gradient_checkpointing']}")
                if args.kohya_python and args.kohya_dir:
                    print("  kohya parses: " + describe_kohya_parse(check_kohya_parses(kohya, kohya_python,
                                                                                       kohya_dir)))
                else:
                    print("  kohya's parser not run: give --kohya-dir and --kohya-python")
        return 0

    if not (args.kohya_dir and args.kohya_python):
        print("error: give kohya's checkout and Python: --kohya-dir/--kohya-python or KOHYA_DIR/KOHYA_PYTHON "
              "(bench/README.md, 'Side by side with kohya', has the recipe)", file=sys.stderr)
        return 2
    if not (Path(kohya_dir) / "train_network.py").exists():
        print(f"error: {kohya_dir} has no train_network.py: --kohya-dir must be an sd-scripts checkout",
              file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    for family in sorted({c.family for c in cases}):
        if not Path(checkpoints[family]).exists():
            print(f"writing the random-weight {family} checkpoint {checkpoints[family]} ...", file=sys.stderr,
                  flush=True)
            make_checkpoint(Path(checkpoints[family]), family, webui_dir=args.webui_dir or None)
    for written in make_kohya_tokenizers(work / "tokenizers", kohya_python):
        print(f"kohya tokenizer written: {written}", file=sys.stderr)
    for res in sorted({c.resolution for c in cases}):
        make_dataset(work / f"data-{res}", res)
    hook = None
    if args.device == "cuda" or args.profile:
        hook = work / "hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = child_env(args.device, args.threads, {"TRAINER_CACHE_DIR": str(work / "trainer-cache")})
    results_file = Path(args.json) if args.json else work / "results.json"
    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
              "ours": _versions(args.our_python), "kohya": _versions(kohya_python, kohya_dir),
              "steps": steps, "warmup_steps": WARMUP_STEPS, "checkpoints": checkpoints,
              "cases": [asdict(c) for c in cases], "runs": [], "summary": []}
    print(f"{len(cases)} case(s) x {args.repeats} repeat(s) x 2 tools, {steps} steps each; ours: "
          f"{report['ours']}, kohya: {report['kohya']}", file=sys.stderr, flush=True)
    for repeat in range(args.repeats):
        for case in cases:
            for tool in (OUR_NAME, KOHYA_NAME):
                p = paths_for(case, tool, repeat)
                Path(p.out).mkdir(parents=True, exist_ok=True)
                if tool == OUR_NAME:
                    cmd, cwd = our_command(case, p, args.our_python), str(REPO)
                else:
                    cmd, cwd = kohya_command(case, p, kohya_python, kohya_dir), kohya_dir
                r = run_child(cmd, tool=tool, steps=steps, env=env, cwd=cwd, log_path=Path(p.out) / "log.txt",
                              cuda_hook=hook, profile=PROFILE_STEPS if args.profile else None)
                r.update(case=case.id, repeat=repeat, lora_file=lora_file_counts(Path(p.out) / "bench.safetensors"))
                report["runs"].append(r)
                print(f"[{repeat + 1}/{args.repeats}] {case.id} {tool}: s/step {_f(r['s_per_step'], '.3f')} "
                      f"(CPU {_f(r['cpu_s_per_step'], '.1f')} s), "
                      f"peak train {_f(r['peak_train_gib'])} GiB, lifetime {_f(r['peak_lifetime_gib'])} GiB, "
                      f"first step {_f(r['first_step_s'], '.1f')} s, load {r['load'][0]:.1f}/{r['load'][1]:.1f}"
                      + (f"\n  FAILED: {r['error']}" if not r["ok"] else ""), file=sys.stderr, flush=True)
                report["summary"] = [summarize(c.id, report["runs"]) for c in cases]
                results_file.write_text(json.dumps(report, indent=1))
    print(format_summary(report["summary"]))
    if args.profile:
        for case in cases:
            print(f"\n# {case.id}: CPU ops, self time per step (s), steps {PROFILE_STEPS[0] + 1}-{PROFILE_STEPS[1]}, "
                  f"median over the repeats")
            print(format_profile(profile_table([r for r in report["runs"] if r["case"] == case.id])))
    print(f"results: {results_file}", file=sys.stderr)
    return 0 if all(r["ok"] for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
