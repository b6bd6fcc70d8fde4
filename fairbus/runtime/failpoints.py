"""Crash points for the recovery tests, as etcd's ``gofail`` failpoints: with
``FAIRBUS_CRASH_AFTER=<kind>:<round>`` in its environment the provider dies at once
(``os._exit(137)``, what a ``kill -9`` leaves) right after the ledger commits its first
``<kind>`` transaction (``announce``, ``evaluation``, ``decision``, ...) in round
``<round>`` or later, before it publishes it — or, with ``published-<kind>``, right
after it published it (the broker has it: the users go on without the provider): a
crash in a phase too short to hit with a signal. Unset, it does nothing."""

from __future__ import annotations

import logging
import os

ENV = "FAIRBUS_CRASH_AFTER"
KILLED = 137

log = logging.getLogger("fairbus.provider")


def crash_after(kind: str, round_number: int) -> None:
    """Die here if the environment asks for it (see the module's docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, first = spec.partition(":")
    if want == kind and round_number >= int(first or 0):
        log.critical("failpoint %s=%s: dying after committing a %s", ENV, spec, kind)
        logging.shutdown()
        os._exit(KILLED)
