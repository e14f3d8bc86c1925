"""Optimizer registry: each optimizer trains and resumes on CPU; 8-bit state; args parsing; probe and fallback."""

from __future__ import annotations

import copy
import io
import logging
import sys
import types

import pytest
import torch

from lib_train.errors import TrainerError
from lib_train.train import optim
from lib_train.train.optim import (
    OPTIMIZERS,
    OptimizerSpec,
    build_optimizer,
    get_optimizer_spec,
    parse_optimizer_args,
    probe_optimizer,
    resolve_optimizer,
    validate_optimizer_args,
)

NAMES = list(OPTIMIZERS)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # the first weight has 64·64 = 4096 elements: bitsandbytes keeps 8-bit state for it
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


BATCH = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
TARGET = torch.randn(16, 1, generator=torch.Generator().manual_seed(2))


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    return (model(BATCH) - TARGET).pow(2).mean()


def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    opt.zero_grad()
    loss = loss_of(model)
    loss.backward()
    opt.step()
    return loss.item()


def lr_for(name: str) -> float:
    return 1.0 if OPTIMIZERS[name].adaptive else 1e-2


def test_registry_names_and_packages():
    assert NAMES == ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "DAdaptAdam", "Prodigy", "Adafactor"]
    assert {n for n in NAMES if OPTIMIZERS[n].adaptive} == {"DAdaptAdam", "Prodigy"}
    assert OPTIMIZERS["DAdaptAdam"].package == "dadaptation"
    assert OPTIMIZERS["Lion"].package == "lion-pytorch"
    assert get_optimizer_spec(" adamw8BIT ").name == "AdamW8bit"


def test_unknown_optimizer_lists_names():
    with pytest.raises(TrainerError) as err:
        get_optimizer_spec("SGDNesterov")
    assert "'SGDNesterov'" in str(err.value)
    assert all(name in str(err.value) for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_trains_and_state_round_trips(name):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(name, [{"params": model.parameters()}], lr_for(name), {})
    start = loss_of(model).item()
    for _ in range(3):
        step(model, opt)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    if not OPTIMIZERS[name].adaptive:  # adaptive ones start with a tiny step (d0) by design
        assert loss_of(model).item() < start

    # resume: the state survives torch.save / torch.load(weights_only=True) and gives the identical next step
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(name, [{"params": twin.parameters()}], lr_for(name), {})
    twin_opt.load_state_dict(state)
    step(model, opt)
    step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adamw8bit_keeps_uint8_state_for_large_params():
    model = mlp()
    opt = build_optimizer("AdamW8bit", [{"params": model.parameters()}], 1e-3, {})
    step(model, opt)
    big, small = model[0].weight, model[0].bias
    assert opt.state[big]["state1"].dtype == torch.uint8
    assert opt.state[big]["state2"].dtype == torch.uint8
    assert opt.state[small]["state1"].dtype == torch.float32  # below min_8bit_size (4096)


def test_adafactor_defaults_allow_an_explicit_lr():
    model = mlp()
    opt = build_optimizer("adafactor", model.parameters(), 1e-3, {})
    assert opt.param_groups[0]["relative_step"] is False and opt.param_groups[0]["lr"] == 1e-3
    with pytest.raises(TrainerError, match="Adafactor rejected its settings: Cannot combine manual `lr`"):
        build_optimizer("Adafactor", mlp().parameters(), 1e-3, {"relative_step": True})


def test_user_args_reach_the_optimizer():
    model = mlp()
    args = parse_optimizer_args("weight_decay=0.2 betas=0.8,0.95 decouple=True use_bias_correction=True")
    opt = build_optimizer("Prodigy", [{"params": model.parameters()}], 1.0, args)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.2 and group["betas"] == (0.8, 0.95)
    assert group["decouple"] is True and group["use_bias_correction"] is True


def test_parse_optimizer_args_types():
    args = parse_optimizer_args(
        "weight_decay=0.01 betas = 0.9, 0.99 decouple=True safeguard_warmup=false d0=1e-6 "
        "growth_rate=inf slice_p=11 beta3=None mode=fast quoted='x'"
    )
    assert args == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.99),
        "decouple": True,
        "safeguard_warmup": False,
        "d0": 1e-6,
        "growth_rate": float("inf"),
        "slice_p": 11,
        "beta3": None,
        "mode": "fast",
        "quoted": "x",
    }
    assert type(args["slice_p"]) is int and type(args["weight_decay"]) is float
    assert parse_optimizer_args("   ") == {}


@pytest.mark.parametrize(
    "text,match",
    [
        ("decouple", "not a key=value pair"),
        ("=1", "not a key=value pair"),
        ("a= ", "not a key=value pair"),
        ("eps=1e-8 eps=1e-6", "given twice"),
        ("betas=0.9,fast", "numbers only"),
    ],
)
def test_parse_optimizer_args_errors(text, match):
    with pytest.raises(TrainerError, match=match):
        parse_optimizer_args(text)


def test_validate_unknown_keys_are_named_with_the_accepted_ones():
    with pytest.raises(TrainerError) as err:
        validate_optimizer_args("dadaptadam", {"decouple": True, "foo": 1, "bar": 2})
    message = str(err.value)
    assert "DAdaptAdam" in message and "unknown argument(s) foo, bar" in message
    assert "accepts: betas, eps, weight_decay" in message and "use_bias_correction" in message
    assert "decouple," in message  # listed as accepted, not reported


def test_validate_types_and_reserved_keys():
    with pytest.raises(TrainerError) as err:
        validate_optimizer_args("AdamW", {"betas": 0.9, "amsgrad": 1, "eps": "small", "lr": 0.1})
    message = str(err.value)
    assert "betas expects 2 comma-separated numbers (e.g. betas=0.9,0.999)" in message
    assert "amsgrad expects True or False" in message
    assert "eps expects a number" in message
    assert "lr cannot be set here: set it with the learning-rate setting" in message
    validate_optimizer_args("AdamW", {"betas": (0.9, 0.99), "weight_decay": 0, "amsgrad": False})


def test_build_rejects_unknown_args():
    with pytest.raises(TrainerError, match="unknown argument"):
        build_optimizer("Lion", mlp().parameters(), 1e-4, {"decouple": True})


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dadaptation", None)  # makes `import dadaptation` fail
    with pytest.raises(TrainerError) as err:
        build_optimizer("DAdaptAdam", mlp().parameters(), 1.0, {})
    message = str(err.value)
    assert "'dadaptation', which is not installed" in message and "pip install dadaptation" in message
    assert "restart" in message
    assert "pip install dadaptation" in probe_optimizer("DAdaptAdam", {}, "cpu")


def test_broken_dependency_is_not_reported_as_missing_package(monkeypatch):
    def fail(name):
        raise ModuleNotFoundError("No module named 'packaging'", name="packaging")

    monkeypatch.setattr(optim.importlib, "import_module", fail)
    with pytest.raises(TrainerError, match=r"'bitsandbytes' is installed but cannot be imported .*packaging"):
        get_optimizer_spec("AdamW8bit").load_class()


class _FailingOptimizer(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("All input tensors need to be on the same GPU")


@pytest.fixture
def failing(monkeypatch):
    module = types.ModuleType("fake_optim_lib")
    module.FailingOptimizer = _FailingOptimizer
    monkeypatch.setitem(sys.modules, "fake_optim_lib", module)
    spec = OptimizerSpec("Failing8bit", "fake_optim_lib", "FailingOptimizer", "fake-optim-lib")
    monkeypatch.setitem(OPTIMIZERS, spec.name, spec)
    return spec.name


def test_probe_reports_a_failing_step(failing):
    reason = probe_optimizer(failing, {}, "cpu")
    assert reason == (
        "Failing8bit cannot run on cpu (torch.float32): RuntimeError: All input tensors need to be on the same GPU"
    )


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Prodigy"])
def test_probe_passes_for_working_optimizers(name):
    assert probe_optimizer(name, {}, "cpu") is None


def test_resolve_keeps_a_working_optimizer():
    assert resolve_optimizer("lion8bit", {}, "cpu", allow_fallback=False) == ("Lion8bit", None)


def test_resolve_falls_back_only_when_allowed(failing):
    name, note = resolve_optimizer(failing, {}, "cpu", allow_fallback=True)
    assert name == "AdamW"
    assert "All input tensors need to be on the same GPU" in note and "Using AdamW instead" in note
    with pytest.raises(TrainerError, match="same GPU.*\n.*allow the fallback"):
        resolve_optimizer(failing, {}, "cpu", allow_fallback=False)


def test_low_lr_warning_for_adaptive_optimizers(caplog):
    with caplog.at_level(logging.WARNING, logger=optim.__name__):
        build_optimizer("AdamW", mlp().parameters(), 1e-4, {})
        assert not caplog.records
        build_optimizer("Prodigy", [{"params": mlp().parameters(), "lr": 1e-4}], 1.0, {})
    assert len(caplog.records) == 1
    assert "Prodigy" in caplog.text and "0.0001" in caplog.text and "1.0" in caplog.text
