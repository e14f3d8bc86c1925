"""Plain helpers for the tests (``from helpers import ...``; pytest advises against importing ``conftest.py``, which
keeps only fixtures): tiny models, image and caption files, configs, an event recorder, the command line's
bad-input runner, and the import graph of a folder of ``lib_train``.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_train.train.events import Commands, Events  # noqa: E402

# ---- tiny models

_STATE_DICTS: dict[str, dict] = {}


def tiny_state_dict(family: str) -> dict:
    """The seeded random weights of the tiny model of ``family`` (built once per session)."""
    if family not in _STATE_DICTS:
        from lib_train.models.build import build_latent_diffusion, randomize_, tiny_spec

        model = build_latent_diffusion(tiny_spec(family))
        randomize_(model, seed=1234 + (family == "sd2"))
        _STATE_DICTS[family] = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return _STATE_DICTS[family]


def make_tiny_model(family: str = "sd1", parameterization: str = "eps"):
    """A fresh tiny ldm LatentDiffusion with the session's seeded weights."""
    from lib_train.models.build import build_latent_diffusion, tiny_spec

    model = build_latent_diffusion(tiny_spec(family), parameterization)
    model.load_state_dict(tiny_state_dict(family))
    return model


def make_bundle(family: str = "sd1", parameterization: str = "eps", clip_skip: int = 1):
    from lib_train.models.bundle import ModelBundle

    return ModelBundle.from_ldm(make_tiny_model(family, parameterization), family=family,
                                prediction=parameterization, clip_skip=clip_skip, checkpoint_name=f"tiny-{family}")


def state_hash(module) -> str:
    """sha256 over every tensor of a module's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str((v.dtype, tuple(v.shape))).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
                 if v.numel() else b"")
    return h.hexdigest()


def module_flags(module) -> list:
    """Every module's training flag and instance forward, every parameter's requires_grad, and hook counts."""
    out = []
    for name, m in module.named_modules():
        out.append((name, m.training, "forward" in m.__dict__, len(m._forward_hooks), len(m._forward_pre_hooks),
                    len(m._backward_hooks)))
    out += [(name, p.requires_grad, p.grad is None) for name, p in module.named_parameters()]
    return out


def fail_on_predict_call(bundle, n: int) -> None:
    """Make the bundle's UNet call number ``n`` raise ``RuntimeError("boom")`` (an error in the middle of a run)."""
    calls = {"n": 0}
    real_predict = bundle.predict

    def failing_predict(*a):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("boom")
        return real_predict(*a)

    bundle.predict = failing_predict


def interop_spec_json(multiplier: float = 1.0) -> dict:
    """The tiny SD1 architecture in the diffusers workers' ``spec.json`` terms (ldm UNet arguments, CLIPTextConfig,
    VAE ddconfig; see tests/interop/diffusers_worker.py)."""
    from lib_train.models.build import tiny_spec

    s = tiny_spec("sd1")
    u, t, v = s.unet, s.text, s.vae
    return {
        "unet": {"in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
                 "channel_mult": u.channel_mult, "num_res_blocks": u.num_res_blocks,
                 "attention_resolutions": u.attention_resolutions, "num_heads": u.num_heads,
                 "num_head_channels": u.num_head_channels, "context_dim": u.context_dim,
                 "transformer_depth": u.transformer_depth, "use_linear_in_transformer": u.use_linear_in_transformer},
        "text_encoder": {"hidden_size": t.width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                         "intermediate_size": t.intermediate, "vocab_size": t.vocab_size,
                         "max_position_embeddings": t.context_length, "hidden_act": "quick_gelu"},
        "vae": {"ch": v.ch, "ch_mult": v.ch_mult, "num_res_blocks": v.num_res_blocks, "z_channels": v.z_channels},
        "multiplier": multiplier,
    }


# ---- image and caption files


def make_images(folder: Path, n: int = 4, size=(64, 64), captions: bool = True, seed: int = 0,
                prefix: str = "img") -> list[Path]:
    """Random RGB PNGs (with `.txt` captions) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = size
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        p = folder / f"{prefix}{i}.png"
        Image.fromarray(arr).save(p)
        if captions:
            (folder / f"{prefix}{i}.txt").write_text(f"thing, tag{i}, red", encoding="utf-8")
        paths.append(p)
    return paths


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A [height, width, 3] uint8 image with structure (gradients + noise), so it compresses to non-trivial files."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 128.0)], axis=2)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def save_image(path: Path, size: tuple[int, int] = (96, 80), *, seed: int = 0, **save_kwargs) -> Path:
    """Write an RGB image of ``size`` = (width, height); the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient(size[0], size[1], seed)).save(path, **save_kwargs)
    return path


def write_caption(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def truncate(path: Path) -> Path:
    """Cut the file to half its length (a download or copy that stopped midway)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---- configs


def tiny_config(tmp_path: Path, **overrides):
    """A small, fast LoRA config over a 64-px dataset in ``tmp_path/data``."""
    from lib_train.config import TrainConfig

    cfg = TrainConfig()
    cfg.data.train_dir = str(tmp_path / "data")
    cfg.data.resolution = 64
    cfg.data.min_bucket_side = 64
    cfg.data.max_bucket_side = 128
    cfg.network.rank = 4
    cfg.network.alpha = 4.0
    cfg.optim.lr = 1e-3
    cfg.optim.te_lr = 1e-3
    cfg.train.epochs = 1
    cfg.output.output_dir = str(tmp_path / "out")
    cfg.output.name = "tiny"
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg, overrides: dict):
    """Set ``section__field=value`` overrides on a config (``train__epochs=2`` → ``cfg.train.epochs = 2``)."""
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg


# ---- events


class Recorder(Events):
    """Records every event of a run; with ``stop_at``, requests a stop through ``commands`` after that step."""

    def __init__(self, stop_at: int | None = None, commands: Commands | None = None):
        self.statuses, self.steps, self.losses, self.files, self.warnings, self.sampled_sets = [], [], [], [], [], []
        self.stop_at, self.commands = stop_at, commands

    def status(self, text):
        self.statuses.append(text)

    def progress(self, p):
        self.steps.append(p.step)
        self.losses.append(p.loss)
        if self.stop_at is not None and p.step == self.stop_at:
            self.commands.request_stop()

    def saved(self, path, kind):
        self.files.append((kind, path))

    def warning(self, text):
        self.warnings.append(text)

    def sampled(self, paths, step):
        self.sampled_sets.append((step, list(paths)))


# ---- the command line (``python -m lib_train lora|embedding``, run in-process)


def run_cli(command: str, args: Sequence, capsys) -> tuple[int, str]:
    """``python -m lib_train COMMAND ARGS...`` through ``lib_train.cli.main``: (exit code, stdout + stderr)."""
    from lib_train.cli import main

    code = main([command, *[str(a) for a in args]])
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_clear_error(code: int, text: str, needles) -> None:
    """A command line refused bad input the way users should see it: exit code 2, one "error: " message naming
    every ``needle`` (the flag, file or value), no traceback."""
    assert code == 2, text
    assert text.startswith("error: "), text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, (needle, text)


BadInput = tuple[Callable[[Path], object], Sequence[str], Sequence[str]]  # (setup(data dir), extra args, needles)


def run_bad_input(command: str, case: BadInput, tmp_path: Path, checkpoint: Path, capsys) -> Path:
    """One row of a command's bad-input table: ``setup`` fills ``tmp_path/data``; the command runs on it with a
    checkpoint, output ``tmp_path/out``, name "n", 64-px buckets and the row's extra args (``{data}`` stands for the
    data folder), and must refuse with one clear message naming every needle. Returns the output folder."""
    setup, extra, needles = case
    data, out = tmp_path / "data", tmp_path / "out"
    setup(data)
    args = ["--checkpoint", checkpoint, "--data", data, "--output", out, "--name", "n", "--resolution", "64",
            "--min-bucket", "64", "--max-bucket", "128", *[str(a).replace("{data}", str(data)) for a in extra]]
    code, text = run_cli(command, args, capsys)
    assert_clear_error(code, text, needles)
    return out


# ---- import layering

def lib_imports(path: Path, package: str) -> set[str]:
    """The ``lib_train`` modules a file of ``package`` imports anywhere in it (lazy and TYPE_CHECKING imports
    included); ``from X import y`` counts as importing ``X`` and ``X.y``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [f"{module}.{a.name}" for a in node.names]
            found.update(n for n in [module, *names] if n.startswith("lib_train"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lib_train"))
    return found


def import_graph(folder: Path) -> dict[str, set[str]]:
    """Each module under ``folder`` (sub-packages included, ``__init__`` files left out) → the modules under
    ``folder`` it imports."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p
               for p in sorted(folder.rglob("*.py")) if p.stem != "__init__"}
    return {m: {n for n in lib_imports(p, m.rpartition(".")[0]) if n in modules and n != m}
            for m, p in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[str]:
    """The modules of ``graph`` that import themselves through others, sorted ([] when there is no circle)."""
    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(graph[n])
        return seen

    return sorted(m for m in graph if m in reachable(m))


def read_stderr_until(proc, pattern: str, timeout: float = 600) -> str:
    """A child process's stderr as it comes (bytes, so tqdm's '\\r' updates count), up to the first match of
    ``pattern``; fails naming the pattern, the exit code and what came when the stream ends or ``timeout`` passes."""
    import os
    import re
    import select
    import time

    fd, raw = proc.stderr.fileno(), b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, raw.decode(errors="replace")):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        assert chunk, f"no {pattern!r} on stderr (exit code {proc.poll()}):\n{raw.decode(errors='replace')}"
        raw += chunk
    return raw.decode(errors="replace")
