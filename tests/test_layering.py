"""Layering (DESIGN.md §2): only ``lib_train/webui/`` may touch the WebUI's ``modules`` or ``launch``; no import
circle inside the WebUI layer.

Runs without a WebUI: every other module of ``lib_train`` must import in a fresh interpreter where importing
``modules`` or ``launch`` fails, and no source file outside ``lib_train/webui/`` may import them, even lazily.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from helpers import import_circles, import_graph

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lib_train"
WEBUI_ONLY = ("modules", "launch")

_IMPORT_ALL = r"""
import importlib, json, os, pkgutil, sys
for name in %(blocked)r:
    sys.modules[name] = None  # "import modules" now raises ImportError
import lib_train


def walk(path, prefix):  # like pkgutil.walk_packages, which imports packages, but not into the WebUI layer
    for m in pkgutil.iter_modules(path, prefix):
        yield m.name
        if m.ispkg and m.name != "lib_train.webui":
            yield from walk([os.path.join(m.module_finder.path, m.name.rsplit(".", 1)[1])], m.name + ".")


names = sorted(n for n in walk(lib_train.__path__, "lib_train.")
               if not n.startswith("lib_train.webui.") and n != "lib_train.__main__")
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps({"imported": names, "failed": failed,
                  "webui_loaded": sorted(m for m in sys.modules if m.startswith("lib_train.webui."))}))
"""


def test_library_imports_without_the_webui():
    code = _IMPORT_ALL % {"blocked": WEBUI_ONLY}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}
    assert "lib_train.cli" in report["imported"] and "lib_train.train.lora_trainer" in report["imported"]
    assert "lib_train.webui" in report["imported"]  # the package itself imports nothing from the WebUI
    assert report["webui_loaded"] == []  # nothing outside the WebUI layer pulls it in


def _webui_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in WEBUI_ONLY]
    return found


def test_no_source_outside_the_webui_layer_imports_the_webui():
    files = [p for p in PACKAGE.rglob("*.py") if "webui" not in p.relative_to(PACKAGE).parts]
    assert len(files) > 20
    offenders = [hit for p in files for hit in _webui_imports(p)]
    assert offenders == []


def test_the_check_sees_lazy_webui_imports():
    webui_layer = sorted((PACKAGE / "webui").rglob("*.py"))
    assert any(_webui_imports(p) for p in webui_layer)  # the layer itself does import modules, inside functions


def test_no_import_circle_in_the_webui_layer():
    graph = import_graph(PACKAGE / "webui")
    assert "lib_train.webui.tab.build" in graph and "lib_train.webui.grid.xyz" in graph  # sub-packages are walked
    assert import_circles(graph) == []  # no module imports itself through others (lazy imports included)


def test_no_import_circle_in_the_grid_package():
    graph = import_graph(PACKAGE / "grid")
    assert set(graph) == {f"lib_train.grid.{m}" for m in ("axes", "keep", "plan", "prompts", "runs")}
    assert import_circles(graph) == []
