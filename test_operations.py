"""Operability: live status, per-task logs, retries for idempotent tasks,
generator steps bounded by a timeout, readable remote tracebacks. Real
worker processes."""

from __future__ import annotations

import asyncio
import json
import linecache
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import cloudpickle
import pytest
import shutil

import wool
from conftest import HERE, until
from test_durable import cli_worker, keyfile  # noqa: F401 (a fixture)
from test_wool import add, exists

HELD: dict[str, asyncio.Event] = {}


@wool.work
async def held(name: str) -> str:
    HELD[name].set()
    await asyncio.Event().wait()
    return name


@pytest.fixture
def namespace():
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    shutil.rmtree(f"/dev/shm/wool-{name}", ignore_errors=True)


async def test_status_shows_running_tasks_then_counts_them(namespace):
    local = wool.LocalDiscoveryService
    HELD["status"] = asyncio.Event()
    async with (
        wool.Worker("blue", discovery=local(namespace)) as worker,
        wool.WorkerPool(discovery=local(namespace)) as pool,
    ):
        await pool.wait_for_workers(1)
        call = asyncio.ensure_future(held("status"))
        await HELD["status"].wait()
        (status,) = await pool.status()
        assert status["uid"] == worker.uid and status["pid"] == os.getpid()
        assert status["address"] == worker.info.address and status["tags"] == ["blue"]
        assert [r["function"] for r in status["running"]] == ["held"]
        assert status["running"][0]["age"] >= 0 and status["uptime"] > 0
        assert status["connections"] == 1 and status["rss"] > 0
        assert (status["done"], status["failed"]) == (0, 0)
        call.cancel()
        assert await add(1, 2) == 3
        await until(lambda: worker.failed == 1)  # the cancelled one
        (status,) = await pool.status()
        assert status["running"] == [] and (status["done"], status["failed"]) == (1, 1)


def wool_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wool", "status", *args],
        cwd=HERE, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_wool_status_with_and_without_the_key(namespace, keyfile):  # noqa: F811
    with cli_worker(
        "--tag", "green", "--discovery", f"local:{namespace}", "--authkey-file", str(keyfile)
    ) as (proc, uid):  # fmt: skip
        listing = wool_status("--discovery", f"local:{namespace}", "--authkey-file", str(keyfile))
        assert listing.returncode == 0, listing.stderr
        (line,) = listing.stdout.splitlines()
        assert line.startswith(f"{uid}  127.0.0.1:{proc.port}  pid {proc.pid}  up ")
        assert "running 0  done 0  failed 0  connections 1" in line and "tags green" in line
        as_json = wool_status(
            "--discovery", f"local:{namespace}", "--authkey-file", str(keyfile), "--json"
        )
        (record,) = map(json.loads, as_json.stdout.splitlines())
        assert record["uid"] == uid and record["tags"] == ["green"]
        refused = wool_status("--discovery", f"local:{namespace}")
        assert refused.returncode == 2 and refused.stdout == ""
        last = refused.stderr.splitlines()[-1]
        assert last.startswith("wool status: worker ")
        assert last.endswith("refused the key; give callers and workers the same key "
                             "(authkey=, --authkey-file or WOOL_AUTHKEY)")
        assert "Traceback" not in refused.stderr


async def test_debug_logs_one_line_per_task(namespace, caplog):
    caplog.set_level(logging.DEBUG, logger="wool")
    local = wool.LocalDiscoveryService
    async with (
        wool.Worker(discovery=local(namespace)),
        wool.WorkerPool(discovery=local(namespace)) as pool,
    ):
        await pool.wait_for_workers(1)
        caplog.clear()
        assert await add(2, 2) == 4
        with pytest.raises(ZeroDivisionError):
            await divide(1, 0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task ")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("task 1 add() from 127.0.0.1:") and ": done in " in lines[0]
    assert "divide() from" in lines[1] and ": failed: ZeroDivisionError in " in lines[1]


@wool.work
async def divide(a, b):
    return a / b


# -- Retries ---------------------------------------------------------------------------


@wool.work(retries=2)
async def record_then_wait(path: str, started: str) -> int:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    Path(started).touch()
    await asyncio.sleep(3600 if len(Path(path).read_text().split()) == 1 else 0)
    return os.getpid()


async def test_retries_survive_a_killed_worker_and_the_task_runs_again(tmp_path):
    ran, started = tmp_path / "ran", tmp_path / "started"
    async with wool.WorkerPool(size=2):
        call = asyncio.ensure_future(record_then_wait(str(ran), str(started)))
        while not await exists(str(started)):
            pass
        (first,) = map(int, ran.read_text().split())
        os.kill(first, signal.SIGKILL)
        second = await call  # sent again, to the other worker
    runs = [int(p) for p in ran.read_text().split()]
    assert runs == [first, second] and second != first  # it ran twice


async def test_without_retries_a_killed_worker_is_worker_lost(tmp_path):
    ran, started = tmp_path / "ran", tmp_path / "started"
    async with wool.WorkerPool(size=2):
        with wool.retries(0):
            call = asyncio.ensure_future(record_then_wait(str(ran), str(started)))
        while not await exists(str(started)):
            pass
        os.kill(int(ran.read_text()), signal.SIGKILL)
        with pytest.raises(wool.WorkerLost, match="with the task on it$"):
            await call
    assert len(ran.read_text().split()) == 1


def test_retries_are_checked():
    with pytest.raises(ValueError, match="retries must be a whole number >= 0"):
        wool.work(retries=-1)
    with pytest.raises(ValueError, match="retries must be a whole number >= 0"):
        with wool.retries(1.5):
            pass


# -- Generator timeouts -------------------------------------------------------------------


@wool.work(timeout=0.5)
async def slow_steps(marker: str):
    try:
        yield 1
        await asyncio.sleep(3600)  # the second step never comes in time
        yield 2
    finally:
        Path(marker).write_text("closed")


async def test_a_generator_step_past_its_timeout_raises_and_closes_it_there(tmp_path):
    marker = tmp_path / "marker"
    async with wool.WorkerPool(size=1):
        steps = slow_steps(str(marker))
        assert await anext(steps) == 1
        with pytest.raises(TimeoutError):
            await anext(steps)
        while not await exists(str(marker)):
            pass
    assert marker.read_text() == "closed"


# -- Tracebacks -----------------------------------------------------------------------------

THREE_DEEP = '''
import asyncio, wool

@wool.work
async def innermost(n):
    raise ValueError(f"deep {n}")

@wool.work
async def middle(n):
    return await innermost(n)

@wool.work
async def outer(n):
    return await middle(n)

async def main():
    async with wool.WorkerPool(size=3):
        await outer(3)

asyncio.run(main())
'''


def test_a_three_deep_failure_reads_one_hop_per_worker(tmp_path):
    script = tmp_path / "three_deep.py"
    script.write_text(THREE_DEEP)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )  # fmt: skip
    err = result.stderr
    assert result.returncode == 1 and err.rstrip().endswith("ValueError: deep 3")
    hops = [line for line in err.splitlines() if line.startswith("[on worker pid ")]
    assert len(hops) == 3, err
    for line, name in ((6, "innermost"), (10, "middle"), (14, "outer")):
        assert f'File "{script}", line {line}, in {name}' in err, err
    assert err.count("wool._RemoteTraceback") == 1
    assert "<dynamic-code>" not in err


def test_wool_status_watch_refreshes_until_ctrl_c(namespace):
    with cli_worker("--discovery", f"local:{namespace}") as (proc, uid):
        watch = subprocess.Popen(
            [sys.executable, "-m", "wool", "status", "--discovery", f"local:{namespace}",
             "--watch"],
            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        try:
            first, gap, second = (watch.stdout.readline() for _ in range(3))
            assert first.startswith(uid) and gap == "\n" and second.startswith(uid)
            watch.send_signal(signal.SIGINT)
            assert watch.wait(timeout=10) == 0
            assert "Traceback" not in watch.stderr.read()
        finally:
            watch.kill()


def test_a_function_sent_by_value_brings_its_lines_to_a_worker_without_its_file():
    where = f"/nonexistent/{uuid.uuid4().hex}/tasks.py"
    lines = ["async def job():\n", "    raise ValueError('from a file not here')\n"]
    code = compile("".join(lines), where, "exec")
    namespace: dict = {}
    exec(code, namespace)
    task = wool.work(namespace["job"])
    # As a caller sends it by value (cloudpickle renames its code's file
    # "<dynamic-code>"), with the file's name and lines beside it.
    definition = cloudpickle.dumps((task, where, lines))
    fn, _ = wool._resolve(definition)
    assert fn.__code__.co_filename == where
    assert linecache.getline(where, 2).strip() == "raise ValueError('from a file not here')"


def test_wool_status_says_when_there_is_no_worker_and_which_tls_file_is_wrong(namespace):
    empty = wool_status("--discovery", f"local:{namespace}", "--wait", "0.1")
    assert empty.returncode == 2 and empty.stdout == ""
    assert empty.stderr.strip() == (
        f"wool status: no worker found on LocalDiscoveryService('{namespace}')"
    )
    missing = wool_status("--discovery", f"local:{namespace}", "--tls-ca", "/nonexistent/ca.crt")
    assert missing.returncode == 2
    assert missing.stderr.startswith("wool status: cannot use --tls-cert None --tls-key None "
                                     "--tls-ca /nonexistent/ca.crt: ")  # fmt: skip
