"""Sample images during a run (``[sample]`` in the config): the same prompts, seeds and settings every time, so
a set made at step 200 compares with the one at step 400.

When samples are made is :func:`due` (every N steps, after every N epochs, and once more at the end so the final
file has a picture). What makes them is a :class:`Sampler`:

- headless runs use :func:`ddim_sampler`, a deterministic DDIM (η = 0) with classifier-free guidance over the
  run's own conditioning (the LoRA being trained is applied in place, the embedding injected), decoded by the
  model's VAE;
- in the WebUI, ``lib_train.webui.sampling`` runs the WebUI's own txt2img processing, with the sampler named by
  ``sample.sampler``.

A set is one image per prompt line; a line may carry its own negative prompt, size, steps, CFG scale, seed and
(WebUI) sampler in kohya's syntax (``a photo of [name] --n blurry --w 512 --h 768 --s 28 --l 7 --d 42``, parsed by
:mod:`lib_train.sample_prompts`); the ``[sample]`` settings fill in the rest (:func:`request_for`).

Images are written atomically as ``samples/<name>-<step:06d>-<i>.png`` (``i``: the line's index) in the output
folder, with their prompt and settings in the PNG's ``parameters`` text (the WebUI's PNG Info); the run copies the
first image of the set made at a save's step to ``<file stem>.preview.png`` (the card picture of the WebUI's Lora
and Textual Inversion tabs). A sampler sees the run through a :class:`SampleContext` (nothing else of it).
"""

from __future__ import annotations

import io
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from PIL import Image, PngImagePlugin

from ..atomic import atomic_write_bytes
from ..config import TrainConfig, sample_prompt_lines
from ..models.bundle import ModelBundle
from ..models.conditioning import ImageSize
from ..sample_prompts import parse_prompts_strict

NAME_TAG = "[name]"


@dataclass(frozen=True)
class SampleImage:
    """One sample: its prompt and its settings (a prompt line's own options, else the ``[sample]`` settings)."""

    prompt: str  # ``[name]`` already filled in
    negative: str
    steps: int
    cfg_scale: float
    seed: int
    width: int
    height: int
    sampler: str  # the WebUI's sampler name (headless: always DDIM)

    def parameters(self, sampler: str | None = None) -> str:
        """The image's settings as the WebUI writes them into a PNG (``parameters``: PNG Info shows them)."""
        negative = f"\nNegative prompt: {self.negative}" if self.negative else ""
        return (f"{self.prompt}{negative}\nSteps: {self.steps}, Sampler: {sampler or self.sampler}, "
                f"CFG scale: {self.cfg_scale:g}, Seed: {self.seed}, Size: {self.width}x{self.height}")


@dataclass(frozen=True)
class SampleRequest:
    """One set of samples: one image per prompt line, each with its own settings."""

    images: tuple[SampleImage, ...]

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(image.prompt for image in self.images)

    @property
    def texts(self) -> list[str]:
        """Every prompt and negative prompt of the set, once each (what a text cache encodes up front)."""
        return list(dict.fromkeys(t for image in self.images for t in (image.prompt, image.negative)))


@contextmanager
def vae_on_device(bundle: ModelBundle, device: torch.device) -> Iterator[torch.nn.Module]:
    """The VAE on ``device`` for the block (a run moves it to the CPU once latents are cached)."""
    vae = bundle.vae
    moved = next(vae.parameters()).device != device
    if moved:
        vae.to(device)
    try:
        yield vae
    finally:
        if moved:
            vae.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()


@dataclass(frozen=True)
class SampleContext:
    """What a sampler sees of a run: the model as trained right now and how the run conditions it."""

    cfg: TrainConfig
    bundle: ModelBundle
    device: torch.device
    autocast: torch.dtype | None  # the run's autocast dtype (None: fp32)
    name_text: str  # what ``[name]`` in a prompt became (the embedding's name, or the LoRA's trigger words)
    # the embedding being trained (name, current vectors: a tensor, or SDXL's {"clip_l", "clip_g"}), to register
    embedding: tuple[str, torch.Tensor | dict[str, torch.Tensor]] | None
    # (prompts, sizes) → UNet conditioning, as the run computes it (sizes: one ImageSize per prompt, for families
    # with size conditioning)
    condition: Callable[[list[str], list[ImageSize] | None], Any]

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output.output_dir)

    def vae_ready(self):
        """The VAE on the training device for a ``with`` block (see :func:`vae_on_device`)."""
        return vae_on_device(self.bundle, self.device)


class Sampler(Protocol):
    def __call__(self, ctx: SampleContext, request: SampleRequest) -> list[Image.Image]:
        """The images of ``request`` made with the model as it is trained right now (one per prompt)."""


def enabled(cfg: TrainConfig) -> bool:
    return bool(sample_prompt_lines(cfg.sample.prompts))


def request_for(cfg: TrainConfig, name_text: str) -> SampleRequest:
    """The run's sample set: one image per prompt line (:mod:`lib_train.sample_prompts`), each with the line's own options
    and the ``[sample]`` settings for the rest; ``[name]`` in a prompt or negative prompt becomes ``name_text`` (the
    embedding's name, or the LoRA's trigger words). A line without ``--d`` uses ``sample.seed + i`` (i: the line's
    index), as the WebUI numbers a batch's seeds. ``cfg`` is validated (:func:`lib_train.config.validate`): a line
    with problems here raises :class:`~lib_train.sample_prompts.SamplePromptError`."""
    s, res = cfg.sample, cfg.data.resolution

    def fill(text: str) -> str:
        return " ".join(text.replace(NAME_TAG, name_text).split())

    images = []
    for i, line in enumerate(parse_prompts_strict(s.prompts)):
        images.append(SampleImage(
            prompt=fill(line.prompt), negative=fill(s.negative if line.negative is None else line.negative),
            steps=line.steps or s.steps, cfg_scale=s.cfg_scale if line.cfg_scale is None else line.cfg_scale,
            seed=s.seed + i if line.seed is None else line.seed, width=line.width or s.width or res,
            height=line.height or s.height or res, sampler=line.sampler or s.sampler))
    return SampleRequest(tuple(images))


def due(cfg: TrainConfig, step: int, *, epoch_end: int | None = None, final: bool = False) -> bool:
    """Whether a set is due after optimizer step ``step`` (``epoch_end``: the 1-based epoch that just ended;
    ``final``: the run's last step)."""
    s = cfg.sample
    if not enabled(cfg):
        return False
    if final:
        return True
    if epoch_end is not None:
        return bool(s.every_epochs) and epoch_end % s.every_epochs == 0
    return bool(s.every_steps) and step % s.every_steps == 0


def save_samples(out_dir: Path, name: str, step: int, images: list[Image.Image]) -> list[Path]:
    """Write ``samples/<name>-<step:06d>-<i>.png`` atomically (``i``: the prompt line's index, so two lines never
    share a file, whatever their text or seed); an image's ``info["parameters"]`` (its prompt and settings, as the
    WebUI writes them) goes into the PNG. Returns the paths."""
    folder = Path(out_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        buf = io.BytesIO()
        text = image.info.get("parameters")
        if isinstance(text, str) and text:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", text)
            image.save(buf, format="PNG", pnginfo=info)
        else:
            image.save(buf, format="PNG")
        paths.append(atomic_write_bytes(folder / f"{name}-{step:06d}-{i}.png", buf.getvalue()))
    return paths


def write_preview(model_file: str | Path, sample: Path) -> Path:
    """Copy ``sample`` to ``<model file stem>.preview.png`` (what the WebUI's cards show)."""
    target = Path(model_file).parent / f"{Path(model_file).stem}.preview.png"
    return atomic_write_bytes(target, Path(sample).read_bytes())


def ddim_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """The ``steps`` timesteps DDIM visits, first (noisiest) to last: uniform spacing ``train_steps // steps``,
    shifted by one (ldm's "uniform" discretisation)."""
    stride = max(train_steps // steps, 1)
    return [t + 1 for t in range(0, train_steps, stride)][:steps][::-1]


def to_image(pixels: torch.Tensor) -> Image.Image:
    """One image in [-1, 1] ``[3,H,W]`` → an RGB PIL image."""
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def ddim_denoise(model_out: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, ac: torch.Tensor,
                 timesteps: list[int], prediction: str) -> torch.Tensor:
    """DDIM (η = 0) from noise ``x`` at ``timesteps[0]`` to the clean latents: ``model_out(x, t)`` is the guided
    model output (ε, or v for ``prediction == "v"``), ``ac`` the fp32 ``alphas_cumprod``."""
    for j, t in enumerate(timesteps):
        a_t = ac[t]
        a_prev = ac[timesteps[j + 1]] if j + 1 < len(timesteps) else ac[0]
        out = model_out(x, t)
        if prediction == "v":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


class _ResizingTorch:
    """``torch`` as the UNet's code sees it while sampling, except ``cat``: an upsampled feature map whose size
    differs from its skip connection's (a latent side that is not a multiple of the UNet's downsampling factor, e.g.
    a 520-px sample: 65 → 33 → 17 → 9 → 18 ≠ 17) is first resized to it (nearest), as the WebUI's txt2img does, so
    every multiple of 8 can be sampled headless too."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def cat(tensors, *args, **kwargs) -> torch.Tensor:
        dim = kwargs.get("dim", args[0] if args else 0)
        if dim == 1 and len(tensors) == 2 and tensors[0].dim() == 4 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
            up, skip = tensors
            tensors = (torch.nn.functional.interpolate(up, size=skip.shape[-2:], mode="nearest"), skip)
        return torch.cat(tensors, *args, **kwargs)


@contextmanager
def any_sample_size(unet: torch.nn.Module) -> Iterator[None]:
    """For the block, the UNet's module (ldm's or sgm's ``openaimodel``, which call ``th.cat`` for the skip
    connections) sees :class:`_ResizingTorch`; put back afterwards."""
    module = sys.modules.get(type(unet).__module__)
    if module is None or getattr(module, "th", None) is not torch:
        yield
        return
    module.th = _ResizingTorch()
    try:
        yield
    finally:
        module.th = torch


@torch.no_grad()
def ddim_sampler(run: SampleContext, request: SampleRequest) -> list[Image.Image]:
    """Deterministic DDIM with classifier-free guidance on the run's bundle (headless runs), one image per
    :class:`SampleImage` with its own size, steps, scale, seed and negative prompt (its sampler name is not used:
    always DDIM). The unconditional half is the negative prompt's conditioning (the empty prompt's by default); a
    size-conditioned family (SDXL) is conditioned on the sample's own size, as the WebUI conditions a generation
    (:meth:`ImageSize.plain`). The noise comes from a CPU generator seeded with the image's seed, so a seed gives the
    same image on any device."""
    bundle, device = run.bundle, run.device
    ac = bundle.alphas_cumprod.to(device)
    ctx = torch.autocast(device.type, dtype=run.autocast) if run.autocast else nullcontext()
    images = []
    for spec in request.images:
        ts = ddim_timesteps(spec.steps, ac.shape[0])
        sizes = [ImageSize.plain(spec.width, spec.height)]
        gen = torch.Generator().manual_seed(spec.seed)
        x = torch.randn((1, 4, spec.height // 8, spec.width // 8), generator=gen).to(device)
        with ctx:
            cond = run.condition([spec.prompt], sizes)
            uncond = run.condition([spec.negative], sizes) if spec.cfg_scale != 1 else None

        def guided(x_t: torch.Tensor, t: int, cond=cond, uncond=uncond, scale=spec.cfg_scale) -> torch.Tensor:
            tt = torch.full((1,), t, device=device, dtype=torch.long)
            with ctx:
                out_c = bundle.predict(x_t, tt, cond).float()
                if uncond is None:
                    return out_c
                out_u = bundle.predict(x_t, tt, uncond).float()
            return out_u + scale * (out_c - out_u)

        with any_sample_size(bundle.unet):
            latents = ddim_denoise(guided, x, ac, ts, bundle.prediction)
        with run.vae_ready():
            image = to_image(bundle.decode_latents(latents)[0])
        image.info["parameters"] = spec.parameters("DDIM")
        images.append(image)
    return images
