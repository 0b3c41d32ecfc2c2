"""The ``LockEngine`` protocol: what actions need from whatever holds main slots.

Controllers only; the worker talks to ``flock`` directly to stay small.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class LockEngine(Protocol):
    def holder(self, path: str, hints: Sequence[int | None]) -> int | None:
        """The pid holding the slot whose lock file is ``path``, or None when free."""
        ...
