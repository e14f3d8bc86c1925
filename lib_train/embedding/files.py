"""Embedding files: what we write and what we read back (FORMATS.md §C.1-§C.3, §C.6-§C.7).

Written, atomically:

* ``<stem>.safetensors`` = one tensor per text encoder of the family, named by :func:`embedding_keys`:
  ``{"emb_params": [n, width]}`` (width 768 SD1, 1024 SD2; kohya's key) or SDXL's ``{"clip_l": [n, 768],
  "clip_g": [n, 1280]}`` (the layout every SDXL loader reads: the WebUI, Forge, ComfyUI, kohya; diffusers once per
  text encoder), + ``modelspec.*`` metadata with ``architecture`` ``<base>/textual-inversion`` and
  ``implementation`` the Stability URL (kohya's TI convention). The WebUI, Forge and ComfyUI take any single-tensor
  file; diffusers needs ``token=``.
* optionally, for one-encoder families, ``<stem>.pt``, the WebUI's own dict: ``string_to_token {"*": 265}``,
  ``string_to_param {"*": [n, width]}``, ``name``, ``step``, ``sd_checkpoint`` (10-hex short sha256),
  ``sd_checkpoint_name``. The tensor is a plain CPU tensor, so ``torch.load(weights_only=True)`` (ComfyUI,
  diffusers) reads it. The file is written in torch's legacy (non-zip) serialization: recent torch's zip archives
  hold ``.format_version`` / ``.storage_alignment`` entries that the WebUI 1.10.1 safe unpickler rejects
  (``modules/safe.py``), while the legacy stream only uses globals it allows (``torch._utils._rebuild_tensor_v2``,
  ``torch.*Storage``, ``collections.OrderedDict``).

Read (to continue training): ours, kohya's, the WebUI ``.pt``/``.bin``, any single-tensor file (1-D → one vector),
and SDXL's two-tensor dict.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..atomic import atomic_write
from ..errors import TrainerError
from ..models.families import Family, as_family, get_family

EMB_KEY = "emb_params"  # the one tensor's name for a one-encoder family (kohya's)
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # kohya writes this for every TI file
WEBUI_TOKEN = 265  # the "string_to_token" value the WebUI writes (unused by every loader)


def embedding_keys(family: str | Family) -> list[str]:
    """The tensor names of ``family``'s embedding files, one per text encoder in the record's order: the encoder's
    own key (SDXL ``clip_l``, ``clip_g``), or :data:`EMB_KEY` for a one-encoder family."""
    return [te.key or EMB_KEY for te in as_family(family).text_encoders]


@dataclass
class EmbeddingFile:
    parts: dict[str, torch.Tensor]  # tensor name → [n, width] fp32: {EMB_KEY: …} or SDXL's {"clip_l", "clip_g"}
    name: str | None = None  # the .pt's "name" (the WebUI itself names an embedding by its file stem)
    step: int | None = None

    @property
    def vectors(self) -> torch.Tensor:
        """The vectors of a one-encoder embedding (SD1/SD2)."""
        if list(self.parts) != [EMB_KEY]:
            raise TrainerError(f"this embedding has one tensor per text encoder ({', '.join(self.parts)})")
        return self.parts[EMB_KEY]

    def describe(self) -> str:
        return describe_shapes({k: tuple(v.shape) for k, v in self.parts.items()})


def describe_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    """Embedding tensors' shapes in words: ``"3 vectors of width 768"``, or per text encoder ``"3 vectors: clip_l
    768, clip_g 1280"`` (the counts of each where they differ)."""
    counts = {s[0] for s in shapes.values()}
    if list(shapes) == [EMB_KEY]:
        n, width = shapes[EMB_KEY]
        return f"{n} vectors of width {width}"
    if len(counts) == 1:
        return f"{counts.pop()} vectors: " + ", ".join(f"{k} width {s[1]}" for k, s in shapes.items())
    return ", ".join(f"{k}: {s[0]} vectors of width {s[1]}" for k, s in shapes.items())


def embedding_metadata(*, title: str, family: str, prediction: str, resolution: int, started_at: float,
                       clip_skip: int = 1, description: str = "") -> dict[str, str]:
    """modelspec metadata of one saved file; ``title`` is its stem, which is also the name prompts use."""
    fam = get_family(family)
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": fam.modelspec_architecture(prediction, "textual-inversion"),
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": _dt.datetime.fromtimestamp(started_at).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
        "modelspec.trigger_phrase": title,
        "modelspec.description": description or f"textual-inversion embedding trained with sd-webui-trainer "
                                                f"{__version__}",
    }
    layer = fam.encoder_layer(clip_skip)
    if layer is not None:
        meta["modelspec.encoder_layer"] = str(layer)
    return meta


def save_safetensors(path: str | os.PathLike, vectors: torch.Tensor | dict[str, torch.Tensor],
                     metadata: dict[str, str]) -> Path:
    """Write ``{"emb_params": vectors}`` (a tensor) or the given tensors by name (SDXL's ``clip_l`` and ``clip_g``)
    with ``metadata`` (all values str) atomically."""
    from safetensors.torch import save_file

    parts = {EMB_KEY: vectors} if isinstance(vectors, torch.Tensor) else vectors
    tensors = {k: _plain(v) for k, v in parts.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_webui_pt(path: str | os.PathLike, vectors: torch.Tensor, *, name: str, step: int,
                  checkpoint_hash: str | None = None, checkpoint_name: str | None = None) -> Path:
    """Write the WebUI's ``.pt`` embedding dict atomically (legacy serialization, see the module docstring)."""
    data = {
        "string_to_token": {"*": WEBUI_TOKEN},
        "string_to_param": {"*": _plain(vectors)},
        "name": name,
        "step": int(step),
        "sd_checkpoint": checkpoint_hash,
        "sd_checkpoint_name": checkpoint_name,
    }
    return atomic_write(path, lambda tmp: torch.save(data, tmp, _use_new_zipfile_serialization=False))


def _plain(vectors: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy that owns its storage (so only the vectors are serialized)."""
    return vectors.detach().to("cpu").contiguous().clone()


def load_embedding(path: str | os.PathLike) -> EmbeddingFile:
    """Read an embedding file (SD1/SD2 one tensor, SDXL ``clip_l`` + ``clip_g``); anything else raises
    :class:`TrainerError` naming the file."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".safetensors", ".pt", ".bin"):
        raise TrainerError(f"{path}: not an embedding file; use a .safetensors, .pt or .bin embedding")
    try:
        if ext == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be used
        raise TrainerError(f"{path} cannot be read as an embedding ({type(e).__name__}: {e})") from None
    return _from_data(data, path)


def _from_data(data, path: Path) -> EmbeddingFile:
    if not isinstance(data, dict):
        raise TrainerError(f"{path} does not hold an embedding (expected a dict of tensors)")
    name, step = data.get("name"), data.get("step")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise TrainerError(f"{path}: string_to_param must hold exactly one tensor")
        parts = {EMB_KEY: next(iter(params.values()))}
    elif {"clip_l", "clip_g"} <= set(data):
        parts = {k: data[k] for k in ("clip_l", "clip_g")}
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if EMB_KEY in tensors:
            parts = {EMB_KEY: tensors[EMB_KEY]}
        elif len(tensors) == 1:
            parts = {EMB_KEY: next(iter(tensors.values()))}
        else:
            raise TrainerError(f"{path} holds {len(tensors)} tensors ({', '.join(list(tensors)[:5])}); an embedding "
                               "file holds one, or SDXL's clip_l and clip_g")
    out = {}
    for key, vec in parts.items():
        if not isinstance(vec, torch.Tensor) or vec.ndim not in (1, 2) or not vec.is_floating_point():
            raise TrainerError(f"{path}: the embedding's {key} must be a float tensor [vectors, width]")
        vec = vec.detach().reshape(1, -1) if vec.ndim == 1 else vec.detach()
        out[key] = vec.to(torch.float32).contiguous().clone()
    counts = {v.shape[0] for v in out.values()}
    if len(counts) != 1:
        raise TrainerError(f"{path}: clip_l and clip_g hold different numbers of vectors "
                           f"({out['clip_l'].shape[0]} and {out['clip_g'].shape[0]}); an SDXL embedding has the same "
                           "number for both")
    return EmbeddingFile(out, name if isinstance(name, str) else None, step if isinstance(step, int) else None)
