"""``python -m fairbus_cli``: the ``fairbus`` command (how local deployments start their
processes with the running interpreter)."""

from fairbus_cli.main import run

run()
