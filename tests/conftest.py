"""Shared fixtures; the plain helpers the tests import (tiny models, files, configs) live in helpers.py.

The tiny models are random-weight SD models built from the real model code (ldm, transformers CLIP, open_clip) with
the full SD1/SD2 key layout (every block type of the real architecture) at small widths, so naming, loading and
training run through exactly the code paths a real checkpoint uses, in seconds on a CPU.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from helpers import tiny_state_dict

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(autouse=True, scope="session")
def _trainer_cache_dir(tmp_path_factory):
    """Keep the tokenizer/hash caches of the tests out of the user's home folder."""
    os.environ["TRAINER_CACHE_DIR"] = str(tmp_path_factory.mktemp("trainer-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models are dominated by per-op overhead: one intra-op thread is faster and does not fight the
    subprocesses some tests start."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny SD1 checkpoint file with the full ldm key layout."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors"
    save_file(tiny_state_dict("sd1"), str(path))
    return path
