"""User-facing errors.

Every problem a user can fix (a bad folder, an impossible setting, a file that is not a model) is raised as a
:class:`TrainerError` whose message names the file or the setting and says what to do. The command line and the
WebUI print that message without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class TrainerError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message."""


@dataclass(frozen=True)
class Problem:
    """One finding: ``where`` is a setting name (``network.rank``) or a file path; ``message`` says what to do."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ProblemsError(TrainerError):
    """Several problems found at once (config validation, dataset scan); all are reported together."""

    def __init__(self, title: str, problems: list[Problem]):
        self.title = title
        self.problems = list(problems)
        lines = [title] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class ConfigError(ProblemsError):
    """The configuration has invalid values; each problem names the setting (and the command-line flag)."""

    def __init__(self, problems: list[Problem]):
        n = len(problems)
        super().__init__(f"The settings have {n} problem{'s' if n != 1 else ''}:", problems)


class DatasetError(ProblemsError):
    """The dataset cannot be used; each problem names the file or folder."""

    def __init__(self, problems: list[Problem]):
        n = len(problems)
        super().__init__(f"The dataset has {n} problem{'s' if n != 1 else ''}:", problems)
