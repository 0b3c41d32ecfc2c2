"""``@record``: frozen value classes without importing ``dataclasses``.

``dataclasses`` imports ``inspect`` (and with it ast, dis, tokenize ...) and
generates half a dozen methods per class with exec: about 15 ms of every
``hadctl status`` when click is not loaded, more than the command's whole
budget over a bare interpreter. A record needs only ``__init__`` (made with
one exec), ``__repr__``, ``__eq__`` and ``__hash__``, and refuses assignment.

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
    params = ", ".join(f"{name}=_d_{name}" if name in defaults else name for name in fields)
    body = "".join(f"    _set(self, {name!r}, {name})\n" for name in fields) or "    pass\n"
    namespace: dict[str, Any] = {"_set": object.__setattr__, **{f"_d_{k}": v for k, v in defaults.items()}}
    exec(f"def __init__(self, {params}):\n{body}", namespace)  # noqa: S102 - fixed template
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

    namespace["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    for method in (namespace["__init__"], __repr__, __eq__, __hash__, __setattr__):
        setattr(cls, method.__name__, method)
    setattr(cls, "__record_fields__", tuple(fields))
    return cls


def replace(value: T, **changes: Any) -> T:
    """A copy of the record ``value`` with some fields changed (like dataclasses.replace)."""
    fields = getattr(type(value), "__record_fields__")
    current = {name: getattr(value, name) for name in fields}
    current.update(changes)
    return type(value)(**current)
