"""The background image prefetch (lib_train/data/prefetch.py) and the loop's one host-device read per step
(issue 13): order, errors and shutdown of the prefetcher; a run with prefetch resumes to exactly the uninterrupted
run's weights; the loop reads one value back from the device per step, however many micro-batches it has."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import Recorder, make_bundle, make_images, tiny_config
from torch.overrides import TorchFunctionMode

from lib_train.data.prefetch import Prefetcher
from lib_train.network.kohya_file import read_lora_file
from lib_train.train import loop
from lib_train.train.events import Commands
from lib_train.train.lora_trainer import prepare_data, train_lora
from lib_train.train.state import load_state

TORCH_DIR = Path(torch.__file__).parent
LIB_DIR = Path(loop.__file__).resolve().parents[1]
DISPATCH_FILES = {str(TORCH_DIR / "overrides.py"), str(TORCH_DIR / "_tensor.py")}


def test_prefetcher_keeps_the_order_and_works_ahead():
    seen = []
    done = threading.Event()

    def load(i):
        seen.append(i)
        if i == 2:
            done.set()
        return i * i

    with Prefetcher(range(6), load, depth=2) as feed:
        it = iter(feed)
        assert next(it) == (0, 0)
        assert done.wait(10)  # items 1 and 2 were loaded while item 0 was in use
        assert list(it) == [(i, i * i) for i in range(1, 6)]
    assert seen == list(range(6))


def test_prefetcher_raises_a_load_error_at_that_items_turn_and_stops():
    def load(i):
        if i == 3:
            raise ValueError("image 3 is broken")
        return i

    feed = Prefetcher(range(10), load, depth=2)
    got = []
    with pytest.raises(ValueError, match="image 3 is broken"):
        for item, _ in feed:
            got.append(item)
    assert got == [0, 1, 2]
    assert not feed._thread.is_alive()


def test_closing_early_stops_the_worker():
    started = threading.Event()

    def items():
        i = 0
        while True:  # an endless source: only close() ends the worker
            started.set()
            yield i
            i += 1

    feed = Prefetcher(items(), lambda i: i, depth=3)
    for item, _ in feed:
        if item == 4:
            break
    assert started.is_set()
    feed.close()
    assert not feed._thread.is_alive()
    with pytest.raises(ValueError):
        Prefetcher([], lambda i: i, depth=0)


@pytest.mark.parametrize("accum", [1, 2])
def test_a_run_with_prefetch_resumes_to_the_uninterrupted_weights(tmp_path, accum):
    make_images(tmp_path / "data" / "3_thing", n=3)
    common = dict(train__epochs=2, optim__grad_accum=accum, output__save_precision="fp32", data__flip=True,
                  data__cache_latents="off", data__shuffle_caption=True, output__save_every_epochs=0)
    ref = train_lora(cfg := tiny_config(tmp_path, output__name="ref", data__prefetch="off", **common),
                     make_bundle("sd1"), prepare_data(cfg))
    ref_tensors, _ = read_lora_file(ref.final_file)
    cfg = tiny_config(tmp_path, output__name="res", data__prefetch="on", **common)
    commands = Commands()
    rec = Recorder(stop_at=3, commands=commands)
    first = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=rec, commands=commands)
    assert first.status == "interrupted" and "Speed switches on: fused, prefetch" in rec.statuses
    assert not [t for t in threading.enumerate() if t.name == "lib_train-prefetch"]  # the worker ended with the run
    resumed = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), resume=load_state(first.state_dir))
    assert resumed.status == "finished" and resumed.step == ref.step
    tensors, _ = read_lora_file(resumed.final_file)
    assert tensors.keys() == ref_tensors.keys()
    for k in tensors:  # prefetch changes when an image is decoded, never what is trained
        assert torch.equal(tensors[k], ref_tensors[k]), k


class _HostReads(TorchFunctionMode):
    """Counts the tensor methods that read a value back to the host (each one a device synchronisation on CUDA)
    when lib_train's own code calls them (torch's AdamW reads its step counter, a CPU tensor unless fused, with
    .item(): no device synchronisation; and the model's code has none)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            caller = sys._getframe(1)
            while caller is not None and caller.f_code.co_filename in DISPATCH_FILES:  # torch's own dispatch
                caller = caller.f_back
            if caller is not None and caller.f_code.co_filename.startswith(str(LIB_DIR)):
                self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("accum", [1, 3])
def test_the_loop_reads_from_the_device_once_per_step(tmp_path, monkeypatch, accum):
    """In the training steps, one read per optimizer step: the step's loss, which is also the finiteness check;
    none per micro-batch. The final save after the last step checks its tensors with one read more."""
    make_images(tmp_path / "data" / "3_thing", n=3)
    cfg = tiny_config(tmp_path, train__epochs=2, optim__grad_accum=accum, output__save_every_epochs=0,
                      output__save_precision="fp32", optim__max_grad_norm=1.0, train__min_snr_gamma=5.0,
                      train__noise_offset=0.05)
    modes = []
    real = loop._step_loop

    def counted(run, optim, position, feed):
        mode = _HostReads()
        modes.append(mode)
        with mode:
            return real(run, optim, position, feed)

    monkeypatch.setattr(loop, "_step_loop", counted)
    rec = Recorder()
    result = train_lora(cfg, make_bundle("sd1"), prepare_data(cfg), events=rec)
    assert result.status == "finished" and result.step >= 2
    assert modes[0].counts == {"item": result.step, "__bool__": 1}, modes[0].counts
    assert all(loss is not None for loss in rec.losses)  # the CPU logs every step
