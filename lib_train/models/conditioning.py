"""Text conditioning computed from the raw ldm text modules, the way the WebUI computes it at inference.

For a plain caption (no emphasis syntax) the WebUI's prompt wrapper (FORMATS.md §E.4):

1. tokenizes the whole caption without special tokens;
2. cuts the tokens into chunks of 75; when a chunk is full and a comma appeared within the last 20 tokens, the chunk
   ends after that comma and the rest moves to the next chunk ("comma padding backtrack", default 20);
3. makes each chunk ``[BOS] + tokens + [EOS]`` padded to 77 — with EOS for SD1, with 0 after the first EOS for SD2
   (open_clip) — and a caption with no tokens still gets one (empty) chunk;
4. pads every caption of a batch to the same number of chunks with empty chunks;
5. encodes each chunk separately and concatenates the outputs along the token axis: ``[B, 77·k, width]``.

Layer choice: the family's text-encoder kind (:mod:`.text_encoders`): HF CLIP (SD1) with clip skip N>1 takes
``hidden_states[-N]`` and applies the final layer norm, else the last hidden state; open_clip (SD2) always takes the
penultimate block's output through ``ln_final`` (clip skip does not apply to SD2: :meth:`Family.clip_skip`). A text
encoder whose record names a :class:`~.text_encoders.Layer` (SDXL's clip_l and clip_g) is encoded at that layer from
the raw modules, with its pooled output where the layer asks for it (:meth:`TextConditioner.encode_ids_pooled`);
:mod:`.sdxl` combines SDXL's two encoders.
Captions longer than ``max_chunks`` chunks are cut (as kohya's ``max_token_length``); :func:`chunk_tokens` reports it.

Placeholders (textual-inversion embeddings, FORMATS.md §C.5/§E.4): when a :class:`Placeholders` registry is set on
the conditioner, a registered name found in the caption's tokens is replaced by ``n`` placeholder slots (id 0) that
take ``n`` of the chunk's 75 slots; if they do not fit, the chunk is closed and they start the next one. Each
occurrence is recorded as a :class:`Fix` (offset in the chunk, key), and during encoding the token-embedding output
at ``offset + 1 ...`` (after BOS) is replaced by the vectors. As in WebUI 1.10.1, comma backtracking moves
placeholder slots to the next chunk but leaves their fix with the chunk they were first placed in.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Callable, NamedTuple, Optional, Protocol, Tuple

import torch

from .families import Family, as_family
from .text_encoders import TokenIds

CHUNK = 75
COMMA_BACKTRACK = 20
PLACEHOLDER_ID = 0  # the id the WebUI writes into an embedding's slots; their token-embedding rows are replaced


class ImageSize(NamedTuple):
    """The sizes a size-conditioned family (SDXL, :attr:`.families.Family.size_conditioning`) conditions one image
    on, in pixels; other families ignore them. Pairs are (height, width) and (top, left), as sgm's embedders take
    them."""

    original: tuple[int, int]  # (h, w) of the source image
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in the resized image's pixels
    target: tuple[int, int]  # (h, w) of the image the UNet sees

    @classmethod
    def plain(cls, width: int, height: int) -> "ImageSize":
        """What the WebUI conditions a ``width`` × ``height`` generation on: original = target = (h, w), crop
        (0, 0) (its ``sdxl_crop_top``/``sdxl_crop_left`` defaults)."""
        return cls((height, width), (0, 0), (height, width))

    @classmethod
    def of_training_image(cls, plan, flip: bool = False) -> "ImageSize":
        """kohya's rule for a training image planned by a :class:`~lib_train.data.buckets.BucketPlan` (sizes (w, h),
        crop (left, top)): original = the source image's (h, w), crop = (top, left) of the crop applied to the
        resized image — with a horizontal flip the crop is mirrored, left = resized_w − left − bucket_w — and
        target = the bucket's (h, w)."""
        (src_w, src_h), (res_w, _), (b_w, b_h), (left, top) = plan.source, plan.resized, plan.bucket, plan.crop
        if flip:
            left = res_w - left - b_w
        return cls((src_h, src_w), (top, left), (b_h, b_w))


class Fix(NamedTuple):
    """An embedding occurrence in a chunk: its slots start at ``offset`` (0-based, BOS not counted)."""

    offset: int
    key: Hashable


# (tokens, position) -> (key, name length in tokens, slots) when a registered name starts at ``position``
FindName = Callable[[Sequence[int], int], Optional[Tuple[Hashable, int, int]]]


class Placeholders(Protocol):
    """What the conditioner needs from an embedding registry (implemented by ``lib_train.embedding.inject``)."""

    def find(self, tokens: Sequence[int], position: int) -> tuple[Hashable, int, int] | None:
        """``(key, name length in tokens, slots)`` if a registered name starts at ``tokens[position]``."""

    def splice(self, embeds: torch.Tensor, fixes: list[list[Fix]]) -> torch.Tensor:
        """Token-embedding output ``[rows, 77, width]`` → the same with each row's fixes' vectors in place."""


def chunk_prompt(tokens: Sequence[int], comma: int, *, max_chunks: int = 3, backtrack: int = COMMA_BACKTRACK,
                 find: FindName | None = None) -> tuple[list[list[int]], list[list[Fix]], bool]:
    """Split caption tokens into chunks of at most 75 (WebUI rule) with placeholder slots for registered names;
    returns (chunks, fixes per chunk, truncated)."""
    chunks: list[list[int]] = []
    fixes: list[list[Fix]] = []
    current: list[int] = []
    current_fixes: list[Fix] = []
    last_comma = -1  # index of the last comma in `current`

    def close(cut: int | None = None) -> None:
        nonlocal current, current_fixes, last_comma
        end = len(current) if cut is None else cut
        chunks.append(current[:end])
        fixes.append(current_fixes)  # WebUI 1.10.1: fixes stay here even when their slots move on
        current, current_fixes, last_comma = current[end:], [], -1

    position = 0
    while position < len(tokens):
        tok = tokens[position]
        if tok == comma:
            last_comma = len(current)
        elif backtrack and len(current) == CHUNK and last_comma != -1 and len(current) - last_comma <= backtrack:
            close(last_comma + 1)  # the full chunk ends after its last comma; the words after it move on
        if len(current) == CHUNK:
            close()
        match = find(tokens, position) if find is not None else None
        if match is None:
            current.append(tok)
            position += 1
            continue
        key, length, slots = match
        if len(current) + slots > CHUNK:
            close()
        current_fixes.append(Fix(len(current), key))
        current += [PLACEHOLDER_ID] * slots
        position += length
    if current or not chunks:
        close()
    truncated = len(chunks) > max_chunks
    return chunks[:max_chunks], fixes[:max_chunks], truncated


def chunk_tokens(tokens: list[int], comma: int, *, max_chunks: int = 3,
                 backtrack: int = COMMA_BACKTRACK) -> tuple[list[list[int]], bool]:
    """Split caption tokens into chunks of at most 75 (WebUI rule); returns (chunks, truncated)."""
    chunks, _fixes, truncated = chunk_prompt(tokens, comma, max_chunks=max_chunks, backtrack=backtrack)
    return chunks, truncated


def chunk_ids(chunk: list[int], ids: TokenIds) -> list[int]:
    """``[BOS] + chunk + [EOS]`` padded to 77 (EOS up to the first end, then ``ids.pad``)."""
    body = chunk + [ids.eos] * (CHUNK - len(chunk))
    seq = [ids.bos] + body + [ids.eos]
    if ids.pad != ids.eos:
        first_end = len(chunk) + 1
        seq = seq[: first_end + 1] + [ids.pad] * (len(seq) - first_end - 1)
    return seq


class TextConditioner:
    """Encodes captions with one text embedder of a family: the ldm embedder of SD1 (``FrozenCLIPEmbedder``) or SD2
    (``FrozenOpenCLIPEmbedder``), or one of SDXL's two (``encoder`` = 0 clip_l, 1 clip_g; :mod:`.sdxl` uses both).

    The encoder is called under the caller's grad mode, so LoRA on the text encoder receives gradients. Set
    ``placeholders`` to inject embedding vectors (see the module docstring); ``None`` (the default) encodes plain text.
    """

    def __init__(self, embedder, family: str | Family, *, clip_skip: int = 1, max_chunks: int = 3, encoder: int = 0):
        """``family``: a family name (or record); ``clip_skip``: the ``model.clip_skip`` setting (the family says
        whether it applies); ``encoder``: which of the family's text encoders ``embedder`` is."""
        self.embedder = embedder
        fam = as_family(family)
        self.family = fam.name
        self.encoder = fam.text_encoders[encoder]  # the record: kind, layer
        self.kind = self.encoder.kind  # tokenizer, token-embedding table and encoding of this text encoder
        self.clip_skip = fam.clip_skip(clip_skip)
        self.max_chunks = max_chunks
        self.truncated_captions = 0  # how many captions were longer than max_chunks × 75 tokens
        self.placeholders: Placeholders | None = None
        self._encode_text, self.ids = self.kind.tokenizer(embedder)

    def text_ids(self, text: str) -> list[int]:
        """The token ids of ``text`` without BOS/EOS, untruncated (the WebUI's ``cond_stage_model.tokenize``)."""
        return list(self._encode_text(text))

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        """The text encoder's token-embedding table ``[vocab, width]`` (no position embedding).

        Inside the WebUI the table is wrapped by the WebUI's ``EmbeddingsWithFixes`` (its embeddings database
        splices vectors there only while its prompt wrapper runs); the table itself is the wrapper's ``wrapped``.
        The wrapper calls it, so a hook on the table also fires through the wrapper."""
        table = self.kind.token_embedding(self.embedder)
        inner = getattr(table, "wrapped", None)
        return inner if isinstance(inner, torch.nn.Embedding) and not isinstance(table, torch.nn.Embedding) else table

    def tokenize_prompts(self, captions: list[str], min_chunks: int = 1) -> tuple[torch.Tensor, list[list[Fix]]]:
        """Token ids ``[B, k, 77]`` with every caption padded to the batch's chunk count ``k`` (at least
        ``min_chunks``), and the fixes of each of the ``B·k`` rows (row ``b·k + c`` = chunk ``c`` of caption
        ``b``)."""
        find = self.placeholders.find if self.placeholders is not None else None
        per_caption = []
        for text in captions:
            chunks, fixes, truncated = chunk_prompt(self._encode_text(text), self.ids.comma,
                                                    max_chunks=self.max_chunks, find=find)
            self.truncated_captions += int(truncated)
            per_caption.append((chunks, fixes))
        k = max(min_chunks, *(len(c) for c, _ in per_caption))
        rows = [[chunk_ids(c, self.ids) for c in chunks + [[]] * (k - len(chunks))] for chunks, _ in per_caption]
        row_fixes = [f for _, fixes in per_caption for f in fixes + [[]] * (k - len(fixes))]
        return torch.tensor(rows, dtype=torch.long), row_fixes

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids ``[B, k, 77]`` with every caption padded to the batch's chunk count ``k``."""
        return self.tokenize_prompts(captions)[0]

    def encode_ids(self, ids: torch.Tensor, fixes: list[list[Fix]] | None = None) -> torch.Tensor:
        """``[B, k, 77]`` token ids → conditioning ``[B, 77·k, width]``; ``fixes`` (per row, from
        :meth:`tokenize_prompts`) are spliced into the token-embedding output by ``placeholders``."""
        return self.encode_ids_pooled(ids, fixes)[0]

    def encode_ids_pooled(self, ids: torch.Tensor, fixes: list[list[Fix]] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`encode_ids`, plus the pooled output of every chunk ``[B, k, dim]`` where the encoder's layer
        gives one (SDXL clip_g), else None.

        Chunk ``c`` of every caption is encoded in one call (``B`` rows), chunk after chunk, as the WebUI's prompt
        wrapper does: the same rows in the same call give the WebUI's numbers bit for bit in a batch too (one call over
        all ``B·k`` rows differs in the last bits)."""
        b, k, n = ids.shape
        ids = ids.to(self._device(), non_blocking=True)  # no wait for the device's queued work
        if fixes and any(fixes) and self.placeholders is None:
            raise ValueError("fixes given but no placeholders are registered")
        zs, pools = [], []
        for c in range(k):
            chunk_fixes = fixes[c::k] if fixes else None  # row b·k + c of the fixes is caption b's chunk c
            z, pooled = self._encode_rows(ids[:, c], chunk_fixes)
            zs.append(z)
            pools.append(pooled)
        return torch.cat(zs, dim=1), (None if pools[0] is None else torch.stack(pools, dim=1))

    def _encode_rows(self, rows: torch.Tensor, fixes: list[list[Fix]] | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[R, 77]`` token ids → (hidden states ``[R, 77, width]``, pooled ``[R, dim]`` or None), with ``fixes``
        (one list per row) spliced into the token-embedding output."""
        hook = None
        if fixes and any(fixes):
            splice = self.placeholders.splice
            hook = self.token_embedding.register_forward_hook(lambda _m, _args, out: splice(out, fixes))
        try:
            if self.encoder.layer is None:
                return self.kind.encode(self.embedder, rows, self.clip_skip), None
            return self.kind.hidden(self.embedder, rows, self.encoder.layer)
        finally:
            if hook is not None:
                hook.remove()

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return self.encode_ids(*self.tokenize_prompts(captions))

    def _device(self) -> torch.device:
        return next(self.embedder.parameters()).device
