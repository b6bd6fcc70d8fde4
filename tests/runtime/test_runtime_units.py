"""The runtime's pure parts: its configuration, the recorded-message decoder and the
user's persistent state. Bad inputs are refused with a typed error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fairbus import envelope
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError, SchemaError
from fairbus.identity import Identity
from fairbus.ledger.recorded import (
    ReceiptError,
    Recorded,
    check_receipt,
    header_only,
    open_recorded,
)
from fairbus.roster import Roster
from fairbus.runtime.config import RuntimeConfig, RuntimeConfigError
from fairbus.runtime.provider import machine_config
from fairbus.runtime.provider_loop import load_task_data
from fairbus.runtime.user_state import UserState, UserStateError
from fairbus.wire import codec
from fairbus.wire.messages import Attestation, GlobalModel

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "fairbus.example.toml"


def test_the_example_configuration_loads() -> None:
    config = RuntimeConfig.load(EXAMPLE)
    assert config.training.dataset == "digits" and config.provider.rounds == 10
    assert config.roster == EXAMPLE.parent / "roster.example.toml"
    assert config.provider_config().detection == config.detection
    assert config.collusion == 1 == config.provider_config().task.collusion
    assert config.training.train.local_steps is None  # derived from the data, by default
    assert config.training.train.equal_steps


@pytest.mark.parametrize(
    ("key", "value", "bad"), [("absent_class_scale", 1.0, 1.5), ("proximal_mu", 0.5, -0.1)]
)
def test_the_local_training_remedies_are_read_from_the_training_table(
    key: str, value: float, bad: float
) -> None:
    raw: dict[str, object] = {"roster": "r", "training": {key: value}}
    config = RuntimeConfig.from_dict(raw, base=Path("/x"), source="t.toml")
    assert getattr(config.training.train, key) == value
    provider = machine_config(config, load_task_data(config), 9)  # what the task start records
    assert getattr(provider.task, key) == value
    with pytest.raises(RuntimeConfigError, match=f"{key}.*number from"):
        RuntimeConfig.from_dict(
            {"roster": "r", "training": {key: bad}}, base=Path("/x"), source="t.toml"
        )


def test_equal_steps_can_be_turned_off_in_the_training_table() -> None:
    raw: dict[str, object] = {"roster": "r", "training": {"equal_steps": False}}
    config = RuntimeConfig.from_dict(raw, base=Path("/x"), source="t.toml")
    assert config.training.train.for_task(1347, 9) == config.training.train
    with pytest.raises(RuntimeConfigError, match="equal_steps"):
        RuntimeConfig.from_dict(
            {"roster": "r", "training": {"equal_steps": 1}}, base=Path("/x"), source="t.toml"
        )


def test_local_steps_is_read_from_the_training_table() -> None:
    raw: dict[str, object] = {"roster": "r", "training": {"local_steps": 47}}
    config = RuntimeConfig.from_dict(raw, base=Path("/x"), source="t.toml")
    assert config.training.train.local_steps == 47


def test_the_mode_and_seccls_theta_and_lambda_are_read_from_the_top() -> None:
    base, source = Path("/x"), "t.toml"
    config = RuntimeConfig.from_dict({"roster": "r"}, base=base, source=source)
    assert (config.mode, config.theta, config.candidate_share) == ("fairness", None, None)
    seccl = RuntimeConfig.from_dict({"roster": "r", "mode": "seccl"}, base=base, source=source)
    assert (seccl.seccl, seccl.theta, seccl.candidate_share) == (True, 0.1, 0.2)
    raw: dict[str, object] = {"roster": "r", "mode": "seccl", "theta": 0.3, "candidate_share": 1}
    config = RuntimeConfig.from_dict(raw, base=base, source=source)
    assert (config.theta, config.candidate_share) == (0.3, 1.0)
    for bad, says in (
        ({"mode": "fedavg"}, "'mode' must be one of fairness, seccl"),
        ({"theta": 0.1}, "belong to a task whose mode is 'seccl'"),
        ({"mode": "seccl", "theta": 0.0}, "'theta' must be in (0, 1]"),
        ({"mode": "seccl", "candidate_share": 1.5}, "'candidate_share' must be in (0, 1]"),
    ):
        with pytest.raises(RuntimeConfigError) as error:
            RuntimeConfig.from_dict({"roster": "r", **bad}, base=base, source=source)
        assert says in str(error.value) and str(error.value).count("\n") == 0


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"roster": "r", "colour": 1}, "unknown keys"),
        ({"roster": 3}, "'roster' must be str"),
        ({}, "'roster' (a path) is required"),
        ({"roster": "r", "broker": "nohost"}, "'broker' is 'host:port'"),
        ({"roster": "r", "broker": "h:99999"}, "'broker' is 'host:port'"),
        ({"roster": "r", "training": {"dataset": "imagenet"}}, "unknown dataset"),
        ({"roster": "r", "training": {"local_epochs": 0}}, "'local_epochs' must be at least 1"),
        ({"roster": "r", "training": {"lr": "fast"}}, "'lr' must be a number"),
        ({"roster": "r", "training": {"local_steps": 0}}, "'local_steps' must be from 1"),
        ({"roster": "r", "training": {"local_steps": 10**6}}, "'local_steps' must be from 1"),
        ({"roster": "r", "training": {"local_steps": 4.5}}, "'local_steps' must be int"),
        ({"roster": "r", "provider": {"rounds": True}}, "'rounds' must be int"),
        ({"roster": "r", "provider": {"min_users": 2}}, "at least 3"),
        ({"roster": "r", "provider": {"defended": 1}}, "'defended' must be bool"),
        ({"roster": "r", "provider": {"speed": 1}}, "unknown keys"),
        ({"roster": "r", "detection": {"bound_score": "x"}}, "[detection]"),
        ({"roster": "r", "training": 5}, "must be dict"),
        ({"roster": "r", "collusion": -1}, "'collusion' must be at least 0"),
        ({"roster": "r", "collusion": 17}, "'collusion' must be at most 16"),
        ({"roster": "r", "collusion": 1.5}, "'collusion' must be int"),
    ],
)
def test_bad_configurations_are_refused(raw: dict[str, object], says: str) -> None:
    with pytest.raises(RuntimeConfigError) as error:
        RuntimeConfig.from_dict(raw, base=Path("/x"), source="t.toml")
    assert says in str(error.value)


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text("roster = [")
    with pytest.raises(RuntimeConfigError):
        RuntimeConfig.load(tmp_path / "t.toml")
    with pytest.raises(RuntimeConfigError):
        RuntimeConfig.load(tmp_path / "missing.toml")


def test_recorded_messages_are_decoded_strictly(
    identities: dict[int, Identity], roster: Roster
) -> None:
    signed = envelope.sign(identities[0], roster.task, GlobalModel(2, b"\x00" * 8),
                           prev=GENESIS, round=1, attempt=0)  # fmt: skip
    bad_inputs = [
        b"",
        b"\xc1",
        codec.pack([1, 2]),
        codec.pack({"e": b"x"}),
        codec.pack({"e": 1, "r": b""}),
        codec.pack({"e": b"", "r": b"x" * 70_000}),
    ]
    for bad in bad_inputs:
        with pytest.raises(FairbusError):
            Recorded.from_bytes(bad)
    # no receipt, a receipt signed by a user, a receipt for another transaction
    with pytest.raises(FairbusError):
        open_recorded(Recorded(signed, b"").to_bytes(), roster)
    user_note = envelope.sign(identities[1], roster.task, Attestation("n", bytes(32), b""),
                              prev=GENESIS)  # fmt: skip
    with pytest.raises(ReceiptError):
        check_receipt(user_note.to_bytes(), signed.hash, roster)
    stripped = envelope.parse(header_only(signed))
    assert stripped.payload == b"" and stripped.hash == signed.hash


def test_user_state_survives_a_restart_and_refuses_damage(tmp_path: Path) -> None:
    state = UserState(tmp_path / "user-3")
    assert state.chain_head() == GENESIS
    state.save_chain_head(b"\x07" * 32)
    describe: dict[str, object] = {"dataset": "digits", "seed": 0}
    state.save_partition(describe, np.arange(5, dtype=np.int64))
    again = UserState(tmp_path / "user-3")
    assert again.chain_head() == b"\x07" * 32
    part = again.partition(describe)
    assert part is not None and part.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UserStateError):
        again.partition({"dataset": "mnist", "seed": 0})
    (tmp_path / "user-3" / "partition.npy").write_bytes(b"garbage")
    with pytest.raises(UserStateError):
        again.partition(describe)
    (tmp_path / "user-3" / "chain_head").write_text("zz")
    with pytest.raises(UserStateError):
        again.chain_head()
    (tmp_path / "user-3" / "chain_head").write_text("ab" * 16)
    with pytest.raises(UserStateError):
        again.chain_head()
    assert isinstance(SchemaError("x"), FairbusError)
