"""Embedding files: keys, shapes, metadata, the WebUI .pt that its safe unpickler accepts, loaders (FORMATS.md §C)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_train.embedding.files import (
    EMB_KEY,
    IMPLEMENTATION,
    embedding_metadata,
    load_embedding,
    save_safetensors,
    save_webui_pt,
)
from lib_train.errors import TrainerError

# The WebUI 1.10.1 safe unpickler (modules/safe.py): zip entry names it accepts, and the only globals it resolves.
WEBUI_ZIP_NAMES = r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$"
WEBUI_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                 ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
                 *(("torch", t) for t in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                          "ByteStorage", "float32", "BFloat16Storage")),
                 ("torch.nn.modules.container", "ParameterDict"), ("__builtin__", "set")}


def webui_create_embedding_from_data(data: dict) -> tuple[torch.Tensor, int, int]:
    """What the WebUI's loader reads from a file's dict (textual_inversion.py create_embedding_from_data, SD1/SD2
    branches): (vectors fp32, vectors count, shape checked against the model's width)."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1
        vec = next(iter(params.values())).detach().to(torch.float32)
    else:
        assert isinstance(next(iter(data.values())), torch.Tensor) and len(data) == 1
        vec = next(iter(data.values())).detach().to(torch.float32)
        if vec.ndim == 1:
            vec = vec.unsqueeze(0)
    return vec, vec.shape[0], vec.shape[-1]


@pytest.mark.parametrize("width", [768, 1024])
def test_safetensors_file_has_the_shape_the_webui_checks(tmp_path, width):
    vec = torch.randn(4, width)
    meta = embedding_metadata(title="laohuang", family="sd1" if width == 768 else "sd2",
                              prediction="eps" if width == 768 else "v", resolution=512, started_at=1.7e9,
                              clip_skip=2)
    path = save_safetensors(tmp_path / "laohuang.safetensors", vec, meta)
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == [EMB_KEY]
        stored = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}
    got, n, shape = webui_create_embedding_from_data(data)
    assert (n, shape) == (4, width) and torch.equal(got, vec)
    arch = "stable-diffusion-v1" if width == 768 else "stable-diffusion-v2-768-v"
    assert stored["modelspec.architecture"] == f"{arch}/textual-inversion"
    assert stored["modelspec.implementation"] == IMPLEMENTATION
    assert stored["modelspec.title"] == stored["modelspec.trigger_phrase"] == "laohuang"
    assert stored["modelspec.prediction_type"] == ("epsilon" if width == 768 else "v")
    assert ("modelspec.encoder_layer" in stored) == (width == 768)  # clip skip is an SD1 setting
    assert not list(tmp_path.glob(".tmp-*"))


def _webui_safe_check(path: Path) -> None:
    """Re-implements the checks of the WebUI 1.10.1 safe unpickler on a .pt (zip names, allowed globals only)."""
    import re

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in WEBUI_GLOBALS:
                raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
            return lambda *args, **kwargs: None  # only which globals are referenced matters here

        def persistent_load(self, saved_id):
            assert saved_id[0] == "storage"
            return None

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            bad = [n for n in z.namelist() if not re.match(WEBUI_ZIP_NAMES, n)]
            assert not bad, f"the WebUI rejects zip entries {bad}"
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
            Restricted(io.BytesIO(z.read(pkl[0]))).load()
    else:
        with open(path, "rb") as f:
            for _ in range(5):  # magic, protocol, sys info, the object, the storage keys
                Restricted(f).load()


@pytest.mark.parametrize("width", [768, 1024])
def test_webui_pt_loads_weights_only_and_passes_the_webui_safe_unpickler(tmp_path, width):
    vec = torch.nn.Parameter(torch.randn(3, width))  # a Parameter in, a plain tensor out
    path = save_webui_pt(tmp_path / "laohuang-000500.pt", vec, name="laohuang-000500", step=500,
                         checkpoint_hash="0123456789", checkpoint_name="v1-5-pruned")
    _webui_safe_check(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"] and type(data["string_to_param"]["*"]) is torch.Tensor
    assert (data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == (
        "laohuang-000500", 500, "0123456789", "v1-5-pruned")
    got, n, shape = webui_create_embedding_from_data(data)
    assert (n, shape) == (3, width) and torch.equal(got, vec.detach())


def test_a_default_torch_save_would_be_rejected_by_the_webui(tmp_path):
    """Guards the test above: recent torch's zip archive holds entries the WebUI's check refuses."""
    path = tmp_path / "plain.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}}, path)
    if not any(n.endswith((".format_version", ".storage_alignment")) for n in zipfile.ZipFile(path).namelist()):
        pytest.skip("this torch writes no .format_version/.storage_alignment entries")
    with pytest.raises(AssertionError, match="rejects zip entries"):
        _webui_safe_check(path)


@pytest.mark.skipif(not os.environ.get("SD_WEBUI_DIR"), reason="SD_WEBUI_DIR (a WebUI 1.10.1 checkout) is not set")
def test_the_webui_own_safe_unpickler_accepts_our_pt(tmp_path):
    path = save_webui_pt(tmp_path / "e.pt", torch.randn(2, 768), name="e", step=1)
    code = "import sys; from modules import safe; safe.check_pt(sys.argv[1], None)"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=os.environ["SD_WEBUI_DIR"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_load_embedding_reads_every_sd_format(tmp_path):
    vec = torch.randn(2, 32)
    ours = save_safetensors(tmp_path / "a.safetensors", vec, {})
    pt = save_webui_pt(tmp_path / "b.pt", vec, name="b", step=7)
    save_file({"kohya_other_key": vec}, str(tmp_path / "c.safetensors"))
    save_file({"v": vec[0]}, str(tmp_path / "d.safetensors"))  # 1-D: one vector
    torch.save({"*": vec.half()}, tmp_path / "e.bin")  # a diffusers-style concept file
    assert torch.equal(load_embedding(ours).vectors, vec)
    loaded = load_embedding(pt)
    assert torch.equal(loaded.vectors, vec) and (loaded.name, loaded.step) == ("b", 7)
    assert torch.equal(load_embedding(tmp_path / "c.safetensors").vectors, vec)
    assert load_embedding(tmp_path / "d.safetensors").vectors.shape == (1, 32)
    e = load_embedding(tmp_path / "e.bin").vectors
    assert e.dtype == torch.float32 and torch.equal(e, vec.half().float())


def test_load_embedding_refuses_what_it_cannot_train(tmp_path):
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1, 1280)}, str(tmp_path / "xl.safetensors"))
    save_file({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "x.ckpt").write_bytes(b"")
    cases = {"xl.safetensors": "clip_g must be a float tensor", "two.safetensors": "holds 2 tensors", "junk.pt": "cannot be read",
             "x.ckpt": "not an embedding file"}
    for name, needle in cases.items():
        with pytest.raises(TrainerError, match=needle) as err:
            load_embedding(tmp_path / name)
        assert name in str(err.value)
