"""The MQTT topics: every topic fairbus publishes or subscribes to is built and parsed here.

Topics live under ``fairbus/<task>/``; every identity publishes only under its own
subtree ``fairbus/<task>/<role>/<id>/…`` (the broker ACL enforces it), and ledger nodes
under ``fairbus/<task>/ledger/<node>/…``. MQTT 3.1.1 features only, QoS 1.

The shapes (after ``fairbus/<task>/``), and what :func:`parse` makes of them:

=====================================  =================================================
``<role>/<id>/<kind>``                 ``Topic(role, id, kind)``: presence, a provider
                                       broadcast (a message type), a user's upload
``user/<id>/to/<recipient>/<kind>``    ``Topic("user", id, kind, recipient)``: a sealed
                                       share
``<role>/<id>/ledger/<request>``       ``Topic(role, id, request, to_ledger=True)``:
                                       ``submit`` or ``query``
``ledger/<node>/<kind>/<addressee>``   ``Topic("ledger", node, kind, addressee)``:
                                       ``receipt`` or ``response``
``ledger/<node>/block``                ``Topic("ledger", node, "block")``
=====================================  =================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from fairbus.roster import Role

QOS = 1
ROLES = frozenset(r.value for r in Role)
LEDGER_REQUESTS = ("submit", "query")
LEDGER_REPLIES = ("receipt", "response")


@dataclass(frozen=True)
class Topic:
    """A parsed topic: who published it (``role``, ``sender``; a ledger node's id for
    ``role == "ledger"``), what it carries (``kind``: a message type, ``presence``,
    ``share``, ``summed_share``, ``submit``, ``query``, ``receipt``, ``response`` or
    ``block``) and for whom, where the topic names someone (a sealed share's recipient,
    a ledger answer's addressee)."""

    role: str
    sender: int
    kind: str
    recipient: int | None = None
    to_ledger: bool = False
    """A submission or query to the ledger (``…/<role>/<id>/ledger/<kind>``)."""

    @property
    def from_ledger(self) -> bool:
        return self.role == Role.LEDGER.value


# --- building --------------------------------------------------------------------------------


def own(task: str, role: str, pid: int) -> str:
    return f"fairbus/{task}/{role}/{pid}"


def message(task: str, role: str, pid: int, kind: str) -> str:
    """What participant ``pid`` publishes for everyone who may read it: a provider
    broadcast, a user's upload (``kind`` the message type, or ``presence``)."""
    return f"{own(task, role, pid)}/{kind}"


def presence(task: str, role: str, pid: int) -> str:
    """Retained ``online`` at connect; the Last Will sets ``offline``."""
    return message(task, role, pid, "presence")


def provider_message(task: str, pid: int, kind: str) -> str:
    """The provider's broadcasts: its ledger transactions (``global_model``,
    ``announce``, ``dropout``, ``evaluation``, ``decision``), each with its ledger
    receipt, and under plain FedAvg the global model in the clear."""
    return message(task, Role.PROVIDER.value, pid, kind)


def provider_messages(task: str) -> str:
    return f"fairbus/{task}/provider/+/+"


def global_models(task: str) -> str:
    return f"fairbus/{task}/provider/+/global_model"


def relayed_payload(task: str, pid: int) -> str:
    """Recorded model-sized envelopes the provider hands the ledger nodes: its test set,
    and the uploads an evaluation is re-derived from when a node lacks them. Below its
    ``ledger`` subtree, which no user may read (users read ``provider/+/+``)."""
    return f"{own(task, 'provider', pid)}/ledger/payload"


def relayed_payloads(task: str) -> str:
    return f"fairbus/{task}/provider/+/ledger/payload"


def direct(task: str, sender: int, recipient: int, kind: str) -> str:
    """A sealed share from one user to another (``share`` or ``summed_share``)."""
    return f"{own(task, 'user', sender)}/to/{recipient}/{kind}"


def direct_inbox(task: str, recipient: int) -> str:
    return f"fairbus/{task}/user/+/to/{recipient}/+"


def upload(task: str, user: int) -> str:
    """What a user sends the provider: a signed masked upload with its ledger receipt
    (model-sized), or under plain FedAvg its model in the clear."""
    return message(task, Role.USER.value, user, "upload")


def uploads(task: str) -> str:
    return f"fairbus/{task}/user/+/upload"


def user_messages(task: str, kind: str) -> str:
    """Every user's publications of ``kind``: SecCL's ``seccl_update`` (type (a)) and
    ``seccl_evaluation`` (type (b)) messages, each with its ledger receipt."""
    return f"fairbus/{task}/user/+/{kind}"


def seccl_changes(task: str) -> str:
    """SecCL's type (a) messages (the participants' shared changes, each with its
    receipt): on the bulletin board, so every participant reads them ("Message
    Interaction Protocol": each participant evaluates the others' changes)."""
    return user_messages(task, "seccl_update")


def seccl_evaluations(task: str) -> str:
    """SecCL's type (b) messages: only the server (and the ledger) read them."""
    return user_messages(task, "seccl_evaluation")


def user_presences(task: str) -> str:
    return f"fairbus/{task}/user/+/presence"


def presences(task: str) -> str:
    """Every participant's presence (``fairbus status`` reads them as an admin)."""
    return f"fairbus/{task}/+/+/presence"


def username(role: str, pid: int) -> str:
    """The broker login (and, with ``use_username_as_clientid``, the client id)."""
    return f"{role}-{pid}"


def ledger_submit(task: str, role: str, pid: int) -> str:
    return f"{own(task, role, pid)}/ledger/submit"


def ledger_query(task: str, role: str, pid: int) -> str:
    return f"{own(task, role, pid)}/ledger/query"


def ledger_receipt(task: str, node: int | str, pid: int | str) -> str:
    return f"fairbus/{task}/ledger/{node}/receipt/{pid}"


def ledger_response(task: str, node: int | str, pid: int | str) -> str:
    return f"fairbus/{task}/ledger/{node}/response/{pid}"


def ledger_block(task: str, node: int | str) -> str:
    return f"fairbus/{task}/ledger/{node}/block"


# --- parsing ---------------------------------------------------------------------------------


def parse(task: str, topic: str) -> Topic | None:
    """The :class:`Topic` of a concrete topic of ``task`` (no wildcards), or None for
    anything else: another task, an unknown role, an id that is not a number, a shape
    not in the table above."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "fairbus" or parts[1] != task:
        return None
    return _parse_tail(parts[2:])


def sender_of(topic: str) -> tuple[str, int] | None:
    """(role, id) of a ``fairbus/<task>/<role>/<id>/…`` topic of any task, or None."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "fairbus":
        return None
    parsed = _parse_tail(parts[2:])
    return None if parsed is None else (parsed.role, parsed.sender)


def _parse_tail(parts: list[str]) -> Topic | None:
    role, pid, rest = parts[0], _number(parts[1]), parts[2:]
    if role not in ROLES or pid is None or not all(rest):
        return None
    if role == Role.LEDGER.value:
        if rest == ["block"]:
            return Topic(role, pid, "block")
        if len(rest) == 2 and rest[0] in LEDGER_REPLIES:
            addressee = _number(rest[1])
            return None if addressee is None else Topic(role, pid, rest[0], addressee)
        if len(rest) == 2 and rest[0] == "ledger" and rest[1] in LEDGER_REQUESTS:
            return Topic(role, pid, rest[1], to_ledger=True)
        return None
    if len(rest) == 1 and rest[0] not in ("to", "ledger"):
        return Topic(role, pid, rest[0])
    if len(rest) == 2 and rest[0] == "ledger" and rest[1] in LEDGER_REQUESTS:
        return Topic(role, pid, rest[1], to_ledger=True)
    if rest == ["ledger", "payload"] and role == Role.PROVIDER.value:
        return Topic(role, pid, "payload", to_ledger=True)
    if len(rest) == 3 and rest[0] == "to" and role == Role.USER.value:
        recipient = _number(rest[1])
        return None if recipient is None else Topic(role, pid, rest[2], recipient)
    return None


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() and text.isascii() else None
