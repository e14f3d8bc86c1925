"""``--medvram`` hooks out and back (lib_train/webui/lowvram.py) on the module tree of a real tiny sgm SDXL model,
with the hooks installed by the WebUI's own ``modules/lowvram.py`` (``setup_for_low_vram(model, use_medvram=True)``,
loaded from ``$SD_WEBUI_DIR``; skipped without it). The WebUI modules that file imports (``devices``, ``shared``)
are given as plain namespaces holding only what it reads: the device (the CPU here, so every "move" is CPU → CPU)
and the command-line flags.

The real-WebUI check of the same, with ``--medvram-sdxl``, is tests/webui/test_sdxl_webui.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import module_flags, state_hash

from lib_train.webui.lowvram import put_back, take_out_hooks


@pytest.fixture
def webui_lowvram(monkeypatch):
    """The WebUI's ``modules.lowvram``, imported from its file under ``$SD_WEBUI_DIR``."""
    root = os.environ.get("SD_WEBUI_DIR")
    path = Path(root or "") / "modules" / "lowvram.py"
    if not root or not path.is_file():
        pytest.skip("SD_WEBUI_DIR (a WebUI checkout with modules/lowvram.py) is not set")
    package = types.ModuleType("modules")
    package.__path__ = []
    package.devices = types.SimpleNamespace(device=torch.device("cpu"))
    package.shared = types.SimpleNamespace(cmd_opts=types.SimpleNamespace(lowvram=False, medvram=False,
                                                                          medvram_sdxl=True))
    monkeypatch.setitem(sys.modules, "modules", package)
    spec = importlib.util.spec_from_file_location("modules.lowvram", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "modules.lowvram", module)
    spec.loader.exec_module(module)
    return module


def _hooks(model):
    return [(name, list(m._forward_pre_hooks.items())) for name, m in model.named_modules() if m._forward_pre_hooks]


def test_medvram_hooks_are_taken_out_and_put_back_exactly(webui_lowvram):
    from sdxl_models import tiny_sgm_sdxl

    model = tiny_sgm_sdxl(seed=4)
    webui_lowvram.setup_for_low_vram(model, True)  # what --medvram-sdxl does to an SDXL model
    assert model.lowvram is True
    with torch.no_grad():  # a first call: the WebUI's hook makes the conditioner the module "on the GPU"
        model.conditioner({"txt": ["a cat"], "original_size_as_tuple": torch.tensor([[64, 64]]),
                           "crop_coords_top_left": torch.tensor([[0, 0]]),
                           "target_size_as_tuple": torch.tensor([[64, 64]])})
    assert webui_lowvram.module_in_gpu is model.conditioner
    other = model.model.register_forward_pre_hook(lambda m, args: None)  # someone else's hook stays, in its place
    hooks, flags, weights = _hooks(model), module_flags(model), state_hash(model)
    assert sorted(name for name, _ in hooks) == ["conditioner", "first_stage_model", "model"]
    encode, decode = model.first_stage_model.encode, model.first_stage_model.decode

    state = take_out_hooks(model, webui_lowvram)
    assert state.hook_count == 3 and len(state.methods) == 2
    assert [(name, len(h)) for name, h in _hooks(model)] == [("model", 1)]  # only the foreign hook
    assert "encode" not in model.first_stage_model.__dict__ and "decode" not in model.first_stage_model.__dict__
    assert webui_lowvram.module_in_gpu is None
    x = torch.randn(1, 4, 8, 8)
    adm = model.model.diffusion_model.label_emb[0][0].in_features
    cond = {"crossattn": torch.randn(1, 77, 64), "vector": torch.randn(1, adm)}
    with torch.no_grad():
        model.model(x, torch.tensor([10]), cond)  # a UNet call no longer moves anything
    assert webui_lowvram.module_in_gpu is None

    put_back(state, webui_lowvram)
    assert _hooks(model) == hooks and module_flags(model) == flags and state_hash(model) == weights
    assert model.first_stage_model.encode == encode and model.first_stage_model.decode == decode
    assert webui_lowvram.module_in_gpu is model.conditioner
    with torch.no_grad():  # the WebUI's hooks work again
        model.model(x, torch.tensor([10]), cond)
    assert webui_lowvram.module_in_gpu is model.model
    other.remove()
