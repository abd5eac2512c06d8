"""Faults and hostile input: failover, WorkerLost, respawn, shutdown, and a
worker that bad bytes cannot break. Real processes and sockets; a concurrent
well-behaved client checks that nobody else loses anything.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import itertools
import logging
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import shutil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wool
from conftest import (
    HELLO, Session, alive, decode, frame, in_flight, run_script, segment, until,
    wait_exit,
)  # fmt: skip
import test_wool
from test_wool import add, exists, wait_cancelled

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
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


async def good_client(worker, n=300):
    """Calls that must all come back right while the worker is under attack."""
    discovery = wool.LocalDiscoveryService(worker.namespace)
    async with wool.WorkerPool(discovery=discovery, authkey=KEY):
        assert await asyncio.gather(*(add(i, 1) for i in range(n))) == [
            i + 1 for i in range(n)
        ]


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


async def hello_session(worker, *frames, pid=0) -> Session:
    """A session past HELLO that sends `frames` ((kind, rid, body)); `pid`:
    the process it says shares the worker's machine (shared files)."""
    session = await Session.open(worker.info, KEY)
    session.send(wool.HELLO, pid, HELLO)
    for kind, rid, body in frames:
        session.send(kind, rid, body)
    return session


async def hello_raw(worker, body: bytes):
    session = await Session.open(worker.info, KEY)
    session.send(wool.HELLO, 0, body)
    return session.reader, session.writer


async def after_hello(worker, *frames, raw=b"", close=False, pid=0):
    """hello_session(), then `raw` bytes: (reader, writer)."""
    session = await hello_session(worker, *frames, pid=pid)
    session.writer.write(raw)
    if close:
        session.writer.write_eof()
    return session.reader, session.writer


def evil_frame(marker, seal=None):
    return frame(wool.TASK, 1, pickle.dumps(Evil(str(marker))), seal)


async def wrong_key(worker, marker):
    reader, writer = await send_raw(worker, b"")
    nonce = (await reader.readexactly(len(wool.MAGIC) + wool.NONCE))[len(wool.MAGIC) :]
    writer.write(wool.MAGIC + wool._digest(b"wrong", b"caller", nonce) + bytes(32))
    writer.write(evil_frame(marker))
    return reader, writer


async def no_hello(worker, marker):
    session = await Session.open(worker.info, KEY)
    session.writer.write(evil_frame(marker, session.outbound))
    return session.reader, session.writer


TASK_BODY = pickle.dumps((("test_wool", "add"), (1, 2), {}, None, None))
WAIT_BODY = pickle.dumps(
    (("test_wool", "wait_cancelled"), ("/dev/null",), {}, None, None)
)


NOT_SHARED = os.open(os.devnull, os.O_RDONLY)  # a descriptor, not a shared file


def shared_task(fd_of, size=2**20):
    """A TASK whose buffer of `size` bytes is said to be in shared file 1,
    held by this (the worker's) process as descriptor `fd_of(worker)`."""

    def send(w, m, pid=os.getpid()):
        table = wool.FILE.pack(fd_of(w), 1) + struct.pack("!IQ", 1, size)
        kind = wool.TASK | wool.BUFFERS | wool.SHARED
        return after_hello(w, (kind, 1, table + TASK_BODY), pid=pid)

    return send


STREAM_BODY = pickle.dumps((("test_wool", "count"), (3,), {}, None, None))

ATTACKS = {
    "random bytes": (lambda w, m: send_raw(w, os.urandom(4096)), "not a wool caller"),
    "a valid frame without the handshake": (
        lambda w, m: send_raw(w, evil_frame(m) * 8),
        "not a wool caller",
    ),
    "another protocol version": (
        lambda w, m: send_raw(w, b"wool\x00\x01" + bytes(64)),
        "caller speaks wool protocol 0001, this worker 0002; run one wool version",
    ),
    "the wrong key": (wrong_key, "the caller does not hold this worker's key"),
    "nothing at all": (lambda w, m: send_raw(w, b""), "no handshake within 0.5 s"),
    "a handshake cut short": (
        lambda w, m: send_raw(w, wool.MAGIC + b"x" * 10, close=True),
        "it closed the connection during the handshake",
    ),
    "a frame before HELLO": (no_hello, "it did not start with HELLO"),
    "a HELLO that does not load": (
        lambda w, m: hello_raw(w, b"not a pickle"),
        "a HELLO that does not load",
    ),
    "a frame with a forged MAC": (
        lambda w, m: after_hello(w, raw=evil_frame(m)),
        "a frame failed its MAC check",
    ),
    "a huge frame": (
        lambda w, m: after_hello(w, raw=wool.HEADER.pack(2**31, wool.TASK, 1)),
        r"frame of 2048 MiB is over max_frame \(256 MiB\)",
    ),
    "a frame cut short": (
        lambda w, m: after_hello(
            w, raw=wool.HEADER.pack(100, wool.TASK, 1) + b"x" * 10, close=True
        ),
        "stream ended inside a frame of 100 bytes",
    ),
    "an unknown frame kind": (
        lambda w, m: after_hello(w, (99, 1, b"")),
        "unknown frame kind 99 from a caller",
    ),
    "a generator step for a coroutine": (  # (one still running: else it has ended)
        lambda w, m: after_hello(w, (wool.TASK, 1, WAIT_BODY), (wool.NEXT, 1, b"")),
        "a generator step for task 1, a coroutine",
    ),
    "a shared file from a peer on another machine": (
        lambda w, m: shared_task(lambda w: 3)(w, m, pid=0),
        "a shared file from a peer on another machine",
    ),
    "a shared file that is not one": (
        shared_task(lambda w: NOT_SHARED),
        r"the shared file \d+ is not the one sent \(/dev/null\)",
    ),
    "a shared file over max_frame": (
        shared_task(lambda w: 3, size=2**40),
        r"frame of 1048576 MiB is over max_frame \(256 MiB\)",
    ),
    "TAKEN for a file never sent": (
        lambda w, m: after_hello(w, (wool.TAKEN, 7, b"")),
        "TAKEN for shared file 7, never sent",
    ),
    "two generator steps at once": (
        lambda w, m: after_hello(  # (the first step may have run as it came)
            w, (wool.STREAM, 1, STREAM_BODY), (wool.NEXT, 1, b""), (wool.NEXT, 1, b"")
        ),
        "two steps at once for generator 1",
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


async def test_a_bad_frame_that_comes_with_the_handshake_leaves_no_peer_behind(worker):
    """Frames that arrive with the end of the handshake are checked at once; a
    bad one closes the connection, and the worker forgets it (else such
    connections would fill max_connections)."""
    for _ in range(3):
        reader, writer = await asyncio.open_connection(*worker.info.address.split(":"))
        nonce = (await reader.readexactly(len(wool.MAGIC) + wool.NONCE))[-wool.NONCE :]
        proof = hmac.new(KEY, b"caller" + nonce, "sha256").digest()
        too_big = b"\xff" * 64  # a header over max_frame, in the same segment
        writer.write(wool.MAGIC + proof + os.urandom(wool.NONCE) + too_big)
        with closed():
            assert (await reader.read())[:1] == b"+"  # it took the key, then closed
        writer.close()
    assert worker.status()["connections"] == 0


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
    assert worker.status()["connections"] <= 1  # the attackers' are all gone


async def test_a_flood_of_bad_connections_logs_a_few_lines_and_a_count(caplog):
    caplog.set_level(logging.WARNING, logger="wool")
    async with wool.Worker(handshake_timeout=30) as worker:
        for _ in range(60):
            reader, writer = await send_raw(worker, os.urandom(200))
            with closed():
                await reader.read()
            writer.close()
    lines = [r.getMessage() for r in caplog.records]
    closed_lines = [line for line in lines if line.startswith("closed connection")]
    assert len(closed_lines) == wool.LOG_BURST
    assert lines[5] == "more warnings about 127.0.0.1 for 60 s: counted"
    assert (
        lines[-1]
        == f"{60 - wool.LOG_BURST} more warnings about 127.0.0.1 were not logged"
    )


async def test_authenticated_callers_get_in_past_held_half_handshakes():
    async with wool.Worker(authkey=KEY, max_connections=8, handshake_timeout=30) as w:
        held = [await send_raw(w, b"") for _ in range(wool.MAX_HANDSHAKES + 40)]
        for _ in range(4):  # each in turn, as new callers arrive
            session = await Session.open(w.info, KEY)
            session.send(wool.HELLO, 0, HELLO)
            session.send(wool.TASK, 1, TASK_BODY)
            kind, _, body = await session.read()
            assert kind == wool.RESULT and pickle.loads(body) == (3, None)
            session.writer.close()
        assert len(w._shaking) <= wool.MAX_HANDSHAKES
        for _, writer in held:
            writer.close()


async def test_connections_over_the_limit_are_refused_at_once(caplog):
    caplog.set_level(logging.WARNING, logger="wool")
    async with wool.Worker(max_connections=3) as worker:
        held = [await Session.open(worker.info, b"") for _ in range(3)]
        reader, writer = await send_raw(worker, b"")
        assert await reader.read() == b""
        assert any("3 already open" in r.getMessage() for r in caplog.records)
        for session in held:
            session.writer.close()


# -- A caller that does not read costs the worker a bounded amount ---------------

ran = []
release = {}  # name -> asyncio.Event, for tasks on in-process workers


@wool.work
async def echo_big(n: int, wait: str | None = None) -> bytes:
    ran.append(n)
    if wait:
        await release[wait].wait()
    return b"x" * n


def queued(peer) -> int:
    """Reply bytes a worker holds for a caller: its outbox and transport."""
    waiting = sum(len(body) for _, _, body in peer.out.queue)
    return waiting + peer.writer.transport.get_write_buffer_size()


@pytest.mark.parametrize("slow", [False, True])
async def test_a_caller_that_stops_reading_stalls_only_itself(worker, slow):
    """Replies wait for room before they are pickled, so what a worker queues
    for a caller that does not read stays under HIGH_WATER and one reply,
    whether its tasks end one by one or all at once."""
    ran.clear()
    release["gate"] = gate = asyncio.Event()
    args = (2**20, "gate" if slow else None)
    body = pickle.dumps(((__name__, "echo_big"), args, {}, None, None))
    tasks = ((wool.TASK, rid, body) for rid in range(1, 601))
    reader, writer = await after_hello(worker, *tasks)  # 600 MiB nobody reads
    await until(lambda: worker.status()["connections"] == 1)
    (peer,) = worker._peers
    bound = wool.HIGH_WATER + 2**20 + 2**10
    if slow:
        await until(lambda: len(ran) == 600)  # all accepted, all waiting
        gate.set()
    for _ in range(400):  # the worker works on; the bound holds all along
        await asyncio.sleep(0)
        assert queued(peer) <= bound
    await until(peer.out.full)
    if slow:
        assert len(ran) == 600  # all had started; their replies wait, unpickled
    else:
        assert peer.frames.held and len(ran) < 600  # it stopped reading
    await good_client(worker)
    writer.close()


async def test_a_task_cancelled_with_the_frames_that_brought_it_frees_its_place():
    """A CANCEL that comes with its TASK (on 3.11 the task has not run yet,
    so its own code cannot end it) still ends it: with max_tasks=1 the
    worker counts nothing running afterwards, and the next task runs."""
    async with wool.Worker(authkey=KEY, max_tasks=1) as worker:
        session = await Session.open(worker.info, KEY)
        frames = [
            (wool.HELLO, 0, HELLO), (wool.TASK, 1, WAIT_BODY), (wool.CANCEL, 1, b""),
            (wool.STATUS, 3, b""),  # answered once the frames before it are taken
        ]  # fmt: skip
        session.writer.write(b"".join(frame(*f, session.outbound) for f in frames))
        for rid in (3, 2):
            while (reply := await session.read())[1] != rid:
                assert reply[1] == 1  # (3.12+: it ran as it came, then was cancelled)
            if rid == 3:
                await until(lambda: worker.running == 0)
                session.send(wool.TASK, 2, TASK_BODY)
        assert reply[0] == wool.RESULT and pickle.loads(reply[2])[0] == 3, reply
        session.writer.close()


async def test_definitions_over_the_bound_close_the_connection(
    worker, caplog, monkeypatch
):
    caplog.set_level(logging.WARNING, logger="wool")
    monkeypatch.setattr(wool, "MAX_DEFINED", 10 * 2**10)
    definitions = ((wool.DEFINE, i, b"x" * 2**10) for i in range(1, 12))
    reader, writer = await after_hello(worker, *definitions)
    with closed():
        assert await reader.read() == b""
    assert any(
        "over 0 MiB of functions defined" in r.getMessage() for r in caplog.records
    )
    await good_client(worker)
    writer.close()


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
        await in_flight(pool)
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


async def test_respawns_are_bounded_then_resume_when_the_window_passes(monkeypatch):
    monkeypatch.setattr(wool, "RESPAWNS", 2)
    monkeypatch.setattr(wool, "RESPAWN_WINDOW", 3.0)
    async with wool.WorkerPool(size=1, wait=0.5) as pool:
        for _ in range(3):
            await pool.wait_for_workers(1, timeout=10)
            with pytest.raises(wool.WorkerLost):
                await die()
        with pytest.raises(wool.NoWorkersAvailable):  # the third waits its turn
            await add(1)
        assert pool.workers == []
        await pool.wait_for_workers(1, timeout=10)  # ... and comes
        assert await add(1) == 1


async def test_pool_exit_past_grace_ends_in_flight_calls_with_worker_lost(tmp_path):
    started = tmp_path / "started"
    async with wool.WorkerPool(size=1, grace=0.2) as pool:
        (w,) = pool.workers
        call = asyncio.ensure_future(wait_cancelled(str(tmp_path / "m"), str(started)))
        await in_flight(pool)
        assert await exists(str(started))
    with pytest.raises(wool.WorkerLost, match="the worker stopped"):
        await call
    assert not alive(w.pid)


async def test_pool_body_cancelled_still_cleans_up():
    pools, inside = [], asyncio.Event()

    async def body():
        async with wool.WorkerPool(size=2) as pool:
            pools.append(pool)
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(body())
    await inside.wait()
    pids = [w.pid for w in pools[0].workers]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(alive(p) for p in pids)
    assert not segment(pools[0]).exists()


async def test_a_replacement_started_as_the_pool_exits_is_stopped_too(monkeypatch):
    started, spawn = [], wool._Spawner.spawn

    async def late_spawn(self):  # a replacement that starts as the pool stops
        if self.procs or started:
            while self.pool._state is not wool._State.STOPPING:
                await self.pool._changed.wait()
        await spawn(self)
        started.append(self.procs)

    monkeypatch.setattr(wool._Spawner, "spawn", late_spawn)
    async with wool.WorkerPool(size=1) as pool:
        (victim,) = pool.workers
        os.kill(victim.pid, signal.SIGKILL)
        await until(lambda: not pool.workers)
    assert not segment(pool).exists()
    assert all(p.returncode is not None for procs in started for p in procs)


def test_a_spawned_worker_whose_pool_is_gone_exits_without_recreating_it():
    namespace = f"gone{uuid.uuid4().hex[:8]}"
    options = {"authkey": b"k", "grace": 1.0}  # as _Spawner.spawn sends them
    data = pickle.dumps((sys.path, 30, "asyncio", [], namespace, options))
    result = subprocess.run(
        [sys.executable, "-c", "import wool; wool._spawned()"],
        input=struct.pack("!I", len(data)) + data, capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert b"FileNotFoundError" in result.stderr
    assert not Path(f"/dev/shm/wool-{namespace}").exists()


def test_spawned_workers_outlive_a_killed_caller_only_by_their_grace():
    """The caller dies while a task blocks the worker's event loop."""
    result = run_script(
        """
        import asyncio, os, time, wool

        @wool.work
        async def block():
            time.sleep(60)  # synchronous: the worker's loop cannot run

        async def main():
            async with wool.WorkerPool(size=1, grace=0.5) as pool:
                print(pool.workers[0].pid, flush=True)
                asyncio.ensure_future(block())
                while not sum(pool.load.values()):
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # the task reaches the worker
                os.kill(os.getpid(), 9)
        asyncio.run(main())
        """
    )
    (worker,) = [int(p) for p in result.stdout.split()]
    start = time.monotonic()
    wait_exit(worker, timeout=20)
    assert time.monotonic() - start < 0.5 + 2 * wool.PATIENCE + 2


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
    pool = wool.WorkerPool("x" * 70_000, size=1)  # its record does not fit
    with pytest.raises(
        RuntimeError, match="a spawned worker exited with code 1 as it started"
    ):
        async with pool:
            pass
    assert not segment(pool).exists()


# -- Trust: a relay, and at-most-once -------------------------------------------------


async def pump(reader, writer, on_frame=None, inbound=False):
    """Forward frames verbatim; after each, `on_frame(kind, rid)` may inject."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            header = await reader.readexactly(wool.HEADER.size)
            size, kind, rid = wool.HEADER.unpack(header)
            writer.write(header + await reader.readexactly(size + wool.TAG))
            if on_frame is not None:
                on_frame(kind, rid)
    writer.close()


async def test_a_relay_that_passed_the_handshake_can_inject_nothing(tmp_path, caplog):
    """A fake record points the pool at a relay, which passes the handshake on
    to the real worker, then sends its own frames both ways."""
    caplog.set_level(logging.WARNING, logger="wool")
    on_worker, on_caller = tmp_path / "worker-pwned", tmp_path / "caller-pwned"
    namespace = f"t{uuid.uuid4().hex[:10]}"
    local = wool.LocalDiscoveryService

    async def relay(reader, writer):
        up_reader, up_writer = await asyncio.open_connection(
            *real.info.address.split(":")
        )
        writer.write(await up_reader.readexactly(len(wool.MAGIC) + wool.NONCE))
        up_writer.write(
            await reader.readexactly(len(wool.MAGIC) + wool.DIGEST + wool.NONCE)
        )
        writer.write(await up_reader.readexactly(1 + wool.DIGEST))  # "+" and proof

        def to_worker(kind, rid):
            if kind == wool.TASK:
                up_writer.write(evil_frame(on_worker))

        def to_caller(kind, rid):
            if kind == wool.ACCEPTED:
                evil = pickle.dumps((Evil(str(on_caller)), None))
                writer.write(frame(wool.RESULT, rid, evil))

        await asyncio.gather(
            pump(reader, up_writer, to_worker), pump(up_reader, writer, to_caller)
        )

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fake = wool.WorkerInfo(uuid.uuid4().hex, "127.0.0.1", port, os.getpid(), "0.1.0")
    try:
        async with wool.Worker(authkey=KEY) as real:  # listed nowhere
            await local(namespace).publish(wool.DiscoveryEvent("worker-added", fake))
            test_wool.HELD["relayed"] = asyncio.Event()
            async with wool.WorkerPool(discovery=local(namespace), authkey=KEY, wait=5):
                with pytest.raises(wool.WorkerLost):
                    await test_wool.hold("relayed")
            assert not on_worker.exists() and not on_caller.exists()
            lines = [r.getMessage() for r in caplog.records]
            assert any("a frame failed its MAC check" in line for line in lines), lines
            await good_client_of(real)
    finally:
        server.close()
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


async def good_client_of(worker):
    namespace = f"t{uuid.uuid4().hex[:10]}"
    service = wool.LocalDiscoveryService(namespace)
    try:
        await service.publish(wool.DiscoveryEvent("worker-added", worker.info))
        async with wool.WorkerPool(
            discovery=wool.LocalDiscoveryService(namespace), authkey=KEY
        ):
            assert await add(1, 2) == 3
    finally:
        await service.close()
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


@wool.work
async def append_line(path: str, line: str) -> str:
    with open(path, "a") as f:
        f.write(line + "\n")
    return line


class Prefer:
    """A balancer that picks the worker with this uid while it is offered."""

    def __init__(self, uid: str):
        self.uid = uid

    def select(self, workers, task):
        return min(workers, key=lambda w: w.uid != self.uid)


async def test_a_task_that_may_have_started_is_never_sent_elsewhere(tmp_path):
    """A worker (with the key) reads the task, then dies before ACCEPTED left
    it: the caller cannot know whether it ran, so it must not run it again."""
    runs, read_it = tmp_path / "runs", asyncio.Event()

    async def swallow(reader, writer):
        _, outbound = await wool._authenticate_caller(reader, writer, KEY)
        writer.write(frame(wool.INFO, 0, fake.to_json(), outbound))
        while True:  # HELLO, then the TASK (unchecked: this peer is honest)
            size, kind, _ = wool.HEADER.unpack(
                await reader.readexactly(wool.HEADER.size)
            )
            await reader.readexactly(size + wool.TAG)
            if kind == wool.TASK:
                break
        read_it.set()
        writer.transport.abort()  # as if killed

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fake = wool.WorkerInfo(uuid.uuid4().hex, "127.0.0.1", port, os.getpid(), "0.1.0")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    local = wool.LocalDiscoveryService
    try:
        async with wool.Worker(authkey=KEY, discovery=local(namespace)):
            await local(namespace).publish(wool.DiscoveryEvent("worker-added", fake))
            async with wool.WorkerPool(
                discovery=local(namespace), authkey=KEY, loadbalancer=Prefer(fake.uid)
            ) as pool:
                await pool.wait_for_workers(2)
                with pytest.raises(wool.WorkerLost, match="may or may not have run"):
                    await append_line(str(runs), "once")
        assert read_it.is_set() and not runs.exists()  # never run elsewhere
    finally:
        server.close()
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


async def test_accepted_leaves_ahead_of_queued_replies(worker):
    big = pickle.dumps(((__name__, "echo_big"), (2**20,), {}, None, None))
    session = await hello_session(worker, *((wool.TASK, r, big) for r in range(1, 41)))
    await until(lambda: worker.status()["connections"] == 1)
    (peer,) = worker._peers
    await until(lambda: peer.out.full())  # replies wait: nobody reads them
    session.send(wool.TASK, 100, TASK_BODY)
    replies_before = 0
    while (frame := await session.read())[:2] != (wool.ACCEPTED, 100):
        replies_before += frame[0] == wool.RESULT
    assert replies_before < 40  # it overtook the replies still queued
    session.writer.close()


# -- Pools and generators that must not leak or spin ---------------------------------


@pytest.fixture
def namespace():
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    shutil.rmtree(f"/dev/shm/wool-{name}", ignore_errors=True)


async def test_a_workers_nested_pools_end_with_the_connections_that_use_them(
    namespace,
):
    local = wool.LocalDiscoveryService
    async with wool.Worker(max_connections=5, discovery=local(namespace)) as worker:
        for _ in range(8):  # each pool: its connection, and one nested back
            async with wool.WorkerPool(discovery=local(namespace)):
                assert await test_wool.fibonacci(4) == 3
        await until(
            lambda: worker.status()["connections"] == worker.status()["nested"] == 0
        )


async def test_a_generator_open_on_a_withdrawn_worker_finishes_without_spinning(
    namespace,
):
    local = wool.LocalDiscoveryService
    async with (
        wool.Worker(discovery=local(namespace)) as worker,
        wool.WorkerPool(discovery=local(namespace)) as pool,
    ):
        numbers = test_wool.count(3)
        assert await anext(numbers) == 0
        await worker.discovery.publish(
            wool.DiscoveryEvent("worker-dropped", worker.info)
        )
        await until(lambda: not pool.workers)  # retiring: no new tasks
        cpu = time.process_time()
        await asyncio.sleep(0.5)  # a window to measure, not to synchronise
        assert time.process_time() - cpu < 0.1  # idle, not spinning
        assert [n async for n in numbers] == [1, 2]
        await until(lambda: not pool._roster.conns)  # closed once answered


@wool.work
async def gated_count(name: str):
    for i in range(3):
        test_wool.HELD[name].set()
        await release[name].wait()
        release[name].clear()
        yield i


async def test_two_concurrent_steps_on_one_generator_raise_like_a_native_one(
    namespace,
):
    local = wool.LocalDiscoveryService
    test_wool.HELD["step"], release["step"] = asyncio.Event(), asyncio.Event()
    async with (
        wool.Worker(discovery=local(namespace)),
        wool.WorkerPool(discovery=local(namespace)),
    ):
        numbers = gated_count("step")
        first = asyncio.ensure_future(anext(numbers))
        await test_wool.HELD["step"].wait()  # the first step runs on the worker
        with pytest.raises(RuntimeError, match="is already running"):
            await anext(numbers)
        release["step"].set()
        assert await first == 0
        await numbers.aclose()


async def test_in_flight_counts_survive_a_worker_updated_event(namespace):
    local = wool.LocalDiscoveryService
    test_wool.HELD["updated"] = asyncio.Event()
    async with (
        wool.Worker(discovery=local(namespace)) as worker,
        wool.WorkerPool(
            discovery=local(namespace), max_tasks_per_worker=1, wait=2
        ) as pool,
    ):
        call = asyncio.ensure_future(test_wool.hold("updated"))
        await test_wool.HELD["updated"].wait()
        updated = dataclasses.replace(worker.info, tags=frozenset({"renamed"}))
        await worker.discovery.publish(wool.DiscoveryEvent("worker-updated", updated))
        await until(lambda: pool.workers and "renamed" in pool.workers[0].tags)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await add(1, 2) == 3  # the worker has room again


# -- Chaos ---------------------------------------------------------------------------


@wool.work
async def record(path: str, call: str, size: int) -> bytes:
    with open(path, "a") as f:  # one short O_APPEND write per run
        f.write(call + "\n")
    return call.encode().ljust(size, b".")


async def chaos(pool, path: Path, seconds: float, monkey, callers=200):
    """`callers` loops of record() while `monkey()` misbehaves; every call
    returns right or fails with WorkerLost or NoWorkersAvailable, none hangs,
    none runs twice."""
    outcomes = collections.Counter()
    stop = asyncio.Event()

    async def caller(i: int):
        for n in itertools.count():
            if stop.is_set():
                return
            name = f"{i}-{n}"
            try:
                async with asyncio.timeout(30):  # a hang fails the test
                    value = await record(str(path), name, 2 * 2**20)
                assert value[: len(name) + 1] == name.encode() + b"."
                outcomes["ok"] += 1
            except (wool.WorkerLost, wool.NoWorkersAvailable) as e:
                outcomes[type(e).__name__] += 1

    running = [asyncio.ensure_future(caller(i)) for i in range(callers)]
    try:
        async with asyncio.timeout(seconds):
            await monkey()
    except TimeoutError:
        pass
    stop.set()
    await asyncio.gather(*running)
    ran = path.read_text().split()
    duplicates = [name for name, k in collections.Counter(ran).items() if k > 1]
    assert not duplicates, f"{len(duplicates)} tasks ran twice: {duplicates[:5]}"
    assert outcomes["ok"] > 1000, outcomes
    return outcomes


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_chaos_kills_and_stops_lose_nothing_and_run_nothing_twice(tmp_path):
    pids = set()

    async def monkey():
        for round in itertools.count():
            await asyncio.sleep(2.0)  # the chaos's own pace
            pids.update(w.pid for w in pool.workers)
            victim, *others = random.sample(pool.workers, len(pool.workers))
            os.kill(victim.pid, signal.SIGKILL)
            if round % 3 == 0 and others:
                os.kill(others[0].pid, signal.SIGSTOP)
                asyncio.get_running_loop().call_later(
                    5.0, os.kill, others[0].pid, signal.SIGCONT
                )

    async with wool.WorkerPool(size=4, wait=10) as pool:
        outcomes = await chaos(pool, tmp_path / "ran", 30.0, monkey)
        pids.update(w.pid for w in pool.workers)
    print(outcomes)
    assert outcomes["WorkerLost"] > 0  # the kills hit calls in flight
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert not any(alive(p) for p in pids)
    assert not segment(pool).exists()
