"""How a config field declares the values it allows: a closed set (`choices`) or bounds
(`bounded`), and the check `dphrl.config.validate` runs on the bounds.

Apart from `dphrl.config` so that the sections kept in their own modules (`dphrl.algo_config`)
declare their fields the same way without importing the module that composes them. Imports
nothing heavy.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import field
from enum import StrEnum
from typing import Any

from dphrl.errors import ConfigError


def choices(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    """A closed set of config values. Member names equal their values (`token-mean` too), so a
    member compares, hashes and prints as its string, and YAML spells it as it reads.

    The enum belongs to the module that defines it (the caller's), where pickle looks it up:
    configs cross ranks pickled (`dist.broadcast_object`)."""
    module = sys._getframe(1).f_globals["__name__"]
    return StrEnum(name, {v: v for v in values}, module=module)


_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_TESTS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def bounded(default: Any = None, *, factory: Any = None, **limits: float) -> Any:
    """A field whose value (each element, for a list) `validate` keeps within `limits`:
    `ge`, `gt`, `le`, `lt`; None always passes. `factory` gives a mutable default."""
    if factory is not None:
        return field(default_factory=factory, metadata=limits)
    return field(default=default, metadata=limits)


def check_bounds(key: str, value: Any, limits: dict[str, float]) -> None:
    """Raise a `ConfigError` naming `key` when `value` (or an element of it) breaks `limits`."""
    many = not isinstance(value, str) and hasattr(value, "__iter__")  # a list (or ListConfig)
    for v in list(value) if many else [value]:
        if v is not None and not all(_TESTS[op](v, limit) for op, limit in limits.items()):
            rule = " and ".join(f"{_SIGNS[op]} {limit}" for op, limit in limits.items())
            shown = list(value) if many else value
            subject = "each value" if many else "it"
            raise ConfigError(f"{key}={shown} is out of range: {subject} must be {rule}")
