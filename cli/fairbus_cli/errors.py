"""How the long-running commands (``provider``, ``user``, ``ledger``, ``broker``) report
what stops them: one line, never a traceback, the message printed as it is (rich markup
escaped, so ``t.toml [provider]: 'rounds' must be int`` keeps its table name) and never
wrapped.

Exit statuses: :data:`OPERATOR_EXIT` (2) for the operator's mistakes
(:class:`fairbus.errors.OperatorError`: a configuration, roster, key or state file, the
broker login; and any :class:`OSError`, a file or folder the process cannot use), which
restarting cannot fix; :data:`FAILURE_EXIT` (1) for any other refusal while running.
"""

from __future__ import annotations

import re
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from fairbus.errors import OperatorError

OPERATOR_EXIT = 2
FAILURE_EXIT = 1
STOPPERS = (OperatorError, OSError)
"""Besides every :class:`~fairbus.errors.FairbusError`, what a command reports in one line."""

_LINE_BREAKS = re.compile(r"\s*\n\s*")


def one_line(message: object) -> str:
    """``message`` as a single line (inner line breaks become spaces)."""
    return _LINE_BREAKS.sub(" ", str(message).strip())


def exit_status(exc: BaseException) -> int:
    """:data:`OPERATOR_EXIT` for an operator's mistake, else :data:`FAILURE_EXIT`."""
    return OPERATOR_EXIT if isinstance(exc, STOPPERS) else FAILURE_EXIT


def say(console: Console, label: str, message: object, *, style: str = "red") -> None:
    """Print ``label: message`` in one line, ``message`` verbatim (no markup, no wrap)."""
    console.print(
        f"[{style}]{escape(label)}:[/] {escape(one_line(message))}",
        soft_wrap=True,
        highlight=False,
    )


def stop(console: Console, exc: BaseException, *, failed: str, mistake: str = "error") -> NoReturn:
    """Report ``exc`` in one line and exit: ``<mistake>: ...`` with status 2 for an
    operator's mistake, ``<failed>: ...`` with status 1 otherwise."""
    status = exit_status(exc)
    say(console, mistake if status == OPERATOR_EXIT else failed, exc)
    raise typer.Exit(status) from None
