"""Learning-rate schedules: hand-computed values per kind, argument errors, LambdaLR resume round trip."""

from __future__ import annotations

import math

import pytest
import torch

from lib_train.errors import TrainerError
from lib_train.train.schedule import SCHEDULERS, lr_factor, make_scheduler


def f(step: int, kind: str, **kw) -> float:
    kw.setdefault("total_steps", 110)
    kw.setdefault("warmup_steps", 10)
    return lr_factor(step, kind=kind, **kw)


def test_scheduler_names():
    assert SCHEDULERS == (
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
    )


@pytest.mark.parametrize("kind", [k for k in SCHEDULERS if k != "constant"])
def test_warmup_is_linear_from_zero(kind):
    assert f(0, kind) == 0.0
    assert f(5, kind) == pytest.approx(0.5)
    assert f(9, kind) == pytest.approx(0.9)
    assert f(10, kind) == pytest.approx(1.0)  # warm-up end: full rate


def test_constant_ignores_warmup():
    assert [f(s, "constant") for s in (0, 5, 10, 60, 110, 500)] == [1.0] * 6


def test_constant_with_warmup_stays_at_one():
    assert f(60, "constant_with_warmup") == 1.0
    assert f(110, "constant_with_warmup") == 1.0


def test_linear():
    # 100 decay steps after 10 warm-up steps
    assert f(35, "linear") == pytest.approx(0.75)
    assert f(60, "linear") == pytest.approx(0.5)
    assert f(110, "linear") == 0.0
    assert f(200, "linear") == 0.0


def test_cosine():
    assert f(35, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # 0.853553
    assert f(60, "cosine") == pytest.approx(0.5)
    assert f(110, "cosine") == pytest.approx(0.0)
    assert f(150, "cosine") == pytest.approx(0.0)


def test_cosine_with_restarts():
    kw = {"num_cycles": 2}
    # two cycles of 50 steps each: 1 -> 0, hard restart to 1, 1 -> 0, then 0
    assert f(10, "cosine_with_restarts", **kw) == pytest.approx(1.0)
    assert f(35, "cosine_with_restarts", **kw) == pytest.approx(0.5)
    assert f(59, "cosine_with_restarts", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.98)))
    assert f(60, "cosine_with_restarts", **kw) == pytest.approx(1.0)  # restart
    assert f(85, "cosine_with_restarts", **kw) == pytest.approx(0.5)
    assert f(110, "cosine_with_restarts", **kw) == 0.0
    # one cycle is the plain cosine
    assert f(35, "cosine_with_restarts") == pytest.approx(f(35, "cosine"))


def test_polynomial():
    kw = {"power": 2.0, "min_factor": 0.1}
    assert f(10, "polynomial", **kw) == pytest.approx(1.0)
    assert f(60, "polynomial", **kw) == pytest.approx(0.1 + 0.9 * 0.25)  # 0.325
    assert f(110, "polynomial", **kw) == pytest.approx(0.1)
    assert f(300, "polynomial", **kw) == pytest.approx(0.1)
    # power 1, floor 0 is linear
    assert f(35, "polynomial") == pytest.approx(f(35, "linear"))


def test_min_factor_floor_applies_to_decaying_kinds():
    assert f(60, "cosine", min_factor=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert f(110, "linear", min_factor=0.2) == pytest.approx(0.2)


def test_no_warmup_starts_at_full_rate():
    assert lr_factor(0, total_steps=100, kind="cosine") == 1.0
    assert lr_factor(50, total_steps=100, kind="linear") == pytest.approx(0.5)


def test_warmup_equal_to_total_steps_is_all_warmup():
    # the trained steps are 0..99: every one of them is in the warm-up
    values = [lr_factor(s, total_steps=100, warmup_steps=100, kind="linear") for s in range(100)]
    assert values == pytest.approx([s / 100 for s in range(100)])


def test_warmup_longer_than_training_is_an_error():
    with pytest.raises(TrainerError, match=r"Warm-up steps \(200\) exceed .* \(100\)"):
        lr_factor(0, total_steps=100, warmup_steps=200, kind="cosine")


def test_unknown_kind_lists_names():
    with pytest.raises(TrainerError) as err:
        lr_factor(0, total_steps=10, kind="cosine_annealing")
    assert "'cosine_annealing'" in str(err.value)
    for name in SCHEDULERS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [{"total_steps": 0}, {"warmup_steps": -1}, {"num_cycles": 0}, {"power": 0.0}, {"min_factor": 1.5}],
)
def test_bad_arguments(bad):
    kw = {"total_steps": 10, "kind": "polynomial", **bad}
    with pytest.raises(TrainerError):
        lr_factor(0, **kw)


def test_make_scheduler_checks_arguments_up_front():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(TrainerError):
        make_scheduler(opt, total_steps=5, warmup_steps=6, kind="linear")


def _optimizer(lr: float) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.ones(3))
    return torch.optim.SGD([{"params": [p]}, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr / 2}], lr=lr)


def test_lambda_lr_follows_factor():
    opt = _optimizer(1.0)
    sched = make_scheduler(opt, total_steps=20, warmup_steps=4, kind="cosine")
    for step in range(20):
        expected = lr_factor(step, total_steps=20, warmup_steps=4, kind="cosine")
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_lambda_lr_state_round_trip():
    kw = {"total_steps": 30, "warmup_steps": 3, "kind": "cosine_with_restarts", "num_cycles": 2, "min_factor": 0.05}
    opt = _optimizer(2e-4)
    sched = make_scheduler(opt, **kw)
    for _ in range(5):
        opt.step()
        sched.step()
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    opt2 = _optimizer(2e-4)
    sched2 = make_scheduler(opt2, **kw)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.last_epoch == 5
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for _ in range(10):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4 * lr_factor(15, **kw))
