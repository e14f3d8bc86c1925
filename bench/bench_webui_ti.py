"""Time the WebUI's built-in "Train embedding" (A1111's Train tab) on the checkpoint a running WebUI has loaded,
with the settings of ``bench_train.py --method embedding`` (batch 1, 4 random-noise images with captions, lr 5e-3,
a subject template, init text "person"), for a side-by-side with our trainer.

It talks to the WebUI's own API (``--api``): ``POST /sdapi/v1/create/embedding`` then ``/sdapi/v1/train/embedding``,
each configuration after a 1-step warm-up call, then twice (``--steps A,B``); s/step = (time of B steps − time of A
steps) / (B − A), so dataset preparation and the first-step overhead cancel out. With ``--pid`` (the WebUI's process id, same user, Linux) it
also reports the process's peak resident memory during each training call (``VmHWM`` after resetting it through
``/proc/PID/clear_refs``), which includes the loaded model.

The WebUI trains with its cross-attention optimizations undone unless its setting
``training_xattention_optimizations`` is on (the default is off): that is how its users run it.

    python bench/bench_webui_ti.py --url http://127.0.0.1:7860 --pid "$(cat webui.pid)"

Asserts nothing; never run by the test suite.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CAPTIONS = ("bench subject, red noise", "bench subject, green noise", "bench subject, blue noise",
            "bench subject, grey noise, close-up")


def _post(url: str, path: str, body: dict, auth: str | None, timeout: float = 3600) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _dataset(root: Path, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / f"data{resolution}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def _hwm_reset(pid: int | None) -> None:
    if pid:
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def _hwm_gib(pid: int | None) -> float | None:
    if not pid:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return None


def _train(args, name: str, vectors: int, data: Path, logs: Path, resolution: int, steps: int) -> tuple[float, float]:
    info = _post(args.url, "/sdapi/v1/create/embedding",
                 {"name": name, "num_vectors_per_token": vectors, "overwrite_old": True, "init_text": "person"},
                 args.auth)["info"]
    if "error" in info:
        raise SystemExit(f"create embedding: {info}")
    body = {"id_task": f"bench-{name}-{steps}", "embedding_name": name, "learn_rate": "0.005", "batch_size": 1,
            "gradient_step": 1, "data_root": str(data), "log_directory": str(logs), "training_width": resolution,
            "training_height": resolution, "varsize": False, "steps": steps, "clip_grad_mode": "disabled",
            "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once",
            "use_weight": False, "create_image_every": 0, "save_embedding_every": 0,
            "template_filename": "subject_filewords.txt", "save_image_with_stored_embedding": False,
            "preview_from_txt2img": False, "preview_prompt": "", "preview_negative_prompt": "", "preview_steps": 20,
            "preview_sampler_name": "Euler a", "preview_cfg_scale": 7, "preview_seed": -1, "preview_width": 512,
            "preview_height": 512}
    (logs / datetime.datetime.now().strftime("%Y-%m-%d") / name).mkdir(parents=True, exist_ok=True)  # it writes
    # its settings file there before creating the folder
    _hwm_reset(args.pid)
    t0 = time.perf_counter()
    info = _post(args.url, "/sdapi/v1/train/embedding", body, args.auth)["info"]
    wall = time.perf_counter() - t0
    if "error: None" not in info:
        raise SystemExit(f"train embedding: {info}")
    return wall, _hwm_gib(args.pid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--auth", help="USER:PASSWORD when the WebUI runs with --api-auth")
    p.add_argument("--pid", type=int, help="the WebUI's process id, for its peak memory")
    p.add_argument("--resolutions", default="256,512")
    p.add_argument("--vectors", default="1,8")
    p.add_argument("--steps", default="3,8", help="A,B: the two step counts whose time difference is measured")
    args = p.parse_args(argv)
    a, b = (int(x) for x in args.steps.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-webui-ti-") as tmp:
        for res in (int(x) for x in args.resolutions.split(",")):
            data = _dataset(Path(tmp), res)
            for vec in (int(x) for x in args.vectors.split(",")):
                # A fresh embedding per call: the WebUI continues an embedding from its saved step, and its database
                # may still hold the previous call's object for a name that was just re-created.
                name = f"zqbench{res}v{vec}"
                _train(args, name + "w", vec, data, Path(tmp) / "logs", res, 1)  # warm-up: first-call costs stay out
                ta, _ = _train(args, name + "a", vec, data, Path(tmp) / "logs", res, a)
                tb, peak = _train(args, name + "b", vec, data, Path(tmp) / "logs", res, b)
                rows.append((f"WebUI TI {vec} vec {res}²", (tb - ta) / (b - a), ta, tb, peak))
                print(f"{rows[-1][0]}: {rows[-1][1]:.2f} s/step ({a} steps {ta:.1f}s, {b} steps {tb:.1f}s), "
                      f"peak RSS {peak if peak is None else round(peak, 2)} GiB", file=sys.stderr, flush=True)
    print("configuration              s/step  peak RSS GiB (whole WebUI process)")
    for label, sps, _, _, peak in rows:
        print(f"{label:<26} {sps:6.2f}  {'-' if peak is None else f'{peak:.2f}'}")
    print("The embeddings zqbench* were created in the WebUI's embeddings folder; delete them when done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
