"""sd-webui-trainer's training library.

Importable without the WebUI: only ``lib_train.webui`` touches the WebUI's ``modules``.
Importing this package is cheap (no torch import here).
"""

__version__ = "0.1.0"
