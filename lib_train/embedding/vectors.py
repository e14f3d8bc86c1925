"""A new embedding's starting vectors, with the WebUI's semantics (FORMATS.md §C.5, ``create_embedding``).

The init text is tokenized without BOS/EOS and its raw token-embedding rows are taken (no position embedding):

* SD1 (HF CLIP tokenizer called with ``max_length = n``) keeps at most the first ``n`` tokens; SD2 (open_clip's
  tokenizer) keeps all of them;
* vector ``i`` of ``n`` is row ``i · len // n``: fewer tokens than vectors repeat rows, more tokens spread out;
* an empty init text gives zeros. (The WebUI crashes on a text with no tokens, e.g. only spaces; we treat a blank
  text as empty.)
"""

from __future__ import annotations

import torch

from ..errors import TrainerError
from ..models.conditioning import TextConditioner


def count_tokens(text: str) -> int:
    """Tokens of ``text`` without BOS/EOS (CLIP BPE; SD1's and SD2's tokenizers give the same ids)."""
    from open_clip.tokenizer import _tokenizer

    return len(_tokenizer.encode(text))


def init_token_ids(conditioner: TextConditioner, init_text: str, n: int) -> list[int]:
    """The token ids whose embedding rows initialise ``n`` vectors (SD1: truncated to ``n``, by the text-encoder
    kind's ``truncates_init_text``)."""
    ids = conditioner.text_ids(init_text)
    return ids[:n] if conditioner.kind.truncates_init_text else ids


def init_vectors(conditioner: TextConditioner, init_text: str, n: int) -> torch.Tensor:
    """``[n, width]`` fp32 vectors on the CPU from the token embeddings of ``init_text`` (zeros when it is blank)."""
    weight = conditioner.token_embedding.weight
    if not init_text.strip():
        return torch.zeros(n, weight.shape[1], dtype=torch.float32)
    ids = init_token_ids(conditioner, init_text, n)
    if not ids:
        raise TrainerError(f"The init text {init_text!r} has no tokens; use a few words that describe the subject "
                           "or leave it empty for zero vectors.")
    with torch.no_grad():
        rows = weight[torch.tensor(ids, device=weight.device)].detach().to("cpu", torch.float32)
    return torch.stack([rows[i * len(ids) // n] for i in range(n)]).clone()


def name_collision(conditioner: TextConditioner, name: str) -> str | None:
    """A warning when ``name`` is a single token the text encoder already knows, else None.

    The WebUI replaces every occurrence of the name's token sequence in a prompt by the embedding, so a name that is
    a known word (``cat``) takes that word away from every prompt; diffusers also refuses to load an embedding whose
    name is already in its tokenizer's vocabulary.
    """
    ids = conditioner.text_ids(name)
    if len(ids) != 1:
        return None
    return (f"the embedding name {name!r} is a single word the text encoder already knows (token {ids[0]}): every "
            f"{name!r} in a prompt will be replaced by the embedding, and diffusers refuses names already in its "
            f"vocabulary. A made-up name such as '{name}-emb' or 'zq{name}' avoids this.")
