"""Load a single-file SDXL checkpoint headless into sgm's ``DiffusionEngine``, with no hub access.

sgm comes from the WebUI's checkout (:mod:`.sgm_import`). The engine is built from sgm's own classes with the
values of configs/inference/sd_xl_base.yaml, except what the checkpoint decides (:class:`.spec.SDXLSpec`: widths,
depths, so the tiny test models load through the same code) and three headless choices: plain softmax attention
(PyTorch's fused kernel) instead of xformers, no sgm gradient checkpointing (the trainer installs its own), and text
embedders built offline. sgm's ``FrozenCLIPEmbedder`` / ``FrozenOpenCLIPEmbedder2`` download their weights and
tokenizer in ``__init__``; the two ``Offline*`` subclasses below build the same objects (same class tree, attributes
and forward) from the spec, the CLIP tokenizer from open_clip's BPE file (:func:`.build.clip_tokenizer`).

The checkpoint's weights are then loaded strictly: every weight of the UNet, VAE and both text encoders must be in
the file and every file tensor under those prefixes must be used (``position_ids`` aside: transformers versions
differ on whether it is saved).
"""

from __future__ import annotations

import contextlib
import io
import os
from functools import lru_cache

import torch

from ..errors import TrainerError
from .build import (LINEAR_END, LINEAR_START, TIMESTEPS, clip_text_model, clip_tokenizer, finish_offline_embedder,
                    open_clip_text_model)
from .families import SDXL, V
from .sdxl import SIZE_FEATURES
from .spec import SDXLSpec, TextSpec

# Prefixes of the tensors the engine takes from the file (others, such as model_ema.*, are ignored).
REQUIRED = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")
_DIFF = "sgm.modules.diffusionmodules."


def _offline_classes():
    from sgm.modules.encoders.modules import AbstractEmbModel, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2

    class OfflineFrozenCLIPEmbedder(FrozenCLIPEmbedder):
        """sgm ``FrozenCLIPEmbedder`` (clip_l) built from a spec instead of a hub download."""

        def __init__(self, text: dict, device: str = "cpu", max_length: int = 77, freeze: bool = True,
                     layer: str = "hidden", layer_idx: int | None = 11, always_return_pooled: bool = False):
            AbstractEmbModel.__init__(self)
            self.tokenizer = clip_tokenizer()
            self.transformer = clip_text_model(TextSpec(**text))
            finish_offline_embedder(self, device, max_length, freeze, layer=layer, layer_idx=layer_idx,
                                    return_pooled=always_return_pooled)

    class OfflineFrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder2):
        """sgm ``FrozenOpenCLIPEmbedder2`` (clip_g) built from a spec: open_clip's ``CLIP`` without its vision
        tower, as the sgm class keeps it after loading pretrained weights."""

        def __init__(self, text: dict, device: str = "cpu", max_length: int = 77, freeze: bool = True,
                     layer: str = "penultimate", always_return_pooled: bool = True, legacy: bool = False):
            AbstractEmbModel.__init__(self)
            self.model = open_clip_text_model(TextSpec(**text))
            finish_offline_embedder(self, device, max_length, freeze, layer=layer, return_pooled=always_return_pooled,
                                    layer_idx={"last": 0, "penultimate": 1}[layer], legacy=legacy)

    return {c.__name__: c for c in (OfflineFrozenCLIPEmbedder, OfflineFrozenOpenCLIPEmbedder2)}


@lru_cache(maxsize=1)
def _cached_offline_classes():
    return _offline_classes()


def __getattr__(name: str):  # module attribute access for sgm's instantiate_from_config targets
    if name.startswith("Offline"):
        classes = _cached_offline_classes()
        if name in classes:
            return classes[name]
    raise AttributeError(name)


def sgm_config(spec: SDXLSpec, prediction: str = "eps") -> dict:
    """The ``DiffusionEngine`` constructor arguments for ``spec``: sd_xl_base.yaml's values (the SDXL base layout,
    the legacy DDPM discrete denoiser; ``VScaling`` for v-prediction), the architecture from ``spec``, softmax
    attention, no sgm checkpointing and offline text embedders."""
    u, v = spec.unet, spec.vae
    unet = dict(
        adm_in_channels=u.adm_in_channels, num_classes="sequential", use_checkpoint=False, in_channels=4,
        out_channels=4, model_channels=u.model_channels, attention_resolutions=list(u.attention_resolutions),
        num_res_blocks=u.num_res_blocks, channel_mult=list(u.channel_mult), num_heads=u.num_heads,
        num_head_channels=u.num_head_channels, use_spatial_transformer=True, use_linear_in_transformer=True,
        transformer_depth=list(u.transformer_depth), transformer_depth_middle=u.transformer_depth_middle,
        context_dim=u.context_dim, spatial_transformer_attn_type="softmax", legacy=False)
    scaling = "VScaling" if prediction == V else "EpsScaling"
    denoiser = dict(num_idx=TIMESTEPS,
                    weighting_config={"target": _DIFF + "denoiser_weighting.EpsWeighting"},
                    scaling_config={"target": _DIFF + f"denoiser_scaling.{scaling}"},
                    discretization_config={"target": _DIFF + "discretizer.LegacyDDPMDiscretization",
                                           "params": {"linear_start": LINEAR_START, "linear_end": LINEAR_END,
                                                      "num_timesteps": TIMESTEPS}})
    texts = [
        {"is_trainable": False, "input_key": "txt", "target": f"{__name__}.OfflineFrozenCLIPEmbedder",
         "params": {"text": dict(spec.clip_l.__dict__), "device": "cpu", "layer": "hidden", "layer_idx": 11}},
        {"is_trainable": False, "input_key": "txt", "target": f"{__name__}.OfflineFrozenOpenCLIPEmbedder2",
         "params": {"text": dict(spec.clip_g.__dict__), "device": "cpu", "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
    ]
    size_embedder = "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"
    sizes = [{"is_trainable": False, "input_key": key, "target": size_embedder, "params": {"outdim": SIZE_FEATURES}}
             for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    ddconfig = dict(attn_type="vanilla", double_z=True, z_channels=v.z_channels, resolution=256, in_channels=3,
                    out_ch=3, ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks, attn_resolutions=[],
                    dropout=0.0)
    return dict(
        scale_factor=SDXL.latent_scale, disable_first_stage_autocast=True,
        denoiser_config={"target": _DIFF + "denoiser.DiscreteDenoiser", "params": denoiser},
        network_config={"target": _DIFF + "openaimodel.UNetModel", "params": unet},
        conditioner_config={"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": texts + sizes}},
        first_stage_config={"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                            "params": {"embed_dim": v.embed_dim, "monitor": "val/rec_loss", "ddconfig": ddconfig,
                                       "lossconfig": {"target": "torch.nn.Identity"}}},
    )


def unfilled(target: str, params: dict):
    """The sgm module ``target(**params)`` with its parameters allocated on the CPU but not initialised (built on the
    meta device): for parts without buffers (UNet, VAE) whose every weight the strict load then sets, which saves
    the random initialisation of billions of values at full size."""
    from sgm.util import get_obj_from_str

    with torch.device("meta"):
        module = get_obj_from_str(target)(**params)
    if next(module.buffers(), None) is not None:
        raise ValueError(f"{target} has buffers; build it with its initialisation")
    return module.to_empty(device="cpu")


def build_sdxl(spec: SDXLSpec, prediction: str = "eps", webui_dir: str | os.PathLike | None = None, *,
               init: bool = True):
    """An sgm ``DiffusionEngine`` of ``spec`` in eval mode with frozen parameters (sgm found by
    :func:`.sgm_import.import_sgm`): randomly initialised, or with ``init=False`` the UNet and VAE left unfilled
    (:func:`unfilled`; load weights next). sgm prints progress lines while it builds; they are swallowed here."""
    from .sgm_import import import_sgm

    import_sgm(webui_dir)
    from sgm.models.diffusion import DiffusionEngine

    config = sgm_config(spec, prediction)
    if not init:
        for part in ("network_config", "first_stage_config"):
            config[part] = {"target": f"{__name__}.unfilled", "params": {"target": config[part]["target"],
                                                                         "params": config[part]["params"]}}
    with contextlib.redirect_stdout(io.StringIO()):
        model = DiffusionEngine(**config)
    return model.eval().requires_grad_(False)


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def load_sdxl_weights(model, sd: dict[str, torch.Tensor], path: str = "the checkpoint") -> None:
    """Copy the UNet, VAE and text-encoder tensors of ``sd`` into ``model``, strictly: TrainerError naming the
    missing keys, the unexpected ones and those of another shape (nothing is copied then). Each file tensor is
    removed from ``sd`` once copied, so a caller that holds no other reference frees the file's copy as the model
    fills (the peak is about the model plus one tensor, not the model plus the whole file: ~14 GB instead of ~21 GB
    for a full-size fp16 file loaded into fp32 on the CPU)."""
    own = model.state_dict()  # the model's tensors (sharing their storage)
    keys = [k for k in sd if k.startswith(REQUIRED)]
    unexpected = [k for k in keys if k not in own and not k.endswith("position_ids")]
    mismatched = [f"{k} is {list(sd[k].shape)}, expected {list(own[k].shape)}" for k in keys
                  if k in own and tuple(own[k].shape) != tuple(sd[k].shape) and not k.endswith("position_ids")]
    present = set(keys)
    missing = [k for k in own if k.startswith(REQUIRED) and k not in present and not k.endswith("position_ids")]
    problems = []
    if missing:
        problems.append(f"missing weights this model needs: {_listed(missing)}")
    if unexpected:
        problems.append(f"tensors this SDXL layout does not have: {_listed(unexpected)}")
    if mismatched:
        problems.append(f"tensors of another shape than the layout read from the file: {_listed(mismatched)}")
    if problems:
        raise TrainerError(f"{path} is not a complete SDXL base checkpoint ({'; '.join(problems)}). The file may be "
                           "truncated or made for another architecture.")
    with torch.no_grad():
        for k in keys:
            t = sd.pop(k)
            if k in own and tuple(own[k].shape) == tuple(t.shape):  # position_ids saved as [77]: the model's own
                own[k].copy_(t)
            del t


def load_sdxl_checkpoint(path: str | os.PathLike, prediction: str = "auto",
                         webui_dir: str | os.PathLike | None = None):
    """Build the sgm ``DiffusionEngine`` for the SDXL checkpoint ``path`` and load its weights: ``(engine,
    CheckpointInfo)`` (see :func:`.checkpoint.load_checkpoint`, which this is for SDXL files; TrainerError for any
    other file)."""
    from .checkpoint import load_checkpoint

    model, info = load_checkpoint(path, prediction=prediction, webui_dir=webui_dir)
    if not isinstance(info.spec, SDXLSpec):
        raise TrainerError(f"{path} is not an SDXL checkpoint.")
    return model, info
