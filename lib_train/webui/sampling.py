"""Sample images during a WebUI run through the WebUI's own txt2img processing.

The model is the one being trained, in place: a LoRA run's network is attached to the loaded UNet and text encoder,
so a plain prompt (no ``<lora:…>`` tag) shows the LoRA as trained so far; an embedding run registers the current
vectors in the WebUI's embeddings database under the run's name for the duration of the call (and puts back what was
registered under that name before). Per call:

- ``do_not_reload_embeddings``: the database is not reloaded from disk (that would drop the registration);
- the conditioning caches are per call (``cached_c``/``cached_uc``): the WebUI's shared caches are keyed by prompt,
  not by weights, so they would hand back the conditioning of an earlier step;
- nothing is saved by the WebUI (our run saves the images), no scripts run, no extra networks are named (the Lora
  extension loads none, so nothing of it is left loaded afterwards);
- the VAE is on the training device for the call (a run moves it to the CPU once latents are cached).

The WebUI's Interrupt during a sample stops the sampler; the run then stops after this step as usual.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from ..errors import TrainerError
from ..train.sampling import SampleContext, SampleRequest


def check_sampler_name(name: str) -> str | None:
    """Why ``name`` is not a sampler of this WebUI (None when it is)."""
    from modules import sd_samplers

    if name in sd_samplers.all_samplers_map:
        return None
    known = ", ".join(sorted(sd_samplers.all_samplers_map)[:12])
    return f"'{name}' is not a sampler of this WebUI; use one of: {known} …"


class _RegisteredEmbedding:
    """The vectors being trained as a WebUI ``Embedding`` under ``name`` until :meth:`remove`: a tensor, or SDXL's
    ``{"clip_l", "clip_g"}`` (the WebUI's own form for a loaded SDXL file: ``vectors`` = the rows, ``shape`` = the
    summed widths)."""

    def __init__(self, name: str, vectors: Any):
        from modules import sd_hijack, shared
        from modules.textual_inversion.textual_inversion import Embedding

        self.db, self.model, self.name = sd_hijack.model_hijack.embedding_db, shared.sd_model, name
        self.previous = self.db.word_embeddings.get(name)
        parts = vectors if isinstance(vectors, dict) else {"": vectors}
        copies = {k: v.detach().clone() for k, v in parts.items()}
        emb = Embedding(copies if isinstance(vectors, dict) else copies[""], name)
        emb.vectors = int(next(iter(copies.values())).shape[0])
        emb.shape = sum(int(v.shape[1]) for v in copies.values())
        self.db.register_embedding_by_name(emb, self.model, name)

    def remove(self) -> None:
        self.db.register_embedding_by_name(self.previous, self.model, self.name)


def webui_sampler(run: SampleContext, request: SampleRequest) -> list[Image.Image]:
    """One image per prompt of ``request`` from ``processing.process_images`` (see the module docstring)."""
    from modules import processing, shared

    problem = check_sampler_name(request.sampler)
    if problem:
        raise TrainerError(f"sample.sampler: {problem}")
    registered = _RegisteredEmbedding(*run.embedding) if run.embedding is not None else None
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=list(request.prompts), negative_prompt=request.negative,
        seed=request.seed, steps=request.steps, cfg_scale=request.cfg_scale, width=request.width,
        height=request.height, sampler_name=request.sampler, batch_size=1, n_iter=len(request.prompts),
        do_not_save_samples=True, do_not_save_grid=True, outpath_samples=str(run.out_dir),
        outpath_grids=str(run.out_dir))
    p.do_not_reload_embeddings = True
    p.cached_c, p.cached_uc = [None, None], [None, None]  # per call: the shared caches ignore changed weights
    p.scripts = None
    job, job_count, job_no = shared.state.job, shared.state.job_count, shared.state.job_no
    try:
        with run.vae_ready():
            processed = processing.process_images(p)
    finally:
        p.close()
        if registered is not None:
            registered.remove()
        # the run's task name and step count, not the samples' ("Batch 2 out of 2")
        shared.state.job, shared.state.job_count, shared.state.job_no = job, job_count, job_no
    images = list(processed.images)
    if images:
        shared.state.assign_current_image(images[0])  # the progress bar's live preview shows the newest sample
    return images
