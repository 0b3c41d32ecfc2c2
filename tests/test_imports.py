"""Import hygiene (STYLE §1): the core never imports click or rich; the worker and
the fast command path stay small (each import here costs every standby or every
``hadctl status``); the speed tricks live in hadctl/lean.py alone."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

TOML = "tomllib" if sys.version_info >= (3, 11) else "tomli"  # what config reads TOML with
SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "hadctl"


def _modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(SRC)): ast.parse(path.read_text(), str(path)) for path in sorted(SRC.rglob("*.py"))}


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level and node.module:
        return [node.module]
    return []


def test_only_lean_imports_signal():
    """signal costs enum (~2 ms, ~1 MB); _signal is a CPython detail: both only behind lean's names."""
    offenders = sorted(f"{name}:{node.lineno} imports {module}"
                       for name, tree in _modules().items() if name != "lean.py"
                       for node in ast.walk(tree) for module in _imported(node)
                       if module.split(".")[0] in ("signal", "_signal"))
    assert not offenders, "use hadctl.lean instead:\n" + "\n".join(offenders)


def test_only_lean_defines_type_checking():
    """``TYPE_CHECKING = False`` is one trick with one home: ``from .lean import TYPE_CHECKING``."""
    offenders = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            if name != "lean.py" and any(isinstance(t, ast.Name) and t.id == "TYPE_CHECKING" for t in targets):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, "import TYPE_CHECKING from hadctl.lean instead: " + ", ".join(offenders)


def test_the_rules_see_a_breach(tmp_path):
    """The two rules above find what they look for (an ast walk that matched nothing would pass)."""
    tree = ast.parse("import _signal\nfrom signal import SIGTERM\nTYPE_CHECKING = False\n")
    assert [m for node in ast.walk(tree) for m in _imported(node)] == ["_signal", "signal"]
    assert any(isinstance(node, ast.Assign) and node.targets[0].id == "TYPE_CHECKING"  # type: ignore[attr-defined]
               for node in ast.walk(tree))
    assert "lean.py" in _modules() and "locks/flock.py" in _modules()


def test_entry_never_imports_cli_at_module_level():
    """cli imports entry; entry reaches cli only inside run, for what its fast path does not take."""
    tree = _modules()["entry.py"]
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not [node for node in top if isinstance(node, ast.ImportFrom) and node.module == "cli"]
    loaded = _modules_after("import hadctl.entry, hadctl.initfile")
    assert "hadctl.cli" not in loaded and "click" not in loaded


def _modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(repr(sorted(sys.modules)), file=sys.stderr)"  # repr: json imports re
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    return set(ast.literal_eval(result.stderr.strip().splitlines()[-1]))


def test_the_core_never_imports_click_or_rich():
    loaded = _modules_after("import hadctl.actions, hadctl.services, hadctl.initfile, hadctl.render")
    assert not {m for m in loaded if m.split(".")[0] in ("click", "rich")}


def test_stop_and_status_load_neither_spawn_nor_preflight():
    """Only what spawns (control.fill) needs spawn.py (and its spec, contain), only
    prepare needs preflight.py: stop and status, which do neither, do not load them."""
    loaded = _modules_after("import hadctl.entry, hadctl.actions, hadctl.services")
    assert not {"hadctl.spawn", "hadctl.spec", "hadctl.preflight", "hadctl.contain"} & loaded


def test_the_worker_imports_neither_dataclasses_typing_signal_nor_threading():
    loaded = _modules_after("import hadctl.worker")
    heavy = {"dataclasses", "typing", "signal", "threading", "enum", "click", "rich", "json", "logging", "ctypes",
             "socket", "hadctl.syslogsend"}  # syslog code: only for log_file = "syslog" (log.open_log)
    assert not loaded & heavy, loaded & heavy


def test_a_worker_logging_to_syslog_imports_nothing_heavy_either():
    """log_file = "syslog" loads syslogsend in every worker: _socket, not socket (enum, selectors)."""
    loaded = _modules_after("import hadctl.worker, hadctl.syslogsend")
    heavy = {"dataclasses", "typing", "signal", "threading", "enum", "json", "logging", "socket", "selectors"}
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
    assert TOML in loaded  # the first time; parsed, the file is now in the cache
    again = _modules_after(code)
    assert "hadctl.actions" in again
    assert not {TOML, "typing"} & again, {TOML, "typing"} & again


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
    assert TOML in _modules_after(code)
    assert TOML in _modules_after(code)


ZOOKEEPER = ("locks/zookeeper.py", "locks/zookeeper_session.py", "locks/zookeeper_fence.py",
             "locks/zookeeper_takeover.py", "locks/zookeeper_controller.py")


def _top_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every import outside a function (TYPE_CHECKING blocks too), relative
    ones spelled with their dots (``.zookeeper_session``)."""
    found: list[tuple[int, str]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + [s for h in getattr(node, "handlers", []) for s in h.body])
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return found


def test_kazoo_stays_in_the_zookeeper_modules_which_load_only_on_demand():
    """kazoo (about 11 MB, 100 ms, threads) is imported by locks/zookeeper*.py alone, and
    any other module reaches those only inside a function (for ``engine = "zookeeper"``)."""
    modules = _modules()
    assert set(ZOOKEEPER) <= set(modules), "a ZooKeeper module moved: update ZOOKEEPER"
    offenders = sorted(f"{name}:{node.lineno} imports {module}"
                       for name, tree in modules.items() if name not in ZOOKEEPER
                       for node in ast.walk(tree) for module in _imported(node) if module.split(".")[0] == "kazoo")
    offenders += sorted(f"{name}:{line} imports {module} at module level"
                        for name, tree in modules.items() if name not in ZOOKEEPER
                        for line, module in _top_level_imports(tree) if "zookeeper" in module)
    assert not offenders, "\n".join(offenders)
    for name in ZOOKEEPER:  # each says so at its top
        assert "kazoo" in (ast.get_docstring(modules[name]) or ""), name


def test_neither_the_worker_nor_a_flock_controller_loads_a_zookeeper_module():
    loaded = _modules_after("import hadctl.worker, hadctl.actions, hadctl.control, hadctl.locks.engine")
    assert not {m for m in loaded if m.startswith("hadctl.locks.zookeeper") or m.split(".")[0] == "kazoo"}
