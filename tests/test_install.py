"""install.py decides what to install from what is present, and never lets a failure escape (WEBUI.md §1).

The WebUI's ``launch`` module is replaced by a recording stand-in: it answers ``is_installed`` from a set and records
the ``run_pip`` commands instead of running pip.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

INSTALL_PY = Path(__file__).resolve().parents[1] / "install.py"


def load_install_module():
    spec = importlib.util.spec_from_file_location("trainer_install_under_test", INSTALL_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


install = load_install_module()


class RecordingLaunch(types.ModuleType):
    """Stand-in for the WebUI's ``launch``: ``present``: import names; ``failing``: pip names that fail."""

    def __init__(self, present=(), failing=()):
        super().__init__("launch")
        self.present = set(present)
        self.failing = set(failing)
        self.pip_commands: list[str] = []

    def is_installed(self, name: str) -> bool:
        return name in self.present

    def run_pip(self, command: str, desc: str | None = None) -> None:
        self.pip_commands.append(command)
        if any(name in command for name in self.failing):
            raise RuntimeError(f"Couldn't install {desc}.\nCommand: pip {command}\nError code: 1")


def fixed_versions(name: str) -> str | None:
    return {"torch": "2.1.2", "numpy": "1.26.2"}.get(name)


ALL_IMPORT_NAMES = {p.import_name for p in install.PACKAGES}


def test_nothing_is_installed_when_everything_is_present():
    launch = RecordingLaunch(present=ALL_IMPORT_NAMES | {"tomli"})
    assert install.install_missing(launch, install.wanted_packages((3, 10), "linux"), fixed_versions) == []
    assert launch.pip_commands == []


def test_only_missing_packages_are_installed():
    launch = RecordingLaunch(present={"dadaptation", "bitsandbytes"})
    install.install_missing(launch, install.wanted_packages((3, 11), "linux"), fixed_versions)
    assert launch.pip_commands == ["install lion-pytorch", "install prodigyopt"]


def test_dadaptation_asks_for_a_release_with_dadaptlion():
    launch = RecordingLaunch(present=ALL_IMPORT_NAMES - {"dadaptation"})
    install.install_missing(launch, install.wanted_packages((3, 11), "linux"), fixed_versions)
    assert launch.pip_commands == ['install "dadaptation>=3.2"']


def test_bitsandbytes_command_holds_the_installed_torch_and_numpy():
    launch = RecordingLaunch(present=ALL_IMPORT_NAMES - {"bitsandbytes"})
    install.install_missing(launch, install.wanted_packages((3, 11), "linux"), fixed_versions)
    assert launch.pip_commands == ['install bitsandbytes "torch==2.1.2" "numpy==1.26.2"']


def test_installed_version_drops_the_local_label():
    import torch

    assert install.installed_version("torch") == torch.__version__.split("+")[0]
    assert install.installed_version("surely-not-an-installed-distribution") is None


def test_tomli_only_on_python_310_and_no_bitsandbytes_on_macos():
    names = lambda packages: [p.pip_name for p in packages]  # noqa: E731
    assert "tomli" in names(install.wanted_packages((3, 10), "linux"))
    assert "tomli" not in names(install.wanted_packages((3, 11), "linux"))
    assert "bitsandbytes" not in names(install.wanted_packages((3, 11), "darwin"))
    assert "bitsandbytes" in names(install.wanted_packages((3, 11), "win32"))


def test_a_failed_install_prints_one_line_and_the_rest_go_on(capsys):
    launch = RecordingLaunch(failing={"dadaptation"})
    install.install_missing(launch, install.wanted_packages((3, 11), "linux"), fixed_versions)
    assert len(launch.pip_commands) == 4  # the failure did not stop the next packages
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "[sd-webui-trainer] could not install dadaptation (Couldn't install sd-webui-trainer requirement: "
        "dadaptation.); the DAdaptation optimizers will be unavailable."
    ]


def test_main_never_raises_even_when_launch_breaks(monkeypatch, capsys):
    broken = RecordingLaunch()

    def explode(name):
        raise OSError("disk on fire")

    broken.is_installed = explode
    monkeypatch.setitem(sys.modules, "launch", broken)
    install.main()
    assert "install.py failed (OSError: disk on fire)" in capsys.readouterr().out


def test_main_installs_through_the_launch_module(monkeypatch):
    launch = RecordingLaunch(present=ALL_IMPORT_NAMES - {"prodigyopt"} | {"tomli"})
    monkeypatch.setitem(sys.modules, "launch", launch)
    install.main()
    assert launch.pip_commands == ["install prodigyopt"]


@pytest.mark.parametrize("module_name", ["lib_train", "modules"])
def test_install_py_does_not_import_the_library_or_the_webui(module_name):
    source = INSTALL_PY.read_text(encoding="utf-8")
    assert f"import {module_name}" not in source
    assert f"from {module_name}" not in source
