from __future__ import annotations

import random

import pytest

from lib_train.data.captions import process_caption, split_tags

CAPTION = "mychar, 1girl, red hair, smile, outdoors, looking at viewer, tree"


def test_split_tags():
    assert split_tags(" a, b ,, c,") == ["a", "b", "c"]
    assert split_tags("") == []


def test_no_options_returns_caption_unchanged():
    text = "a photo of  mychar,with (odd:1.2) spacing"
    assert process_caption(text, rng=random.Random(0)) == text


def test_shuffle_keeps_first_tokens_and_all_tags():
    results = set()
    for seed in range(20):
        out = split_tags(process_caption(CAPTION, shuffle=True, keep_tokens=2, rng=random.Random(seed)))
        assert out[:2] == ["mychar", "1girl"]
        assert sorted(out) == sorted(split_tags(CAPTION))
        results.add(tuple(out))
    assert len(results) > 5


def test_deterministic_for_equal_rng_state():
    kwargs = dict(shuffle=True, keep_tokens=1, tag_dropout_rate=0.3, caption_dropout_rate=0.1)
    a = [process_caption(CAPTION, rng=random.Random(42), **kwargs) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_tag_dropout_never_drops_kept_tokens():
    out = process_caption(CAPTION, keep_tokens=1, tag_dropout_rate=1.0, rng=random.Random(0))
    assert out == "mychar"
    rng = random.Random(1)
    kept_counts = [len(split_tags(process_caption(CAPTION, keep_tokens=1, tag_dropout_rate=0.5, rng=rng)))
                   for _ in range(200)]
    assert min(kept_counts) >= 1 and 2.5 < sum(kept_counts) / 200 - 1 < 3.5  # ~half of the 6 other tags survive


def test_caption_dropout():
    assert process_caption(CAPTION, caption_dropout_rate=1.0, keep_tokens=3, rng=random.Random(0)) == ""
    rng = random.Random(5)
    dropped = sum(process_caption(CAPTION, caption_dropout_rate=0.25, rng=rng) == "" for _ in range(400))
    assert 60 < dropped < 140


@pytest.mark.parametrize("kwargs", [dict(caption_dropout_rate=1.5), dict(tag_dropout_rate=-0.1), dict(keep_tokens=-1)])
def test_invalid_rates(kwargs):
    with pytest.raises(ValueError):
        process_caption(CAPTION, rng=random.Random(0), **kwargs)
