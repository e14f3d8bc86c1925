"""Tests that need a real AUTOMATIC1111 WebUI (skipped unless ``SD_WEBUI_DIR`` is set; see conftest.py). A package, so
its conftest.py never shadows ``tests/conftest.py`` as ``conftest``."""
