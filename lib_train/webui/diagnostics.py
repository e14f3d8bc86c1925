"""Read-only checks on the loaded model, served by the API's diagnostics routes (and used by the real-WebUI tests).

- :func:`state_dict_hash` and :func:`module_flags`: sha256 over every tensor of the loaded model (name, dtype,
  shape, bytes) and counts of its flags, the evidence that a run left it exactly as it was (DESIGN.md §3 "Train in
  place");
- :func:`compare_conditioning`: the WebUI's prompt wrapper and the headless
  :class:`~lib_train.models.conditioning.TextConditioner` on the same plain prompts with the options a run pins,
  the evidence that headless training conditions like the WebUI does (DESIGN.md §3 "Text conditioning");
  :func:`compare_sdxl_conditioning` the same for SDXL: the WebUI's ``get_learned_conditioning`` against the
  library's SDXL conditioning (context and vector ``y``) at given image sizes; with an embedding name, the WebUI's
  side with that embedding as its embeddings database loaded it (its ``EmbeddingsWithFixes`` on both encoders, its
  prompt wrappers placing the name) against ours with the same file read by :func:`~lib_train.embedding.files.
  load_embedding` and registered by :class:`~lib_train.embedding.inject.Injection`, as a run trains it.

Callers hold the WebUI's queue lock, so no generation or run changes the model meanwhile.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..embedding.files import embedding_keys, load_embedding
from ..embedding.inject import Injection
from ..errors import TrainerError
from ..models.conditioning import TextConditioner


def state_dict_hash(model: torch.nn.Module) -> dict[str, Any]:
    """``{"sha256", "tensors", "elements"}`` of ``model.state_dict()`` in key order."""
    h = hashlib.sha256()
    count = elements = 0
    for key, value in sorted(model.state_dict().items()):
        t = value.detach()
        h.update(key.encode())
        h.update(f"{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        count += 1
        elements += t.numel()
    return {"sha256": h.hexdigest(), "tensors": count, "elements": elements}


def module_flags(model: torch.nn.Module) -> dict[str, int]:
    """Counts of what a run must also put back: parameters with ``requires_grad``, modules in training mode,
    modules with an instance-level ``forward`` (e.g. a LoRA wrapper left behind) and registered forward hooks."""
    modules = list(model.modules())
    return {
        "requires_grad": sum(1 for p in model.parameters() if p.requires_grad),
        "training_modules": sum(1 for m in modules if m.training),
        "instance_forwards": sum(1 for m in modules if "forward" in m.__dict__),
        "forward_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules),
    }


def _difference(webui: torch.Tensor, library: torch.Tensor) -> dict[str, Any]:
    """Both tensors' shapes, whether they are bit-identical, and their largest absolute difference (fp32)."""
    same_shape = webui.shape == library.shape
    return {"webui_shape": list(webui.shape), "library_shape": list(library.shape),
            "equal": bool(same_shape and torch.equal(webui, library)),
            "max_abs_diff": float((webui.float() - library.float()).abs().max()) if same_shape else None,
            "max_abs_value": float(webui.float().abs().max())}


def compare_conditioning(model: Any, family: str, prompts: list[str], clip_skip: int = 1) -> list[dict[str, Any]]:
    """For each prompt: both tensors' shapes and their largest absolute difference (fp32).

    The WebUI side runs under the options a run pins (:func:`~lib_train.webui.model.conditioning_options`).
    """
    from modules import sd_hijack

    from .model import conditioning_options, pinned_options

    ours = TextConditioner(model.cond_stage_model.wrapped, family, clip_skip=clip_skip, max_chunks=64)
    results = []
    with pinned_options(conditioning_options(clip_skip)), torch.no_grad():
        for prompt in prompts:
            webui = model.cond_stage_model([prompt]).float()
            sd_hijack.model_hijack.fixes = None  # the raw encoder below must not see the wrapper's leftovers
            library = ours([prompt]).float()
            results.append({"prompt": prompt, **_difference(webui, library)})
    return results


def webui_embedding_file(name: str) -> Path:
    """The file the WebUI's embeddings database loaded ``name`` from (it is checked for changes first, as every
    generation does); :class:`TrainerError` when no embedding of that name is loaded."""
    from modules import sd_hijack

    db = sd_hijack.model_hijack.embedding_db
    db.load_textual_inversion_embeddings()
    embedding = db.word_embeddings.get(name)
    if embedding is None:
        why = ("was skipped by the WebUI: it was made for another model family" if name in db.skipped_embeddings
               else "is not loaded by the WebUI (GET /sdapi/v1/embeddings lists the loaded ones)")
        raise TrainerError(f"embedding: '{name}' {why}; name an embedding the loaded checkpoint can use")
    path = getattr(embedding, "filename", None)
    if not path or not Path(path).is_file():
        raise TrainerError(f"embedding: '{name}' is registered without a file to read ({path}); name an embedding "
                           "loaded from the embeddings folder")
    return Path(path)


def compare_sdxl_conditioning(model: Any, prompts: list[str], sizes: list[tuple[int, int]], clip_skip: int = 1,
                              embedding: str = "") -> list[dict[str, Any]]:
    """For each (width, height) in ``sizes``, each prompt alone and all of them as one batch: the WebUI's
    ``get_learned_conditioning`` (as txt2img calls it: original = target = (height, width), crop from the options
    ``sdxl_crop_top``/``sdxl_crop_left``) against what a run conditions with — the SDXL bundle's
    :meth:`~lib_train.models.bundle.ModelBundle.conditioning` over the conditioner's raw embedders — at the same
    sizes;
    per output (``crossattn``, ``vector``) the shapes, whether they are bit-identical, and the largest difference.
    Both sides run under the WebUI's ``devices.autocast()`` and the options a run pins.

    ``embedding``: the name of an embedding the WebUI has loaded (:func:`webui_embedding_file`); the WebUI encodes
    with it as it does at inference, and ours with that file's vectors registered on both text encoders as an
    embedding run does. Each result then also says whether the embedding changed our output (``embedding_changes``:
    ours without it differs), so an equality that ignored the name on both sides shows."""
    from modules import devices, prompt_parser, sd_hijack, shared

    from ..models.bundle import ModelBundle
    from ..models.conditioning import ImageSize
    from ..models.sdxl import text_root
    from .model import conditioning_options, pinned_options

    ours = ModelBundle.from_sgm(model, text_root=text_root(model.conditioner), max_chunks=64)
    vectors = None
    if embedding:
        path = webui_embedding_file(embedding)
        parts = load_embedding(path).parts
        keys = embedding_keys(ours.family_rules)
        if sorted(parts) != sorted(keys):
            raise TrainerError(f"embedding: {path} holds {', '.join(parts)}; an SDXL embedding holds "
                               f"{' and '.join(keys)}")
        vectors = [parts[k] for k in keys]
    batches = [[p] for p in prompts] + ([list(prompts)] if len(prompts) > 1 else [])
    results = []
    with pinned_options(conditioning_options(clip_skip)), torch.no_grad(), devices.autocast():
        crop = (int(shared.opts.sdxl_crop_top), int(shared.opts.sdxl_crop_left))
        for width, height in sizes:
            size = ImageSize((height, width), crop, (height, width))
            for batch in batches:
                webui = model.get_learned_conditioning(prompt_parser.SdConditioning(batch, width=width,
                                                                                    height=height))
                sd_hijack.model_hijack.fixes = None  # the raw encoders below must not see the wrapper's leftovers
                plain = ours.conditioning(batch, size)
                library = plain
                if vectors is not None:
                    injection = Injection(ours.text_conditioners, embedding, vectors)
                    try:
                        library = ours.conditioning(batch, size)
                    finally:
                        injection.remove()
                for key in ("crossattn", "vector"):
                    extra = {} if vectors is None else {
                        "embedding_changes": not torch.equal(plain[key], library[key])}
                    results.append({"prompts": batch, "size": [width, height], "key": key,
                                    **_difference(webui[key], library[key]), **extra})
    return results
