"""Errors of hadctl, each carrying the LSB exit status the CLI turns it into.

Leaf module: imports nothing from hadctl, and nothing heavy, because the
spawned worker imports it too.
"""
from __future__ import annotations


class HadctlError(Exception):
    """Base of every error hadctl reports as one line and an exit status."""

    exit_status = 1


class ActionFailedError(HadctlError):
    """The action ran and did not do what it promised (LSB 1)."""

    exit_status = 1


class BusyError(ActionFailedError):
    """Another hadctl controller holds the service's control lock."""


class NotPermittedError(HadctlError):
    """The user may not do this (LSB 4)."""

    exit_status = 4


class NotInstalledError(HadctlError):
    """The entrypoint cannot be imported or called (LSB 5)."""

    exit_status = 5


class ConfigError(HadctlError):
    """The configuration file is missing, unreadable or invalid (LSB 6)."""

    exit_status = 6


class NotRunningError(HadctlError):
    """The action needs a running main and none runs (LSB 7)."""

    exit_status = 7


class ArgumentError(HadctlError):
    """A bad value of an action's option, found past click's parsing (LSB 2)."""

    exit_status = 2


def count_option(value: str | None, default: int, option: str, unit: str) -> int:
    """An option's count (``logs -n``, ``events -n``): ``default`` when not given; a
    number >= 0, else ArgumentError naming the option."""
    try:
        count = default if value is None else int(value)
        if count < 0:
            raise ValueError
    except ValueError:
        raise ArgumentError(f"{option}: expected a number of {unit} >= 0, got {value!r}") from None
    return count
