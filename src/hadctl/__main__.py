"""``python -m hadctl``: the same as the ``hadctl`` command."""
from hadctl.entry import run

run()
