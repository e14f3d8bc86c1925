"""Sample images during a WebUI run through the WebUI's own txt2img processing.

Each prompt line is one txt2img call with the line's own size, steps, CFG scale, seed, negative prompt and sampler
(:class:`~lib_train.train.sampling.SampleImage`; kohya's ``--w --h --s --l --d --n --ss`` options). The model is the
one being trained, in place: a LoRA run's network is attached to the loaded UNet and text encoder,
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

from ..config import TrainConfig
from ..errors import Problem, TrainerError
from ..sample_prompts import parse_prompts
from ..train.sampling import SampleContext, SampleImage, SampleRequest


def check_sampler_name(name: str) -> str | None:
    """Why ``name`` is not a sampler of this WebUI (None when it is)."""
    from modules import sd_samplers

    if name in sd_samplers.all_samplers_map:
        return None
    known = ", ".join(sorted(sd_samplers.all_samplers_map)[:12])
    return f"'{name}' is not a sampler of this WebUI; use one of: {known} …"


def sampler_problems(cfg: TrainConfig) -> list[Problem]:
    """The sampler names of a run's samples that this WebUI does not have: ``sample.sampler`` and each prompt line's
    ``--ss`` (checked before the run starts)."""
    found = []
    problem = check_sampler_name(cfg.sample.sampler)
    if problem:
        found.append(Problem("sample.sampler", problem))
    for line in parse_prompts(cfg.sample.prompts)[0]:
        problem = check_sampler_name(line.sampler) if line.sampler else None
        if problem:
            found.append(Problem("sample.prompts", f"sample prompt line {line.line}: --ss {problem}"))
    return found


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
    """One image per prompt line of ``request``, each from its own ``processing.process_images`` call with the
    line's size, steps, CFG scale, seed, negative prompt and sampler (see the module docstring); an Interrupt ends
    the set early (the images made so far are returned)."""
    from modules import shared

    for name in dict.fromkeys(image.sampler for image in request.images):
        problem = check_sampler_name(name)
        if problem:
            raise TrainerError(f"sample.sampler: {problem}")
    registered = _RegisteredEmbedding(*run.embedding) if run.embedding is not None else None
    job, job_count, job_no = shared.state.job, shared.state.job_count, shared.state.job_no
    images: list[Image.Image] = []
    try:
        with run.vae_ready():
            for spec in request.images:
                images += _txt2img(run, spec)
                if shared.state.interrupted:
                    break
    finally:
        if registered is not None:
            registered.remove()
        # the run's task name and step count, not the samples' ("Batch 2 out of 2")
        shared.state.job, shared.state.job_count, shared.state.job_no = job, job_count, job_no
    if images:
        shared.state.assign_current_image(images[-1])  # the progress bar's live preview shows the newest sample
    return images


def _txt2img(run: SampleContext, spec: SampleImage) -> list[Image.Image]:
    """``spec`` made by the WebUI's txt2img: its images, each with the WebUI's infotext as ``info["parameters"]``."""
    from modules import processing, shared

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=spec.prompt, negative_prompt=spec.negative, seed=spec.seed,
        steps=spec.steps, cfg_scale=spec.cfg_scale, width=spec.width, height=spec.height, sampler_name=spec.sampler,
        batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True, outpath_samples=str(run.out_dir),
        outpath_grids=str(run.out_dir))
    p.do_not_reload_embeddings = True
    p.cached_c, p.cached_uc = [None, None], [None, None]  # per call: the shared caches ignore changed weights
    p.scripts = None
    try:
        processed = processing.process_images(p)
    finally:
        p.close()
    images = list(processed.images)
    infotexts = list(getattr(processed, "infotexts", None) or [])
    for k, image in enumerate(images):
        image.info["parameters"] = infotexts[k] if k < len(infotexts) and infotexts[k] else spec.parameters()
    return images
