"""The one exception family of fairbus.

Every refusal the library makes is a :class:`FairbusError`; callers that must
survive bad input from the network catch that and nothing wider. Sub-families
group refusals by the layer that made them, so a runtime can log "wire" apart
from "crypto" without parsing messages.
"""

from __future__ import annotations


class FairbusError(Exception):
    """Base of every error fairbus raises on purpose."""


class OperatorError(FairbusError):
    """A mistake the operator must fix (a configuration, roster, key or state file, the
    broker login): retrying cannot help. The CLI prints its message, which names the file
    and what is wrong with it, in one line and exits with status 2."""


# --- field arithmetic and codecs -------------------------------------------------------


class FieldError(FairbusError):
    """A value is not a valid element of GF(p) or cannot be encoded into it."""


class FieldRangeError(FieldError):
    """A value lies outside what the field or fixed-point codec can represent.

    ``index`` is the flat position of the first offending element and ``value``
    its value, so a user can find the bad weight in the model.
    """

    def __init__(self, message: str, *, index: int, value: float) -> None:
        super().__init__(message)
        self.index = index
        self.value = value


# --- Shamir secret sharing ---------------------------------------------------------------


class ShamirError(FairbusError):
    """Secret sharing was asked something it cannot do."""


class TooFewSharesError(ShamirError):
    """Fewer shares than the threshold were given to reconstruction."""


class DuplicateShareError(ShamirError):
    """Two shares carry the same evaluation point."""


class MismatchedShareError(ShamirError):
    """Shares disagree in length, evaluation point or dtype."""


# --- grouping and detection ------------------------------------------------------------


class GroupingError(FairbusError):
    """No grouping satisfies the constraints, or a received grouping violates them."""


class DetectionError(FairbusError):
    """Algorithm 6 was given inconsistent inputs (a group without an accuracy, say)."""


class SecclError(FairbusError):
    """SecCL's selective sharing, peer evaluation or Borda election was given inputs it
    cannot use (a change vector with NaN, an index out of bounds, a self-evaluation)."""


# --- identities and roster ---------------------------------------------------------------


class IdentityError(OperatorError):
    """A key file is missing, malformed or unsafely readable."""


class RosterError(OperatorError):
    """The roster file is malformed, or names someone it does not know."""


# --- envelopes -------------------------------------------------------------------------------


class EnvelopeError(FairbusError):
    """An envelope failed a cryptographic or binding check."""


class SignatureError(EnvelopeError):
    """A detached Ed25519 signature does not verify for the claimed sender."""


class UnknownSenderError(EnvelopeError):
    """The claimed sender is not in the roster (or has no allowed role)."""


class RoleError(EnvelopeError):
    """The sender is in the roster, but its role may not send this message type."""


class ChainError(EnvelopeError):
    """The envelope's ``prev`` does not equal the sender's current chain head (a fork)."""


class ReplayError(EnvelopeError):
    """The envelope was already accepted, or was sealed for another context."""


class SealError(EnvelopeError):
    """A sealed direct envelope failed to decrypt or authenticate."""


# --- wire format -------------------------------------------------------------------------------


class WireError(FairbusError):
    """Bytes from the network do not form a valid message."""


class DecodeError(WireError):
    """The bytes are not well-formed msgpack (truncated, garbage, trailing data)."""


class SchemaError(WireError):
    """Well-formed msgpack, but not a message fairbus knows: unknown type, missing,
    extra or mistyped field."""


class SizeError(WireError):
    """A message, field or collection exceeds its configured limit."""
