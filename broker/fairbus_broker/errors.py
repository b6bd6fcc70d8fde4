"""The broker package's errors; both are :class:`fairbus.errors.OperatorError` (the CLI
prints them in one line and exits with status 2)."""

from __future__ import annotations

from fairbus.errors import OperatorError


class BrokerError(OperatorError):
    """The broker cannot be configured or started (missing binary, no logins, a crash)."""


class BrokerConfigError(BrokerError):
    """The broker configuration file is malformed: an unknown key, a wrong type, a value
    out of range or a missing file. The message names the file and the field."""
