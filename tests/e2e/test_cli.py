"""The console script, driven through typer's runner."""

import json
import stat
from pathlib import Path

from typer.testing import CliRunner

from fairbus.roster import Role, Roster
from fairbus_cli.main import app

runner = CliRunner()


def test_help_explains_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("keys", "roster", "bench", "demo", "simulate", "walkthrough", "broker",
                    "provider", "user", "ledger", "audit"):  # fmt: skip
        assert command in result.output


def test_keys_new_writes_0600_files_and_a_roster(tmp_path: Path) -> None:
    roster_path = tmp_path / "roster.toml"
    for pid, role in ((0, "provider"), (3, "user")):
        result = runner.invoke(
            app,
            [
                "keys",
                "new",
                "--id",
                str(pid),
                "--role",
                role,
                "--dir",
                str(tmp_path / "k"),
                "--roster",
                str(roster_path),
                "--task",
                "mytask",
            ],
        )
        assert result.exit_code == 0, result.output
    for name in ("0.sign.key", "0.box.key", "3.sign.key", "3.box.key"):
        assert stat.S_IMODE((tmp_path / "k" / name).stat().st_mode) == 0o600
    roster = Roster.load(roster_path)
    assert roster.task == "mytask" and roster.provider == 0 and roster[3].role is Role.USER
    again = runner.invoke(app, ["keys", "new", "--id", "3", "--dir", str(tmp_path / "k")])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output
    shown = runner.invoke(app, ["keys", "show", "--id", "3", "--dir", str(tmp_path / "k")])
    assert roster[3].identity.verify_hex in shown.output
    secret = (tmp_path / "k" / "3.sign.key").read_text().strip()
    assert secret not in shown.output


def test_roster_check(tmp_path: Path) -> None:
    good = Path(__file__).resolve().parents[2] / "configs" / "roster.example.toml"
    result = runner.invoke(app, ["roster", "check", str(good)])
    assert result.exit_code == 0 and "digits-demo" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("task = 'x'\n[[member]]\nid = 1\n")
    result = runner.invoke(app, ["roster", "check", str(bad)])
    assert result.exit_code == 2 and "missing keys" in result.output


def test_bench_crypto_small(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["bench", "crypto", "--params", "2000", "--repeats", "2", "--group-size", "4", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["exact"] is True
    for step in ("share generation", "reconstruction", "masking", "unmask group"):
        assert report["steps"][step]["median_ms"] > 0


def test_demo_walkthrough_recovers_the_exact_group_mean() -> None:
    """The real machines through the ledger (the command exits 1 unless the field sum is
    exact, the keys cancel and the ledger replays); one upload alone is noise."""
    result = runner.invoke(app, ["walkthrough"])
    assert result.exit_code == 0, result.output
    assert "bit for bit" in result.output

    def row(label: str) -> str:
        line = next(line for line in result.output.splitlines() if label in line)
        return line.rstrip(" │").rsplit("│", 1)[-1].strip()

    assert row("ledger blocks") == "8"  # task start … decision: one transaction a block
    assert row("ledger replays from genesis") == "yes"
    assert float(row("one masked upload decoded")) < 0.3 < float(row("group mean recovered"))


def test_the_networked_demo_runs_and_its_ledger_audits(tmp_path: Path) -> None:
    """``fairbus demo`` (what ``make demo`` runs), shortened: embedded broker, SQLite
    ledger, provider and 9 user processes; a table, the plots and a passing audit."""
    import subprocess
    import sys

    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fairbus_cli", "demo", "--rounds", "3",
         "--epochs", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit: OK" in result.stdout and "honest users excluded: none" in result.stdout
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "scores.png").exists()
