"""SDXL conditioning computed from the raw text modules, the way the WebUI computes it for plain captions
(FORMATS.md §E.4; sgm ``GeneralConditioner`` with the embedders of configs/inference/sd_xl_base.yaml).

- Cross-attention context ``[B, 77·k, 2048]``: each encoder tokenizes and chunks the caption on its own (the SD1
  rules of :mod:`.conditioning`: 75-token chunks, comma backtrack, padding with empty chunks; clip_l pads with EOS,
  clip_g with 0 after the first EOS), encodes every chunk at its layer — clip_l ``hidden_states[11]`` (the
  penultimate of 12) without the final norm, clip_g the penultimate block's output without ``ln_final`` — and the
  two are concatenated along the feature axis (768 ‖ 1280), chunk by chunk.
- Vector ``y`` ``[B, 2816]``: clip_g's pooled output of the caption's FIRST chunk (the WebUI takes
  ``zs[0].pooled``: ``ln_final`` at the end-of-text token, times ``text_projection``, 1280) ‖ the size embeddings of
  the original size (h, w), the crop's top-left (top, left) and the target size (h, w): 256 Fourier features per
  number (:func:`size_embedding`), 3 × 2 × 256 = 1536.

At inference the WebUI passes original = target = (H, W) of the image and crop = (``sdxl_crop_top``,
``sdxl_crop_left``) (0, 0 by default). For training, kohya's rule is each image's original size, the crop actually
applied and the bucket as the target.

Where the two encoders' chunk counts differ (their tokenizers split a caption differently; rare) the WebUI fails on
the concatenation; here both are padded to the larger count with empty chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .conditioning import TextConditioner
from .families import SDXL, Family

SIZE_FEATURES = 256  # Fourier features per size number (sgm ConcatTimestepEmbedderND outdim)
MAX_PERIOD = 10000


def size_embedding(values: torch.Tensor, features: int = SIZE_FEATURES) -> torch.Tensor:
    """Sinusoidal features of every number of ``values`` ``[B, n]`` → ``[B, n·features]`` (fp32).

    For a number v and i < features/2: frequency f_i = MAX_PERIOD^(-i / (features/2)); the features of v are
    ``cos(v·f_0 … v·f_{h-1}) ‖ sin(v·f_0 … v·f_{h-1})``, and the numbers' feature blocks follow each other.
    """
    if values.ndim == 1:
        values = values[:, None]
    half = features // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half).to(values.device)
    angles = values.reshape(-1)[:, None].float() * freqs[None]
    feats = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return feats.reshape(values.shape[0], values.shape[1] * features)


class TextRoot(torch.nn.Module):
    """The text-encoder root of an SDXL bundle: the raw (unwrapped) embedders at ``embedders.0`` (clip_l) and
    ``embedders.1`` (clip_g), the paths of the family's records. A view: it holds the model's own modules."""

    def __init__(self, embedders: Sequence[torch.nn.Module]):
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)


def text_root(conditioner, family: Family = SDXL) -> TextRoot:
    """:class:`TextRoot` over an sgm ``GeneralConditioner``'s text embedders. The WebUI replaces each by a prompt
    wrapper whose ``wrapped`` is the sgm embedder; that one is taken (its token-embedding table may still be wrapped
    by the WebUI's ``EmbeddingsWithFixes``, which passes plain token ids through)."""
    embedders = list(conditioner.embedders)[:len(family.text_encoders)]
    return TextRoot([getattr(e, "wrapped", e) for e in embedders])


def _pairs(values, batch: int, device) -> torch.Tensor:
    """(h, w)-style pairs → ``[B, 2]``: one pair for the whole batch, one per caption, or a tensor."""
    t = torch.as_tensor(values).to(device, non_blocking=True)  # a pageable copy that does not wait for the device
    if t.ndim == 1:
        t = t[None].expand(batch, -1)
    if tuple(t.shape) != (batch, 2):
        raise ValueError(f"expected one (a, b) pair or {batch} pairs, got shape {tuple(t.shape)}")
    return t


class SDXLConditioner:
    """Captions and sizes → ``{"crossattn": [B, 77·k, 2048], "vector": [B, 2816]}`` from SDXL's two text embedders.

    ``root`` holds the (unwrapped) embedders at the family's paths (sgm ``GeneralConditioner``: ``embedders.0`` with
    ``.transformer``/``.tokenizer``, ``embedders.1`` with ``.model``). The encoders run under the caller's grad mode
    (LoRA on them receives gradients).
    """

    def __init__(self, root, family: Family = SDXL, *, max_chunks: int = 3):
        self.family = family
        self.encoders = [TextConditioner(te.module(root), family, encoder=i, max_chunks=max_chunks)
                         for i, te in enumerate(family.text_encoders)]

    @property
    def truncated_captions(self) -> int:
        return max(c.truncated_captions for c in self.encoders)

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context ``[B, 77·k, Σ widths]``, pooled output of the first chunk ``[B, dim]``)."""
        tokens = [c.tokenize_prompts(captions) for c in self.encoders]
        k = max(ids.shape[1] for ids, _ in tokens)
        if any(ids.shape[1] != k for ids, _ in tokens):
            tokens = [c.tokenize_prompts(captions, min_chunks=k) for c in self.encoders]
        outputs = [c.encode_ids_pooled(ids, fixes) for c, (ids, fixes) in zip(self.encoders, tokens)]
        pooled = [p for _, p in outputs if p is not None]
        if len(pooled) != 1:
            raise ValueError(f"{self.family.label} needs exactly one text encoder with a pooled output")
        return torch.cat([z for z, _ in outputs], dim=-1), pooled[0][:, 0]

    def vector(self, pooled: torch.Tensor, original_size, crop_top_left, target_size) -> torch.Tensor:
        """``pooled`` ‖ size embeddings of original (h, w), crop (top, left), target (h, w): ``[B, 2816]``."""
        b = pooled.shape[0]
        sizes = [size_embedding(_pairs(v, b, pooled.device)) for v in (original_size, crop_top_left, target_size)]
        return torch.cat([pooled, *sizes], dim=1)

    def __call__(self, captions: list[str], original_size: Sequence | torch.Tensor,
                 crop_top_left: Sequence | torch.Tensor, target_size: Sequence | torch.Tensor) -> dict:
        """The UNet's conditioning for ``captions``; each size is one (a, b) pair for the batch or one per caption."""
        context, pooled = self.text(captions)
        return {"crossattn": context, "vector": self.vector(pooled, original_size, crop_top_left, target_size)}
