"""Caption augmentation: tag shuffling, keep-first-N, tag dropout and whole-caption dropout (pure, no torch).

A caption is a comma-separated tag list (``"mychar, 1girl, red hair"``). The options mirror kohya's
``--shuffle_caption``, ``--keep_tokens``, ``--caption_tag_dropout_rate`` and ``--caption_dropout_rate``:
the first ``keep_tokens`` tags stay first and in order (put the trigger word there), the rest are shuffled and/or
dropped one by one. All randomness comes from the ``rng`` argument, so a given rng state always gives the same result
(the epoch planner hands every sample its own seed, which makes a resumed run see the same captions).
"""

from __future__ import annotations

import random

TAG_SEPARATOR = ","


def split_tags(caption: str) -> list[str]:
    """Split on ``","``, strip each tag, drop empty ones: ``"a, b,,c "`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in caption.split(TAG_SEPARATOR) if t.strip()]


def join_tags(tags: list[str]) -> str:
    """Inverse of :func:`split_tags`: tags joined by ``", "``."""
    return ", ".join(tags)


def process_caption(
    caption: str,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    caption_dropout_rate: float = 0.0,
    tag_dropout_rate: float = 0.0,
    rng: random.Random,
) -> str:
    """Return the caption a training step uses.

    1. With probability ``caption_dropout_rate`` the whole caption becomes ``""`` (unconditional sample).
    2. Otherwise, if ``shuffle`` or ``tag_dropout_rate > 0``: the first ``keep_tokens`` tags are kept in place;
       each remaining tag is dropped with probability ``tag_dropout_rate``, and the survivors are shuffled when
       ``shuffle``. The result is re-joined with ``", "``.
    3. With neither option the caption is returned unchanged (its own spacing and punctuation kept).
    """
    if not 0.0 <= caption_dropout_rate <= 1.0 or not 0.0 <= tag_dropout_rate <= 1.0:
        raise ValueError("caption_dropout_rate and tag_dropout_rate must be between 0 and 1")
    if keep_tokens < 0:
        raise ValueError("keep_tokens must be 0 or more")
    if caption_dropout_rate > 0.0 and rng.random() < caption_dropout_rate:
        return ""
    if not shuffle and tag_dropout_rate <= 0.0:
        return caption
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout_rate > 0.0:
        rest = [t for t in rest if rng.random() >= tag_dropout_rate]
    if shuffle:
        rng.shuffle(rest)
    return join_tags(kept + rest)
