"""The MQTT topics: every topic fairbus publishes or subscribes to is built and parsed here.

Topics live under ``fairbus/<task>/``; every identity publishes only under its own
subtree ``fairbus/<task>/<role>/<id>/…`` (the broker ACL enforces it), and ledger nodes
under ``fairbus/<task>/ledger/<node>/…``. MQTT 3.1.1 features only, QoS 1.
"""

from __future__ import annotations

QOS = 1


def own(task: str, role: str, pid: int) -> str:
    return f"fairbus/{task}/{role}/{pid}"


def presence(task: str, role: str, pid: int) -> str:
    """Retained ``online`` at connect; the Last Will sets ``offline``."""
    return f"{own(task, role, pid)}/presence"


def provider_message(task: str, pid: int, kind: str) -> str:
    """The provider's signed broadcasts (``global_model``, ``announce``, ``dropout``,
    ``evaluation``, ``decision``), each with its ledger receipt."""
    return f"{own(task, 'provider', pid)}/{kind}"


def provider_messages(task: str) -> str:
    return f"fairbus/{task}/provider/+/+"


def global_models(task: str) -> str:
    return f"fairbus/{task}/provider/+/global_model"


def direct(task: str, sender: int, recipient: int, kind: str) -> str:
    """A sealed share from one user to another (``share`` or ``summed_share``)."""
    return f"{own(task, 'user', sender)}/to/{recipient}/{kind}"


def direct_inbox(task: str, recipient: int) -> str:
    return f"fairbus/{task}/user/+/to/{recipient}/+"


def upload(task: str, user: int) -> str:
    """A signed masked upload with its ledger receipt (model-sized)."""
    return f"{own(task, 'user', user)}/upload"


def uploads(task: str) -> str:
    return f"fairbus/{task}/user/+/upload"


def user_presences(task: str) -> str:
    return f"fairbus/{task}/user/+/presence"


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


def sender_of(topic: str) -> tuple[str, int] | None:
    """(role, id) of a ``fairbus/<task>/<role>/<id>/…`` topic, or None."""
    parts = topic.split("/")
    if len(parts) < 4 or not parts[3].isdigit():
        return None
    return parts[2], int(parts[3])
