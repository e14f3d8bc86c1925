"""Put embedding vectors into the text encoder at the name's token slots, as the WebUI does at inference.

:class:`EmbeddingSlots` is the registry a :class:`~lib_train.models.conditioning.TextConditioner` consults
(its ``placeholders``): ``find`` recognises a registered name in a caption's tokens (its token sequence as the
tokenizer produces it on its own, longest registered name first — the WebUI's ``find_embedding_at_position``) and
says how many slots it takes (its vector count); the conditioner lays out the chunks and calls ``splice`` on the
token-embedding output, which writes each occurrence's vectors at ``offset + 1`` (after BOS), cut at the end of the
77-token row, cast to the output's dtype (FORMATS.md §C.5, §E.4; the WebUI's ``EmbeddingsWithFixes``). The vectors
enter the graph, so training them works through the frozen text encoder and UNet.

A family with several text encoders (SDXL) has one registry per encoder, each holding that encoder's vectors under
the same name and the same token ids: as in the WebUI, the name is registered once by the FIRST encoder's tokenizer
(``cond_stage_model.tokenize``, clip_l's on SDXL), and each encoder lays out its own chunks and finds the name in its
own tokens (:class:`Injection`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from ..errors import TrainerError
from ..models.conditioning import Fix, TextConditioner


class EmbeddingSlots:
    """Registered embeddings: name token ids → vectors ``[n, width]``."""

    def __init__(self) -> None:
        self._by_first: dict[int, list[tuple[tuple[int, ...], Hashable]]] = {}
        self.vectors: dict[Hashable, torch.Tensor] = {}

    def add(self, key: Hashable, ids: Sequence[int], vectors: torch.Tensor) -> None:
        if not ids:
            raise TrainerError(f"the embedding name {key!r} has no tokens; use letters or digits in the name")
        ids = tuple(ids)
        entries = [e for e in self._by_first.get(ids[0], []) if e[1] != key] + [(ids, key)]
        self._by_first[ids[0]] = sorted(entries, key=lambda e: -len(e[0]))
        self.vectors[key] = vectors

    def find(self, tokens: Sequence[int], position: int) -> tuple[Hashable, int, int] | None:
        for ids, key in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position:position + len(ids)]) == ids:
                return key, len(ids), int(self.vectors[key].shape[0])
        return None

    def splice(self, embeds: torch.Tensor, fixes: list[list[Fix]]) -> torch.Tensor:
        """``embeds`` ``[rows, 77, width]`` with the vectors of ``fixes[row]`` written after each fix's offset."""
        out = embeds.clone()
        for row, row_fixes in enumerate(fixes):
            for offset, key in row_fixes:
                vec = self.vectors[key].to(device=out.device, dtype=out.dtype)
                n = min(out.shape[1] - offset - 1, vec.shape[0])
                out[row, offset + 1:offset + 1 + n] = vec[:n]
        return out


class Injection:
    """Registers ``vectors`` under ``name`` on ``conditioners`` until :meth:`remove` (each conditioner's previous
    registry, usually none, is put back).

    One conditioner and a tensor ``[n, width]``, or one conditioner per text encoder of the family (record order)
    and a tensor for each (SDXL: clip_l ``[n, 768]``, clip_g ``[n, 1280]``; the same ``n``)."""

    def __init__(self, conditioners: TextConditioner | Sequence[TextConditioner], name: str,
                 vectors: torch.Tensor | Sequence[torch.Tensor]):
        conds = [conditioners] if isinstance(conditioners, TextConditioner) else list(conditioners)
        vecs = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
        if len(conds) != len(vecs) or len({int(v.shape[0]) for v in vecs}) != 1:
            raise ValueError(f"{len(vecs)} vector sets for {len(conds)} text encoders, or different vector counts")
        ids = conds[0].text_ids(name)  # the WebUI registers a name by the first encoder's tokens
        self.slots = []
        self._installed: list[tuple[TextConditioner, object]] = []
        for cond, vec in zip(conds, vecs):
            slots = EmbeddingSlots()
            slots.add(name, ids, vec)
            self.slots.append(slots)
            self._installed.append((cond, cond.placeholders))
            cond.placeholders = slots

    def remove(self) -> None:
        for cond, previous in self._installed:
            cond.placeholders = previous
        self._installed = []
