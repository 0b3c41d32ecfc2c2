"""Plain values shared by actions and the renderer: roles, slot reports, outcomes.

Imports only lean and record from hadctl. The spawned worker never imports it
(dataclasses cost memory there); only controllers do.
"""
from __future__ import annotations

from .lean import TYPE_CHECKING
from .record import record

if TYPE_CHECKING:
    from typing import ClassVar


class Role:
    """A slot's role: ``Role.MAIN`` or ``Role.STANDBY``, the only two (compare with ``is``);
    ``value`` is "main" or "standby". A plain class, not enum.Enum: with re and functools,
    enum costs every command about 4 ms to import."""

    __slots__ = ("value",)
    MAIN: ClassVar[Role]
    STANDBY: ClassVar[Role]

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Role.{self.value.upper()}"


Role.MAIN = Role("main")
Role.STANDBY = Role("standby")


@record
class SlotReport:
    """What the locks say about one slot.

    ``pid`` is the holder of the slot's lock, or None when nobody holds it.
    ``stale`` lists pid files found for the slot whose pid does not hold it.
    """

    role: Role
    slot: int
    pid: int | None
    stale: tuple[str, ...] = ()
    host: str | None = None
    backoff_until: float | None = None
    tampered: str | None = None  # why its lock file is none hadctl made: nothing is signalled through it

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def label(self) -> str:
        return f"{self.role.value} #{self.slot}"


@record
class Step:
    """One line of output: ``NAME : what [result]``; ``ok`` picks the colour."""

    what: str
    result: str
    ok: bool = True


@record
class Outcome:
    """The result of one action for one service: lines, slots and exit status."""

    name: str
    action: str
    exit_status: int
    steps: tuple[Step, ...] = ()
    slots: tuple[SlotReport, ...] = ()
    log_file: str | None = None
    detail: dict[str, object] | None = None  # extra facts for JSON
