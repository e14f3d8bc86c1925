"""Installs the optional packages sd-webui-trainer uses, when they are missing.

The WebUI's launcher runs this file in a subprocess at every start (and once after "Install from URL"), with
``import launch`` available and the WebUI root on PYTHONPATH (WEBUI.md §1). Rules:

- Only packages that are missing are installed; nothing installed is ever upgraded or downgraded. The WebUI pins torch,
  numpy and friends, so bitsandbytes is installed with the installed torch and numpy pinned in the same pip command:
  pip then picks an older bitsandbytes instead of replacing torch (WEBUI.md §1 "Verified pip behaviour").
- bitsandbytes has no macOS wheels: skipped there, with a note.
- A failed install prints one line and the WebUI starts anyway (exit status 0); the trainer reports the missing
  optimizer when it is chosen.

This file must not import ``lib_train`` or ``modules``.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable
from dataclasses import dataclass

TAG = "[sd-webui-trainer]"


@dataclass(frozen=True)
class OptionalPackage:
    pip_name: str
    import_name: str
    provides: str  # what the user loses without it, for the failure line
    minimum: str = ""  # lowest acceptable version, when older releases lack what we use


PACKAGES = (
    # dadaptation >= 3 is sdist-only on PyPI; without the minimum, the WebUI's `--prefer-binary` picks the 2.0 wheel,
    # which has no DAdaptLion.
    OptionalPackage("dadaptation", "dadaptation", "the DAdaptation optimizers", minimum="3.2"),
    OptionalPackage("lion-pytorch", "lion_pytorch", "the Lion optimizer"),
    OptionalPackage("prodigyopt", "prodigyopt", "the Prodigy optimizer"),
    OptionalPackage("bitsandbytes", "bitsandbytes", "the 8-bit optimizers (AdamW8bit, Lion8bit)"),
)
TOMLI = OptionalPackage("tomli", "tomli", "reading TOML config files on Python 3.10")

# Installed packages that pip must keep as they are while it resolves bitsandbytes' dependencies.
HELD_FOR_BITSANDBYTES = ("torch", "numpy")


def wanted_packages(python: tuple[int, int], platform: str) -> list[OptionalPackage]:
    """The packages this extension uses on this Python (major, minor) and ``sys.platform``."""
    wanted = [p for p in PACKAGES if not (p.pip_name == "bitsandbytes" and platform == "darwin")]
    if python < (3, 11):
        wanted.append(TOMLI)
    return wanted


def installed_version(dist_name: str) -> str | None:
    """The installed version of a distribution without its local label (``2.1.2+cu121`` → ``2.1.2``), or None."""
    try:
        return importlib.metadata.version(dist_name).split("+", 1)[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_command(package: OptionalPackage, version_of: Callable[[str], str | None]) -> str:
    """The argument string for ``launch.run_pip``; bitsandbytes gets ``"torch==<installed>"`` (and numpy) pins."""
    command = f'install "{package.pip_name}>={package.minimum}"' if package.minimum else f"install {package.pip_name}"
    if package.pip_name == "bitsandbytes":
        for held in HELD_FOR_BITSANDBYTES:
            version = version_of(held)
            if version is not None:
                command += f' "{held}=={version}"'
    return command


def install_missing(launch, packages: list[OptionalPackage], version_of=installed_version) -> list[str]:
    """Runs ``launch.run_pip`` for each package ``launch.is_installed`` does not find; returns the pip commands run.

    A failure prints one line naming the package and what is lost, and the next package is tried.
    """
    commands = []
    for package in packages:
        if launch.is_installed(package.import_name):
            continue
        command = pip_command(package, version_of)
        commands.append(command)
        try:
            launch.run_pip(command, f"sd-webui-trainer requirement: {package.pip_name}")
        except Exception as err:  # noqa: BLE001 - an optional package must never stop the WebUI
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            print(f"{TAG} could not install {package.pip_name} ({reason}); {package.provides} will be unavailable.")
    return commands


def main() -> None:
    try:
        import launch

        if sys.platform == "darwin" and not launch.is_installed("bitsandbytes"):
            print(f"{TAG} bitsandbytes has no macOS build: the 8-bit optimizers are unavailable on this machine.")
        install_missing(launch, wanted_packages(sys.version_info[:2], sys.platform))
    except Exception as err:  # noqa: BLE001 - the WebUI must start even if this script breaks
        print(f"{TAG} install.py failed ({type(err).__name__}: {err}); optional optimizers may be unavailable.")


if __name__ == "__main__":
    main()
