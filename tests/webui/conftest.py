"""A real AUTOMATIC1111 WebUI for the tests that need one (DESIGN.md §4 tier 5); skipped unless ``SD_WEBUI_DIR`` is set.

Tests that use the ``webui`` fixture talk HTTP to a WebUI server started here, once per session, from the checkout
named by the environment (nothing about this machine is hard-coded):

- ``SD_WEBUI_DIR``: an AUTOMATIC1111 1.10.x checkout whose ``extensions/`` holds this repository (a symlink is fine:
  ``ln -s "$PWD" "$SD_WEBUI_DIR/extensions/sd-webui-trainer"``). Required; without it those tests are skipped.
- ``SD_WEBUI_PYTHON``: the WebUI's Python (default ``$SD_WEBUI_DIR/venv/bin/python``, the WebUI's own venv).
- ``SD_WEBUI_ENV``: extra environment for the server as shell words, e.g.
  ``"HF_HOME=/path/to/hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1"`` for an offline machine.
- ``SD_WEBUI_ARGS``: extra ``launch.py`` arguments, e.g. ``"--ckpt models/Stable-diffusion/random-sd15.safetensors"``
  to pick the checkpoint (an SD1.x checkpoint; a random-weight one is enough).
- ``SD_WEBUI_TIMEOUT``: seconds to wait for startup and the model load (default 900).

The server runs on the CPU (``--use-cpu all --no-half --precision full``, as the WebUI's own CI), on a free local
port, with the API on and protected by a generated ``--api-auth`` pair, ``--lora-dir`` and ``--embeddings-dir`` in a
temporary folder (so test files never land in the user's folders) and ``--skip-prepare-environment`` (nothing is installed or
downloaded). Its log is kept in the session's temporary folder and printed in failure messages.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LARGE_BODY = 1 << 20  # request bodies over this (the API's limit) are sent headers first (WebuiServer._send_large)
EARLY_ANSWER_WAIT = 30.0  # seconds a large body waits for the server's answer to its headers before it is sent
SERVER_FLAGS = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check", "--no-half",
                "--use-cpu", "all", "--precision", "full", "--api", "--do-not-download-clip",
                "--no-download-sd-model"]


@dataclass
class Response:
    status: int
    body: Any  # parsed JSON, or the text when it is not JSON


@dataclass
class WebUI:
    """A running WebUI server: HTTP helpers (authenticated by default) and what the tests need to know about it."""

    url: str
    user: str
    password: str
    lora_dir: Path
    log: Path
    process: subprocess.Popen
    embeddings_dir: Path | None = None  # the server's --embeddings-dir (a temporary folder)

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None, auth: bool = True,
                timeout: float = 900) -> Response:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if auth:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        if data is not None and len(data) > LARGE_BODY:
            status, text = self._send_large(method, path, data, dict(req.header_items()), timeout)
        else:
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    status, text = r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read().decode()
        try:
            return Response(status, json.loads(text))
        except ValueError:
            return Response(status, text)

    def _send_large(self, method: str, path: str, data: bytes, headers: dict[str, str],
                    timeout: float) -> tuple[int, str]:
        """Send a body over :data:`LARGE_BODY` bytes the way a client that honours an early answer does: the headers
        first, then — unless the server has already answered (a 413 from the declared length, which it sends without
        reading the body and then closes) — the body. Writing into the closed connection would fail with a broken
        pipe, or a reset that can take the answer with it, depending on timing."""
        host, port = self.url.split("//", 1)[1].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.putrequest(method, path)
            for name, value in {**headers, "Content-Length": str(len(data))}.items():
                conn.putheader(name, value)
            conn.endheaders()
            answered, _, _ = select.select([conn.sock], [], [], EARLY_ANSWER_WAIT)
            if not answered:
                conn.send(data)
            r = conn.getresponse()
            return r.status, r.read().decode()
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Any:
        return self._ok(self.request("GET", path, **kw), path)

    def post(self, path: str, body: Any = None, **kw) -> Any:
        return self._ok(self.request("POST", path, body, **kw), path)

    def _ok(self, r: Response, path: str) -> Any:
        assert r.status == 200, f"{path} answered {r.status}: {r.body}\n{self.log_tail()}"
        return r.body

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        kept = [ln for ln in self.log_text().splitlines() if not ln.startswith("WARNING: Location")]
        return "---- WebUI log (tail) ----\n" + "\n".join(kept[-lines:])

    def wait_job(self, job_id: str, *, until=lambda s: s["state"] not in ("queued", "running"),
                 timeout: float = 900) -> dict:
        """Poll ``/trainer/v1/jobs/{id}`` until ``until(status)``; returns that status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.get(f"/trainer/v1/jobs/{job_id}")
            if until(status):
                return status
            assert time.monotonic() < deadline, f"job {job_id} still {status}\n{self.log_tail()}"
            assert self.process.poll() is None, f"the WebUI exited ({self.process.returncode})\n{self.log_tail()}"
            time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extension_installed(webui_dir: Path) -> bool:
    ext = webui_dir / "extensions"
    return ext.is_dir() and any(p.resolve() == REPO for p in ext.iterdir() if p.is_dir())


class _PortTaken(Exception):
    """The free port found was taken by another process before gradio bound it."""


def _wait_for_log(log: Path, needle: str, process: subprocess.Popen, deadline: float) -> None:
    while needle not in (text := log.read_text(encoding="utf-8", errors="replace")):
        if "Stable diffusion model failed to load" in text:
            pytest.fail("the WebUI could not load its checkpoint (pick one with SD_WEBUI_ARGS='--ckpt ...'):\n"
                        + text[-6000:])
        if process.poll() is not None and "Cannot find empty port" in text:
            raise _PortTaken()
        if process.poll() is not None:
            pytest.fail(f"the WebUI exited ({process.returncode}) before '{needle}':\n"
                        + log.read_text(errors="replace")[-6000:])
        if time.monotonic() > deadline:
            pytest.fail(f"no '{needle}' in the WebUI log in time:\n" + log.read_text(errors="replace")[-6000:])
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def webui(tmp_path_factory) -> WebUI:
    root = os.environ.get("SD_WEBUI_DIR")
    if not root:
        pytest.skip("SD_WEBUI_DIR is not set (see tests/webui/conftest.py to run the real-WebUI tests)")
    webui_dir = Path(root).resolve()
    if not (webui_dir / "launch.py").is_file():
        pytest.fail(f"SD_WEBUI_DIR={root} has no launch.py; point it at an AUTOMATIC1111 checkout")
    if not _extension_installed(webui_dir):
        pytest.fail(f"this repository is not in {webui_dir / 'extensions'}; link it: "
                    f"ln -s {REPO} {webui_dir / 'extensions' / 'sd-webui-trainer'}")
    python = os.environ.get("SD_WEBUI_PYTHON") or str(webui_dir / "venv" / "bin" / "python")
    if not Path(python).is_file():
        pytest.fail(f"no WebUI Python at {python}; set SD_WEBUI_PYTHON to the WebUI venv's python")

    tmp = tmp_path_factory.mktemp("webui")
    lora_dir, embeddings_dir, log = tmp / "Lora", tmp / "embeddings", tmp / "webui.log"
    embeddings_dir.mkdir()
    user, password = "trainer-tests", secrets.token_hex(8)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1"}
    env.update(dict(word.split("=", 1) for word in shlex.split(os.environ.get("SD_WEBUI_ENV", ""))))
    timeout = float(os.environ.get("SD_WEBUI_TIMEOUT", "900"))
    deadline = time.monotonic() + timeout
    for attempt in range(3):  # a port found free can be taken by another process before gradio binds it
        port = _free_port()
        args = [python, "launch.py", *SERVER_FLAGS, "--port", str(port), "--lora-dir", str(lora_dir),
                "--embeddings-dir", str(embeddings_dir),
                "--api-auth", f"{user}:{password}", *shlex.split(os.environ.get("SD_WEBUI_ARGS", ""))]
        with open(log, "wb") as out:
            process = subprocess.Popen(args, cwd=webui_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            # No request before "Startup time:": one in that window kills the WebUI's startup (WEBUI.md §8b).
            _wait_for_log(log, "Startup time:", process, deadline)
            break
        except _PortTaken:
            _stop(process)
            if attempt == 2:
                pytest.fail("the WebUI found no free port three times:\n" + log.read_text(errors="replace")[-3000:])
        except BaseException:
            _stop(process)
            raise
    try:
        _wait_for_log(log, "Model loaded in", process, deadline)
        yield WebUI(f"http://127.0.0.1:{port}", user, password, lora_dir, log, process, embeddings_dir)
    finally:
        _stop(process)
        print(f"WebUI log: {log}", file=sys.stderr)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Two 64×64 images with captions in a ``2_thing`` repeat folder (4 samples per epoch)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("dataset")
    folder = root / "2_thing"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"thing, tag{i}, red", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def lora_config(dataset):
    """``lora_config(name, max_steps, **sections)``: a LoRA config over :func:`dataset` at 64 px, rank 4, with a high
    learning rate (so a few steps visibly change images); ``sections`` update it."""
    return lambda name, max_steps, **sections: _lora_config(dataset, name, max_steps, sections)


def _lora_config(dataset: Path, name: str, max_steps: int, sections: dict) -> dict:
    cfg = {"data": {"train_dir": str(dataset), "resolution": 64, "min_bucket_side": 64, "max_bucket_side": 128},
           "network": {"rank": 4, "alpha": 4},
           "optim": {"lr": 0.01, "te_lr": 0.001},
           "train": {"max_steps": max_steps},
           "output": {"name": name, "trigger_words": "thing"}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg
