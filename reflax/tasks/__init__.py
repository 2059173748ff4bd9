"""Verifiable tasks and their registry.

>>> from reflax import tasks
>>> task = tasks.get("countdown", test_size=1000)
>>> tasks.names()
['countdown', 'function_calling']

Built-in tasks: ``countdown`` (:mod:`reflax.tasks.countdown`) and ``function_calling``
(:mod:`reflax.tasks.function_calling`). To add one, write a module in this package with a
:class:`Task` subclass decorated by ``@register("name")``; it is found automatically.
"""

from reflax.tasks.base import Prompt, Task
from reflax.tasks.registry import TaskOptionError, get, names, register

__all__ = ["Prompt", "Task", "TaskOptionError", "get", "names", "register"]
