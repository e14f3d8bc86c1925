"""The speed switches of issue 13 (lib_train/train/speed.py): which are on where (the decision, pure), and that each
one trains what the run without it trains and leaves the model exactly as it was (on the CPU: channels-last and
fused AdamW work on CPU tensors too; torch.compile with the "aot_eager" backend stands in for inductor, which would
need minutes of C++ compiling here)."""

from __future__ import annotations

import pytest
import torch
from helpers import Recorder, make_bundle, make_images, make_tiny_model, state_hash, tiny_config

from lib_train.config import validate
from lib_train.errors import ConfigError
from lib_train.network.kohya_file import read_lora_file
from lib_train.train import speed
from lib_train.train.checkpointing import GradientCheckpointing
from lib_train.train.lora_trainer import prepare_data, train_lora
from lib_train.train.optim import build_optimizer
from lib_train.train.speed import ChannelsLast, RegionalCompile, compile_problem, plan_speed


def _cfg(**switches):
    from lib_train.config import TrainConfig

    cfg = TrainConfig()
    for key, value in switches.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _no_problem(device_type):
    return None


# ------------------------------------------------------------------------------------------------- decisions

def test_auto_is_on_only_where_it_wins():
    cpu = plan_speed(_cfg(), "cpu", latents_cached=True, optimizer="AdamW", problem=_no_problem,
                     fused_problem=lambda d: None)
    assert (cpu.compile, cpu.channels_last, cpu.fused, cpu.prefetch) == (False, False, True, False)
    assert cpu.summary() == "fused" and cpu.notices == ()
    old_torch = plan_speed(_cfg(), "cpu", latents_cached=True, optimizer="AdamW", problem=_no_problem,
                           fused_problem=lambda d: "torch 2.1 has no fused AdamW for cpu")
    assert not old_torch.fused and old_torch.notices == () and old_torch.summary() == "none"
    cuda = plan_speed(_cfg(), "cuda", latents_cached=True, optimizer="AdamW", problem=_no_problem,
                      fused_problem=lambda d: None)
    assert (cuda.compile, cuda.channels_last, cuda.fused, cuda.prefetch) == (False, True, True, False)
    assert cuda.summary() == "channels_last, fused"
    assert plan_speed(_cfg(), "cuda", latents_cached=False, optimizer="AdamW", problem=_no_problem).prefetch
    assert not plan_speed(_cfg(), "cpu", latents_cached=False, optimizer="AdamW", problem=_no_problem).prefetch
    assert plan_speed(_cfg(data__prefetch="on"), "cpu", latents_cached=False, optimizer="AdamW").prefetch
    assert not plan_speed(_cfg(data__prefetch="off"), "cuda", latents_cached=False, optimizer="AdamW").prefetch
    # prefetch has nothing to do when every latent is cached, even when asked for
    assert not plan_speed(_cfg(data__prefetch="on"), "cpu", latents_cached=True, optimizer="AdamW").prefetch


def test_on_and_off_override_auto_and_say_why_when_impossible():
    cfg = _cfg(train__compile="on", train__channels_last="on", optim__fused="on")
    plan = plan_speed(cfg, "cpu", latents_cached=True, optimizer="AdamW", problem=_no_problem,
                      fused_problem=lambda d: None)
    assert (plan.compile, plan.channels_last, plan.fused) == (True, True, True) and plan.notices == ()
    plan = plan_speed(cfg, "cpu", latents_cached=True, optimizer="Lion",
                      problem=lambda d: "torch.compile needs a C++ compiler for the CPU")
    assert not plan.compile and not plan.fused
    assert plan.notices == ("train.compile (--compile) is off for this run: torch.compile needs a C++ compiler for "
                            "the CPU.", "optim.fused (--fused-optimizer) applies to AdamW only; Lion runs unfused.")
    plan = plan_speed(cfg, "cpu", latents_cached=True, optimizer="AdamW", problem=_no_problem,
                      fused_problem=lambda d: "torch 2.1 has no fused AdamW for cpu")
    assert not plan.fused and plan.notices == ("optim.fused (--fused-optimizer) is off for this run: torch 2.1 has "
                                               "no fused AdamW for cpu.",)
    # auto never warns: it simply stays off where the host cannot
    quiet = plan_speed(_cfg(), "cuda", latents_cached=True, optimizer="AdamW", problem=lambda d: "no triton",
                       fused_problem=lambda d: "no")
    assert quiet.notices == () and not quiet.fused
    off = plan_speed(_cfg(train__channels_last="off", optim__fused="off"), "cuda", latents_cached=True,
                     optimizer="AdamW", fused_problem=lambda d: None)
    assert not off.channels_last and not off.fused


def test_where_compile_cannot_run():
    assert "MPS" in compile_problem("mps", dynamo_ok=True)
    why = compile_problem("cuda", platform="win32", has_triton=False, dynamo_ok=True)
    assert "triton" in why and "Windows" in why
    assert compile_problem("cuda", platform="linux", has_triton=True, dynamo_ok=True) is None
    assert "C++ compiler" in compile_problem("cpu", compiler=None, dynamo_ok=True)
    assert compile_problem("cpu", compiler="/usr/bin/g++", dynamo_ok=True) is None
    assert "cannot compile under Python" in compile_problem("cuda", has_triton=True, dynamo_ok=False)
    for why in (compile_problem("mps", dynamo_ok=True), compile_problem("cpu", compiler=None, dynamo_ok=True)):
        assert "\n" not in why  # one line


def test_a_bad_switch_value_is_named(tmp_path):
    make_images(tmp_path / "data" / "1_a", n=1)
    cfg = tiny_config(tmp_path, train__compile="yes", optim__fused="maybe")
    with pytest.raises(ConfigError) as info:
        validate(cfg, headless=False)
    text = str(info.value)
    assert "train.compile (--compile)" in text and "optim.fused (--fused-optimizer)" in text
    assert "must be one of auto, on, off" in text


# --------------------------------------------------------------------------------------------- channels-last

def test_channels_last_converts_frozen_convolutions_and_restores_their_strides():
    unet = make_tiny_model("sd1").model.diffusion_model.requires_grad_(False)
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    trained = torch.nn.Conv2d(4, 4, 3)  # requires_grad: a LoRA's conv is left alone
    unet.add_module("trained_probe", trained)
    before = [(w, w.stride(), w.detach().clone()) for w in convs]
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g), torch.tensor([500])
    with torch.no_grad():
        ref = unet(x, t, context=ctx)
    cl = ChannelsLast(unet)
    assert cl.count == sum(1 for w in convs if w.shape[-1] > 1)
    changed = [w for w in convs if w.shape[-1] > 1]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in changed)
    assert trained.weight.is_contiguous()
    with torch.no_grad():
        out = unet(x, t, context=ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    cl.restore()
    for w, stride, value in before:
        assert w.stride() == stride and w.is_contiguous() and torch.equal(w, value)
    assert [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)][:len(convs)] == convs  # same objects


# --------------------------------------------------------------------------------------------- regional compile

def test_regional_compile_wraps_each_block_and_removes_exactly(monkeypatch):
    unet = make_tiny_model("sd1").model.diffusion_model
    blocks = [m for m in unet.modules() if type(m).__name__ in speed.COMPILE_CLASSES]
    ckpt = GradientCheckpointing(unet)  # an earlier instance forward (checkpointing) must come back as it was
    before = [(m, dict(vars(m)).get("forward")) for m in blocks]
    compiled = RegionalCompile(unet, notice=lambda text: None, backend="aot_eager")
    assert compiled.count == len(blocks) > 0
    assert all(vars(m)["forward"] is not f for m, f in before)
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g), torch.tensor([500])
    out = unet(x, t, context=ctx)
    compiled.remove()
    assert [(m, dict(vars(m)).get("forward")) for m in blocks] == before
    ref = unet(x, t, context=ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    ckpt.remove()
    assert not any("forward" in vars(m) for m in unet.modules() if type(m).__name__ == "ResBlock")


def test_a_failing_compile_falls_back_with_one_notice_and_no_traceback():
    unet = make_tiny_model("sd1").model.diffusion_model

    def broken_backend(gm, inputs):
        raise RuntimeError("no compiler here")

    notices = []
    compiled = RegionalCompile(unet, notice=notices.append, backend=broken_backend)
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g), torch.tensor([500])
    with torch.no_grad():
        out = unet(x, t, context=ctx)
        again = unet(x, t, context=ctx)
    compiled.remove()
    assert len(notices) == 1 and "torch.compile failed and is off for the rest of this run" in notices[0]
    assert "\n" not in notices[0] and "no compiler here" in notices[0]
    with torch.no_grad():
        torch.testing.assert_close(out, unet(x, t, context=ctx))
    torch.testing.assert_close(again, out)


# ------------------------------------------------------------------------------------------------ fused AdamW

def test_fused_is_passed_to_adamw_only_and_the_users_args_win():
    p = torch.nn.Parameter(torch.zeros(3))
    assert build_optimizer("AdamW", [p], 1e-3, {}, fused=True).param_groups[0]["fused"] is True
    assert not build_optimizer("AdamW", [p], 1e-3, {}).param_groups[0]["fused"]
    assert build_optimizer("AdamW", [p], 1e-3, {"fused": False}, fused=True).param_groups[0]["fused"] is False
    adafactor = build_optimizer("Adafactor", [p], 1e-3, {}, fused=True)  # takes no fused: not given one
    assert "fused" not in adafactor.param_groups[0]


# ------------------------------------------------------------------------------------- whole runs on the CPU

def _run(cfg, bundle, **kw):
    return train_lora(cfg, bundle, prepare_data(cfg), **kw)


def test_every_switch_on_trains_what_every_switch_off_trains_and_restores_the_model(tmp_path, monkeypatch):
    """compile (aot_eager), channels-last, fused AdamW and prefetch (latents uncached) all on: the same LoRA as with
    all off (to float tolerance: other kernels), the model bit-identical afterwards, no wrapper left."""
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(speed, "compile_problem", lambda device_type: None)
    make_images(tmp_path / "data" / "2_thing", n=2)
    results = {}
    for mode in ("off", "on"):
        cfg = tiny_config(tmp_path, output__name=f"all{mode}", output__save_precision="fp32", train__epochs=2,
                          data__cache_latents="off", data__prefetch=mode, train__compile=mode,
                          train__channels_last=mode, optim__fused=mode, data__flip=True)
        bundle = make_bundle("sd1")
        before = state_hash(bundle.model)
        strides = [p.stride() for p in bundle.model.parameters()]
        rec = Recorder()
        result = _run(cfg, bundle, events=rec)
        assert result.status == "finished" and rec.warnings == []
        assert state_hash(bundle.model) == before and [p.stride() for p in bundle.model.parameters()] == strides
        assert not any("forward" in vars(m) for m in bundle.unet.modules()
                       if type(m).__name__ in speed.COMPILE_CLASSES)
        summary = next(s for s in rec.statuses if s.startswith("Speed switches on: "))
        assert summary == ("Speed switches on: none" if mode == "off" else
                           "Speed switches on: compile, channels_last, fused, prefetch")
        results[mode] = read_lora_file(result.final_file)[0]
    for k in results["off"]:
        torch.testing.assert_close(results["on"][k], results["off"][k], rtol=1e-3, atol=5e-5)


def test_compile_asked_for_where_it_cannot_run_is_one_notice(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "compile_problem", lambda device_type: "torch.compile needs a C++ compiler for the "
                                                                      "CPU (g++, clang++ or MSVC's cl), and none was "
                                                                      "found")
    make_images(tmp_path / "data" / "1_thing", n=1)
    cfg = tiny_config(tmp_path, train__compile="on", train__max_steps=1)
    rec = Recorder()
    assert _run(cfg, make_bundle("sd1"), events=rec).status == "finished"
    assert rec.warnings == ["train.compile (--compile) is off for this run: torch.compile needs a C++ compiler for "
                            "the CPU (g++, clang++ or MSVC's cl), and none was found."]
