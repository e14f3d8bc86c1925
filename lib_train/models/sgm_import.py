"""Finding sgm, SDXL's model code, for headless loading.

sgm (Stability-AI's generative-models) is not on PyPI; the WebUI keeps a checkout at
``<webui>/repositories/generative-models``, and inside the WebUI it is importable already. Headless, the folder is
looked for in this order: an explicit WebUI folder, the ``SD_WEBUI_DIR`` environment variable, and the WebUI this
extension is installed in (``<webui>/extensions/<name>/``, so ``<this repo>/../..``). The first checkout found is
added to ``sys.path``, and only when ``import sgm`` fails without it.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from ..errors import TrainerError

ENV_VAR = "SD_WEBUI_DIR"
SGM_SUBDIR = Path("repositories") / "generative-models"
EXTENSION_ROOT = Path(__file__).resolve().parents[2]  # <webui>/extensions/<name> when installed as an extension

NOT_FOUND = ("SDXL needs the WebUI's copy of Stability-AI's generative-models code: run from an extension installed "
             f"in the WebUI, or set {ENV_VAR}=/path/to/stable-diffusion-webui")


def candidate_webui_dirs(webui_dir: str | os.PathLike | None = None) -> list[Path]:
    """The WebUI folders to look in, in order: ``webui_dir``, ``$SD_WEBUI_DIR``, the one this extension sits in."""
    found = [Path(p).expanduser() for p in (webui_dir, os.environ.get(ENV_VAR)) if p]
    return found + [EXTENSION_ROOT.parent.parent]


def find_sgm_root(webui_dir: str | os.PathLike | None = None) -> Path:
    """The first ``repositories/generative-models`` (holding the ``sgm`` package) under the candidate folders;
    TrainerError saying what to do when there is none."""
    looked = []
    for webui in candidate_webui_dirs(webui_dir):
        root = webui / SGM_SUBDIR
        if (root / "sgm" / "__init__.py").is_file():
            return root
        looked.append(str(root))
    raise TrainerError(f"{NOT_FOUND} (no sgm package in: {', '.join(looked)}).")


def _import_error(root: Path | None, err: ImportError) -> TrainerError:
    where = f"sgm (found at {root})" if root else "sgm"
    missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    if missing and missing.split(".")[0] != "sgm":
        package = missing.split(".")[0]
        return TrainerError(f"{where} cannot be imported: the Python package '{package}' is missing. Install it in "
                            f"this environment (pip install {package}; the WebUI's requirements list it), then try "
                            "again.")
    return TrainerError(f"{where} cannot be imported: {type(err).__name__}: {err}")


def import_sgm(webui_dir: str | os.PathLike | None = None):
    """The ``sgm`` package: as already importable (inside the WebUI), else from the first checkout
    :func:`find_sgm_root` finds (its folder added to ``sys.path``). TrainerError when it is not found (saying what to
    do) or when its imports fail (naming the missing package)."""
    try:
        return importlib.import_module("sgm")
    except ModuleNotFoundError as e:
        if e.name != "sgm":  # sgm is there but one of its dependencies is not
            raise _import_error(None, e) from None
    except ImportError as e:
        raise _import_error(None, e) from None
    root = find_sgm_root(webui_dir)
    entry = str(root)
    sys.path.insert(0, entry)
    try:
        return importlib.import_module("sgm")
    except ImportError as e:
        sys.path.remove(entry)
        for name in [n for n in sys.modules if n == "sgm" or n.startswith("sgm.")]:
            del sys.modules[name]  # half-imported submodules would shadow a later, working checkout
        raise _import_error(root, e) from None
