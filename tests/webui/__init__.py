"""Tests of the WebUI layer (a package, so its conftest.py never shadows ``tests/conftest.py`` as ``conftest``)."""
