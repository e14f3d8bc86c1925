"""Stop signals of the command line: SIGTERM (and SIGHUP) stop a real run like the first Ctrl-C — the LoRA and the
resume state saved, how to resume printed, exit 128 + the signal — and the resumed run ends with the weights of an
uninterrupted one; a second signal aborts; a signal while nothing can be saved aborts at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_images, run_cli, read_stderr_until

from lib_train.network.kohya_file import read_lora_file
from lib_train.signals import SignalAbort, StopSignals

FAST = ["--resolution", "64", "--min-bucket", "64", "--max-bucket", "128", "--rank", "4", "--alpha", "4",
        "--save-precision", "fp32"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # one torch thread, as in the tests (conftest)




def _args(tmp_path: Path, checkpoint, name: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
            "--name", name, "--epochs", "6", "--seed", "7", *FAST]


def test_sigterm_saves_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_checkpoint, capsys):
    signame, signum = "SIGTERM", signal.SIGTERM
    make_images(tmp_path / "data" / "1_x", n=2)  # 2 steps an epoch, 12 in all
    code, text = run_cli("lora", _args(tmp_path, tiny_checkpoint, "ref"), capsys)
    assert code == 0, text

    cmd = [sys.executable, "-m", "lib_train", "lora", *_args(tmp_path, tiny_checkpoint, "run")]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        err = read_stderr_until(proc, r"(?s)Training: 12 steps\n.*\b1/12\b")  # the progress bar shows the first step
        proc.send_signal(signum)
        _, rest = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    err += rest.decode(errors="replace")
    assert proc.returncode == 128 + signum, err
    assert f"warning: {signame}: stopping after this step, saving the LoRA and the resume state" in err
    m = re.search(rf"Interrupted by {signame} at step (\d+)/12\.", err)
    assert m and 1 <= int(m.group(1)) < 12, err
    state_dir = tmp_path / "out" / ".run-state"
    assert f"resume with: python -m lib_train lora --resume {state_dir}" in err
    assert "Traceback" not in err
    assert (tmp_path / "out" / f"run-step{int(m.group(1)):08d}.safetensors").is_file()
    assert not (tmp_path / "out" / "run.safetensors").exists() and not (tmp_path / "out" / ".run.lock").exists()

    done = subprocess.run([sys.executable, "-m", "lib_train", "lora", "--resume", str(state_dir)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    ref, _ = read_lora_file(tmp_path / "out" / "ref.safetensors")
    resumed, meta = read_lora_file(tmp_path / "out" / "run.safetensors")
    assert meta["ss_steps"] == "12" and ref.keys() == resumed.keys()
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k


def _deliver(signum: int) -> None:
    """Send ``signum`` to this process and let Python run its handler (it runs in the main thread between
    bytecodes; ``signal.pthread_kill`` to the main thread delivers it before it returns here)."""
    signal.pthread_kill(threading.main_thread().ident, signum)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="no pthread_kill")
@pytest.mark.parametrize("first", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_the_first_signal_asks_to_stop_the_second_aborts(first):
    signum = getattr(signal, first, None)
    if signum is None:
        pytest.skip(f"no {first} here")
    asked = []
    before = signal.getsignal(signum)
    with StopSignals(asked.append) as signals:
        signals.arm()
        _deliver(signum)
        assert asked == [first] and signals.received == signum
        with pytest.raises(SignalAbort) as info:
            _deliver(signal.SIGINT)
        assert info.value.exit_code == 130
    assert signal.getsignal(signum) is before, "the previous handler was not restored"


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="no pthread_kill")
def test_a_signal_before_training_aborts_at_once():
    with StopSignals(lambda name: pytest.fail("nothing can be saved yet")):
        with pytest.raises(SignalAbort) as info:
            _deliver(signal.SIGTERM)
    assert info.value.exit_code == 143 and str(info.value) == "SIGTERM"


def test_no_handlers_outside_the_main_thread():
    seen = {}

    def worker():
        before = signal.getsignal(signal.SIGTERM)
        with StopSignals(lambda name: None):
            seen["during"] = signal.getsignal(signal.SIGTERM)
        seen["before"] = before

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["during"] is seen["before"]


def test_a_signal_while_the_model_loads_aborts_without_output(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """The command line: a SIGTERM during loading ends the command at once, exit 143, lock released."""
    import lib_train.models.load as load

    real = load.load_bundle

    def load_then_signal(*a, **k):
        real(*a, **k)
        _deliver(signal.SIGTERM)
        raise AssertionError("the signal did not abort the load")

    monkeypatch.setattr(load, "load_bundle", load_then_signal)
    make_images(tmp_path / "data" / "1_x", n=1)
    code, text = run_cli("lora", ["--checkpoint", tiny_checkpoint, "--data", tmp_path / "data", "--output",
                                  tmp_path / "out", "--name", "n", *FAST], capsys)
    assert code == 143, text
    assert text.strip().splitlines()[-1] == "Aborted by SIGTERM: nothing more was saved."
    assert not (tmp_path / "out" / ".n.lock").exists()
