"""``python -m hadctl``: the same as the ``hadctl`` command."""
from hadctl.cli import run

run()
