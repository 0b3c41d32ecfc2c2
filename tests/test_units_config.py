"""The config validation table, one bad value at a time: each refusal is a
ConfigError (exit 6) whose one line names the file, the key and the problem.
Pure calls of ``config.load`` on files in tmp_path: no process is started."""
from __future__ import annotations

from pathlib import Path

import pytest

from hadctl import config
from hadctl.errors import ConfigError

GOOD = 'name = "svc"\nentrypoint = "pkg.mod:run"\npid_dir = "run"\nlog_file = "run/hadctl.log"\n'

# (what is wrong, TOML added to a good file, key named, problem named)
BAD_VALUES = [
    ("string expected", "stdout_file = 3", "stdout_file", "expected a string, got"),
    ("empty string", 'user = " "', "user", "expected a non-empty string"),
    ("NUL in a string", 'directory = "a\\u0000b"', "directory", "without NUL"),
    ("name with a slash", 'name = "a/b"', "name", "one-line name without '/'"),
    ("entrypoint without colon", 'entrypoint = "pkg.mod.run"', "entrypoint", 'expected "package.module:function"'),
    ("warmup not a name", 'warmup = "pkg:1run"', "warmup", 'expected "package.module:function"'),
    ("boolean expected", 'quiet = "yes"', "quiet", "expected true or false"),
    ("integer expected", 'uid = "0"', "uid", "expected an integer >= 0"),
    ("boolean is no integer", "start_limit_burst = true", "start_limit_burst", "expected an integer >= 1"),
    ("integer below minimum", "[locks]\nmax_procs = 0", "locks.max_procs", "expected an integer >= 1, got 0"),
    ("integer above maximum", "[locks]\nstandby_max_procs = 10001", "locks.standby_max_procs", "<= 10000"),
    ("negative seconds", "kill_timeout = -1", "kill_timeout", "expected a number of seconds >= 0"),
    ("zero where positive", "ready_timeout = 0", "ready_timeout", "expected a number of seconds > 0"),
    ("infinite seconds", "upgrade_timeout = inf", "upgrade_timeout", "expected a finite number of seconds"),
    ("not a number of seconds", 'signal_kill_timeout = "2s"', "signal_kill_timeout", "number of seconds"),
    ("list expected", 'python_path = "lib"', "python_path", "expected a list of strings"),
    ("list of strings expected", "python_path = [1]", "python_path", "expected a string, got"),
    ("args not a list", 'args = "a b"', "args", "expected a list, got"),
    ("umask not octal", 'umask = "abc"', "umask", 'expected an octal string like "022"'),
    ("umask too large", "umask = 4096", "umask", "between 000 and 777"),
    ("no signal list", "stop_signals = []", "stop_signals", "non-empty list of signal names"),
    ("unknown signal", 'stop_signals = ["TERM", "NOPE"]', "stop_signals", "unknown or unusable signal"),
    ("unusable signal", 'stop_signals = ["STOP"]', "stop_signals", "unknown or unusable signal"),
    ("env not a table", 'env = "A=1"', "env", "expected a table of strings"),
    ("env bad name", 'env = { "A=B" = "1" }', "env", "invalid variable name"),
    ("env bad value", "env = { A = [1] }", "env", "variable A: expected a string"),
    ("not one of the choices", 'kill_mode = "tree"', "kill_mode", 'expected one of "group", "process"'),
    ("unknown engine", '[locks]\nengine = "etcd"', "locks.engine", 'expected one of "flock", "zookeeper"'),
    ("init value not a string", "[init]\nlsb_desc = 1", "init.lsb_desc", "expected a string"),
    ("table expected", 'locks = "flock"', "locks", "expected a table [locks]"),
    ("unknown key with a hint", "max_proc = 2", "max_proc", "unknown key"),
    ("HADaemon::Control spelling", 'program = "x"', "program", 'did you mean "entrypoint"'),
    ("unknown user", 'user = "no-such-user-hadctl"', "user", "unknown user"),
    ("unknown group", 'group = "no-such-group-hadctl"', "group", "unknown group"),
    ("uid without passwd entry", "uid = 9999", "uid", 'has no passwd entry, so set "gid" too'),
    ("directory missing", 'directory = "nowhere"', "directory", "is not a directory"),
    ("zookeeper without hosts", '[locks]\nengine = "zookeeper"', "locks.hosts", 'required when engine is "zookeeper"'),
    ("fence_grace too long", '[locks]\nengine = "zookeeper"\nhosts = "h:2181"\nsession_timeout = 2\nfence_grace = 2',
     "locks.fence_grace", "must be less than locks.session_timeout"),
    ("both lock paths the same", '[locks]\npath = "l"\nstandby_path = "l"', "locks.standby_path", "must differ"),
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "svc.toml"
    path.write_text(text)
    return path


def _refusal(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    return caught.value


def _with(base: str, extra: str) -> str:
    """``base`` with ``extra``'s keys instead of its own (a top-level key replaces base's
    line; a table goes at the end, where TOML wants tables)."""
    replaced = {line.split("=")[0].strip() for line in extra.splitlines() if "=" in line and not extra.startswith("[")}
    kept = [line for line in base.splitlines() if line.split("=")[0].strip() not in replaced]
    return "\n".join(kept) + "\n" + extra + "\n"


def test_the_good_file_loads(tmp_path):
    cfg = config.load(str(_write(tmp_path, GOOD)))
    assert (cfg.name, cfg.entrypoint, cfg.pid_dir) == ("svc", "pkg.mod:run", str(tmp_path / "run"))


@pytest.mark.parametrize(("extra", "key", "problem"), [row[1:] for row in BAD_VALUES],
                         ids=[row[0] for row in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_file_key_and_problem(tmp_path, extra, key, problem):
    path = _write(tmp_path, _with(GOOD, extra))
    error = _refusal(path)
    message = str(error)
    assert error.exit_status == 6
    assert message.startswith(f"{path}: "), message
    assert f'"{key}"' in message, message
    assert problem in message, message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("missing", config.REQUIRED)
def test_a_missing_required_key_is_named(tmp_path, missing):
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith(missing + " "))
    error = _refusal(_write(tmp_path, text))
    assert error.exit_status == 6
    assert str(error) == f'{tmp_path / "svc.toml"}: missing required key "{missing}"'


@pytest.mark.parametrize(("content", "problem"), [
    (b'name = "svc\n', "invalid TOML"),
    (b'name = "\xff"\n', "invalid TOML: not UTF-8 text (line 1)"),
])
def test_a_file_that_is_no_toml_names_the_problem(tmp_path, content, problem):
    path = tmp_path / "svc.toml"
    path.write_bytes(content)
    error = _refusal(path)
    assert error.exit_status == 6 and str(error).startswith(f"{path}: {problem}"), str(error)


def test_a_missing_file_or_a_folder_names_the_path(tmp_path):
    assert str(_refusal(tmp_path / "none.toml")) == f"{tmp_path / 'none.toml'}: no such file"
    assert str(_refusal(tmp_path)) == f"{tmp_path}: is a directory, not a service file"


def test_every_key_of_the_table_is_refused_when_given_a_table(tmp_path):
    """No check of the table lets a wrong type through (a TOML table fits none of them)."""
    for key in config.TOP_KEYS:
        if key in ("env",):  # a table is what env is
            continue
        path = _write(tmp_path, _with(GOOD, f"{key} = {{ x = 1 }}"))
        message = str(_refusal(path))
        assert message.startswith(f'{path}: key "{key}": expected'), message
