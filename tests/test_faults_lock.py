"""One run per output name: a second run on the same (folder, name) is refused before its model loads, naming the
first run's process; a lock left by a killed process is taken over with a message; the lock ends with its run."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from helpers import ROOT, Recorder, make_bundle, make_images, run_cli, tiny_config, read_stderr_until

from lib_train.train.lock import OutputLocked, holder, lock_path, output_lock
from lib_train.train.lora_trainer import prepare_data, train_lora

FAST = ["--resolution", "64", "--min-bucket", "64", "--max-bucket", "128", "--rank", "2"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")




def test_a_second_command_line_run_on_the_same_name_is_refused_naming_the_first(tmp_path, tiny_checkpoint, capsys,
                                                                                monkeypatch):
    make_images(tmp_path / "data" / "1_x", n=2)
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "data"), "--output", str(out), "--name",
            "case", "--epochs", "50", *FAST]
    first = subprocess.Popen([sys.executable, "-m", "lib_train", "lora", *args], env=ENV, stderr=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        read_stderr_until(first, r"\b1/100\b")  # it trains
        import lib_train.models.load as load

        monkeypatch.setattr(load, "load_bundle", lambda *a, **k: pytest.fail("loaded before the lock was checked"))
        code, text = run_cli("lora", args, capsys)
        assert code == 2, text
        error = text.strip().splitlines()[-1]
        assert error.startswith(f"error: Another training run is writing 'case' in {out}: process {first.pid} on "
                                f"{socket.gethostname()} (python -m lib_train lora, started "), error
        assert error.endswith("Wait for it to end or stop it, or choose another output name. (Its lock file is "
                              ".case.lock; it goes away with that process.)"), error
        # a library caller (the WebUI's path) is refused the same way
        cfg = tiny_config(tmp_path, output__name="case", output__overwrite=True)
        with pytest.raises(OutputLocked, match=f"process {first.pid} on"):
            train_lora(cfg, make_bundle("sd1"), prepare_data(cfg))
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143
    assert holder(out, "case") is None and not lock_path(out, "case").exists()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_message(tmp_path):
    make_images(tmp_path / "data" / "1_x", n=1)
    out = tmp_path / "out"
    out.mkdir()
    code = ("import os, signal, sys; from lib_train.train.lock import output_lock\n"
            f"with output_lock({str(out)!r}, 'tiny', what='a test holder'):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    assert killed.wait(timeout=120) == -signal.SIGKILL
    assert lock_path(out, "tiny").is_file(), "the killed holder should have left its lock file"
    assert holder(out, "tiny") is None
    rec = Recorder()
    result = train_lora(tiny_config(tmp_path), make_bundle("sd1"), prepare_data(tiny_config(tmp_path)), events=rec)
    assert result.status == "finished"
    (note,) = [w for w in rec.warnings if "lock" in w]
    assert re.fullmatch(rf"Took over the lock of 'tiny' in {re.escape(str(out))}: process {killed.pid} "
                        rf"on {re.escape(socket.gethostname())} \(a test holder, started [\d\- :]+\) is no longer "
                        "running.", note), note
    assert not lock_path(out, "tiny").exists()


def test_the_same_thread_may_nest_another_thread_is_refused(tmp_path):
    with output_lock(tmp_path, "n", what="outer") as outer:
        with output_lock(tmp_path, "n", what="inner") as inner:
            assert inner is outer
        assert lock_path(tmp_path, "n").is_file() and holder(tmp_path, "n") == outer
        found = {}

        def other():
            try:
                with output_lock(tmp_path, "n", what="other thread"):
                    found["got"] = True
            except OutputLocked as e:
                found["refused"] = str(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert f"process {os.getpid()} on" in found["refused"] and "got" not in found
    assert not lock_path(tmp_path, "n").exists() and holder(tmp_path, "n") is None
    with output_lock(tmp_path, "n-2", what="x"):  # another name in the same folder is free
        assert holder(tmp_path, "n") is None
