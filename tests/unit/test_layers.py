"""The layers of docs/architecture.md hold: the import contract covers every module of the
core, a wrong import breaks it, and a built wheel has no generic top-level names."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import fairbus

REPO = Path(__file__).resolve().parents[2]
DRIVERS = {"fairbus.runtime", "fairbus.bench"}
PACKAGES = {"fairbus_cli": "cli", "fairbus_ledger_service": "ledger", "fairbus_broker": "broker"}


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_every_module_of_fairbus_is_core_or_a_driver() -> None:
    core = set(_contracts()["core"]["source_modules"])  # type: ignore[arg-type]
    children = {f"fairbus.{m.name}" for m in pkgutil.iter_modules(fairbus.__path__)}
    assert children - core - DRIVERS == set(), "name the new module in pyproject's contract"
    assert core - children == set(), "the contract names a module that does not exist"
    assert set(_contracts()["core"]["forbidden_modules"]) >= DRIVERS  # type: ignore[arg-type]


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(root / p) for p in (".", *PACKAGES.values()))
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "fairbus", root / "fairbus", ignore=ignore)
    for package, folder in PACKAGES.items():
        shutil.copytree(REPO / folder / package, root / folder / package, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contract_holds_and_a_wrong_import_breaks_it(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    kept = _lint_imports(root)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    grouping = root / "fairbus" / "grouping.py"
    grouping.write_text(grouping.read_text() + "\nimport fairbus_ledger_service.client  # wrong\n")
    broken = _lint_imports(root)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "fairbus.grouping -> fairbus_ledger_service.client" in broken.stdout
    assert "BROKEN" in broken.stdout


def test_the_wheel_has_no_generic_top_level_names(tmp_path: Path) -> None:
    source = tmp_path / "source"  # setuptools writes build/ into the tree it builds
    skip = (".venv", ".git", "build", "out", "data", "state", "keys", "*.egg-info")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*skip, "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("fairbus-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    packages = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert packages == {"fairbus", *PACKAGES}
    entry = zipfile.ZipFile(wheel).read(
        next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt"))
    )
    assert b"fairbus = fairbus_cli.main:run" in entry
