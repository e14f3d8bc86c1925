"""The method registry (lib_train/methods.py) is the one place that knows the methods by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lib_train import methods
from lib_train.config import SECTIONS, default_config, method_default
from lib_train.errors import TrainerError

PACKAGE = Path(__file__).resolve().parents[1] / "lib_train"
BRANCH = re.compile(r'method == |== "lora"|== "embedding"')


def test_no_method_branches_outside_the_registry():
    hits = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}"
            for p in sorted(PACKAGE.rglob("*.py")) if p.name != "methods.py" or p.parent != PACKAGE
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if BRANCH.search(line)]
    assert hits == []


def test_each_method_is_complete():
    assert list(methods.METHODS) == ["lora", "embedding"]
    for name, m in methods.METHODS.items():
        assert m.name == name and m.noun and m.label and m.cli_help.endswith(".")
        assert m.section in SECTIONS and methods.method_of(m.section) is m
        assert all(key.split(".")[0] in SECTIONS for key in m.defaults)
        assert m.extensions[0] == ".safetensors" and m.numbered_by in ("epoch", "step")
        assert callable(m.entry("prepare")) and callable(m.entry("train"))
        assert default_config(name).method == name


def test_method_defaults_live_in_one_place():
    assert method_default("lora", "optim.lr") == 1e-4
    assert method_default("embedding", "optim.lr") == 5e-3
    assert method_default("embedding", "output.save_precision") == "fp32"


def test_unknown_method():
    with pytest.raises(TrainerError, match="unknown method 'dreambooth'"):
        methods.get("dreambooth")
