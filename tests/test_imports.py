"""Import hygiene (STYLE §1): the core never imports click or rich; the worker and
the fast command path stay small (each import here costs every standby or every
``hadctl status``)."""
from __future__ import annotations

import ast
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(repr(sorted(sys.modules)), file=sys.stderr)"  # repr: json imports re
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    return set(ast.literal_eval(result.stderr.strip().splitlines()[-1]))


def test_the_core_never_imports_click_or_rich():
    loaded = _modules_after("import hadctl.actions, hadctl.services, hadctl.initfile, hadctl.render")
    assert not {m for m in loaded if m.split(".")[0] in ("click", "rich")}


def test_the_worker_imports_neither_dataclasses_typing_signal_nor_threading():
    loaded = _modules_after("import hadctl.worker")
    heavy = {"dataclasses", "typing", "signal", "threading", "enum", "click", "rich", "json", "logging", "ctypes"}
    assert not loaded & heavy, loaded & heavy


def test_plain_status_runs_without_click(service):
    svc = service()
    code = (f"sys.argv = ['hadctl', '-c', {str(svc.config)!r}, 'status']\n"
            "from hadctl import entry\n"
            "entry._exit_now = sys.exit  # os._exit would end us before we print sys.modules\n"
            "try:\n    entry.run()\nexcept SystemExit:\n    pass")
    loaded = _modules_after(code)
    assert "hadctl.actions" in loaded  # it really ran the action
    assert not {m for m in loaded if m.split(".")[0] in ("click", "rich", "dataclasses", "inspect", "psutil")}
    assert "tomllib" in loaded  # the first time; parsed, the file is now in the cache
    again = _modules_after(code)
    assert "hadctl.actions" in again
    assert not {"tomllib", "typing"} & again, {"tomllib", "typing"} & again


def test_anything_else_goes_through_click(service):
    svc = service()
    code = (f"sys.argv = ['hadctl', '-c', {str(svc.config)!r}, 'status', '--help']\n"
            "from hadctl import entry\n"
            "entry._exit_now = sys.exit  # os._exit would end us before we print sys.modules\n"
            "try:\n    entry.run()\nexcept SystemExit:\n    pass")
    assert "click" in _modules_after(code)


def test_an_empty_cache_folder_means_every_run_parses(service, monkeypatch):
    monkeypatch.setenv("HADCTL_CACHE_DIR", "")
    svc = service()
    code = (f"sys.argv = ['hadctl', '-c', {str(svc.config)!r}, 'status']\n"
            "from hadctl import entry\n"
            "entry._exit_now = sys.exit  # os._exit would end us before we print sys.modules\n"
            "try:\n    entry.run()\nexcept SystemExit:\n    pass")
    assert "tomllib" in _modules_after(code)
    assert "tomllib" in _modules_after(code)
