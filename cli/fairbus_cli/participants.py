"""``fairbus provider`` and ``fairbus user``: the two long-running participants of a task."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from fairbus.errors import FairbusError
from fairbus.training.attacks import Attack, Behaviour
from fairbus_cli.errors import STOPPERS, one_line, stop

console = Console(stderr=True)

CONFIG = typer.Option(
    ..., "--config", "-c", help="The task's configuration (TOML; configs/fairbus.example.toml)."
)


def _run_until_stopped(main: Callable[[], Coroutine[Any, Any, object]]) -> None:
    """Run ``main()`` in an event loop; SIGTERM (systemd stop) and Ctrl-C end it cleanly,
    saying offline."""

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await main()

    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(guarded())


def provider(
    config: Path = CONFIG,
    standby: bool = typer.Option(
        False,
        "--standby",
        help="Run as a hot standby: wait (data and model loaded) until the active "
        "provider's etcd lease lapses, then take over from the ledger. Needs [provider] "
        "etcd in the configuration.",
    ),
) -> None:
    """Coordinate training: announce each round (recorded on the ledger first), collect
    the masked uploads that carry ledger receipts, decrypt the group models (Alg. 5),
    evaluate them, detect violators (Alg. 6) and aggregate the clean groups.

    Started again after a crash (same identity), it rebuilds its state from the ledger
    and goes on; an interrupted round is closed and continues as a new attempt. With
    [provider] etcd, providers elect the active one and the others wait as standbys.
    Writes STATE/provider/rounds.jsonl (one JSON line per round) and the global model.
    A mistake in the configuration, roster, key files, state folder or broker login is
    one line and exit status 2; an unreachable broker is waited for (and said so).

    A task whose mode is 'seccl' runs SecCL's server instead: the participants' top-θ
    changes and peer evaluations, the Borda election and the new global model, all on
    the ledger, with a deadline per phase (no restart from the ledger, no standby yet).
    """
    from fairbus.runtime.config import RuntimeConfig, RuntimeConfigError
    from fairbus.runtime.provider import ProviderRuntime

    try:
        settings = RuntimeConfig.load(config)
        if standby and not settings.provider.etcd:
            raise RuntimeConfigError(
                f"{config} [provider]: --standby needs 'etcd' (the members through which "
                "providers elect the active one)"
            )
        if settings.seccl:  # SecCL's server (fairbus.runtime.seccl_provider)
            from fairbus.runtime.seccl_provider import SecclProviderRuntime

            if standby or settings.provider.etcd:
                raise RuntimeConfigError(
                    f"{config}: a task whose mode is 'seccl' has no hot standby yet "
                    "(remove --standby and [provider] etcd)"
                )
            _run_until_stopped(lambda: SecclProviderRuntime(settings).run())
            return
        _run_until_stopped(lambda: ProviderRuntime(settings).run())
    except (FairbusError, *STOPPERS) as exc:
        stop(console, exc, failed="provider stopped")


def user(
    user_id: int = typer.Option(..., "--id", help="This user's roster id."),
    config: Path = CONFIG,
    attack: Behaviour = typer.Option(
        Behaviour.HONEST,
        help="For experiments only: behave as this kind of attacker (what the provider "
        "must detect).",
    ),
) -> None:
    """Take part in training as user ID: train on the local share of the data, negotiate
    group keys over sealed direct channels (Alg. 3), upload the masked model (Alg. 4)
    once the ledger has recorded it. Keeps its chain head and data partition in
    STATE/user-ID across restarts. Exits with status 3 when excluded as a violator; a
    mistake in the configuration, roster, key files, state folder or broker login is one
    line and exit status 2; an unreachable broker is waited for (and said so).

    In a task whose mode is 'seccl', a SecCL participant instead: it shares the top θ
    of its parameter changes and evaluates the others' on its own validation data.
    """
    from fairbus.runtime.config import RuntimeConfig
    from fairbus.runtime.user import EXCLUDED_EXIT, UserExcludedError, UserRuntime

    try:
        settings = RuntimeConfig.load(config)
        if settings.seccl:  # a SecCL participant (fairbus.runtime.seccl_user)
            from fairbus.runtime.seccl_user import SecclUserRuntime

            _run_until_stopped(lambda: SecclUserRuntime(settings, user_id, Attack(attack)).run())
            return
        _run_until_stopped(lambda: UserRuntime(settings, user_id, Attack(attack)).run())
    except UserExcludedError as exc:
        message = escape(one_line(exc))
        console.print(f"[yellow]{message}[/]; it takes no further part", soft_wrap=True)
        raise typer.Exit(EXCLUDED_EXIT) from None
    except (FairbusError, *STOPPERS) as exc:
        stop(console, exc, failed=f"user {user_id} stopped")
