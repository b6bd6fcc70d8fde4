"""The broker package's errors; both are :class:`fairbus.errors.FairbusError`."""

from __future__ import annotations

from fairbus.errors import FairbusError


class BrokerError(FairbusError):
    """The broker cannot be configured or started (missing binary, no logins, a crash)."""


class BrokerConfigError(BrokerError):
    """The broker configuration file is malformed: an unknown key, a wrong type, a value
    out of range or a missing file. The message names the file and the field."""
