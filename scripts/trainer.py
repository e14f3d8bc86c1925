"""sd-webui-trainer's entry point in the WebUI: registration only, everything else lives in ``lib_train``.

The WebUI imports each ``scripts/*.py`` with the extension's folder first on ``sys.path``, so ``import lib_train``
finds this extension's package — unless another extension imported a package of that name first (package names are
global in the WebUI's process, WEBUI.md §3). That is checked before anything is registered, and fails loudly.
"""

from __future__ import annotations

import os

import lib_train

EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def check_package() -> None:
    """Raise ImportError unless the imported ``lib_train`` is the one in this extension's folder."""
    found = os.path.dirname(os.path.realpath(lib_train.__file__))
    ours = os.path.join(EXTENSION_DIR, "lib_train")
    if found != ours:
        raise ImportError(f"sd-webui-trainer: the Python package 'lib_train' was already imported from {found} "
                          f"(another extension uses the same name), not from {ours}. Disable the other extension "
                          "or this one, then restart the WebUI.")


def register_callbacks() -> None:
    """Register with the WebUI: the API routes (``/trainer/v1/``), the Trainer tab and its settings section."""
    from modules import script_callbacks

    from lib_train.webui import api
    from lib_train.webui.tab import backend

    script_callbacks.on_app_started(api.register_routes)
    script_callbacks.on_ui_tabs(backend.on_ui_tabs)
    script_callbacks.on_ui_settings(backend.on_ui_settings)


check_package()
register_callbacks()
