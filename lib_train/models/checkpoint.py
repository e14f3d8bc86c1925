"""Load a single-file checkpoint headless, with no hub access: SD1.x / SD2.x into an ldm ``LatentDiffusion``, SDXL
(once :data:`.families.TRAINS_SDXL` lets :func:`.spec.detect_family` accept it) into sgm's ``DiffusionEngine``
(:mod:`.sdxl_load`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TrainerError
from .build import build_latent_diffusion
from .families import RECORDS
from .spec import UNET_PREFIX, ModelSpec, SDXLSpec, infer_spec

# Prefixes whose weights the model must find in the file (others, such as model_ema.*, are ignored).
_REQUIRED = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


@dataclass
class CheckpointInfo:
    path: str
    name: str  # file name, as ss_sd_model_name
    spec: ModelSpec | SDXLSpec
    prediction: str  # "eps" or "v"
    prediction_source: str  # how the prediction type was decided

    def legacy_hash(self) -> str:
        """The WebUI's/kohya's old 8-hex model hash: sha256 of 64 KiB at offset 1 MiB."""
        with open(self.path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]

    def sha256(self) -> str:
        """Full-file sha256 (the WebUI's new model hash), cached next to our tokenizer cache by path+size+mtime."""
        st = os.stat(self.path)
        cache_dir = Path(os.environ.get("TRAINER_CACHE_DIR", Path.home() / ".cache" / "sd-webui-trainer"))
        cache_file = cache_dir / "hashes.json"
        key = f"{os.path.abspath(self.path)}|{st.st_size}|{int(st.st_mtime)}"
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        if key not in cache:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            cache[key] = h.hexdigest()
            from ..atomic import atomic_write_text

            try:
                atomic_write_text(cache_file, json.dumps(cache))
            except OSError:
                pass
        return cache[key]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.ckpt``/``.pt`` checkpoint. Pickles are opened with ``weights_only=True``."""
    path = str(path)
    if not os.path.isfile(path):
        raise TrainerError(f"Checkpoint not found: {path}")
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - any parse error means "not a usable file"
            raise TrainerError(f"{path} is not a readable .safetensors file ({e}). Re-download it or pick "
                               "another checkpoint.") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise TrainerError(f"{path} cannot be opened safely as a checkpoint ({type(e).__name__}). Use the "
                           ".safetensors version of this model (convert it once in the WebUI or with a trusted "
                           "tool).") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise TrainerError(f"{path} does not contain a state dict; it is not a Stable Diffusion checkpoint.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _yaml_prediction(path: str) -> str | None:
    """The WebUI picks a model's config from ``<checkpoint>.yaml``; a v-model's config says ``parameterization: v``."""
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    try:
        text = Path(yaml_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"parameterization:\s*['\"]?(\w+)", text)
    if m is None:  # an sgm (SDXL) config names its denoiser scaling instead
        return "v" if re.search(r"denoiser_scaling\.VScaling", text) else "eps"
    return "v" if m.group(1) == "v" else "eps"


def _probe_v_prediction(unet: torch.nn.Module, context_dim: int) -> bool:
    """The WebUI's heuristic for full-size SD2 weights: on a constant 0.5 latent at t=999 with a constant context,
    a v-prediction UNet's output minus the input averages below -1."""
    dtype = next(unet.parameters()).dtype
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)] if dtype != torch.float32 else []
    for m in norms:  # ldm's GroupNorm32 computes in fp32; its weights are 16-bit here (as CUDA autocast does it)
        m.forward = functools.partial(_fp32_group_norm, m)
    half = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
    try:
        with torch.no_grad(), half:  # weights already in their training dtype (a GPU run): compute in it
            x = torch.full((1, 4, 8, 8), 0.5)
            ctx = torch.full((1, 2, context_dim), 0.5)
            out = unet(x, torch.tensor([999]), context=ctx).float()
            return float((out - x).mean()) < -1
    finally:
        for m in norms:
            del m.forward


def _fp32_group_norm(m: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.group_norm(x.float(), m.num_groups, m.weight.float(), m.bias.float(),
                                          m.eps).type(x.dtype)


def load_checkpoint(path: str | os.PathLike, *, prediction: str = "auto",
                    webui_dir: str | os.PathLike | None = None, frozen_dtype: torch.dtype | None = None):
    """Build the model for ``path`` and load its weights. Returns ``(LatentDiffusion, CheckpointInfo)``; for an SDXL
    file ``(DiffusionEngine, CheckpointInfo)`` (sgm from the WebUI, ``webui_dir`` or as :mod:`.sgm_import` finds it).

    Prediction type: ``prediction`` when not "auto"; else a ``<checkpoint>.yaml`` next to the file; else a ``v_pred``
    marker tensor in the file; else, for full-size weights of a family that has one (SD2), the WebUI's probe; else
    the family's default (epsilon).

    ``frozen_dtype``: the dtype the UNet and the text encoder(s) are to train in (frozen, half precision on a GPU;
    None: fp32). The UNet and the VAE are built unfilled (meta device) and each weight is created from the file's
    tensor in its part's dtype (the VAE stays fp32), one at a time, the file's copy dropped as it goes; the text
    encoders are cast before their weights are copied in. So an fp32 copy of the UNet is never held when it trains in
    16 bits (the result equals loading in fp32 and casting afterwards, bit for bit), and the load needs no random
    initialisation of the UNet or VAE.
    """
    path = str(path)
    sd = read_state_dict(path)
    spec = infer_spec(sd)
    family = RECORDS[spec.family]
    source = "flag"
    if prediction == "auto":
        yaml_pred = _yaml_prediction(path)
        if yaml_pred is not None:
            prediction, source = yaml_pred, "yaml next to the checkpoint"
        elif "v_pred" in sd:
            prediction, source = "v", "v_pred marker in the checkpoint"
        else:
            prediction, source = family.default_prediction, "default"
    if isinstance(spec, SDXLSpec):
        from .sdxl_load import build_sdxl, load_sdxl_weights

        model = build_sdxl(spec, prediction, webui_dir, init=False)  # every UNet/VAE weight comes next
        if frozen_dtype is not None:
            model.model.to(frozen_dtype)  # still on the meta device: only the dtype its weights will be made in
            model.conditioner.to(frozen_dtype)
        load_sdxl_weights(model, sd, path)
        del sd
        return model, CheckpointInfo(path=path, name=os.path.basename(path), spec=spec, prediction=prediction,
                                     prediction_source=source)
    model = build_latent_diffusion(spec, "v" if prediction == "v" else "eps", init=False)
    if frozen_dtype is not None:
        model.model.to(frozen_dtype)  # still on the meta device: only the dtype its weights will be made in
        model.cond_stage_model.to(frozen_dtype)
    own = model.state_dict()  # the model's tensors (sharing their storage; the UNet's and VAE's on meta)
    missing = [k for k in own if k.startswith(_REQUIRED) and k not in sd and not k.endswith("position_ids")]
    mismatched = [f"{k} is {list(sd[k].shape)}, expected {list(own[k].shape)}" for k in own
                  if k in sd and k.startswith(_REQUIRED) and tuple(sd[k].shape) != tuple(own[k].shape) and not k.endswith("position_ids")]
    for problem, keys in (("is missing weights this model needs", missing),
                          ("has tensors of another shape than the layout read from it", mismatched)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise TrainerError(f"{path} {problem}: {shown}. The file may be truncated or not a full SD checkpoint.")
    _fill(model, sd, own)
    if (source == "default" and family.probe_v_prediction and spec.is_full_size
            and _probe_v_prediction(model.model.diffusion_model, spec.unet.context_dim)):
        prediction, source = "v", f"the WebUI's {family.short} v-prediction probe"
        model.parameterization = "v"
    info = CheckpointInfo(path=path, name=os.path.basename(path), spec=spec, prediction=prediction,
                          prediction_source=source)
    del sd
    return model, info


def _fill(model: torch.nn.Module, sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Set ``model``'s tensors ``own`` from the file's ``sd`` (shapes checked): a tensor still on the meta device is
    created from the file's tensor in its dtype, any other is copied into. Each file tensor is removed from ``sd``
    once used (the caller holds no other reference), so the file's copy shrinks as the model fills."""
    from .sdxl_load import _materialize

    with torch.no_grad():
        for k in [k for k in sd if k in own and k.startswith(_REQUIRED)]:  # not the file's schedule buffers
            t = sd.pop(k)
            target = own[k]
            if target.is_meta:
                _materialize(model, k, t.to(target.dtype))
            elif k.endswith("position_ids") and tuple(target.shape) != tuple(t.shape):
                continue  # transformers versions differ on whether and how it is saved: the model's own stands
            else:
                target.copy_(t)
            del t
    left = [k for k, t in model.state_dict().items() if t.is_meta]
    if left:  # the missing check before filling names them; a loud error rather than a model with empty weights
        raise TrainerError(f"weights left unset: {', '.join(left[:5])}")


__all__ = ["CheckpointInfo", "load_checkpoint", "read_state_dict", "UNET_PREFIX"]
