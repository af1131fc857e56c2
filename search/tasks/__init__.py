"""Tasks the search trains candidates on: ``tasks.get(name, **settings)``.

- ``regression``: synthetic teacher-student MLP regression (no data needed).
- ``lm``: character-level language modelling on a local text file (``data=``), or a .bin token file.
- ``cifar``: the ICML residual MLP on a local CIFAR-10/100 python-pickle folder (``data=``).
"""

from __future__ import annotations

from ..errors import SearchError
from .base import Hyper, Task

_TASKS = {
    "regression": ("search.tasks.regression", "Regression"),
    "lm": ("search.tasks.lm", "LanguageModel"),
    "cifar": ("search.tasks.cifar", "Cifar"),
}
NAMES = tuple(_TASKS)


def get(name: str, **settings) -> Task:
    """A task by name; settings are its config fields (e.g. data=..., batch=...) or a config name."""
    if not isinstance(name, str) or name not in _TASKS:
        raise SearchError(f"unknown task {name!r}; tasks are {', '.join(_TASKS)}")
    from importlib import import_module

    module, cls = _TASKS[name]
    return getattr(import_module(module), cls)(**settings)


__all__ = ["NAMES", "Hyper", "Task", "get"]
