"""Faults and hostile input: failover, WorkerLost, respawn, shutdown, and a
worker that bad bytes cannot break. Real processes and sockets; a concurrent
well-behaved client checks that nobody else loses anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import re
import signal
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wool
from test_wool import add, alive, decode, exists, wait_cancelled

KEY = b"fault-key"


@pytest.fixture
async def worker():
    """An in-process worker with a short handshake deadline, and its namespace."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    try:
        async with wool.Worker(
            authkey=KEY,
            handshake_timeout=0.5,
            discovery=wool.LocalDiscoveryService(namespace),
        ) as worker:
            worker.namespace = namespace
            yield worker
    finally:
        Path(f"/dev/shm/wool-{namespace}").unlink(missing_ok=True)


async def good_client(worker, n=300):
    """Calls that must all come back right while the worker is under attack."""
    discovery = wool.LocalDiscoveryService(worker.namespace)
    async with wool.WorkerPool(discovery=discovery, authkey=KEY):
        assert await asyncio.gather(*(add(i, 1) for i in range(n))) == [
            i + 1 for i in range(n)
        ]


async def authenticated(worker, key=KEY):
    """A raw connection that passed the handshake."""
    reader, writer = await asyncio.open_connection(worker.info.host, worker.info.port)
    await wool._authenticate_worker(reader, writer, key, worker.info.address)
    return reader, writer


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


async def send_raw(worker, data: bytes, close=False):
    reader, writer = await asyncio.open_connection(worker.info.host, worker.info.port)
    writer.write(data)
    if close:
        writer.write_eof()
    return reader, writer


async def after_hello(worker, data: bytes, close=False):
    reader, writer = await authenticated(worker)
    writer.write(wool.encode(wool.HELLO, 0, pickle.dumps([])) + data)
    if close:
        writer.write_eof()
    return reader, writer


def evil_frame(marker):
    return wool.encode(wool.TASK, 1, pickle.dumps(Evil(str(marker))))


async def wrong_key(worker, marker):
    reader, writer = await send_raw(worker, b"")
    nonce = (await reader.readexactly(len(wool.MAGIC) + wool.NONCE))[len(wool.MAGIC) :]
    writer.write(wool.MAGIC + wool._digest(b"wrong", b"caller", nonce) + bytes(32))
    writer.write(evil_frame(marker))
    return reader, writer


async def no_hello(worker, marker):
    reader, writer = await authenticated(worker)
    writer.write(evil_frame(marker))
    return reader, writer


ATTACKS = {
    "random bytes": (lambda w, m: send_raw(w, os.urandom(4096)), "not a wool caller"),
    "a valid frame without the handshake": (
        lambda w, m: send_raw(w, evil_frame(m) * 8),
        "not a wool caller",
    ),
    "the wrong key": (wrong_key, "the caller does not hold this worker's key"),
    "nothing at all": (lambda w, m: send_raw(w, b""), "no handshake within 0.5 s"),
    "a handshake cut short": (
        lambda w, m: send_raw(w, wool.MAGIC + b"x" * 10, close=True),
        "it closed the connection during the handshake",
    ),
    "a frame before HELLO": (no_hello, "it did not start with HELLO"),
    "a huge frame": (
        lambda w, m: after_hello(w, wool.HEADER.pack(2**31, wool.TASK, 1)),
        r"frame of 2048 MiB is over max_frame \(256 MiB\)",
    ),
    "a frame cut short": (
        lambda w, m: after_hello(
            w, wool.HEADER.pack(100, wool.TASK, 1) + b"x" * 10, True
        ),
        "stream ended inside a frame of 100 bytes",
    ),
    "an unknown frame kind": (
        lambda w, m: after_hello(w, wool.encode(99, 1)),
        "unknown frame kind 99 from a caller",
    ),
}


@pytest.mark.parametrize("attack", ATTACKS)
async def test_hostile_input_closes_one_connection_with_one_log_line(
    attack, worker, tmp_path, caplog
):
    marker = tmp_path / "pwned"
    make, message = ATTACKS[attack]
    caplog.set_level(logging.WARNING, logger="wool")
    reader, writer = await make(worker, marker)
    good = asyncio.ensure_future(good_client(worker))
    with closed():
        await reader.read()  # until the worker closes the connection
    await good
    address = "%s:%s" % writer.get_extra_info("sockname")[:2]
    lines = [r.getMessage() for r in caplog.records if address in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"closed connection from {address}: ")
    assert re.search(message, lines[0]), lines[0]
    assert not marker.exists()
    writer.close()


@contextlib.contextmanager
def closed():
    """Reading until the worker closed; a reset is a close too."""
    with contextlib.suppress(ConnectionResetError):
        yield


async def test_hundreds_of_hostile_connections_at_once(worker, tmp_path):
    marker = tmp_path / "pwned"
    attackers = await asyncio.gather(
        *(send_raw(worker, os.urandom(100) if i % 2 else b"") for i in range(300))
    )
    await good_client(worker, 1000)
    for reader, writer in attackers:
        with closed():
            await reader.read()
        writer.close()
    assert not marker.exists()
    assert worker._connections <= 1  # the attackers' are all gone


async def test_connections_over_the_limit_are_refused_at_once(caplog):
    caplog.set_level(logging.WARNING, logger="wool")
    async with wool.Worker(max_connections=3, handshake_timeout=30) as worker:
        held = [await send_raw(worker, b"") for _ in range(3)]
        for reader, _ in held:  # each got its challenge: they are counted
            await reader.readexactly(len(wool.MAGIC) + wool.NONCE)
        reader, writer = await send_raw(worker, b"")
        assert await reader.read() == b""
        assert any("already open" in r.getMessage() for r in caplog.records)
        for _, w in held:
            w.close()


async def test_a_caller_that_stops_reading_stalls_only_itself(worker):
    reader, writer = await after_hello(worker, b"")
    ref = (echo_big.__module__, echo_big.__qualname__)
    body = pickle.dumps((ref, (2**20,), {}, None, None))  # a TASK body
    ran.clear()
    for rid in range(1, 201):  # 200 MiB of replies that nobody reads
        writer.write(wool.encode(wool.TASK, rid, body))
    with pytest.raises(TimeoutError):  # proving a negative needs a deadline
        async with asyncio.timeout(2):
            while len(ran) < 200:
                await asyncio.sleep(0.05)
    assert 0 < len(ran) < 50  # the worker ran some, then stopped reading
    (peer,) = worker._peers
    assert peer.out.backlog() <= wool.HIGH_WATER + len(ran) * 2**20
    await good_client(worker)
    writer.close()


ran = []


@wool.work
async def echo_big(n: int) -> bytes:
    ran.append(n)
    return b"x" * n


# -- The frame decoder and the handshake, fuzzed ----------------------------------


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_frame_decoder_raises_nothing_but_protocol_error(chunks):
    frames, error, _ = decode(chunks, max_frame=1024)
    assert error is None or isinstance(error, wool.ProtocolError)
    assert all(len(body) <= 1024 for _, _, body in frames)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_handshake_raises_nothing_unexpected(data):
    class Sink:
        def write(self, data):
            pass

    async def shake():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        try:
            await wool._authenticate_caller(reader, Sink(), KEY)
        except (
            wool.ProtocolError,
            wool.AuthenticationError,
            asyncio.IncompleteReadError,
        ):
            return
        raise AssertionError("random bytes passed the handshake")

    asyncio.run(shake())


# -- Workers that die, pools that stop ----------------------------------------------


async def test_worker_killed_mid_task_raises_worker_lost_then_replacement_serves(
    tmp_path,
):
    started = tmp_path / "started"
    async with wool.WorkerPool(size=1) as pool:
        (victim,) = pool.workers
        call = asyncio.ensure_future(wait_cancelled(str(tmp_path / "m"), str(started)))
        await asyncio.sleep(0)  # one step: the TASK frame is sent
        assert await exists(str(started))
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(wool.WorkerLost, match=f"lost worker {victim.address}"):
            await call
        assert await add(2, 2) == 4  # on the replacement
        (replacement,) = pool.workers
        assert replacement.pid != victim.pid


@wool.work
async def die():
    os._exit(3)


async def test_respawns_are_bounded(monkeypatch):
    monkeypatch.setattr(wool, "RESPAWNS_PER_MINUTE", 2)
    async with wool.WorkerPool(size=1, wait=2) as pool:
        for _ in range(3):
            with pytest.raises(wool.WorkerLost):
                await die()
        with pytest.raises(wool.NoWorkersAvailable):
            await add(1)
        assert pool.workers == []


async def test_pool_exit_past_grace_ends_in_flight_calls(tmp_path):
    started = tmp_path / "started"
    async with wool.WorkerPool(size=1, grace=0.2) as pool:
        (w,) = pool.workers
        call = asyncio.ensure_future(wait_cancelled(str(tmp_path / "m"), str(started)))
        await asyncio.sleep(0)
        assert await exists(str(started))
    done, _ = await asyncio.wait([call])
    assert isinstance(call.exception(), (asyncio.CancelledError, wool.WorkerLost))
    assert not alive(w.pid)


async def test_pool_body_cancelled_still_cleans_up():
    before = set(os.listdir("/dev/shm"))
    pids, inside = [], asyncio.Event()

    async def body():
        async with wool.WorkerPool(size=2) as pool:
            pids.extend(w.pid for w in pool.workers)
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(body())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(alive(p) for p in pids)
    assert set(os.listdir("/dev/shm")) - before == set()


# -- Memory --------------------------------------------------------------------------


def rss(pid="self") -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf(
        "SC_PAGE_SIZE"
    )


@pytest.mark.timeout(180)
async def test_memory_is_flat_over_100_000_tasks():
    async def batch(n):
        for start in range(0, n, 2000):
            await asyncio.gather(*(add(i, 1) for i in range(start, start + 2000)))

    async with wool.WorkerPool(size=2) as pool:
        await batch(20_000)  # warm-up
        before = [rss(), *(rss(w.pid) for w in pool.workers)]
        await batch(100_000)
        after = [rss(), *(rss(w.pid) for w in pool.workers)]
    growth = [(a - b) / 2**20 for a, b in zip(after, before)]
    assert all(g < 8 for g in growth), f"MiB grown (caller, workers): {growth}"


async def test_a_worker_that_cannot_start_fails_the_pool_at_once():
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(
        RuntimeError, match="a spawned worker exited with code 1 as it started"
    ):
        async with wool.WorkerPool("x" * 600, size=1):  # its record does not fit
            pass
    assert set(os.listdir("/dev/shm")) - before == set()
