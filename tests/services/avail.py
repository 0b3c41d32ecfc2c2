"""Services for tests/test_availability.py (issue 12, availability items).

Importing this module misbehaves on request, so a test can break the *new* code
of a restart by changing only the config's ``env``:

* ``AVAIL_IMPORT=fail``: the import raises (new code that cannot be imported);
* ``AVAIL_IMPORT=hang``: the import blocks for ever, in a helper function (an
  import that waits on a server that never answers).

``serve`` is the well-behaved main of tests/services/basic.py; ``deaf`` a warmup
after which the standby no longer hears TERM or the stop file (both blocked), so
that only KILL, after signal_kill_timeout, ends it.
"""
import os
import signal
import time

from tests.services.basic import serve  # noqa: F401 - the entrypoint


def deaf() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGIO})


def _wait_for_a_server_that_never_answers() -> None:
    while True:
        time.sleep(3600)


if os.environ.get("AVAIL_IMPORT") == "fail":
    raise ImportError("tests.services.avail: broken on purpose (AVAIL_IMPORT=fail)")
if os.environ.get("AVAIL_IMPORT") == "hang":
    _wait_for_a_server_that_never_answers()
