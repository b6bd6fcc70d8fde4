"""``fairbus bench flower``: fairbus beside Flower's SecAgg+ and plain FedAvg, same work.

Flower (``flwr``, deployment engine) runs as one SuperLink and N SuperNodes on loopback,
no Ray, from its own virtual environment: ``flwr`` pins typer, rich and protobuf below
what fairbus needs, so it never enters fairbus's environment (``pip install
'fairbus[flower]'`` is meant for a separate venv; see README, "Side by side with
Flower"). The benchmark writes the Flower app itself (no ``flwr new``, which fetches
templates), ships it with ``flwr run`` and starts the SuperLink with
``--disable-runtime-dependency-installation``; telemetry is off.

Same work on both sides: the paper's MNIST CNN; the MNIST-shaped data set of
``fairbus bench round`` (:func:`fairbus.bench.round.write_mnist_like`) split IID as a
fairbus task splits it (user k of the sorted ids holds part k); one local epoch's worth
of SGD steps (``TrainConfig.for_task``: lr 0.01, momentum 0.9, batch 64), one torch
thread per client; the server evaluates each new global model on the same 1,000 test
images. The Flower clients are fairbus's own :class:`~fairbus.training.local.Trainer`:
the few modules of ``fairbus.training`` it needs are copied into a folder on the Flower
processes' ``PYTHONPATH`` (they import torch and numpy only).

Flower's SecAgg+ is ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on the
server and ``secaggplus_mod`` on the ClientApp; plain FedAvg is the same app without
either. Round time: the ServerApp logs the wall clock at the start of each round's fit
and after its evaluation; the first round is left out as warm-up (it also downloads the
app). Bytes: every SuperNode talks to the SuperLink through its own counting TCP proxy
(:class:`CountingProxy`), so what is counted is everything on the wire of the Fleet API
(HTTP headers and bodies, each way) between a round's start and end, per client.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fairbus.bench.round import RoundRun
from fairbus.errors import OperatorError

FLWR_VERSION = "1.42.0"
APP_PACKAGE = "fairbusflower"
FLOWER_TOOLS = ("flower-superlink", "flower-supernode", "flwr")
TRAINING_MODULES = (
    "__init__.py",
    "errors.py",
    "training/__init__.py",
    "training/config.py",
    "training/data.py",
    "training/local.py",
    "training/models.py",
    "training/sgd.py",
)
"""The fairbus files the Flower processes import (torch, numpy; sklearn only for digits)."""


class FlowerSetupError(OperatorError):
    """Flower is not where ``--flwr-python`` points, or it is not the version measured."""


# --- the Flower installation ---------------------------------------------------------------


@dataclass(frozen=True)
class FlowerTools:
    """The executables of a Flower installation (a virtual environment's ``bin``)."""

    bin: Path

    @classmethod
    def find(cls, where: Path) -> FlowerTools:
        """``where``: the Flower venv's ``python``, its ``bin`` folder or the venv itself."""
        candidates = [where / "bin", where] if where.is_dir() else [where.parent]
        for folder in candidates:
            if all(os.access(folder / tool, os.X_OK) for tool in FLOWER_TOOLS):
                return cls(folder.absolute())
        raise FlowerSetupError(
            f"no {', '.join(FLOWER_TOOLS)} next to {where}: install Flower in its own venv "
            f"(python3 -m venv .venv-flower && .venv-flower/bin/pip install "
            f"torch==2.13.0 flwr=={FLWR_VERSION} numpy) and pass --flwr-python "
            f".venv-flower/bin/python"
        )

    def tool(self, name: str) -> str:
        """The path of one of the venv's executables."""
        return str(self.bin / name)

    def version(self) -> str:
        """The installed flwr's version (``flower-superlink --version``)."""
        out = subprocess.run(
            [self.tool("flower-superlink"), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        words = (out.stdout + out.stderr).split()
        return words[-1] if words else "unknown"


# --- bytes on the wire ----------------------------------------------------------------------


@dataclass
class ByteCounter:
    """Bytes through one proxy, each way, with the wall-clock time of every chunk."""

    up: int = 0
    down: int = 0
    times: list[float] = field(default_factory=list)
    up_total: list[int] = field(default_factory=list)
    down_total: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, up: int = 0, down: int = 0, at: float | None = None) -> None:
        with self.lock:
            self.up += up
            self.down += down
            self.times.append(time.time() if at is None else at)
            self.up_total.append(self.up)
            self.down_total.append(self.down)

    def _before(self, t: float) -> tuple[int, int]:
        k = bisect.bisect_left(self.times, t)
        return (self.up_total[k - 1], self.down_total[k - 1]) if k else (0, 0)

    def between(self, start: float, end: float) -> tuple[int, int]:
        """(up, down) bytes of the chunks seen at times in [start, end)."""
        with self.lock:
            up0, down0 = self._before(start)
            up1, down1 = self._before(end)
        return up1 - up0, down1 - down0


class CountingProxy:
    """A TCP proxy on 127.0.0.1 to ``target``: "up" is what the connecting side sends."""

    def __init__(self, target: tuple[str, int], counter: ByteCounter | None = None) -> None:
        self.target = target
        self.counter = counter if counter is not None else ByteCounter()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, upstream=True),
            self._pipe(up_reader, writer, upstream=False),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while chunk := await reader.read(1 << 16):
                if upstream:
                    self.counter.add(up=len(chunk))
                else:
                    self.counter.add(down=len(chunk))
                writer.write(chunk)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()


class ProxyThread:
    """Counting proxies served by an event loop on a thread of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.proxies: list[CountingProxy] = []

    def __enter__(self) -> ProxyThread:
        self.thread.start()
        return self

    def add(self, target: tuple[str, int]) -> CountingProxy:
        proxy = CountingProxy(target)
        asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(10)
        self.proxies.append(proxy)
        return proxy

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _close(self) -> None:
        for proxy in self.proxies:
            await proxy.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the Flower app ------------------------------------------------------------------------

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{package}"
version = "1.0.0"
description = "fairbus bench flower: the paper's MNIST CNN, plain FedAvg or SecAgg+"
dependencies = ["flwr=={flwr}", "torch", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fairbus"

[tool.flwr.app.components]
serverapp = "{package}.server_app:app"
clientapp = "{package}.client_app:app"

[tool.flwr.app.config]
{config}
"""

SERVER_APP = '''\
"""The ServerApp of ``fairbus bench flower`` (written by fairbus.bench.flower)."""

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import (
    default_evaluate_workflow,
    default_fit_workflow,
)

from fairbus.training.data import Dataset
from fairbus.training.local import Evaluator
from fairbus.training.models import initial_params

SECURE = {secure}
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.set_num_threads(1)
    data = Path(str(cfg["data-dir"]))
    log = Path(str(cfg["timings-file"]))
    clients = int(cfg["num-clients"])
    test = np.load(data / "test.npz")
    x = torch.from_numpy(test["x"].astype(np.float32) / 255.0).unsqueeze(1)
    evaluator = Evaluator("mnist_cnn", Dataset(x, torch.from_numpy(test["y"].astype(np.int64))))
    accuracy: dict[int, float] = {{}}

    def evaluate(server_round, arrays, config):
        if server_round == 0:
            return None
        accuracy[server_round] = evaluator.accuracy(arrays[0].astype(np.float32))
        return 0.0, {{"accuracy": accuracy[server_round]}}

    initial = initial_params("mnist_cnn", int(cfg["seed"]))
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        evaluate_fn=evaluate,
        initial_parameters=ndarrays_to_parameters([initial]),
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=int(cfg["num-server-rounds"])),
        strategy=strategy,
    )
    fit = default_fit_workflow
    if SECURE:
        fit = SecAggPlusWorkflow(
            num_shares=int(cfg["num-shares"]),
            reconstruction_threshold=int(cfg["reconstruction-threshold"]),
            max_weight=float(cfg["max-weight"]),
        )
    started: list[float] = []

    def timed_fit(grid, context):
        started.append(time.time())
        fit(grid, context)

    def timed_evaluate(grid, context):
        default_evaluate_workflow(grid, context)
        r = len(started)
        line = {{"round": r, "start": started[-1], "end": time.time(),
                 "accuracy": accuracy.get(r, float("nan"))}}
        with log.open("a") as f:
            f.write(json.dumps(line) + "\\n")

    DefaultWorkflow(fit_workflow=timed_fit, evaluate_workflow=timed_evaluate)(grid, legacy)
'''

CLIENT_APP = '''\
"""The ClientApp of ``fairbus bench flower`` (written by fairbus.bench.flower)."""

from pathlib import Path

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context

from fairbus.training.config import TrainConfig, trainer_seed
from fairbus.training.data import Dataset
from fairbus.training.local import Trainer

SECURE = {secure}


class FairbusTrainer(NumPyClient):
    """fairbus's Trainer on this SuperNode's part of the data."""

    def __init__(self, trainer: Trainer, samples: int) -> None:
        self.trainer = trainer
        self.samples = samples

    def fit(self, parameters, config):
        out = self.trainer.train(np.asarray(parameters[0], dtype=np.float32))
        return [out], self.samples, {{}}


def client_fn(context: Context):
    torch.set_num_threads(1)
    cfg = context.run_config
    k = int(context.node_config["partition-id"])
    part = np.load(Path(str(cfg["data-dir"])) / f"client-{{k}}.npz")
    x = torch.from_numpy(part["x"].astype(np.float32) / 255.0).unsqueeze(1)
    data = Dataset(x, torch.from_numpy(part["y"].astype(np.int64)))
    config = TrainConfig(local_epochs=1, local_steps=int(cfg["local-steps"]))
    trainer = Trainer("mnist_cnn", data, config, seed=trainer_seed(int(cfg["seed"]), k + 1))
    return FairbusTrainer(trainer, len(data)).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if SECURE else [])
'''


def toml_value(value: object) -> str:
    """A TOML scalar (the run configuration holds strings, ints, floats and bools)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_app(directory: Path, *, secure: bool, config: dict[str, object]) -> Path:
    """The Flower app (pyproject.toml, ServerApp, ClientApp) in ``directory``."""
    shutil.rmtree(directory, ignore_errors=True)
    package = directory / APP_PACKAGE
    package.mkdir(parents=True)
    lines = "\n".join(f"{key} = {toml_value(value)}" for key, value in config.items())
    (directory / "pyproject.toml").write_text(
        APP_PYPROJECT.format(package=APP_PACKAGE, flwr=FLWR_VERSION, config=lines)
    )
    (package / "__init__.py").write_text('"""fairbus bench flower."""\n')
    (package / "server_app.py").write_text(SERVER_APP.format(secure=secure))
    (package / "client_app.py").write_text(CLIENT_APP.format(secure=secure))
    return directory


def copy_training_modules(site: Path) -> Path:
    """fairbus's training modules into ``site``/fairbus, for the Flower processes."""
    source = Path(__file__).resolve().parent.parent
    shutil.rmtree(site / "fairbus", ignore_errors=True)
    for name in TRAINING_MODULES:
        target = site / "fairbus" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target)
    return site


def write_client_data(mnist: Path, out: Path, clients: int, seed: int = 0) -> list[int]:
    """Each client's part of the training set (``client-K.npz``, uint8 images as in the
    IDX files) and the test set (``test.npz``), split as a fairbus task with ``clients``
    users splits it. Returns the parts' sizes."""
    from fairbus.training.data import load_mnist, partition

    train, test = load_mnist(mnist)
    out.mkdir(parents=True, exist_ok=True)

    def pixels(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
        out: npt.NDArray[np.uint8] = np.rint(x[:, 0] * 255.0).astype(np.uint8)
        return out

    sizes = []
    for k, index in enumerate(partition(train, clients, "iid", 0.5, seed)):
        part = train.subset(index)
        np.savez(out / f"client-{k}.npz", x=pixels(part.x.numpy()), y=part.y.numpy())
        sizes.append(len(part))
    np.savez(out / "test.npz", x=pixels(test.x.numpy()), y=test.y.numpy())
    return sizes


# --- one Flower run --------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowerRound:
    """One line of the ServerApp's timings file."""

    round: int
    start: float
    end: float
    accuracy: float


@dataclass(frozen=True)
class FlowerRun:
    """Per-round means over the measured rounds (the first left out as warm-up)."""

    secure: bool
    round_s: float
    rounds_s: list[float]
    bytes_up_per_client: float
    bytes_down_per_client: float
    bytes_up_whole_run: float
    """Every byte a client sent over the whole run (registration, app download, polls
    between rounds included), per round."""
    accuracy: float


def read_rounds(path: Path) -> list[FlowerRound]:
    """The rounds the ServerApp has finished so far (none before its first)."""
    if not path.exists():
        return []
    return [
        FlowerRound(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()
    ]


def measured(rounds: list[FlowerRound]) -> list[FlowerRound]:
    """The rounds measured: all but the first (warm-up), unless there is only one."""
    return rounds[1:] if len(rounds) > 1 else rounds


def summarize(secure: bool, rounds: list[FlowerRound], counters: list[ByteCounter]) -> FlowerRun:
    """Means per round and per client over the measured rounds."""
    window = measured(rounds)
    ups = [sum(c.between(r.start, r.end)[0] for r in window) / len(window) for c in counters]
    downs = [sum(c.between(r.start, r.end)[1] for r in window) / len(window) for c in counters]
    whole = [c.up / len(rounds) for c in counters]
    return FlowerRun(
        secure,
        statistics.mean(r.end - r.start for r in window),
        [r.end - r.start for r in rounds],
        statistics.mean(ups),
        statistics.mean(downs),
        statistics.mean(whole),
        rounds[-1].accuracy,
    )


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """Whether ``port`` accepts connections within ``timeout`` while ``alive()`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


class Processes:
    """The SuperLink, SuperNodes and ``flwr run``: each in a session of its own, so
    stopping one stops what it spawned (SuperExec, ServerApp, ClientApps)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 — the child's
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.running.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.running):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in reversed(self.running):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.running.clear()


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a Flower process's log, for an error message."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class FlowerSettings:
    """What both Flower runs share."""

    tools: FlowerTools
    clients: int
    rounds: int
    local_steps: int
    max_weight: float
    num_shares: int = 3
    reconstruction_threshold: int = 2
    seed: int = 0
    round_timeout: float = 900.0


def flower_env(tools: FlowerTools, home: Path, site: Path) -> dict[str, str]:
    """The environment of every Flower process: its own FLWR_HOME, no telemetry, one
    thread, fairbus's training modules importable, the Flower venv first on PATH (the
    SuperLink and SuperNodes start ``flower-superexec`` from it) and nothing of
    fairbus's venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    path = env.get("PATH", "")
    if env.get("VIRTUAL_ENV_PROMPT") is not None or sys.prefix != sys.base_prefix:
        venv_bin = str(Path(sys.prefix) / "bin")
        path = os.pathsep.join(p for p in path.split(os.pathsep) if p != venv_bin)
    path = os.pathsep.join((str(tools.bin), path))
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(site),
        PATH=path,
    )
    return env


def run_flower_deployment(
    settings: FlowerSettings,
    workdir: Path,
    data: Path,
    site: Path,
    *,
    secure: bool,
    progress: Callable[[str], None] = lambda _: None,
) -> FlowerRun:
    """One Flower deployment (SuperLink, ``clients`` SuperNodes behind counting proxies)
    running ``rounds`` rounds of plain FedAvg or SecAgg+."""
    tools = settings.tools
    root = (workdir / ("flower-secaggplus" if secure else "flower-plain")).absolute()
    shutil.rmtree(root, ignore_errors=True)
    (root / "logs").mkdir(parents=True)
    timings = root / "rounds.jsonl"
    config: dict[str, object] = {
        "num-server-rounds": settings.rounds,
        "num-clients": settings.clients,
        "local-steps": settings.local_steps,
        "seed": settings.seed,
        "num-shares": settings.num_shares,
        "reconstruction-threshold": settings.reconstruction_threshold,
        "max-weight": settings.max_weight,
        "data-dir": str(data.absolute()),
        "timings-file": str(timings),
    }
    app = write_app(root / "app", secure=secure, config=config)
    link_port = free_port()
    link_home = root / "home-superlink"
    link_home.mkdir()
    (link_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    processes = Processes(root / "logs")
    try:
        with ProxyThread() as proxies:
            link = processes.start(
                "superlink",
                [tools.tool("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                 "--port", str(link_port), "--disable-runtime-dependency-installation"],
                flower_env(tools, link_home, site),
            )  # fmt: skip
            if not wait_for_port(link_port, 60, lambda: link.poll() is None):
                raise FlowerSetupError(
                    "flower-superlink did not start:\n" + log_tail(root / "logs/superlink.log")
                )
            progress(f"SuperLink on :{link_port}; starting {settings.clients} SuperNodes")
            counters = []
            for k in range(settings.clients):
                proxy = proxies.add(("127.0.0.1", link_port))
                counters.append(proxy.counter)
                home = root / f"home-supernode-{k}"
                home.mkdir()
                processes.start(
                    f"supernode-{k}",
                    [tools.tool("flower-supernode"), "--insecure",
                     "--superlink", f"127.0.0.1:{proxy.port}", "--host", "127.0.0.1",
                     "--port", str(free_port()),
                     "--node-config", f"partition-id={k} num-partitions={settings.clients}"],
                    flower_env(tools, home, site),
                )  # fmt: skip
            runner = processes.start(
                "flwr-run",
                [tools.tool("flwr"), "run", str(app), "bench", "--stream"],
                flower_env(tools, link_home, site),
            )
            try:
                done = _wait_for_rounds(settings, timings, runner, root, secure, progress)
            finally:
                processes.stop()  # before the proxies close under their connections
            return summarize(secure, done, counters)
    finally:
        processes.stop()


def _wait_for_rounds(
    settings: FlowerSettings,
    timings: Path,
    runner: subprocess.Popen[bytes],
    root: Path,
    secure: bool,
    progress: Callable[[str], None],
) -> list[FlowerRound]:
    name = "SecAgg+" if secure else "plain FedAvg"
    deadline = time.monotonic() + settings.round_timeout * (settings.rounds + 1)
    seen = 0
    while True:
        rounds = read_rounds(timings)
        if len(rounds) > seen:
            seen = len(rounds)
            last = rounds[-1]
            progress(f"Flower {name}: round {last.round} took {last.end - last.start:.1f} s")
        if seen >= settings.rounds:
            return rounds
        if runner.poll() is not None and not read_rounds(timings)[seen:]:
            raise FlowerSetupError(
                f"flwr run ended after {seen} of {settings.rounds} rounds:\n"
                + log_tail(root / "logs/flwr-run.log")
                + "\n--- superlink ---\n"
                + log_tail(root / "logs/superlink.log")
                + "\n--- supernode-0 ---\n"
                + log_tail(root / "logs/supernode-0.log")
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"Flower {name}: {seen} of {settings.rounds} rounds in time")
        time.sleep(0.5)


# --- the comparison ---------------------------------------------------------------------------

TIME_GOAL = 0.25
"""Issue 16: fairbus's secure round at most this fraction of Flower's SecAgg+ round."""
BYTES_GOAL = 0.55
"""Issue 16: fairbus's secure bytes per client at most this fraction of SecAgg+'s."""


@dataclass(frozen=True)
class Side:
    """One system's run, as the table shows it."""

    label: str
    round_s: float
    bytes_per_client: float


def comparison_rows(
    fairbus_secure: dict[str, Side],
    fairbus_plain: Side | None,
    flower_secure: Side | None,
    flower_plain: Side | None,
) -> list[tuple[str, str, str, str]]:
    """(measure, fairbus, Flower, fairbus / Flower) rows: each secure keying against
    SecAgg+, plain against plain, with the issue's goals where they apply."""
    rows: list[tuple[str, str, str, str]] = []

    def ratio(a: float, b: float, goal: float | None) -> str:
        if b <= 0 or math.isnan(a) or math.isnan(b):
            return "–"
        text = f"{a / b:.3f}"
        if goal is not None:
            text += f" (goal ≤ {goal:.2f} {'✓' if a / b <= goal else '✗'})"
        return text

    pairs: list[tuple[Side | None, Side | None, bool]] = [
        (side, flower_secure, True) for side in fairbus_secure.values()
    ]
    pairs.append((fairbus_plain, flower_plain, False))
    for ours, theirs, secure in pairs:
        if ours is None or theirs is None:
            continue
        what = f"{ours.label} / {theirs.label}"
        rows.append(
            (
                f"round wall time, {what}",
                f"{ours.round_s:.2f} s",
                f"{theirs.round_s:.2f} s",
                ratio(ours.round_s, theirs.round_s, TIME_GOAL if secure else None),
            )
        )
        rows.append(
            (
                f"bytes sent per client and round, {what}",
                f"{ours.bytes_per_client / 1e6:.2f} MB",
                f"{theirs.bytes_per_client / 1e6:.2f} MB",
                ratio(
                    ours.bytes_per_client,
                    theirs.bytes_per_client,
                    BYTES_GOAL if secure else None,
                ),
            )
        )
    return rows


def local_steps_for(per_user: int, clients: int) -> int:
    """The SGD steps ``fairbus bench round``'s users take a round (one local epoch on an
    average user's share, equal for all: :meth:`TrainConfig.for_task`)."""
    from fairbus.training.config import TrainConfig

    steps = TrainConfig(local_epochs=1).for_task(per_user * clients, clients).local_steps
    assert steps is not None
    return steps


@dataclass(frozen=True)
class Comparison:
    """Both systems' runs from one ``fairbus bench flower``."""

    flower_plain: FlowerRun | None
    flower_secure: FlowerRun | None
    fairbus_plain: RoundRun | None
    fairbus_secure: dict[str, RoundRun]
    flwr_version: str
    local_steps: int

    def sides(self) -> tuple[dict[str, Side], Side | None, Side | None, Side | None]:
        """The runs as :func:`comparison_rows` takes them."""
        secure = {
            k: Side(f"fairbus secure ({k})", r.round_s, r.bytes_per_user)
            for k, r in self.fairbus_secure.items()
        }
        plain = self.fairbus_plain
        ours = None if plain is None else Side("fairbus plain", plain.round_s, plain.bytes_per_user)
        flower: list[Side | None] = [
            None if run is None else Side(label, run.round_s, run.bytes_up_per_client)
            for label, run in (("Flower SecAgg+", self.flower_secure),
                               ("Flower plain", self.flower_plain))
        ]  # fmt: skip
        return secure, ours, flower[0], flower[1]


def bench(
    tools: FlowerTools,
    workdir: Path,
    *,
    rounds: int = 3,
    clients: int = 9,
    per_user: int = 6_667,
    broker: str = "mosquitto",
    store: str = "sqlite",
    keyings: tuple[str, ...] = ("shamir", "pairwise"),
    num_shares: int = 3,
    reconstruction_threshold: int = 2,
    run_fairbus: bool = True,
    run_flower: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> Comparison:
    """fairbus plain and secure (one deployment per keying, as ``fairbus bench round``),
    then Flower plain FedAvg and SecAgg+, on the same data and training."""
    from fairbus.bench import round as round_module

    if clients < 3:
        raise FlowerSetupError(f"--clients must be at least 3 (SecAgg+ and fairbus), got {clients}")
    if not 2 <= reconstruction_threshold < num_shares <= clients:
        raise FlowerSetupError(
            "SecAgg+ needs 2 ≤ reconstruction threshold < shares ≤ clients, got "
            f"{reconstruction_threshold} < {num_shares} ≤ {clients}"
        )
    version = tools.version() if run_flower else "not run"
    if run_flower and version != FLWR_VERSION:
        progress(f"warning: flwr {version}; this benchmark was written for {FLWR_VERSION}")
    workdir = workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    progress("writing the MNIST-shaped data set")
    round_module.write_mnist_like(workdir / "mnist", per_user * clients, 1_000)
    steps = local_steps_for(per_user, clients)
    fairbus_plain = None
    fairbus_secure: dict[str, RoundRun] = {}
    if run_fairbus:
        progress(f"fairbus plain FedAvg, {clients} users, {rounds} rounds")
        fairbus_plain = round_module.run(workdir, secure=False, rounds=rounds, broker=broker,
                                         store=store, users=clients)  # fmt: skip
        progress(f"fairbus plain: {fairbus_plain.round_s:.1f} s per round")
        for keying in keyings:
            progress(f"fairbus secure ({keying}), {clients} users, {rounds} rounds")
            fairbus_secure[keying] = round_module.run(
                workdir, secure=True, rounds=rounds, broker=broker, store=store,
                keying=keying, users=clients,
            )  # fmt: skip
            progress(f"fairbus secure ({keying}): {fairbus_secure[keying].round_s:.1f} s")
    flower_plain = flower_secure = None
    if run_flower:
        data = workdir / "flower-data"
        sizes = write_client_data(workdir / "mnist", data, clients)
        site = copy_training_modules(workdir / "flower-site")
        settings = FlowerSettings(tools, clients, rounds, steps, float(max(sizes)),
                                  num_shares, reconstruction_threshold)  # fmt: skip
        progress(f"Flower plain FedAvg, {clients} SuperNodes, {rounds} rounds")
        flower_plain = run_flower_deployment(settings, workdir, data, site, secure=False,
                                             progress=progress)  # fmt: skip
        progress(f"Flower SecAgg+, {clients} SuperNodes, {rounds} rounds")
        flower_secure = run_flower_deployment(settings, workdir, data, site, secure=True,
                                              progress=progress)  # fmt: skip
    return Comparison(flower_plain, flower_secure, fairbus_plain, fairbus_secure, version, steps)
