"""``status --all``: the status of every service config (``*.toml``) in one folder.

One Outcome per file, in file-name order, then a summary Outcome. A file that
does not load is reported as broken (exit status 6) without hiding the others.
The overall status is the worst one, ranked by how urgently a person must act:

    broken config (6, or any other error)  >  partly running (1)  >  stopped (3)  >  running (0)

A broken file cannot even be started; a partly running service lost slots it
was meant to hold, which never results from a clean ``stop``; a fully stopped
service is most often stopped on purpose (``stop`` also leaves the standby stop
file behind). An empty folder is 0: nothing is wrong in it.

Fast by construction: one interpreter, one ``HolderProbe`` shared by all
services, so /proc/locks (10-18 ms a read) is read at most once. Imports
actions, config, errors, locks.flock and model; never click or rich.
"""
from __future__ import annotations

import os

from . import actions
from .config import ServiceConfig, load
from .errors import ConfigError, HadctlError
from .locks.flock import HolderProbe
from .model import Outcome, Step

SUMMARY_ACTION = "status --all"
RESULTS = {0: "Running", 1: "Partly Running", 3: "Not Running"}
STATES = {0: "running", 1: "partly", 3: "stopped"}


def severity(status: int) -> int:
    """Rank of an LSB status for "worst of": running < stopped < partly < anything else."""
    return {0: 0, 3: 1, 1: 2}.get(status, 10 + status)


def config_files(folder: str) -> list[str]:
    """The ``*.toml`` files of ``folder`` (not hidden ones, not folders), sorted by name.

    Raises ConfigError (exit 6) with one line when ``folder`` cannot be listed.
    """
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no such folder (status --all reads --config-dir, "
                          f"$HADCTL_CONFIG_DIR or /etc/hadctl)") from None
    except NotADirectoryError:
        raise ConfigError(f"{folder}: not a folder (status --all wants a folder of *.toml files)") from None
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot list: {exc.strerror}") from None
    names = []
    for entry in entries:
        if entry.name.endswith(".toml") and not entry.name.startswith("."):
            try:
                if entry.is_dir():
                    continue
            except OSError:
                pass  # let load() say what is wrong with it
            names.append(entry.path)
    return sorted(names)


def status_all(folder: str) -> tuple[list[Outcome], int]:
    """Status of every service in ``folder``: (one Outcome per file + a summary, worst status).

    Raises ConfigError when the folder itself cannot be read.
    """
    holder_probe = HolderProbe()
    outcomes: list[Outcome] = []
    for path in config_files(folder):
        try:
            outcomes.append(_service_status(load(path), holder_probe))
        except HadctlError as exc:
            outcomes.append(_broken(path, exc))
    counts = {"running": 0, "partly": 0, "stopped": 0, "broken": 0}
    for outcome in outcomes:
        kind = "broken" if "error" in (outcome.detail or {}) else STATES.get(outcome.exit_status, "broken")
        counts[kind] += 1
    worst = max((o.exit_status for o in outcomes), key=severity, default=0)
    what = (f"{len(outcomes)} services: {counts['running']} running, {counts['partly']} partly, "
            f"{counts['stopped']} stopped, {counts['broken']} broken")
    summary = Outcome(os.path.abspath(folder), SUMMARY_ACTION, worst,
                      (Step(what, RESULTS.get(worst, "Broken"), worst == 0),),
                      detail={"config_dir": os.path.abspath(folder), "services": len(outcomes), **counts})
    return [*outcomes, summary], worst


def _service_status(cfg: ServiceConfig, holder_probe: HolderProbe) -> Outcome:
    """What ``hadctl -c FILE status`` says, through the shared probe, plus the file's path."""
    outcome = actions.status(cfg, holder_probe)
    return Outcome(outcome.name, outcome.action, outcome.exit_status, outcome.steps, outcome.slots,
                   outcome.log_file, {**(outcome.detail or {}), "config_file": cfg.config_file})


def _broken(path: str, exc: HadctlError) -> Outcome:
    """A file that does not load: one failed line naming the problem; exit status 6.

    (Another error's own status is kept when it is not one that reads as a state.)
    """
    name = os.path.splitext(os.path.basename(path))[0]
    status = 6 if exc.exit_status in STATES else exc.exit_status
    return Outcome(name, "status", status, (Step(str(exc), "Broken", False),),
                   detail={"config_file": path, "error": str(exc)})
