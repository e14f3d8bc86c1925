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

Output ``<workdir>/results.json``: ``{"<family> n=<n> clip_skip=<k>": {"shapes": [[...], [...]], "max_abs_diff":
float | null, "equal": bool}}``. Exit status 0 on success; otherwise 1 with a last line
``webui_ti_worker: <step> failed: ...``.
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
    step[0] = "writing results.json"
    (workdir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


def main(argv: list[str]) -> int:
    from worker_cli import worker_main

    return worker_main("webui_ti_worker", "<webui dir> <repo root> <workdir>", run, argv, convert=lambda a: [a[0], a[1], Path(a[2]).resolve()])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
