"""PNG plots in the manner of the fairness paper's Figures 3-5 and SecCL's Figures 4-5."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fairbus.rounds import RoundRecord

# The object-oriented API (Figure, not pyplot) needs no display and no global backend.


def plot_accuracy(records: Sequence[RoundRecord], path: Path, title: str = "") -> Path:
    """Figs. 3-4: the global model's accuracy per round, with every group model's."""
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.subplots()
    for kind, marker, color in (
        ("basic", "o", "tab:blue"),
        ("focus", "^", "tab:orange"),
        ("reference", "s", "tab:green"),
    ):
        xs = [r.round for r in records for g in r.groups if g["kind"] == kind]
        ys = [g["accuracy"] for r in records for g in r.groups if g["kind"] == kind]
        if xs:
            ax.scatter(xs, ys, s=14, marker=marker, color=color, alpha=0.45, label=f"{kind} groups")
    ax.plot(
        [r.round for r in records],
        [r.global_accuracy for r in records],
        color="black",
        linewidth=2,
        marker="s",
        markersize=4,
        label="global model",
    )
    for r in records:
        if r.violators:
            who = ", ".join(map(str, r.violators))
            ax.annotate(
                f"user{'s' if len(r.violators) > 1 else ''} {who} excluded",
                (r.round, r.global_accuracy),
                textcoords="offset points",
                xytext=(4, -14),
                fontsize=7,
                color="tab:red",
            )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "accuracy of the global and group models")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


LABELLED_USERS = 40
"""Up to this many users, the score plot names each on its axis."""


def plot_scores(
    records: Sequence[RoundRecord], path: Path, attackers: Collection[int] = ()
) -> Path:
    """Fig. 5: each user's contribution score, with its 95% interval where it had one.

    One panel: the mean score over the rounds a user took part in, and the interval
    of its last round as a key user; attackers in red, excluded users ringed. Up to
    :data:`LABELLED_USERS` users every one is named on the axis; beyond, the axis is the
    user's position in id order (one scatter and one error-bar call per colour, so
    1,000 users plot in a second).
    """
    users = sorted({u for r in records for u in r.scores})
    excluded = {u for r in records for u in r.violators}
    fig = Figure(figsize=(7 if len(users) <= LABELLED_USERS else 10, 4.2), dpi=120)
    ax = fig.subplots()
    for color, members in (
        ("tab:blue", [u for u in users if u not in attackers]),
        ("tab:red", [u for u in users if u in attackers]),
    ):
        xs, means, bars = [], [], []
        for user in members:
            k = users.index(user) if len(users) <= LABELLED_USERS else user
            scores = [r.scores[user]["score"] for r in records if user in r.scores]
            xs.append(k)
            means.append(sum(s for s in scores if s is not None) / max(1, len(scores)))
            intervals = [
                (r.scores[user]["conf_lo"], r.scores[user]["conf_up"])
                for r in records
                if user in r.scores and r.scores[user]["conf_lo"] is not None
            ]
            if intervals:
                lo, up = intervals[-1]
                assert lo is not None and up is not None
                bars.append((k, max(lo, -0.1), min(up, 1.1)))
        size = 36 if len(users) <= LABELLED_USERS else 8
        ax.scatter(xs, means, color=color, s=size, zorder=3)
        if bars:
            middle = [(lo + up) / 2 for _, lo, up in bars]
            ax.errorbar(
                [k + 0.15 for k, _, _ in bars],
                middle,
                yerr=[[m - lo for m, (_, lo, _) in zip(middle, bars, strict=True)],
                      [up - m for m, (_, _, up) in zip(middle, bars, strict=True)]],
                color=color, capsize=4, linewidth=1.5, alpha=0.8, linestyle="none",
            )  # fmt: skip
    if len(users) <= LABELLED_USERS:
        ax.set_xticks(range(len(users)))
        ax.set_xticklabels([f"{u}{'*' if u in excluded else ''}" for u in users])
        ax.set_xlabel("user (* = excluded; red = attacker)")
    else:
        out = sorted(excluded)
        if out:
            marks = [
                sum(s for s in sc if s is not None) / max(1, len(sc))
                for sc in ([r.scores[u]["score"] for r in records if u in r.scores] for u in out)
            ]
            ax.scatter(out, marks, s=80, facecolors="none", edgecolors="black", zorder=4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("user id (ringed = excluded; red = attacker)")
    ax.set_ylabel("mean score, last key-user interval")
    ax.set_ylim(-0.1, 1.1)
    ax.set_title("contribution scores and 95% intervals")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_candidates(
    records: Sequence[RoundRecord], path: Path, attackers: Collection[int] = ()
) -> Path:
    """SecCL: the candidates the Borda election picked in each round (attackers in
    red), and each one's total points as the marker's label."""
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.subplots()
    for r in records:
        for user in r.candidates:
            color = "tab:red" if user in attackers else "tab:blue"
            ax.scatter([r.round], [user], color=color, zorder=3)
            points = r.borda.get(user)
            if points is not None:
                ax.annotate(str(points), (r.round, user), textcoords="offset points",
                            xytext=(5, -3), fontsize=6)  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("candidate (red = attacker)")
    ax.set_title("SecCL candidates per round (label: Borda points)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_accuracy_curves(
    curves: Sequence[tuple[str, Sequence[float]]],
    path: Path,
    title: str,
    baseline: float | None = None,
) -> Path:
    """SecCL's Figs. 4 and 5: the global model's test accuracy per round, one curve per
    setting, and the accuracy of training on all the data as a dashed line."""
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.subplots()
    for label, accuracies in curves:
        rounds = range(1, len(accuracies) + 1)
        ax.plot(rounds, accuracies, marker="o", markersize=3, label=label)
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1,
                   label=f"all data ({baseline:.3f})")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
