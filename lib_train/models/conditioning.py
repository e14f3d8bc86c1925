"""Text conditioning computed from the raw ldm text modules, the way the WebUI computes it at inference.

For a plain caption (no emphasis syntax) the WebUI's prompt wrapper (FORMATS.md §E.4):

1. tokenizes the whole caption without special tokens;
2. cuts the tokens into chunks of 75; when a chunk is full and a comma appeared within the last 20 tokens, the chunk
   ends after that comma and the rest moves to the next chunk ("comma padding backtrack", default 20);
3. makes each chunk ``[BOS] + tokens + [EOS]`` padded to 77 — with EOS for SD1, with 0 after the first EOS for SD2
   (open_clip) — and a caption with no tokens still gets one (empty) chunk;
4. pads every caption of a batch to the same number of chunks with empty chunks;
5. encodes each chunk separately and concatenates the outputs along the token axis: ``[B, 77·k, width]``.

Layer choice: SD1 with clip skip N>1 takes ``hidden_states[-N]`` and applies the final layer norm, else the last
hidden state; SD2 always takes the penultimate block's output through ``ln_final`` (clip skip does not apply).
Captions longer than ``max_chunks`` chunks are cut (as kohya's ``max_token_length``); :func:`chunk_tokens` reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 75
COMMA_BACKTRACK = 20


@dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    pad: int
    comma: int


def chunk_tokens(tokens: list[int], comma: int, *, max_chunks: int = 3,
                 backtrack: int = COMMA_BACKTRACK) -> tuple[list[list[int]], bool]:
    """Split caption tokens into chunks of at most 75 (WebUI rule); returns (chunks, truncated)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma = -1  # index of the last comma in `current`
    for tok in tokens:
        if tok == comma:
            last_comma = len(current)
        elif backtrack and len(current) == CHUNK and last_comma != -1 and len(current) - last_comma <= backtrack:
            cut = last_comma + 1  # the full chunk ends after its last comma; the words after it move on
            chunks.append(current[:cut])
            current = current[cut:]
            last_comma = -1
        if len(current) == CHUNK:
            chunks.append(current)
            current = []
            last_comma = -1
        current.append(tok)
    if current or not chunks:
        chunks.append(current)
    truncated = len(chunks) > max_chunks
    return chunks[:max_chunks], truncated


def chunk_ids(chunk: list[int], ids: TokenIds) -> list[int]:
    """``[BOS] + chunk + [EOS]`` padded to 77 (EOS up to the first end, then ``ids.pad``)."""
    body = chunk + [ids.eos] * (CHUNK - len(chunk))
    seq = [ids.bos] + body + [ids.eos]
    if ids.pad != ids.eos:
        first_end = len(chunk) + 1
        seq = seq[: first_end + 1] + [ids.pad] * (len(seq) - first_end - 1)
    return seq


class TextConditioner:
    """Encodes captions with an ldm ``FrozenCLIPEmbedder`` (SD1) or ``FrozenOpenCLIPEmbedder`` (SD2).

    The encoder is called under the caller's grad mode, so LoRA on the text encoder receives gradients.
    """

    def __init__(self, embedder, family: str, *, clip_skip: int = 1, max_chunks: int = 3):
        self.embedder = embedder
        self.family = family
        self.clip_skip = clip_skip
        self.max_chunks = max_chunks
        self.truncated_captions = 0  # how many captions were longer than max_chunks × 75 tokens
        if family == "sd1":
            tok = embedder.tokenizer
            self._encode_text = lambda text: tok(text, add_special_tokens=False, truncation=False)["input_ids"]
            self.ids = TokenIds(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.eos_token_id,
                                comma=tok.get_vocab()[",</w>"])
        else:
            from open_clip.tokenizer import _tokenizer as simple

            self._encode_text = simple.encode
            self.ids = TokenIds(bos=simple.encoder["<start_of_text>"], eos=simple.encoder["<end_of_text>"], pad=0,
                                comma=simple.encoder[",</w>"])

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids ``[B, k, 77]`` with every caption padded to the batch's chunk count ``k``."""
        per_caption = []
        for text in captions:
            chunks, truncated = chunk_tokens(self._encode_text(text), self.ids.comma, max_chunks=self.max_chunks)
            self.truncated_captions += int(truncated)
            per_caption.append(chunks)
        k = max(len(c) for c in per_caption)
        rows = [[chunk_ids(c, self.ids) for c in chunks + [[]] * (k - len(chunks))] for chunks in per_caption]
        return torch.tensor(rows, dtype=torch.long)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, k, 77]`` token ids → conditioning ``[B, 77·k, width]``."""
        b, k, n = ids.shape
        flat = ids.reshape(b * k, n).to(self._device())
        if self.family == "sd1":
            tr = self.embedder.transformer
            if self.clip_skip > 1:
                out = tr(input_ids=flat, output_hidden_states=True)
                z = tr.text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
            else:
                z = tr(input_ids=flat).last_hidden_state
        else:
            z = self.embedder.encode_with_transformer(flat)
        return z.reshape(b, k * n, z.shape[-1])

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(captions))

    def _device(self) -> torch.device:
        return next(self.embedder.parameters()).device
