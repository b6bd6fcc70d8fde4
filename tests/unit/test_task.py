"""The task's consensus-critical parameters: one definition, strict TOML, the wire round trip."""

from __future__ import annotations

import dataclasses
import tomllib

import numpy as np
import pytest

from fairbus import envelope
from fairbus.detection import DetectionParams
from fairbus.errors import FairbusError, SchemaError
from fairbus.identity import Identity
from fairbus.protocol.events import Commit, StartRound
from fairbus.protocol.provider import ProviderConfig, ProviderMachine
from fairbus.roster import Roster
from fairbus.task import DEFAULT_DETECTION, PHASE_TIMEOUT, TaskParams, detection_table
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS
from fairbus.wire.messages import DetectionPolicy, TaskStart, decode_body

POLICIES = [
    DEFAULT_DETECTION,
    DetectionParams(),  # the paper's, every extension off (None fields on the wire)
    DetectionParams(bound_score=1, tolerance=0, contribution_tolerance=0.0, key_score=0.0),
    DetectionParams(contribution_tolerance=0.2, relative_tolerance=0.5, weight_floor=0.5),
]


def test_the_defaults_exist_once() -> None:
    assert TaskParams().detection is DEFAULT_DETECTION
    assert ProviderConfig().detection == DEFAULT_DETECTION
    assert ProviderConfig().task == TaskParams()
    assert ProviderConfig().phase_timeout == PHASE_TIMEOUT
    assert detection_table({}) == DEFAULT_DETECTION


def test_the_wire_policy_is_the_detection_params_field_for_field() -> None:
    names = [f.name for f in dataclasses.fields(DetectionParams)]
    assert list(DetectionPolicy.FIELDS) == names
    assert [f.name for f in dataclasses.fields(DetectionPolicy)] == names


@pytest.mark.parametrize("detection", POLICIES)
def test_task_params_round_trip_through_the_wire(detection: DetectionParams) -> None:
    task = TaskParams(detection)
    message = task.to_message()
    decoded = decode_body("task_start", message.payload(), DEFAULT_LIMITS)
    assert isinstance(decoded, TaskStart)
    assert decoded == TaskStart.from_wire(message.to_wire(), "", DEFAULT_LIMITS)
    assert TaskParams.from_message(decoded) == task
    # canonical: the same parameters give the same bytes (so the same transaction hash)
    assert TaskParams.from_message(decoded).to_message().payload() == message.payload()


def _wire(
    collusion: object = 1, keying: object = "shamir", local_steps: object = None, **changes: object
) -> dict[str, object]:
    """A task start's wire form; ``changes`` go to the detection policy, but for
    ``absent_class_scale`` and ``proximal_mu``, fields of the task start itself."""
    remedies = {k: changes.pop(k, None) for k in ("absent_class_scale", "proximal_mu")}
    policy = TaskParams().to_message().to_wire()["detection"]
    wire = {"detection": {**policy, **changes}, "collusion": collusion, "keying": keying}
    seccl = {"mode": "fairness", "theta": None, "candidate_share": None}
    return {
        **wire,
        "evaluation": None,
        "local_steps": local_steps,
        **seccl,
        **remedies,
    }


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"bound_score": 1.5}, "bound_score"),
        ({"tolerance": -0.1}, "tolerance"),
        ({"confidence": 1}, "confidence"),  # an int is not a float
        ({"min_evidence": 1}, "min_evidence"),
        ({"min_evidence": 2**40}, "min_evidence"),
        ({"carry_evidence": 1}, "carry_evidence"),
        ({"evidence_window": 0}, "evidence_window"),  # off is nil on the wire, not 0
        ({"level_rounds": True}, "level_rounds"),
        ({"key_score": float("nan")}, "key_score"),
        ({"contribution_layers": "classifier"}, "contribution_layers"),
        ({"contribution_layers": None}, "contribution_layers"),
        ({"surprise": 1}, "unknown fields"),
    ],
)
def test_a_task_start_is_decoded_strictly(changes: dict[str, object], complaint: str) -> None:
    with pytest.raises(SchemaError, match=complaint):
        decode_body("task_start", codec.pack(_wire(**changes)), DEFAULT_LIMITS)


@pytest.mark.parametrize("collusion", [-1, 17, True, 1.0, None])
def test_a_task_starts_collusion_bound_is_decoded_strictly(collusion: object) -> None:
    with pytest.raises(SchemaError, match="collusion"):
        decode_body("task_start", codec.pack(_wire(collusion)), DEFAULT_LIMITS)


@pytest.mark.parametrize("keying", ["Shamir", "pairwise ", "", 1, None])
def test_a_task_starts_keying_is_decoded_strictly(keying: object) -> None:
    with pytest.raises(SchemaError, match="keying"):
        decode_body("task_start", codec.pack(_wire(keying=keying)), DEFAULT_LIMITS)


@pytest.mark.parametrize("steps", [0, -1, 100_001, True, 60.0, "60"])
def test_a_task_starts_local_steps_are_decoded_strictly(steps: object) -> None:
    with pytest.raises(SchemaError, match="local_steps"):
        decode_body("task_start", codec.pack(_wire(local_steps=steps)), DEFAULT_LIMITS)


@pytest.mark.parametrize("steps", [None, 1, 60, 100_000])
def test_the_local_steps_are_recorded_at_task_start(steps: int | None) -> None:
    task = TaskParams(local_steps=steps)
    decoded = decode_body("task_start", codec.pack(_wire(local_steps=steps)), DEFAULT_LIMITS)
    assert isinstance(decoded, TaskStart)
    assert TaskParams.from_message(decoded) == task
    assert ProviderConfig(local_steps=steps).task.local_steps == steps


@pytest.mark.parametrize(
    ("key", "value"),
    [
        *(("absent_class_scale", v) for v in (-0.1, 1.5, 1, True, "0.5", float("nan"))),
        *(("proximal_mu", v) for v in (-0.1, 100.5, 0, True, float("inf"))),
    ],
)
def test_a_task_starts_local_training_remedies_are_decoded_strictly(
    key: str, value: object
) -> None:
    with pytest.raises(SchemaError, match=key):
        decode_body("task_start", codec.pack(_wire(**{key: value})), DEFAULT_LIMITS)


@pytest.mark.parametrize(
    ("key", "value"),
    [("absent_class_scale", v) for v in (None, 0.0, 0.5, 1.0)]
    + [("proximal_mu", v) for v in (None, 0.0, 0.1, 100.0)],
)
def test_the_local_training_remedies_are_recorded_at_task_start(
    key: str, value: float | None
) -> None:
    task = TaskParams(**{key: value})
    decoded = decode_body("task_start", codec.pack(_wire(**{key: value})), DEFAULT_LIMITS)
    assert isinstance(decoded, TaskStart)
    assert TaskParams.from_message(decoded) == task
    assert getattr(ProviderConfig(**{key: value}).task, key) == value


@pytest.mark.parametrize("keying", ["shamir", "pairwise"])
def test_the_keying_is_recorded_at_task_start(keying: str) -> None:
    task = TaskParams(keying=keying)
    assert TaskParams.from_message(task.to_message()) == task
    with pytest.raises(SchemaError, match="keying"):
        TaskParams(keying="bonawitz")


@pytest.mark.parametrize("c", [0, 1, 2, 16])
def test_the_collusion_bound_is_recorded_at_task_start(c: int) -> None:
    task = TaskParams(collusion=c)
    decoded = decode_body("task_start", task.to_message().payload(), DEFAULT_LIMITS)
    assert isinstance(decoded, TaskStart) and decoded.collusion == c
    assert TaskParams.from_message(decoded) == task
    assert TaskParams().collusion == 1  # the default: a member knows its own model


def test_a_well_typed_but_invalid_policy_is_refused_as_a_whole() -> None:
    # every field within its bounds, but a window smaller than the evidence it must hold
    message = decode_body(
        "task_start", codec.pack(_wire(evidence_window=2, min_evidence=4)), DEFAULT_LIMITS
    )
    assert isinstance(message, TaskStart)
    with pytest.raises(SchemaError, match="evidence_window"):
        TaskParams.from_message(message)


def test_parameters_the_ledger_could_not_record_are_refused_at_once() -> None:
    out_of_bounds = DetectionParams(bound_score=2.0)  # valid for detect(), not recordable
    with pytest.raises(SchemaError, match="bound_score"):
        TaskParams(out_of_bounds)
    with pytest.raises(SchemaError, match="bound_score"):
        ProviderConfig(detection=out_of_bounds)


def test_zero_turns_the_whole_number_extensions_off() -> None:
    params = detection_table({"level_rounds": 0, "evidence_window": 0})
    assert params.level_rounds is None and params.evidence_window is None
    assert params.min_evidence == DEFAULT_DETECTION.min_evidence  # the rest: the defaults


def test_zero_turns_the_relative_tolerance_and_the_weight_floor_off() -> None:
    on = detection_table({"relative_tolerance": 0.3, "weight_floor": 0.4})
    assert on == detection_table({})  # omitted, they take these defaults: both on
    params = detection_table({"relative_tolerance": 0, "weight_floor": 0.0})
    assert params.relative_tolerance is None and params.weight_floor is None
    assert detection_table({"weight_floor": 0.5}).weight_floor == 0.5


def test_a_toml_table_is_read_over_the_defaults() -> None:
    table = tomllib.loads("[detection]\nbound_score = 0.2\ncarry_evidence = false\n")
    params = detection_table(table["detection"])
    assert params == dataclasses.replace(DEFAULT_DETECTION, bound_score=0.2, carry_evidence=False)
    assert TaskParams.from_message(TaskParams(params).to_message()).detection == params


@pytest.mark.parametrize("direction", ["median", "last_step", "accurate_median"])
def test_the_contribution_direction_is_read_and_recorded(direction: str) -> None:
    default = detection_table({})
    assert default.contribution_direction == "leading_median"
    assert detection_table({"contribution_direction": "leading_median"}) == default
    table = tomllib.loads(f'[detection]\ncontribution_direction = "{direction}"\n')
    params = detection_table(table["detection"])
    assert params.contribution_direction == direction
    recorded = TaskParams.from_message(TaskParams(params).to_message())
    assert recorded.detection.contribution_direction == direction


@pytest.mark.parametrize(
    ("name", "value", "bad", "default"),
    [
        ("suspect_weight", 0.5, 1.5, 0.3),
        ("weight_veto", 0.3, 1.5, 0.4),
        ("plateau_gain", 0.02, 1.5, 0.01),
        ("widening_cap", 2.0, 11.0, 1.0),
        ("rank_below", 0.5, 1.5, 0.35),
        ("convict_below", 0.3, 1.5, 0.4),
        ("believed_noise", 3.0, 11.0, 2.0),
        ("trusted_weight", 0.6, 1.5, 0.5),
        ("class_lead", 0.2, 1.5, 0.1),
    ],
)
def test_an_extension_of_alg_6_is_read_recorded_and_turned_off_by_zero(
    name: str, value: float, bad: float, default: float | None
) -> None:
    defaults = TaskParams.from_message(TaskParams(detection_table({})).to_message())
    assert getattr(defaults.detection, name) == default  # what the task records by default
    params = detection_table({name: value})
    recorded = TaskParams.from_message(TaskParams(params).to_message())
    assert getattr(recorded.detection, name) == value
    assert getattr(detection_table({name: 0}), name) is None
    with pytest.raises(FairbusError, match=name):
        detection_table({name: bad})


def test_the_veto_without_departed_users_is_read_and_recorded() -> None:
    assert detection_table({}).veto_without_departed is True
    params = detection_table({"veto_without_departed": False})
    recorded = TaskParams.from_message(TaskParams(params).to_message())
    assert recorded.detection.veto_without_departed is False
    with pytest.raises(FairbusError, match="'veto_without_departed' must be true or false"):
        detection_table({"veto_without_departed": 1})


def test_the_weight_veto_must_not_exceed_the_weight_floor() -> None:
    with pytest.raises(FairbusError, match="must not exceed weight_floor"):
        detection_table({"weight_veto": 0.4, "weight_floor": 0.3})


@pytest.mark.parametrize(
    ("table", "complaint"),
    [
        ({"bound_scor": 1}, "[detection] takes only"),
        ([], "[detection] takes only"),
        ({"carry_evidence": 1}, "'carry_evidence' must be true or false"),
        ({"bound_score": True}, "'bound_score' must be a number"),
        ({"bound_score": "0.1"}, "'bound_score' must be a number"),
        ({"confidence": 2.0}, "[detection]: confidence"),
        ({"level_rounds": 2.5}, "whole number"),
        ({"evidence_window": 2}, "evidence_window"),
        ({"bound_score": 2.0}, "bound_score"),  # beyond what the ledger records
        ({"min_evidence": 10**30}, "min_evidence"),
        ({"tolerance": float("inf")}, "tolerance"),
        ({"contribution_direction": 1}, "'contribution_direction' must be a string"),
        ({"contribution_direction": "mean"}, "contribution_direction must be one of"),
    ],
)
def test_a_bad_detection_table_is_refused_by_name(table: object, complaint: str) -> None:
    with pytest.raises(FairbusError) as info:
        detection_table(table)
    assert complaint in str(info.value)
    assert str(info.value).startswith("[detection]")


def test_the_provider_records_the_task_start_first(
    identities: dict[int, Identity], roster: Roster
) -> None:
    machine = ProviderMachine(identities[0], roster, np.zeros(8, dtype=np.float32))
    out = machine.handle(StartRound(0.0))
    commits = [o for o in out if isinstance(o, Commit)]
    assert [c.kind for c in commits] == ["task_start", "global_model", "announce"]
    first = commits[0].envelope
    assert first.header.prev == envelope.GENESIS and first.header.round is None
    message = envelope.verify(first, roster).message
    assert isinstance(message, TaskStart)
    assert TaskParams.from_message(message) == machine.config.task
    assert commits[1].envelope.header.prev == first.hash  # the chain goes on from it


def test_the_mode_and_seccls_theta_and_lambda_are_recorded_at_task_start() -> None:
    assert TaskParams().mode == "fairness"
    task = TaskParams(mode="seccl", theta=0.1, candidate_share=0.2)
    decoded = decode_body("task_start", task.to_message().payload(), DEFAULT_LIMITS)
    assert isinstance(decoded, TaskStart)
    assert (decoded.mode, decoded.theta, decoded.candidate_share) == ("seccl", 0.1, 0.2)
    assert TaskParams.from_message(decoded) == task


@pytest.mark.parametrize(
    ("mode", "theta", "share", "complaint"),
    [
        ("seccl", None, 0.2, "theta"),
        ("seccl", 0.1, None, "candidate_share"),
        ("seccl", 0.0, 0.2, "θ"),
        ("seccl", 0.1, 1.5, "λ"),
        ("fairness", 0.1, None, "seccl task"),
        ("fedavg", None, None, "mode"),
    ],
)
def test_seccl_parameters_are_checked(
    mode: str, theta: float | None, share: float | None, complaint: str
) -> None:
    with pytest.raises(SchemaError, match=complaint):
        TaskParams(mode=mode, theta=theta, candidate_share=share)


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [({"mode": "SecCL"}, "mode"), ({"theta": 1.5}, "theta"), ({"candidate_share": 1}, "share")],
)
def test_the_mode_is_decoded_strictly(changes: dict[str, object], complaint: str) -> None:
    with pytest.raises(SchemaError, match=complaint):
        decode_body("task_start", codec.pack({**_wire(), **changes}), DEFAULT_LIMITS)
