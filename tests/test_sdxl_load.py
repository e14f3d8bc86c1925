"""Headless SDXL loading.

CI tier (no sgm): finding sgm (:mod:`lib_train.models.sgm_import`) — an explicit folder, ``SD_WEBUI_DIR``, the
WebUI the extension is installed in — and its messages when nothing is found or a found checkout cannot be imported.
sgm tier (``SD_WEBUI_DIR``): a tiny SDXL-layout checkpoint file written from sgm's own model, loaded back through
the headless loader with SDXL switched on for the test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lib_train.errors import TrainerError
from lib_train.models import sgm_import


def _fake_webui(root: Path, sgm_init: str) -> Path:
    pkg = root / "repositories" / "generative-models" / "sgm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(sgm_init)
    return root


@pytest.fixture
def no_sgm(monkeypatch, tmp_path):
    """sgm not importable and no checkout anywhere: sgm modules unloaded, generative-models off sys.path, no
    SD_WEBUI_DIR, the extension "installed" in an empty folder (restored afterwards)."""
    for name in [n for n in sys.modules if n == "sgm" or n.startswith("sgm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "generative-models" not in p])
    monkeypatch.delenv(sgm_import.ENV_VAR, raising=False)
    monkeypatch.setattr(sgm_import, "EXTENSION_ROOT", tmp_path / "nowhere" / "extensions" / "trainer")
    yield
    for name in [n for n in sys.modules if n == "sgm" or n.startswith("sgm.")]:
        del sys.modules[name]  # the fake ones


def test_nothing_found_says_what_to_do(no_sgm, tmp_path):
    with pytest.raises(TrainerError) as err:
        sgm_import.import_sgm(tmp_path / "not-a-webui")
    text = str(err.value)
    assert text.startswith(sgm_import.NOT_FOUND)
    assert "run from an extension installed in the WebUI, or set SD_WEBUI_DIR=/path/to/stable-diffusion-webui" in text
    assert str(tmp_path / "not-a-webui" / "repositories" / "generative-models") in text


def test_search_order_explicit_env_extension(no_sgm, tmp_path, monkeypatch):
    explicit, env, installed = (_fake_webui(tmp_path / n, "") for n in ("explicit", "env", "installed"))
    monkeypatch.setattr(sgm_import, "EXTENSION_ROOT", installed / "extensions" / "sd-webui-trainer")
    sub = sgm_import.SGM_SUBDIR
    assert sgm_import.find_sgm_root() == installed / sub
    monkeypatch.setenv(sgm_import.ENV_VAR, str(env))
    assert sgm_import.find_sgm_root() == env / sub
    assert sgm_import.find_sgm_root(explicit) == explicit / sub
    assert sgm_import.find_sgm_root(tmp_path / "empty") == env / sub  # a folder without the checkout is skipped


def test_found_but_a_package_is_missing(no_sgm, tmp_path):
    webui = _fake_webui(tmp_path / "webui", "import kornia_not_installed_here\n")
    entry = str(webui / sgm_import.SGM_SUBDIR)
    with pytest.raises(TrainerError) as err:
        sgm_import.import_sgm(webui)
    text = str(err.value)
    assert f"sgm (found at {entry}) cannot be imported" in text
    assert "the Python package 'kornia_not_installed_here' is missing" in text
    assert "pip install kornia_not_installed_here" in text
    assert entry not in sys.path and "sgm" not in sys.modules  # nothing half-done left behind


def test_found_and_imported_from_the_checkout(no_sgm, tmp_path):
    webui = _fake_webui(tmp_path / "webui", "FAKE = True\n")
    assert sgm_import.import_sgm(webui).FAKE
    assert sys.path[0] == str(webui / sgm_import.SGM_SUBDIR)
    sgm_import.import_sgm(tmp_path / "elsewhere")  # importable now: no second entry
    assert sys.path.count(str(webui / sgm_import.SGM_SUBDIR)) == 1
