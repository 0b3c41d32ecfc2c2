"""``@record``: frozen value classes without importing ``dataclasses``.

``dataclasses`` imports ``inspect`` (and with it ast, dis, tokenize ...) and
generates half a dozen methods per class with exec: about 15 ms of every
``hadctl status`` when click is not loaded, more than the command's whole
budget over a bare interpreter. A record needs only ``__init__``, ``__repr__``,
``__eq__`` and ``__hash__``, and refuses assignment. Its ``__init__`` is one
generic function, not code generated with exec: compiling a 40-field ``__init__``
cost a standby 1.4 ms and 0.3 MB, and records are built rarely.

Type checkers see it as a frozen dataclass (PEP 681 ``dataclass_transform``).
Leaf module: imports only lean (itself a leaf) from hadctl.
"""
from __future__ import annotations

from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:
    def dataclass_transform(**_kwargs: object) -> object:
        return lambda decorator: decorator


@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen record of its annotated fields, in order.

    A default must be immutable (it is shared); fields without one come first.
    """
    fields = list(cls.__dict__.get("__annotations__", {}))
    defaults = {name: cls.__dict__[name] for name in fields if name in cls.__dict__}
    known = frozenset(fields)
    name_of = cls.__name__
    set_field = object.__setattr__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(fields):
            raise TypeError(f"{name_of}() takes {len(fields)} arguments, got {len(args)}")
        values = dict(zip(fields, args, strict=False))
        for key, value in kwargs.items():
            if key not in known or key in values:
                raise TypeError(f"{name_of}() got an unexpected or repeated argument {key!r}")
            values[key] = value
        for name in fields:
            if name in values:
                set_field(self, name, values[name])
            elif name in defaults:
                set_field(self, name, defaults[name])
            else:
                raise TypeError(f"{name_of}() missing argument {name!r}")

    for name in defaults:
        delattr(cls, name)

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in fields)
        return f"{type(self).__name__}({inner})"

    def __eq__(self: Any, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in fields)

    def __hash__(self: Any) -> int:
        return hash(tuple(getattr(self, name) for name in fields))

    def __setattr__(self: Any, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name}")

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    for method in (__init__, __repr__, __eq__, __hash__, __setattr__):
        setattr(cls, method.__name__, method)
    setattr(cls, "__record_fields__", tuple(fields))  # noqa: B010 - unknown to the type checker
    return cls


def replace(value: T, **changes: Any) -> T:
    """A copy of the record ``value`` with some fields changed (like dataclasses.replace)."""
    fields = getattr(type(value), "__record_fields__")  # noqa: B009 - unknown to the type checker
    current = {name: getattr(value, name) for name in fields}
    current.update(changes)
    return type(value)(**current)
