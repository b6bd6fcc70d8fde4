"""``fairbus bench flower`` without Flower: the byte-counting proxy, the app it writes,
the data split, the summary and the comparison table. Running Flower itself is the
benchmark's job (flwr lives in a venv of its own, never in fairbus's)."""

from __future__ import annotations

import ast
import asyncio
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fairbus.bench import flower
from fairbus.bench.round import write_mnist_like
from fairbus.training.data import load_mnist, partition


def test_byte_counter_counts_within_a_window() -> None:
    counter = flower.ByteCounter()
    counter.add(up=10, at=1.0)
    counter.add(down=7, at=2.0)
    counter.add(up=5, down=1, at=3.0)
    assert counter.between(0.0, 10.0) == (15, 8)
    assert counter.between(1.5, 3.0) == (0, 7)
    assert counter.between(2.0, 3.5) == (5, 8)
    assert counter.between(4.0, 5.0) == (0, 0)
    assert (counter.up, counter.down) == (15, 8)


async def test_the_proxy_forwards_and_counts_both_ways() -> None:
    async def echo_twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(1000)
        writer.write(data + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo_twice, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = flower.CountingProxy(("127.0.0.1", port))
    await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"x" * 1000)
    await writer.drain()
    assert await reader.readexactly(2000) == b"x" * 2000
    writer.close()
    await asyncio.sleep(0.05)
    assert (proxy.counter.up, proxy.counter.down) == (1000, 2000)
    await proxy.close()
    server.close()
    await server.wait_closed()


def test_the_proxy_thread_serves_proxies() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener, flower.ProxyThread() as proxies:
        proxy = proxies.add(listener.getsockname()[:2])
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            server_side, _ = listener.accept()
            with server_side:
                client.sendall(b"abc")
                assert server_side.recv(3) == b"abc"
                server_side.sendall(b"hello")
                assert client.recv(5) == b"hello"
    assert (proxy.counter.up, proxy.counter.down) == (3, 5)


@pytest.mark.parametrize("secure", [True, False])
def test_the_app_it_writes(tmp_path: Path, secure: bool) -> None:
    config: dict[str, object] = {"num-server-rounds": 3, "max-weight": 6667.0,
                                 "data-dir": str(tmp_path), "flag": True}  # fmt: skip
    app = flower.write_app(tmp_path / "app", secure=secure, config=config)
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == config
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fairbusflower.server_app:app",
                          "clientapp": "fairbusflower.client_app:app"}  # fmt: skip
    assert f"flwr=={flower.FLWR_VERSION}" in project["project"]["dependencies"]
    for name in ("server_app.py", "client_app.py"):
        source = (app / "fairbusflower" / name).read_text()
        tree = ast.parse(source)  # valid Python, whatever flwr's presence
        assert f"SECURE = {secure}" in source
        assert any(isinstance(n, ast.FunctionDef) for n in ast.walk(tree))


def test_the_copied_training_modules_are_self_contained(tmp_path: Path) -> None:
    site = flower.copy_training_modules(tmp_path / "site")
    copied = {p.relative_to(site).with_suffix("").as_posix().replace("/", ".")
              for p in site.rglob("*.py")}  # fmt: skip
    copied = {name.removesuffix(".__init__") for name in copied}
    for path in site.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fairbus"):
                assert node.module in copied, f"{path.name} imports {node.module}"
    app = flower.write_app(tmp_path / "app", secure=True, config={})
    for name in ("server_app.py", "client_app.py"):
        for node in ast.walk(ast.parse((app / "fairbusflower" / name).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fairbus."):
                assert node.module in copied


def test_client_data_is_the_fairbus_split(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "mnist", 90, 20)
    sizes = flower.write_client_data(tmp_path / "mnist", tmp_path / "data", 3)
    train, test = load_mnist(tmp_path / "mnist")
    parts = partition(train, 3, "iid", 0.5, 0)
    assert sizes == [len(p) for p in parts] == [30, 30, 30]
    for k, index in enumerate(parts):
        saved = np.load(tmp_path / "data" / f"client-{k}.npz")
        x = saved["x"].astype(np.float32) / 255.0
        np.testing.assert_array_equal(x, train.x[index].numpy()[:, 0])
        np.testing.assert_array_equal(saved["y"], train.y[index].numpy())
    assert len(np.load(tmp_path / "data" / "test.npz")["y"]) == len(test) == 20


def test_local_steps_are_bench_rounds() -> None:
    assert flower.local_steps_for(6_667, 9) == math.ceil(6_667 / 64)


def test_summary_leaves_out_the_warm_up_round() -> None:
    rounds = [flower.FlowerRound(1, 0.0, 10.0, 0.1), flower.FlowerRound(2, 10.0, 14.0, 0.2),
              flower.FlowerRound(3, 14.0, 20.0, 0.3)]  # fmt: skip
    counter = flower.ByteCounter()
    counter.add(up=1000, down=1000, at=1.0)  # warm-up: the app download and all
    counter.add(up=100, down=50, at=11.0)
    counter.add(up=300, down=150, at=15.0)
    run = flower.summarize(True, rounds, [counter])
    assert run.round_s == 5.0
    assert run.rounds_s == [10.0, 4.0, 6.0]
    assert (run.bytes_up_per_client, run.bytes_down_per_client) == (200.0, 100.0)
    assert run.bytes_up_whole_run == 1400 / 3
    assert run.accuracy == 0.3


def test_comparison_rows_give_ratios_and_goals() -> None:
    secure = {"pairwise": flower.Side("fairbus secure (pairwise)", 20.0, 2.4e6)}
    rows = flower.comparison_rows(
        secure,
        flower.Side("fairbus plain", 17.0, 2.33e6),
        flower.Side("Flower SecAgg+", 100.0, 4.0e6),
        flower.Side("Flower plain", 50.0, 2.33e6),
    )
    assert rows[0][1:] == ("20.00 s", "100.00 s", "0.200 (goal ≤ 0.25 ✓)")
    assert rows[1][1:] == ("2.40 MB", "4.00 MB", "0.600 (goal ≤ 0.55 ✗)")
    assert rows[2][3] == "0.340" and rows[3][3] == "1.000"
    assert flower.comparison_rows(secure, None, None, None) == []


def test_a_missing_flower_venv_is_one_operator_error(tmp_path: Path) -> None:
    with pytest.raises(flower.FlowerSetupError, match="--flwr-python"):
        flower.FlowerTools.find(tmp_path / "nowhere" / "bin" / "python")
    bin_ = tmp_path / "venv" / "bin"
    bin_.mkdir(parents=True)
    for tool in (*flower.FLOWER_TOOLS, "python"):
        (bin_ / tool).write_text("#!/bin/sh\n")
        (bin_ / tool).chmod(0o755)
    for where in (bin_ / "python", bin_, bin_.parent):
        assert flower.FlowerTools.find(where).bin == bin_.absolute()
