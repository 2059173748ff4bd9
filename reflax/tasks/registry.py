"""Name -> Task class registry.

A task is added by writing one module in ``reflax/tasks/`` whose class is decorated with
``@register("my_task")``: every module of the package is imported on the first lookup, so no
other file needs editing. Tasks defined elsewhere register when their module is imported.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable

from reflax.tasks.base import Task

_REGISTRY: dict[str, type[Task]] = {}
_discovered = False


class TaskOptionError(TypeError, ValueError):
    """A task was asked for with keyword options its constructor does not accept."""


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a :class:`Task` subclass under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")

    def decorate(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"@register({name!r}) must decorate a Task subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        same_class = existing is not None and (
            (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
        )
        if existing is not None and not same_class:
            raise ValueError(
                f"task name {name!r} is already registered to "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _discover() -> None:
    """Import every module of this package once, so their ``@register`` calls run."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("reflax.tasks")
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"reflax.tasks.{module.name}")


def names() -> list[str]:
    """Sorted names of all registered tasks."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str, **kwargs: object) -> Task:
    """A new instance of the task registered as ``name``, built with ``kwargs``."""
    _discover()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}")
    signature = inspect.signature(cls)
    params = signature.parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = [
            p.name
            for p in params
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TaskOptionError(
                f"task {name!r} got unknown option(s) {', '.join(unknown)}; "
                f"accepted options: {', '.join(accepted) or '(none)'}"
            )
    return cls(**kwargs)
