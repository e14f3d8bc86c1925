"""Micro-measurements of the speed switches (issue 13) on one piece of a training step each, light enough for a
shared CPU (each well under 2 minutes and 1 GB): what ``bench_train.py``'s whole-step A/B runs cannot resolve on a
machine whose speed drifts 2x within minutes. A and B alternate within one process, so drift touches both alike.

    python bench/speed_micro.py fused           # AdamW step on a LoRA-sized parameter set: foreach vs fused
    python bench/speed_micro.py channels-last   # one SD1.5 ResBlock forward+backward: contiguous vs channels-last
    python bench/speed_micro.py compile         # the same ResBlock through lib_train's RegionalCompile (inductor)
    python bench/speed_micro.py prefetch        # image decode per step: serial vs lib_train.data.prefetch

Asserts nothing; never run by the tests.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def _stats(name: str, values: list[float], unit: float = 1e3, suffix: str = "ms") -> float:
    med = statistics.median(values)
    print(f"  {name}: median {med * unit:.4g} {suffix} (min {min(values) * unit:.4g}, max {max(values) * unit:.4g}, "
          f"n {len(values)})")
    return med


def fused() -> None:
    """AdamW.step on 528 tensors / 6.5 M parameters (an SD1.5 rank-16 UNet + text-encoder LoRA's shapes)."""
    torch.manual_seed(0)
    shapes = ([(16, 768), (768, 16)] * 100 + [(16, 320), (320, 16)] * 64 + [(16, 1280), (1280, 16)] * 64
              + [(16, 640), (640, 16)] * 36)
    params = [torch.nn.Parameter(torch.randn(s) * 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {"foreach": torch.optim.AdamW(params, lr=1e-4, foreach=True),
            "fused": torch.optim.AdamW(params, lr=1e-4, fused=True)}
    for o in opts.values():
        o.step()
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(40):
        for k, o in opts.items():
            t0 = time.perf_counter()
            o.step()
            times[k].append(time.perf_counter() - t0)
    print(f"AdamW step, {len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f} M parameters:")
    a, b = _stats("foreach", times["foreach"]), _stats("fused", times["fused"])
    print(f"  fused / foreach = {b / a:.3f}; load {os.getloadavg()}")


def _resblock():
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    torch.manual_seed(0)
    # SD1.5's first-stage ResBlock (320 channels) on the 32² latent of a 256² image; frozen, the input needs a
    # gradient (as in a LoRA step, where the gradient flows through the frozen block)
    root = torch.nn.Sequential(ResBlock(320, 1280, 0.0, out_channels=320, dims=2, use_checkpoint=False))
    root.requires_grad_(False)
    x, emb = torch.randn(1, 320, 32, 32, requires_grad=True), torch.randn(1, 1280)

    def run():
        root[0](x, emb).square().mean().backward()

    def timed(n: int = 3) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        return (time.perf_counter() - t0) / n

    run()
    return root, run, timed


def channels_last() -> None:
    from lib_train.train.speed import ChannelsLast

    root, run, timed = _resblock()
    res: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
    for _ in range(12):
        res["contiguous"].append(timed())
        cl = ChannelsLast(root)
        run()
        res["channels_last"].append(timed())
        cl.restore()
    print("SD1.5 ResBlock 320 ch, 32², forward + backward:")
    a, b = _stats("contiguous", res["contiguous"]), _stats("channels-last", res["channels_last"])
    print(f"  channels-last / contiguous = {b / a:.3f}; load {os.getloadavg()}")


def compile_() -> None:
    from lib_train.train.speed import RegionalCompile

    torch.set_num_threads(1)
    root, run, timed = _resblock()
    eager = [timed() for _ in range(5)]
    rc = RegionalCompile(root, print)
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    compiled = [timed() for _ in range(5)]
    rc.remove()
    eager += [timed() for _ in range(5)]
    print(f"SD1.5 ResBlock 320 ch, 32², forward + backward, one thread; inductor cache "
          f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}:")
    print(f"  first compiled call (compile of forward and backward): {first:.1f} s wall, {first_cpu:.1f} s CPU of "
          "this process")
    a, b = _stats("eager", eager), _stats("compiled", compiled)
    print(f"  compiled / eager = {b / a:.3f}; load {os.getloadavg()}")


def prefetch() -> None:
    import numpy as np
    from PIL import Image

    from lib_train.data.buckets import BucketPlan
    from lib_train.data.latent_cache import load_pixels
    from lib_train.data.prefetch import Prefetcher

    tmp = tempfile.mkdtemp(prefix="speed-micro-")
    rng = np.random.default_rng(0)
    plans = []
    for w, h, fmt, bucket in ((256, 256, "PNG", (256, 256)), (768, 1024, "JPEG", (448, 576)),
                              (2048, 1536, "JPEG", (1152, 896))):
        yy, xx = np.mgrid[0:h, 0:w]  # a smooth picture with grain: a photo's compressibility, not noise's
        arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
        arr = (arr + rng.integers(0, 20, arr.shape)).clip(0, 255).astype(np.uint8)
        path = os.path.join(tmp, f"img{w}.{fmt.lower()}")
        Image.fromarray(arr).save(path, fmt, quality=92)
        scale = max(bucket[0] / w, bucket[1] / h)
        resized = (max(bucket[0], round(w * scale)), max(bucket[1], round(h * scale)))
        plans.append((path, BucketPlan((w, h), bucket, resized, ((resized[0] - bucket[0]) // 2,
                                                                 (resized[1] - bucket[1]) // 2), 0.0)))
    print("load_pixels (decode, resize, crop, flip) per image:")
    for path, plan in plans:
        load_pixels(path, plan, False)
        t = []
        for i in range(7):
            t0 = time.perf_counter()
            load_pixels(path, plan, i % 2 == 1)
            t.append(time.perf_counter() - t0)
        _stats(f"{plan.source[0]}x{plan.source[1]} {Path(path).suffix} -> {plan.bucket[0]}x{plan.bucket[1]}", t)
    path, plan = plans[2]
    a = torch.randn(768, 768)

    def step():  # 0.25 s of matrix products: a GPU step's time, spent in torch (which releases the GIL)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.25:
            a @ a

    def serial(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            load_pixels(path, plan, False)
            step()
        return (time.perf_counter() - t0) / n

    def prefetched(n: int) -> float:
        t0 = time.perf_counter()
        with Prefetcher(range(n), lambda i: load_pixels(path, plan, False), depth=2) as feed:
            for _ in feed:
                step()
        return (time.perf_counter() - t0) / n

    res: dict[str, list[float]] = {"serial": [], "prefetch": []}
    for _ in range(4):
        res["serial"].append(serial(6))
        res["prefetch"].append(prefetched(6))
    print("a 0.25 s step fed 2048x1536 JPEGs:")
    s, p = _stats("serial", res["serial"], 1, "s/step"), _stats("prefetch", res["prefetch"], 1, "s/step")
    print(f"  prefetch / serial = {p / s:.3f}; load {os.getloadavg()}")


if __name__ == "__main__":
    what = {"fused": fused, "channels-last": channels_last, "compile": compile_, "prefetch": prefetch}
    if len(sys.argv) != 2 or sys.argv[1] not in what:
        sys.exit(f"usage: python bench/speed_micro.py {{{','.join(what)}}}")
    what[sys.argv[1]]()
