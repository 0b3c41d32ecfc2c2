"""Turning ``"module:function"`` into a callable, calling it, and its end into an exit status.

Shared by the worker (which must stay small: standard library only, no typing)
and ``hadctl foreground``. Imports lean only.
"""
from __future__ import annotations

import sys

from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class EntrypointError(Exception):
    """The target cannot be imported, lacks the attribute, or is not callable."""


def resolve(target: str) -> Callable[..., Any]:
    """Import ``module:function`` (the function may be dotted) and return the callable.

    Raises EntrypointError naming what is wrong; whatever the module raised on
    import is its ``__cause__`` (so a caller can print its traceback).
    """
    module_name, _, attribute = target.partition(":")
    try:
        __import__(module_name)
        value: object = sys.modules[module_name]
    except BaseException as exc:
        raise EntrypointError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise EntrypointError(f"{module_name} has no attribute {attribute!r}")
        value = getattr(value, part)
    if not callable(value):
        raise EntrypointError(f"{attribute!r} is not callable")
    return value


def exit_status(code: object) -> int:
    """A function's return value (or SystemExit code) as a process exit status:
    None -> 0, an int -> itself (mod 256), anything else is printed and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def call(function: Callable[..., Any], args: tuple[Any, ...] | list[Any]) -> int:
    """Run the service's function; its end as an exit status.

    A return value or ``SystemExit`` code goes through ``exit_status``; any other
    exception (the service's own failure) has its traceback printed to stderr
    and gives 1.
    """
    try:
        code = function(*args)
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return exit_status(code)
