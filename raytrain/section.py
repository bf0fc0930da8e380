"""The base of every typed config section, and the error that reports every problem at once.

Its own module so that ``config`` (which assembles the sections) and the modules
that define their own section (``lengths``) both import it and not each other.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

Problem = tuple[str, Any, str]  # (key, value, fix)


class Section(BaseModel):
    """Typed keys, each documented by the docstring under it (the CLI's --help and the README's reference)."""
    # allow_inf_nan=False: a float key given nan or inf is refused like any other bad value (pydantic accepts
    # them by default, and a learning rate of nan would start training)
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """Every problem found in a config, reported together as ``key = value: fix``."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"  {key} = {value!r}: {fix}" for key, value, fix in problems]
        super().__init__(f"{len(problems)} problem(s) in the config:\n" + "\n".join(lines))

    def __reduce__(self):  # rebuilt from its problems when it crosses a process (a Ray worker's error)
        return ConfigError, (self.problems,)
