"""The Algorithm 6 options shared by ``fairbus simulate`` and ``fairbus bench detection``."""

from __future__ import annotations

from enum import StrEnum

import typer

from fairbus.detection import DetectionParams
from fairbus.task import DEFAULT_DETECTION

DEFAULTS = DEFAULT_DETECTION


def _negative_if_off(value: float | None) -> float:
    """An optional extension's default as an option: negative means off (None)."""
    return -1.0 if value is None else value


def _off_if_negative(value: float) -> float | None:
    """An option's value as the extension's setting: negative means off (None)."""
    return None if value < 0 else value


class Direction(StrEnum):
    """The choices of ``--contribution-direction`` (:data:`fairbus.detection.DIRECTIONS`)."""

    MEDIAN = "median"
    LAST_STEP = "last_step"
    ACCURATE_MEDIAN = "accurate_median"
    LEADING_MEDIAN = "leading_median"


class Layers(StrEnum):
    """The choices of ``--contribution-layers`` (:data:`fairbus.detection.LAYERS`)."""

    ALL = "all"
    FEATURES = "features"


BOUND_SCORE = typer.Option(DEFAULTS.bound_score, help="Alg. 6 bound_score.")
BOUND_CONF = typer.Option(DEFAULTS.bound_conf, help="Alg. 6 bound_conf.")
TOLERANCE = typer.Option(
    DEFAULTS.tolerance,
    help="Not in the paper: a group scores when acc > τ − tolerance (0 = as written).",
)
CONTRIBUTION_TOLERANCE = typer.Option(
    _negative_if_off(DEFAULTS.contribution_tolerance),
    help="Not in the paper: a group must also contribute at least (1 − this) times the "
    "round's largest contribution (its update projected on --contribution-direction); "
    "negative turns it off (as written).",
)
CONTRIBUTION_DIRECTION = typer.Option(
    Direction(DEFAULTS.contribution_direction),
    help="Not in the paper: what a group's update is projected on to measure its "
    "contribution: the median of the round's basic groups' updates (leans towards the "
    "noise in them, so disguised free-riders pass) or the global model's last step "
    "(M_r − M_{r−1}, from recorded models: finds them, but reads honest users whose data "
    "is skewed to a class or two as free-riders; README), or the median of the basic "
    "groups whose accuracy beats the scoring bar (accurate_median: poisoners' groups do "
    "not bend it), or of those above τ − tolerance, the bar without its loosening by the "
    "error left (leading_median: neither do label flippers' groups).",
)
CONTRIBUTION_LAYERS = typer.Option(
    Layers(DEFAULTS.contribution_layers),
    help="Not in the paper: which parameters a group's update is measured on: all, or the "
    "model's convolutional (feature) layers only, where users holding different classes "
    "move the model alike (the classifier moves class by class; README).",
)
MIN_EVIDENCE = typer.Option(
    DEFAULTS.min_evidence,
    help="Not in the paper: the fewest group scores a key user's interval needs before it "
    "can make a violator (2 = as written).",
)
CARRY_EVIDENCE = typer.Option(
    DEFAULTS.carry_evidence,
    help="Not in the paper: a key user's interval counts its focus groups over the "
    "consecutive rounds it has been a key user (off = its active groups of one round, as "
    "written).",
)
KEY_EVIDENCE_ONLY = typer.Option(
    DEFAULTS.key_evidence_only,
    help="Not in the paper: with --carry-evidence, drop a user's carried focus-group "
    "scores when it stops being a key user (off = kept until the evidence window drops "
    "them).",
)
KEY_SCORE = typer.Option(
    _negative_if_off(DEFAULTS.key_score),
    help="Not in the paper: a user scoring below this fraction also becomes a key user "
    "(so key users exist while τ < bound_score); negative turns it off (as written).",
)
EVIDENCE_WINDOW = typer.Option(
    DEFAULTS.evidence_window or 0,
    help="Not in the paper: with --carry-evidence, keep only a user's last this many "
    "focus-group scores (0 = all).",
)
RELATIVE_TOLERANCE = typer.Option(
    _negative_if_off(DEFAULTS.relative_tolerance),
    help="Not in the paper: a group scores when acc > τ − max(tolerance, this × (1 − τ)), "
    "so the accuracy bar follows the error left; negative turns it off.",
)
WEIGHT_FLOOR = typer.Option(
    _negative_if_off(DEFAULTS.weight_floor),
    help="Not in the paper: a focus group that beats the accuracy bar but not the "
    "contribution bar still scores when its focus user's fitted weight θ is at least "
    "this; negative turns it off.",
)
NOISE_WIDENING = typer.Option(
    _negative_if_off(DEFAULTS.noise_widening),
    help="Not in the paper: the contribution bar is 1 − max(contribution tolerance, this × "
    "the fit's relative residual in the round), so noisy rounds convict no one on "
    "contribution; negative turns it off.",
)
NOISE_CEILING = typer.Option(
    _negative_if_off(DEFAULTS.noise_ceiling),
    help="Not in the paper: leave the contribution test out of a round whose fit's "
    "relative residual is above this (there a free-rider's group cannot be told from a "
    "clean one); negative turns it off.",
)
SUSPECT_WEIGHT = typer.Option(
    _negative_if_off(DEFAULTS.suspect_weight),
    help="Not in the paper: a user whose fitted weight θ is below this becomes a key user "
    "whatever its score, where the fit is sharp (residual below the contribution "
    "tolerance); only its own focus groups can convict it. Negative turns it off.",
)
WEIGHT_VETO = typer.Option(
    _negative_if_off(DEFAULTS.weight_veto),
    help="Not in the paper: a focus group whose focus user's fitted weight θ is below "
    "this does not score, whatever its own contribution, where the fit is sharp "
    "(residual below the contribution tolerance). Negative turns it off.",
)
PLATEAU_GAIN = typer.Option(
    _negative_if_off(DEFAULTS.plateau_gain),
    help="Not in the paper: once the groups' mean accuracy spans less than this over the "
    "level rounds (the model has converged), a round whose fit residual is not below the "
    "contribution tolerance tests accuracy alone. Negative turns it off.",
)
RANK_BELOW = typer.Option(
    _negative_if_off(DEFAULTS.rank_below),
    help="Not in the paper: while τ is below this (near chance, where accuracy cannot tell "
    "groups apart), contributions are measured along the median of the basic groups whose "
    "model ranks the true class no worse than the round's global model. Negative turns it "
    "off.",
)
CONVICT_BELOW = typer.Option(
    _negative_if_off(DEFAULTS.convict_below),
    help="Not in the paper: a user whose fitted weight θ is below this with 95% confidence "
    "is a violator, where the contribution fit has at least 4 rounds and none fitted worse "
    "than twice its level, and the model is past chance (τ ≥ 0.25) and not at a plateau. "
    "Negative turns it off.",
)
VETO_WITHOUT_DEPARTED = typer.Option(
    DEFAULTS.veto_without_departed,
    help="Not in the paper: where users have left the task, --weight-veto refuses a focus "
    "group only if the contribution fit without their groups weighs its user low too "
    "(where that fit is sharp).",
)
BELIEVED_NOISE = typer.Option(
    _negative_if_off(DEFAULTS.believed_noise),
    help="Not in the paper: the fitted clean level is the contribution test's yardstick "
    "only where the fit explains every round of its window within this many times the "
    "level; elsewhere the round's largest contribution is. Negative: always the level.",
)
TRUSTED_WEIGHT = typer.Option(
    _negative_if_off(DEFAULTS.trusted_weight),
    help="Not in the paper: under a sharp contribution fit, a focus group "
    "whose user is weighed at least this scores whatever its accuracy and contribution. "
    "Negative turns it off.",
)
CLASS_LEAD = typer.Option(
    _negative_if_off(DEFAULTS.class_lead),
    help="Not in the paper: a user whose groups classify some class better than the "
    "round's other groups, by at least this much of Youden's informedness on average over "
    "six rounds or more (one-sided, at the task's confidence), is not convicted on its "
    "fitted contribution weight. Negative turns it off.",
)
WIDENING_CAP = typer.Option(
    _negative_if_off(DEFAULTS.widening_cap),
    help="Not in the paper: the widened contribution tolerance is at most this (1: a group "
    "that moved the model backwards never scores on contribution). Negative: no cap.",
)
LEVEL_ROUNDS = typer.Option(
    DEFAULTS.level_rounds or 0,
    help="Not in the paper: compare a group's contribution with the clean level fitted by "
    "least squares over this many rounds (0 = with the round's largest contribution).",
)


def detection_params(
    bound_score: float,
    bound_conf: float,
    tolerance: float,
    contribution_tolerance: float,
    key_score: float,
    min_evidence: int,
    carry_evidence: bool,
    evidence_window: int,
    level_rounds: int,
    relative_tolerance: float,
    weight_floor: float,
    noise_widening: float,
    key_evidence_only: bool,
    contribution_direction: Direction,
    noise_ceiling: float,
    suspect_weight: float,
    weight_veto: float,
    plateau_gain: float,
    widening_cap: float,
    rank_below: float,
    convict_below: float,
    veto_without_departed: bool,
    believed_noise: float,
    trusted_weight: float,
    contribution_layers: Layers = Layers(DEFAULTS.contribution_layers),
    class_lead: float = _negative_if_off(DEFAULTS.class_lead),
) -> DetectionParams:
    """The options as :class:`DetectionParams`; a negative (or for the two whole-number
    extensions, zero) value means off."""
    return DetectionParams(
        bound_score,
        bound_conf,
        tolerance=tolerance,
        contribution_tolerance=_off_if_negative(contribution_tolerance),
        key_score=_off_if_negative(key_score),
        min_evidence=min_evidence,
        carry_evidence=carry_evidence,
        evidence_window=evidence_window if evidence_window > 0 else None,
        level_rounds=level_rounds if level_rounds > 0 else None,
        relative_tolerance=_off_if_negative(relative_tolerance),
        weight_floor=_off_if_negative(weight_floor),
        noise_widening=_off_if_negative(noise_widening),
        key_evidence_only=key_evidence_only,
        contribution_direction=contribution_direction.value,
        noise_ceiling=_off_if_negative(noise_ceiling),
        suspect_weight=_off_if_negative(suspect_weight),
        weight_veto=_off_if_negative(weight_veto),
        plateau_gain=_off_if_negative(plateau_gain),
        rank_below=_off_if_negative(rank_below),
        convict_below=_off_if_negative(convict_below),
        veto_without_departed=veto_without_departed,
        believed_noise=_off_if_negative(believed_noise),
        trusted_weight=_off_if_negative(trusted_weight),
        widening_cap=_off_if_negative(widening_cap),
        contribution_layers=contribution_layers.value,
        class_lead=_off_if_negative(class_lead),
    )
