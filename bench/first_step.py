"""Click → first step with the latents already cached on disk, the model already loaded (issue 13's goal: ≤ 10 s).

A first process builds the full-size random-weight model (as ``bench_train.py`` does) and trains one step with
``data.cache_latents = "disk"``, which writes the latent cache into the output folder. A second, fresh process builds
the model again (not timed: the model is loaded before the click) and makes ``--clicks`` runs of ``train_lora`` on
it, each a new call as a Train click is, with the cache on disk. Each click's time from the call to the end of step
1 is split by the trainer's own status lines and events:

- ``scan``: the dataset scan and plan (``prepare_data``: a Train click in the tab runs it, the CLI before loading);
- ``setup``: LoRA attach, checkpointing wrappers, optimizer and schedule, the free-space check (call → "Caching
  latents");
- ``latents``: reading the cached latents (hashing each image file for its key, one small file per latent);
- ``texts``: caching text encodings where the text encoders are not trained (else nothing);
- ``step 1``: the first optimizer step (forward, backward, optimizer; the first click also pays autograd's and
  the allocator's warm-up); ``later steps``: the median of the click's further steps (``--steps``), for comparison.

Run from the repository root (asserts nothing)::

    python bench/first_step.py --resolution 256 --clicks 2
    python bench/first_step.py --resolution 512 --profile 25      # + the 25 costliest functions of click 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402

RESULT_PREFIX = "FIRST_STEP "


def _phases(t0: float, marks: list[tuple[str, float]], first_step_end: float) -> dict[str, float]:
    def at(prefix: str) -> float | None:
        return next((t for text, t in marks if text.startswith(prefix)), None)

    latents, texts, training = at("Caching latents"), at("Caching text"), at("Training:")
    out = {"setup": (latents or training) - t0}
    if latents is not None:
        out["latents"] = (texts or training) - latents
    if texts is not None:
        out["texts"] = training - texts
    out["step 1"] = first_step_end - training
    out["total"] = first_step_end - t0
    return out


def run(args: dict) -> dict:
    import torch

    from lib_train.methods import METHODS
    from lib_train.train.events import Events

    bc = bt.BenchConfig(**args["bench"])
    work = Path(args["work"])
    t0 = time.perf_counter()
    bundle = bt._build_bundle(bc)
    build_s = time.perf_counter() - t0
    data = work / "data"
    if not data.exists():
        bt._make_dataset(data, bc.resolution)
    cfg = bt._train_config(bc, data, work / "out")
    cfg.train.max_steps = args.get("steps", 1)
    prepare, train = METHODS[bc.method].entry("prepare"), METHODS[bc.method].entry("train")
    cache_dir = work / "out" / ".latent-cache"
    cached_before = len(list(cache_dir.glob("*.safetensors"))) if cache_dir.is_dir() else 0
    clicks = []
    for n in range(args["clicks"]):
        marks: list[tuple[str, float]] = []
        ends: list[float] = []

        class Marks(Events):
            def status(self, text: str) -> None:
                marks.append((text, time.perf_counter()))

            def progress(self, p) -> None:
                if bc.device == "cuda":
                    torch.cuda.synchronize()
                ends.append(time.perf_counter())

        t_click = time.perf_counter()
        prep = prepare(cfg)  # a Train click in the tab scans again (the job's prepare)
        scan_s = time.perf_counter() - t_click
        profiler = None
        if args.get("profile") and n == 0:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        start = time.perf_counter()
        train(cfg, bundle, prep, events=Marks())
        if profiler is not None:
            profiler.disable()
            import io
            import pstats

            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args["profile"])
            print(text.getvalue(), file=sys.stderr)
        phases = _phases(start, marks, ends[0])
        later = [b - a for a, b in zip(ends, ends[1:])]  # steps 2.. of the same click, for comparison
        clicks.append({"scan": scan_s, **phases, "total": phases["total"] + scan_s,
                       **({"later steps": statistics.median(later)} if later else {})})
    return {"config": asdict(bc), "build_s": build_s, "latent_files_before": cached_before, "clicks": clicks,
            "machine": bt._machine(bc.device)}


def _child(args: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(args)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(bt.REPO))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise SystemExit(f"the child process failed (exit code {proc.returncode}; see its messages above)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--clicks", type=int, default=2, help="timed runs in the second process (default 2)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed click: step 1 is the goal's, the median "
                                                        "of the later ones shows what a step costs once warm")
    p.add_argument("--te", default="trained", choices=tuple(bt.TE_MODES))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto")
    p.add_argument("--tiny", action="store_true", help="the small test layout (a check of the script)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions of click 1")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(RESULT_PREFIX + json.dumps(run(json.loads(a.one))), flush=True)
        return 0
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    bc = bt.BenchConfig(resolution=a.resolution, checkpointing=False, cache="disk", steps=1, device=device,
                        precision=a.precision, te=a.te, tiny=a.tiny)
    with tempfile.TemporaryDirectory(prefix="first-step-") as work:
        fill = _child({"bench": asdict(bc), "work": work, "clicks": 1})
        timed = _child({"bench": asdict(bc), "work": work, "clicks": a.clicks, "profile": a.profile,
                        "steps": a.steps})
    print(f"\n{bc.label}; device {device}; latent files on disk before the timed clicks: "
          f"{timed['latent_files_before']}; model build (not timed) {timed['build_s']:.0f} s")
    print(f"cold (cache filled in this click): {fill['clicks'][0]}")
    cols = ["scan", "setup", "latents", "texts", "step 1", "total", "later steps"]
    rows = [[f"click {i + 1}"] + [f"{c[k]:.2f}" if k in c else "-" for k in cols]
            for i, c in enumerate(timed["clicks"])]
    print(bt.text_table(["click (cache on disk)"] + [f"{k} s" for k in cols], rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"fill": fill, "timed": timed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
