"""Reliability: every call gets exactly one answer, and a live peer is never
declared dead because it is busy.

Real worker processes and sockets. The busy-peer tests go through the
socket path (WOOL_SHARE=0), as between machines; the dead-host test, a link
cut with data in flight, is in test_netns.py. Each call that could hang is
bounded by its own timeout, so a hang fails with the case that hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import shutil

import wool
from conftest import HELLO, KEY, Session, in_flight, until

# -- Every call gets exactly one answer ---------------------------------------------


class Mine(BaseException):
    """A BaseException of the user's own."""


class ExitOnLoad:
    def __reduce__(self):
        return sys.exit, (3,)


class ExitOnDump:
    def __reduce__(self):
        raise SystemExit(4)


class Unprintable(Exception):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()  # cannot be pickled

    def __str__(self):
        raise RuntimeError("no")


@wool.work
async def echo(x):
    return x


@wool.work
async def exit_with(code: int):
    sys.exit(code)


@wool.work
async def raise_(cls, *args):
    raise cls(*args)


@wool.work
async def make(cls):
    return cls()


@wool.work
async def fail_at_length(n: int):
    raise ValueError("x" * n)


@wool.work
async def count_then_fail(cls):
    yield 1
    raise cls("in a generator")


ANSWERS = {
    "sys.exit()": (
        lambda: exit_with(2), wool.RemoteError, r"^builtins\.SystemExit: 2$"
    ),
    "KeyboardInterrupt": (
        lambda: raise_(KeyboardInterrupt, "boom"),
        wool.RemoteError, r"^builtins\.KeyboardInterrupt: boom$",
    ),
    "GeneratorExit": (lambda: raise_(GeneratorExit, "boom"), GeneratorExit, "^boom$"),
    "a BaseException of the user's": (lambda: raise_(Mine, "boom"), Mine, "^boom$"),
    "SystemExit unpickling the arguments on the worker": (
        lambda: echo(ExitOnLoad()), wool.RemoteError, r"SystemExit: 3$"
    ),
    "SystemExit pickling the result on the worker": (
        lambda: make(ExitOnDump), TypeError,
        r"^cannot send the value of make\(\) back to the caller: SystemExit\(4\)$",
    ),
    "SystemExit unpickling the result in the caller": (
        lambda: make(ExitOnLoad), TypeError,
        r"^cannot load the value of make\(\) in the caller: SystemExit\(3\)$",
    ),
    "SystemExit pickling the arguments in the caller": (
        lambda: echo(ExitOnDump()), TypeError,
        r"^cannot send echo\(\) and its arguments to a worker: SystemExit\(4\)$",
    ),
    "an exception that neither pickles nor prints": (
        lambda: raise_(Unprintable), wool.RemoteError,
        r"^test_reliability\.Unprintable: <str\(\) raised RuntimeError>$",
    ),
}  # fmt: skip


@pytest.fixture
async def pool():
    async with wool.WorkerPool(size=1) as pool:
        yield pool


@pytest.mark.parametrize("case", ANSWERS)
async def test_whatever_a_task_does_its_call_gets_one_answer(pool, case):
    call, error, message = ANSWERS[case]
    # A task of its own: a SystemExit that reached it would stop the loop.
    answer = asyncio.ensure_future(call())
    with pytest.raises(error, match=message):
        async with asyncio.timeout(10):
            await answer
    async with asyncio.timeout(10):
        assert await echo(1) == 1  # the worker and the pool serve on


@pytest.mark.parametrize("cls", [SystemExit, KeyboardInterrupt])
async def test_a_generator_step_that_exits_gets_one_answer(pool, cls):
    steps = count_then_fail(cls)
    async with asyncio.timeout(10):
        assert await anext(steps) == 1
        with pytest.raises(wool.RemoteError, match=f"{cls.__name__}: in a generator"):
            await anext(steps)
        assert await echo(2) == 2


async def test_a_100_mib_error_message_arrives_whole_and_logs_a_short_line(caplog):
    caplog.set_level(logging.DEBUG, "wool")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    local = wool.LocalDiscoveryService(namespace)
    try:  # a worker in this process, so that its log is ours to read
        async with (
            wool.Worker(discovery=local),
            wool.WorkerPool(discovery=local) as pool,
        ):
            await pool.wait_for_workers(1)
            with pytest.raises(ValueError) as raised:
                async with asyncio.timeout(30):
                    await fail_at_length(100 * 2**20)
            assert str(raised.value) == "x" * (100 * 2**20)
            assert await echo(3) == 3
    finally:
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)
    longest = max(len(r.getMessage()) + len(r.exc_text or "") for r in caplog.records)
    assert longest < 10_000


async def test_an_error_over_max_frame_arrives_trimmed_as_remote_error():
    async with wool.WorkerPool(size=1, max_frame=8 * 2**20):
        with pytest.raises(wool.RemoteError, match="^builtins.ValueError: x") as raised:
            async with asyncio.timeout(30):
                await fail_at_length(100 * 2**20)
        assert len(raised.value.message) < 2 * wool.TRIM
        assert f"{100 * 2**20 - wool.TRIM} characters left out" in raised.value.message
        assert "characters left out" in raised.value.traceback
        assert await echo(4) == 4


# -- Retries are bounded --------------------------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 to a worker, whose connections a test cuts."""

    def __init__(self, port: int):
        self.port, self.target, self.pairs = 0, port, []

    async def start(self):
        self.server = await asyncio.start_server(self.relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def relay(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.pairs.append((writer, up_writer))

        async def pipe(source, sink):
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await source.read(2**16):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self):
        for pair in self.pairs:
            for writer in pair:
                writer.transport.abort()
        self.pairs.clear()


RELAY: list[Relay] = []
RUNS: list[int] = []


@wool.work(retries=2)
async def run_then_lose_the_connection():
    """In a worker of this process: count the run, then cut its connection."""
    RUNS.append(os.getpid())
    RELAY[0].cut()
    await asyncio.sleep(3600)


async def test_retries_on_one_worker_run_a_task_at_most_n_plus_1_times():
    RUNS.clear()
    async with wool.Worker(authkey=KEY) as worker:
        relay = Relay(worker.info.port)
        await relay.start()
        RELAY[:] = [relay]
        listed = wool.DnsDiscoveryService(f"127.0.0.1:{relay.port}")
        async with wool.WorkerPool(discovery=listed, authkey=KEY):
            with pytest.raises(
                wool.WorkerLost,
                match=r"; sent 3 times \(retries=2\), to "
                + ", ".join([f"127.0.0.1:{relay.port}"] * 3) + "$",
            ):  # fmt: skip
                async with asyncio.timeout(30):
                    await run_then_lose_the_connection()
        relay.server.close()
    assert len(RUNS) == 3


# -- A busy peer is alive -------------------------------------------------------------


@wool.work
async def block(seconds: float, marker: str):
    Path(marker).touch()
    time.sleep(seconds)  # the event loop is blocked; the kernel still answers


@wool.work
async def zeros(n: int) -> bytes:
    return bytes(n)


class ByFunction:
    """Sends `zeros` to one worker and everything else to the other."""

    def select(self, workers, task):
        first, second = sorted(workers, key=lambda w: w.uid)
        return second if task.fn is zeros else first


@pytest.mark.timeout(150)
async def test_loops_blocked_30_s_with_50_mib_coming_each_way_lose_nothing(
    tmp_path, monkeypatch
):
    """Worker A's loop is blocked while 50 MiB are sent to it, and the
    caller's while worker B sends it 50 MiB: both receivers advertise a zero
    window for 30 s, their kernels answering each probe. Nothing is lost."""
    data, marker = bytes(range(256)) * (50 * 2**12), tmp_path / "blocked"
    monkeypatch.setenv("WOOL_SHARE", "0")  # through the socket, as between machines
    wool._machine.cache_clear()
    try:
        async with wool.WorkerPool(size=2, loadbalancer=ByFunction()) as pool:
            await pool.wait_for_workers(2)
            blocked = asyncio.ensure_future(block(30, str(marker)))
            await until(marker.exists)
            to_a = asyncio.ensure_future(echo(data))  # waits in A's window
            from_b = asyncio.ensure_future(zeros(len(data)))
            await in_flight(pool, 3)
            time.sleep(30)  # this loop blocked, while B sends
            async with asyncio.timeout(60):
                assert await from_b == bytes(len(data))
                assert await to_a == data
                assert await blocked is None
    finally:
        wool._machine.cache_clear()


@pytest.mark.timeout(300)
async def test_100_000_calls_started_at_once_all_complete():
    async with wool.WorkerPool(size=2):
        results = await asyncio.gather(*(echo(i) for i in range(100_000)))
    assert results == list(range(100_000))


@pytest.mark.timeout(300)
def test_100_000_submits_in_a_tight_loop_all_complete():
    with wool.Executor(size=2) as executor:
        futures = [executor.submit(abs, -i) for i in range(100_000)]
        assert [f.result(timeout=240) for f in futures] == list(range(100_000))


# -- Bounds: shared files, local namespaces -------------------------------------------


@wool.work
async def buffer(n: int):
    return bytearray(n)


async def test_a_peer_that_never_says_taken_holds_at_most_shared_files():
    """A caller that shares the machine but never answers TAKEN: past
    SHARED_FILES files, the worker's replies come through the socket."""
    n = wool.SHARED_FILES + 20
    async with wool.Worker(authkey=KEY) as worker:
        session = await Session.open(worker.info, KEY)
        session.send(wool.HELLO, os.getpid(), HELLO)
        task = pickle.dumps(((__name__, "buffer"), (2**21,), {}, None, None))
        for rid in range(1, n + 1):
            session.send(wool.TASK, rid, task)
        kinds = []
        async with asyncio.timeout(30):
            while len(kinds) < n:
                kind, _, _ = await session.read()
                if kind != wool.ACCEPTED:
                    kinds.append(kind)
        shared = wool.RESULT | wool.BUFFERS | wool.SHARED
        assert kinds.count(shared) == wool.SHARED_FILES
        assert kinds.count(wool.RESULT | wool.BUFFERS) == 20
        session.writer.close()


def test_bytearrays_travel_out_of_band():
    body = wool._pickle(wool._lift((bytearray(2**20),)), oob=True)
    assert type(body) is wool._Parts and [b.nbytes for b in body.buffers] == [2**20]


NOBODY = """
import fcntl, os, sys
sys.path.insert(0, {here!r})
import asyncio, wool_discovery
from multiprocessing import resource_tracker, shared_memory
os.setgid(65534)
os.setuid(65534)  # nobody, from here on
{code}
"""


def as_nobody(code: str) -> subprocess.Popen:
    """A Python process that drops to user nobody before it runs `code`."""
    here = os.path.dirname(__file__)
    script = NOBODY.format(here=here, code=textwrap.dedent(code))
    return subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to be nobody)")


@needs_root
async def test_a_namespace_squatted_by_another_user_is_refused_at_once():
    namespace = f"t{uuid.uuid4().hex[:10]}"
    squatter = as_nobody(f"""
        fd = os.open("/dev/shm/wool-{namespace}", os.O_CREAT | os.O_RDWR, 0o666)
        os.fchmod(fd, 0o666)
        os.ftruncate(fd, 2**17)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("holding", flush=True)
        sys.stdin.read()
    """)
    try:
        assert squatter.stdout.readline() == "holding\n"
        local = wool.LocalDiscoveryService(namespace)
        who = f"/dev/shm/wool-{namespace} is not a directory, and belongs to uid 65534 with mode 666"
        async with asyncio.timeout(10):
            worker = wool.Worker(discovery=local)
            with pytest.raises(PermissionError, match=who):
                await worker.start()
            assert worker.state is wool._State.STOPPED  # and it listens no more
            async with wool.WorkerPool(discovery=local, wait=20):
                with pytest.raises(wool.NoWorkersAvailable, match=who):
                    await echo(1)
    finally:
        squatter.communicate("")
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


@needs_root
def test_a_record_of_another_users_process_is_foreign_and_cleared():
    """As nobody, a record naming pid 1 (root's: kill() says EPERM) is not
    taken for a live worker of ours, and is cleared."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    reader = as_nobody(f"""
        service = wool_discovery.LocalDiscoveryService({namespace!r})
        WorkerInfo, Event = wool_discovery.WorkerInfo, wool_discovery.DiscoveryEvent

        async def main():
            for uid, pid in [("foreign", 1), ("ours", os.getpid())]:
                info = WorkerInfo(uid, "127.0.0.1", 1, pid, "0")
                await service.publish(Event("worker-added", info))
            async for event in service.subscribe():
                print(event.info.uid, flush=True)
                break
            print(sorted(service.records()), flush=True)
            service.remove()

        asyncio.run(main())
    """)
    try:
        out, _ = reader.communicate(timeout=30)
    finally:
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)
    assert out.split("\n")[:2] == ["ours", "['ours']"]


# -- Refusals: a call that cannot run somewhere goes elsewhere, and only then fails


class Poison:
    """Pickles anywhere; loads nowhere."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def _refuse_to_load():
    raise ValueError("this argument does not load here")


@wool.work
async def identity(x):
    return x


async def test_an_argument_that_loads_nowhere_fails_that_call_alone():
    async with wool.WorkerPool(size=2, wait=5) as pool:
        await pool.wait_for_workers(2)
        with pytest.raises(ValueError, match="this argument does not load here"):
            await identity(Poison())
        assert await identity(7) == 7  # the function is not blamed for it
    with wool.Executor(2) as executor:
        with pytest.raises(ValueError, match="does not load here"):
            executor.submit(functools.partial(identity, Poison())).result(timeout=30)
        assert executor.submit(operator.add, 1, 2).result(timeout=30) == 3


async def fake_worker(answer):
    """A server that passes the handshake with KEY, says INFO, takes HELLO,
    then for each TASK sends what `answer(rid)` makes: (kind, body) frames.
    Returns (server, its WorkerInfo, the TASKs it got)."""
    got = []

    async def serve(reader, writer):
        inbound, outbound = await wool._authenticate_caller(reader, writer, KEY)
        info = wool.WorkerInfo(uuid.uuid4().hex, "127.0.0.1", port, os.getpid(), wool.__version__)
        writer.writelines(wool.encode(wool.INFO, 0, info.to_json(), outbound))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size, kind, rid = wool.HEADER.unpack(await reader.readexactly(wool.HEADER.size))
                await reader.readexactly(size + wool.TAG)
                if kind == wool.TASK:
                    got.append(rid)
                    for frame in answer(rid):
                        writer.writelines(wool.encode(*frame[:1], rid, frame[1], outbound))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}", got


@pytest.mark.parametrize("answer", ["garbage", "refused after accepted"])
async def test_a_refusal_that_makes_no_sense_is_worker_lost_never_a_resend(answer):
    frames = {
        "garbage": [(wool.REFUSED, b"not a pickle")],
        "refused after accepted": [(wool.ACCEPTED, b""), (wool.REFUSED, b"")],
    }[answer]
    server, address, got = await fake_worker(lambda rid: frames)
    try:
        listed = wool.DnsDiscoveryService(address)
        async with wool.WorkerPool(discovery=listed, authkey=KEY, wait=5):
            with pytest.raises(wool.WorkerLost, match="REFUSED that makes no sense"):
                await identity(1)
        assert len(got) == 1  # sent once, never again
    finally:
        server.close()
