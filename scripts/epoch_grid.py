"""The "Epoch × weight grid" script (txt2img/img2img Script dropdown) and the Trainer axes of the X/Y/Z plot.

Registration only: the script, its controls and the axes live in ``lib_train.webui.grid`` (``script``, ``ui``,
``xyz``). ``lib_train`` is imported at module top, while the WebUI has this extension's folder on ``sys.path``
(WEBUI.md §3), and checked to be this extension's package (as ``scripts/trainer.py`` does).
"""

from __future__ import annotations

import os

import lib_train
from modules import script_callbacks, scripts

# The WebUI may load this file before scripts/trainer.py, whose check would then come too late: the same check here.
_OURS = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "lib_train")
if os.path.dirname(os.path.realpath(lib_train.__file__)) != _OURS:
    raise ImportError(f"sd-webui-trainer: the Python package 'lib_train' was already imported from "
                      f"{os.path.dirname(lib_train.__file__)} (another extension uses the same name), not from {_OURS}. "
                      "Disable the other extension or this one, then restart the WebUI.")

from lib_train.webui.grid import script as grid_script  # noqa: E402 - after the package check
from lib_train.webui.grid import ui as grid_ui  # noqa: E402
from lib_train.webui.grid import xyz as grid_xyz  # noqa: E402


class EpochWeightGrid(scripts.Script):
    """Thin adapter: the WebUI's Script interface → :mod:`lib_train.webui.grid`."""

    def title(self):
        return grid_script.TITLE

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return grid_ui.build_ui(self, is_img2img)

    def run(self, p, *args):
        return grid_script.run_grid(p, *args)


script_callbacks.on_before_ui(grid_xyz.register_xyz_axes)
