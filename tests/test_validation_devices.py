"""Issue 12: ``--device`` checked against this machine's choices before anything loads, and a CUDA
out-of-memory error reported with its numbers and the changes that apply to the run."""

from __future__ import annotations

import pytest
import torch

from lib_train import devices
from lib_train.config import default_config
from lib_train.errors import TrainerError
from lib_train.train.oom import is_out_of_memory, out_of_memory_message, suggestions


@pytest.fixture
def gpus(monkeypatch):
    def set_machine(count: int, mps: bool = False):
        monkeypatch.setattr(devices, "_cuda_count", lambda: count)
        monkeypatch.setattr(devices, "_mps", lambda: mps)
    return set_machine


def test_a_typo_lists_the_real_choices(gpus):
    gpus(2, mps=False)
    with pytest.raises(TrainerError) as e:
        devices.check_device("gpu")
    msg = str(e.value)
    assert "--device 'gpu' is not a device" in msg and "\n" not in msg
    assert "available here: auto, cpu, cuda, cuda:0, cuda:1." in msg


def test_mps_is_offered_only_where_it_exists(gpus):
    gpus(0, mps=True)
    assert devices.device_choices() == ["auto", "cpu", "mps"]
    assert devices.check_device("mps") == torch.device("mps")
    gpus(0, mps=False)
    with pytest.raises(TrainerError, match="MPS"):
        devices.check_device("mps")


def test_cuda_without_a_gpu_says_what_to_do_in_one_line(gpus):
    gpus(0)
    for text in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(TrainerError) as e:
            devices.check_device(text)
        assert "--device cpu" in str(e.value) and "\n" not in str(e.value)


def test_a_gpu_number_past_the_machine_is_named(gpus):
    gpus(2)
    with pytest.raises(TrainerError, match="has 2 CUDA GPUs .cuda:0 to cuda:1."):
        devices.check_device("cuda:2")
    assert devices.check_device("cuda:1") == torch.device("cuda", 1)
    assert devices.check_device("auto") == torch.device("cuda")
    gpus(0)
    assert devices.check_device("auto") == torch.device("cpu")
    assert devices.check_device(" CPU ") == torch.device("cpu")


def test_the_command_line_refuses_a_bad_device_before_loading(tmp_path, capsys, gpus, monkeypatch):
    from lib_train import cli
    from lib_train.models import load

    gpus(0)
    monkeypatch.setattr(load, "load_bundle", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    for device in ("gpu", "cuda"):
        code = cli.main(["lora", "--device", device, "--checkpoint", str(tmp_path / "none.safetensors"),
                         "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--name", "n"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert err.startswith(f"error: --device {device!r}" if device == "gpu" else "error: --device cuda:")
        assert len(err.strip().splitlines()) == 1


NEW = ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.15 GiB of which "
       "5.06 MiB is free. Process 1234 has 79.14 GiB memory in use.")
OLD = ("CUDA out of memory. Tried to allocate 512.00 MiB (GPU 0; 7.79 GiB total capacity; 6.50 GiB already "
       "allocated; 3.06 MiB free; 6.90 GiB reserved in total by PyTorch)")


@pytest.mark.parametrize("text, asked, free, total", [(NEW, "20.00 MiB", "5.06 MiB", "79.15 GiB"),
                                                      (OLD, "512.00 MiB", "3.06 MiB", "7.79 GiB")])
def test_out_of_memory_names_the_numbers(text, asked, free, total):
    msg = out_of_memory_message(RuntimeError(text), default_config(), "cpu")
    assert f"it asked for {asked}" in msg and f"{free} of {total} was free" in msg
    assert msg.startswith("Out of GPU memory") and "Files saved so far are kept" in msg


def test_out_of_memory_suggests_only_what_applies():
    cfg = default_config()
    cfg.train.batch_size, cfg.data.resolution = 4, 1024
    text = " ".join(suggestions(cfg))
    for needle in ("(--gradient-checkpointing) on", "(--batch-size) 4 → 2", "(--resolution) 1024 → 768",
                   "(--optimizer) AdamW8bit or Adafactor"):
        assert needle in text, needle
    cfg.train.gradient_checkpointing, cfg.train.batch_size, cfg.data.resolution = True, 1, 512
    cfg.optim.optimizer = "AdamW8bit"
    text = " ".join(suggestions(cfg))
    assert "checkpointing" not in text and "batch" not in text and "resolution" not in text
    assert "8-bit" not in text and "close other programs" in text


def test_out_of_memory_is_recognised():
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    assert is_out_of_memory(oom("CUDA out of memory."))
    assert is_out_of_memory(RuntimeError(OLD))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_out_of_memory_mid_run_is_one_message_and_the_model_is_restored(tmp_path):
    from helpers import make_bundle, make_images, module_flags, state_hash, tiny_config

    from lib_train.train.lora_trainer import prepare_data, train_lora

    make_images(tmp_path / "data" / "2_thing", n=3)
    cfg = tiny_config(tmp_path, train__batch_size=2)
    bundle = make_bundle("sd1")
    before = state_hash(bundle.model), module_flags(bundle.model)
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    calls, real_predict = {"n": 0}, bundle.predict

    def predict(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise oom(NEW)
        return real_predict(*a)

    bundle.predict = predict
    with pytest.raises(TrainerError) as e:
        train_lora(cfg, bundle, prepare_data(cfg))
    msg = str(e.value)
    assert msg.startswith("Out of GPU memory (it asked for 20.00 MiB; 5.06 MiB of 79.15 GiB was free)")
    assert "(--batch-size) 2 → 1" in msg and "(--gradient-checkpointing) on" in msg
    assert (state_hash(bundle.model), module_flags(bundle.model)) == before
