"""Computes the WebUI 1.10.1's own prompt conditioning with a textual-inversion embedding registered, and ours, on
the same tiny random models, and reports whether they are identical.

Runs ONLY with the WebUI's Python (its venv), as a subprocess of ``tests/webui/test_embedding_webui.py``::

    <webui python> tests/interop/webui_ti_worker.py <webui dir> <our repo root> <workdir>

``<workdir>/request.json``: ``{"prompts": [str, ...], "vectors": [int, ...]}``.

For SD1 (clip skip 1 and 2) and SD2 tiny models built by ``lib_train.models.build`` and every vector count: the
WebUI side wraps the ldm text embedder in its ``FrozenCLIPEmbedderWithCustomWords`` /
``FrozenOpenCLIPEmbedderWithCustomWords`` with ``EmbeddingsWithFixes`` on the token embedding and registers a
``textual_inversion.Embedding`` named ``laohuang`` in its embedding database (default options: emphasis "Original",
comma backtrack 20); our side is :class:`lib_train.models.conditioning.TextConditioner` with
:class:`lib_train.embedding.inject.Injection` on a copy of the same model (no chunk limit, as the WebUI has none).

SDXL: a tiny sgm ``DiffusionEngine`` (:func:`lib_train.models.sdxl_load.build_sdxl` of ``tiny_sdxl_spec``) made
into what the WebUI loads (``sd_models_xl.extend_sdxl`` and ``sd_hijack.model_hijack.hijack``: its prompt wrappers on
both text encoders, ``EmbeddingsWithFixes`` reading ``clip_l`` and ``clip_g``), ``laohuang.safetensors`` holding
``{"clip_l", "clip_g"}`` in an embeddings folder of the WebUI's database, and the conditioning diagnostic the
real-WebUI tests call (:func:`lib_train.webui.diagnostics.compare_sdxl_conditioning` with that embedding): the
WebUI's ``get_learned_conditioning`` against ours, for each prompt alone and all as one batch.

Output ``<workdir>/results.json``: ``{"<family> n=<n> clip_skip=<k>": {"shapes": [[...], [...]], "max_abs_diff":
float | null, "equal": bool}}``; for SDXL ``"sdxl n=<n> <crossattn|vector>"`` with the batch's shapes, whether every
result of that output is bit-identical, the largest difference, and ``changed``: how many of them the embedding
changed on our side. Exit status 0 on success; otherwise 1 with a last line ``webui_ti_worker: <step> failed: ...``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types
from pathlib import Path


def run(webui: str, repo: str, workdir: Path, step: list[str]) -> None:
    step[0] = "importing the WebUI"
    request = json.loads((workdir / "request.json").read_text(encoding="utf-8"))
    sys.argv = ["webui.py", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full"]
    os.chdir(webui)
    sys.path.insert(0, webui)
    from modules import initialize

    initialize.imports()
    from modules import sd_hijack, sd_hijack_clip, sd_hijack_open_clip, shared
    from modules.textual_inversion import textual_inversion

    sys.path.insert(0, repo)
    import torch

    from lib_train.embedding.inject import Injection
    from lib_train.models.build import build_latent_diffusion, randomize_, tiny_spec
    from lib_train.models.conditioning import TextConditioner

    results, hijack, db = {}, sd_hijack.model_hijack, sd_hijack.model_hijack.embedding_db
    for family in ("sd1", "sd2"):
        step[0] = f"building the tiny {family} model"
        model = build_latent_diffusion(tiny_spec(family))
        randomize_(model, 7)
        ours_model = copy.deepcopy(model)
        if family == "sd1":
            wrapper = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(model.cond_stage_model, hijack)
            holder = model.cond_stage_model.transformer.text_model.embeddings
        else:
            wrapper = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(model.cond_stage_model, hijack)
            holder = model.cond_stage_model.model
        holder.token_embedding = sd_hijack.EmbeddingsWithFixes(holder.token_embedding, hijack)
        width = wrapper.encode_embedding_init_text(",", 1).shape[1]
        for n in request["vectors"]:
            vec = torch.randn(n, width, generator=torch.Generator().manual_seed(n))
            embedding = textual_inversion.Embedding(vec, "laohuang")
            embedding.vectors, embedding.shape = n, width
            db.word_embeddings.clear()
            db.ids_lookup.clear()
            db.register_embedding(embedding, types.SimpleNamespace(cond_stage_model=wrapper))
            for skip in (1, 2) if family == "sd1" else (1,):
                step[0] = f"encoding with {family}, {n} vectors, clip skip {skip}"
                shared.opts.CLIP_stop_at_last_layers = skip
                cond = TextConditioner(ours_model.cond_stage_model, family, clip_skip=skip, max_chunks=100)
                with torch.no_grad():
                    theirs = wrapper(request["prompts"])
                    injection = Injection(cond, "laohuang", vec)
                    try:
                        ours = cond(request["prompts"])
                    finally:
                        injection.remove()
                same_shape = theirs.shape == ours.shape
                results[f"{family} n={n} clip_skip={skip}"] = {
                    "shapes": [list(theirs.shape), list(ours.shape)],
                    "max_abs_diff": float((theirs - ours).abs().max()) if same_shape else None,
                    "equal": bool(same_shape and torch.equal(theirs, ours)),
                }
    results.update(_sdxl(webui, workdir, request, step))
    step[0] = "writing results.json"
    (workdir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


def _sdxl(webui: str, workdir: Path, request: dict, step: list[str]) -> dict:
    import sgm.modules.encoders.modules as sgm_encoders
    import torch
    from modules import devices, sd_hijack, sd_models_xl, shared

    from lib_train.embedding.files import save_safetensors
    from lib_train.models.build import randomize_, tiny_sdxl_spec
    from lib_train.models.sdxl_load import build_sdxl
    from lib_train.webui.diagnostics import compare_sdxl_conditioning

    step[0] = "building the tiny SDXL model"
    model = build_sdxl(tiny_sdxl_spec(), webui_dir=webui)
    randomize_(model, 7)
    for embedder in model.conditioner.embedders:  # the offline builders only replace __init__: the classes the
        for cls in (sgm_encoders.FrozenCLIPEmbedder, sgm_encoders.FrozenOpenCLIPEmbedder2):  # WebUI's hijack knows
            if isinstance(embedder, cls):
                embedder.__class__ = cls
    sd_models_xl.extend_sdxl(model)
    devices.dtype_unet = torch.float32  # what the WebUI's model load sets with --no-half (the sizes' features are
    # cast to it; its default, fp16, would round them)
    hijack, db = sd_hijack.model_hijack, sd_hijack.model_hijack.embedding_db
    hijack.hijack(model)
    shared.sd_model = model
    folder = workdir / "embeddings"
    folder.mkdir()
    db.clear_embedding_dirs()
    db.add_embedding_dir(str(folder))
    widths = [e.encode_embedding_init_text(",", 1).shape[1] for e in model.conditioner.embedders
              if hasattr(e, "encode_embedding_init_text")]
    results = {}
    for n in request["vectors"]:
        step[0] = f"encoding with sdxl, {n} vectors"
        g = torch.Generator().manual_seed(n)
        save_safetensors(folder / "laohuang.safetensors", {"clip_l": torch.randn(n, widths[0], generator=g),
                                                           "clip_g": torch.randn(n, widths[1], generator=g)}, {})
        db.load_textual_inversion_embeddings(force_reload=True)
        found = compare_sdxl_conditioning(model, request["prompts"], [(1024, 1024)], embedding="laohuang")
        for key in ("crossattn", "vector"):
            mine = [r for r in found if r["key"] == key]
            batch = mine[-1]  # all prompts as one batch
            results[f"sdxl n={n} {key}"] = {
                "shapes": [batch["webui_shape"], batch["library_shape"]],
                "max_abs_diff": max((r["max_abs_diff"] for r in mine), key=lambda d: -1 if d is None else d),
                "equal": all(r["equal"] for r in mine),
                "changed": sum(r["embedding_changes"] for r in mine),
            }
    return results


def main(argv: list[str]) -> int:
    from worker_cli import worker_main

    return worker_main("webui_ti_worker", "<webui dir> <repo root> <workdir>", run, argv, convert=lambda a: [a[0], a[1], Path(a[2]).resolve()])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
