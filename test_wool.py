"""The specification of wool, in wool.py's order: errors and the public API,
frames, streams and handshake, the worker, pools, entry points.

Real worker processes, real sockets on 127.0.0.1, real shared memory. Every
test has a timeout (pyproject.toml); none sleeps to synchronise (one polls for 2 s
to show that something does not happen).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import shutil

import wool
from conftest import (
    HELLO, HERE, KEY, Session, Transport, alive, decode, frame, frames_taking_every_kind,
    in_flight, run_script,
    segment, until, wait_exit,
)  # fmt: skip


# -- Task functions (importable, so workers find them by reference) ------------


@wool.work
async def add(a: int, b: int = 0) -> int:
    """Add two numbers on a worker."""
    return a + b


@wool.work
async def pid() -> int:
    return os.getpid()


@wool.work
async def echo(x):
    return x


@wool.work
async def fibonacci(n: int) -> int:
    if n <= 1:
        return n
    return await fibonacci(n - 1) + await fibonacci(n - 2)


class Boom(Exception):
    pass


class Unpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = __import__("threading").Lock()


@wool.work
async def fail(kind: str):
    if kind == "boom":
        raise Boom("it went boom")
    if kind == "unpicklable":
        raise Unpicklable("holds a lock")
    raise ValueError(kind)


@wool.work
async def wait_cancelled(marker: str, started: str | None = None):
    if started:
        Path(started).touch()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        Path(marker).write_text("cancelled")
        raise


@wool.work
async def count(n: int, marker: str | None = None):
    try:
        for i in range(n):
            got = yield i
            if got is not None:
                yield f"got {got}"
    except Boom as e:
        yield f"caught {e}"
    finally:
        if marker:
            Path(marker).write_text("closed")


@wool.work
async def exists(path: str) -> bool:
    return Path(path).exists()


class Calculator:
    def __init__(self, base: int):
        self.base = base

    @wool.work
    async def plus(self, x: int) -> int:
        return self.base + x

    @classmethod
    @wool.work
    async def name(cls) -> str:
        return cls.__name__

    @staticmethod
    @wool.work
    async def double(x: int) -> int:
        return 2 * x


def make_multiplier(k: int):
    @wool.work
    async def multiply(x: int) -> int:
        return k * x

    return multiply


@pytest.fixture
async def pool():
    async with wool.WorkerPool(size=2) as pool:
        yield pool


# -- The public API --------------------------------------------------------------


def test_work_keeps_name_docstring_and_signature():
    assert add.__name__ == "add"
    assert add.__doc__ == "Add two numbers on a worker."
    assert str(inspect.signature(add)) == "(a: 'int', b: 'int' = 0) -> 'int'"
    assert inspect.iscoroutinefunction(add)
    assert wool.routine is wool.work


def test_work_refuses_what_is_not_async():
    with pytest.raises(TypeError, match="needs an `async def` function"):
        wool.work(lambda: 1)
    with pytest.raises(TypeError, match="put @wool.work below @classmethod"):
        wool.work(classmethod(add))


async def test_call_outside_a_pool_raises_at_once():
    with pytest.raises(
        wool.NoWorkersAvailable,
        match=r"add\(\) was called outside a WorkerPool; call it inside `async with wool.WorkerPool\(\):`",
    ):
        await add(1, 2)
    with pytest.raises(wool.NoWorkersAvailable, match="outside a WorkerPool"):
        async for _ in count(1):
            pass


def test_tags_must_be_strings_where_they_are_given():
    with pytest.raises(
        TypeError,
        match=r"tags must be strings, not 4 \(for a number "
        r"of workers, write size=N\)",
    ):
        wool.WorkerPool(4)
    with pytest.raises(TypeError, match="Worker tags must be strings, not 1"):
        wool.Worker("gpu", 1)


def test_vendored_inside_a_package_runs_nested_calls_on_spawned_workers(tmp_path):
    vendor = tmp_path / "pkg" / "_vendor"
    vendor.mkdir(parents=True)
    for name in ("pkg/__init__.py", "pkg/_vendor/__init__.py"):
        (tmp_path / name).touch()
    for module in ("wool.py", "wool_discovery.py"):
        (vendor / module).write_text((HERE / module).read_text())
    (tmp_path / "pkg" / "tasks.py").write_text(
        textwrap.dedent("""
        from pkg._vendor import wool

        @wool.work
        async def fibonacci(n):
            return n if n <= 1 else await fibonacci(n - 1) + await fibonacci(n - 2)
    """)
    )
    result = run_script(
        """
        import asyncio, sys
        sys.modules["wool"] = sys.modules["wool_discovery"] = None  # no other copy
        from pkg._vendor import wool
        from pkg.tasks import fibonacci

        async def main():
            async with wool.WorkerPool(size=2):
                print(await fibonacci(10), wool.__name__, wool.WorkerInfo.__module__)
        asyncio.run(main())
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "55 pkg._vendor.wool pkg._vendor.wool_discovery\n"


def test_pool_arguments_are_checked():
    with pytest.raises(ValueError, match="size must be a whole number"):
        wool.WorkerPool(size=-1)
    with pytest.raises(TypeError, match="authkey must be bytes"):
        wool.WorkerPool(size=1, authkey="secret")
    with pytest.raises(TypeError, match="not both"):
        wool.WorkerPool(size=1, spawn=2)
    with pytest.raises(ValueError, match="max_tasks_per_worker must be >= 1"):
        wool.WorkerPool(size=1, max_tasks_per_worker=0)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        wool.work(timeout=0)
    with pytest.raises(
        TypeError, match=r"interfaces is a list of addresses, like \['127.0.0.1'\]"
    ):
        wool.LanDiscoveryService(interfaces="127.0.0.1")


async def test_a_pool_cannot_be_entered_twice():
    async with wool.WorkerPool(size=1) as pool:
        with pytest.raises(RuntimeError, match="cannot be started twice"):
            await pool.__aenter__()


async def test_result_comes_back(pool):
    assert await add(2, b=3) == 5
    assert repr(pool) == "<WorkerPool ready 2/2>"


async def test_tasks_run_in_the_pools_worker_processes(pool):
    pids = set(await asyncio.gather(*(pid() for _ in range(8))))
    assert pids == {w.pid for w in pool.workers}
    assert len(pids) == 2 and os.getpid() not in pids


async def test_spawn_alias_and_tags_reach_spawned_workers():
    async with wool.WorkerPool("gpu", "fast", spawn=1) as pool:
        assert [w.tags for w in pool.workers] == [frozenset({"gpu", "fast"})]


async def test_exception_keeps_type_message_and_remote_traceback(pool):
    with pytest.raises(Boom, match="it went boom") as caught:
        await fail("boom")
    cause = caught.value.__cause__
    assert "Traceback" in str(cause) and 'raise Boom("it went boom")' in str(cause)


async def test_unpicklable_exception_arrives_as_remote_error(pool):
    with pytest.raises(wool.RemoteError, match="Unpicklable: holds a lock") as caught:
        await fail("unpicklable")
    assert caught.value.type_name == "test_wool.Unpicklable"
    assert "holds a lock" in caught.value.traceback


async def test_unpicklable_argument_raises_type_error_in_the_caller(pool):
    with pytest.raises(TypeError, match=r"cannot send echo\(\) and its arguments"):
        await echo(socket.socket())
    assert await echo(1) == 1  # nothing was lost


async def test_unpicklable_return_value_raises_type_error_from_the_worker(pool):
    with pytest.raises(
        TypeError, match=r"cannot send the value of return_socket\(\) back"
    ):
        await return_socket()
    assert await echo(1) == 1


@wool.work
async def return_socket():
    return socket.socket()


async def test_generator_streams_values_one_per_step(pool):
    assert [x async for x in count(4)] == [0, 1, 2, 3]
    assert isinstance(count(1), wool.collections.abc.AsyncGenerator)


async def test_generator_asend_athrow_aclose_reach_the_worker(pool, tmp_path):
    marker = tmp_path / "closed"
    gen = count(10, str(marker))
    assert await gen.__anext__() == 0
    assert await gen.asend("hi") == "got hi"
    assert await gen.athrow(Boom("thrown")) == "caught thrown"
    await gen.aclose()
    assert marker.read_text() == "closed"
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()


async def test_generator_left_early_runs_its_finally_on_the_worker(tmp_path):
    marker = tmp_path / "closed"
    async with wool.WorkerPool(size=1):
        async for i in count(100, str(marker)):
            if i == 2:
                break
        # The abandoned generator is closed (by asyncio's finalizer) there.
        while not await exists(str(marker)):
            pass


async def test_generator_exception_reaches_caller(pool):
    with pytest.raises(Boom):
        gen = count(3)
        await gen.__anext__()
        await gen.athrow(Boom)
        await gen.athrow(Boom("again"))  # the generator has finished
    assert await add(1) == 1


async def test_methods_classmethods_staticmethods(pool):
    assert await Calculator(10).plus(5) == 15
    assert await Calculator.name() == "Calculator"
    assert await Calculator.double(21) == 42


async def test_closures_travel_by_value_defined_once_per_connection():
    triple = make_multiplier(3)
    async with wool.WorkerPool(size=1) as pool:
        assert await asyncio.gather(*(triple(i) for i in range(3))) == [0, 3, 6]
        (conn,) = pool._roster.conns.values()
        assert len(conn.defined) == 1  # one DEFINE frame, then its number


async def test_accepted_comes_after_a_first_step_that_did_not_answer(worker):
    session = await Session.open(worker.info, b"secret")
    session.send(wool.HELLO, 0, HELLO)
    HELD["accepted"] = asyncio.Event()
    session.send(
        wool.TASK, 1, pickle.dumps(((__name__, "hold"), ("accepted",), {}, None, None))
    )
    session.send(
        wool.TASK, 2, pickle.dumps(((__name__, "add"), (1, 2), {}, None, None))
    )
    # The quick one's answer says it ran; the one still running says ACCEPTED.
    assert {(await session.read())[:2] for _ in range(2)} == {
        (wool.RESULT, 2), (wool.ACCEPTED, 1)
    }  # fmt: skip
    assert HELD["accepted"].is_set()
    # One alone says it too; and one whose TASK came in just ahead of the start
    # of a large frame, still being received as the task starts.
    held = pickle.dumps(((__name__, "hold"), ("accepted",), {}, None, None))
    session.send(wool.TASK, 3, held)
    assert (await session.read())[:2] == (wool.ACCEPTED, 3)
    task = frame(wool.TASK, 4, held, session.outbound)  # (sealed in sending order)
    large = frame(wool.DEFINE, 9, bytes(4 * wool.LARGE), session.outbound)
    session.writer.write(task + large[:100])
    assert (await session.read())[:2] == (wool.ACCEPTED, 4)
    session.writer.write(large[100:])
    quick = pickle.dumps(((__name__, "add"), (2, 2), {}, None, None))
    session.send(wool.TASK, 5, quick)
    assert (await session.read())[:2] == (wool.RESULT, 5)
    # And one that came in a read right behind a STATUS, whose answer went at
    # once: the flush that follows it was due before the task's first step.
    status = frame(wool.STATUS, 50, b"", session.outbound)
    session.writer.write(status + frame(wool.TASK, 6, held, session.outbound))
    assert (await session.read())[:2] == (wool.RESULT, 50)
    assert (await session.read())[:2] == (wool.ACCEPTED, 6)
    session.writer.close()


async def test_a_task_naming_an_undefined_function_fails_alone(worker):
    session = await Session.open(worker.info, b"secret")
    session.send(wool.HELLO, 0, HELLO)
    session.send(wool.TASK, 1, pickle.dumps((12345, (), {}, None, None)))
    kind, rid, data = await session.read()  # refused: it never ran
    assert (kind, rid) == (wool.REFUSED, 1)
    whole, error = pickle.loads(data)
    assert whole  # the function, not this call's arguments
    with pytest.raises(wool.ProtocolError, match="function 12345 was never defined"):
        raise wool._load_error(error)
    session.writer.close()


def test_functions_in_main_travel_by_value():
    result = run_script(
        """
        import asyncio, os, wool

        @wool.work
        async def where(x):
            return x * 2, os.getpid()

        @wool.work
        async def fib(n):
            return n if n <= 1 else await fib(n - 1) + await fib(n - 2)

        async def main():
            async with wool.WorkerPool(size=2):
                value, pid = await where(21)
                print(value, pid != os.getpid(), await fib(10))

        asyncio.run(main())
        """
    )
    assert result.stdout.split() == ["42", "True", "55"], result.stderr


async def test_nested_dispatch_fibonacci_on_two_workers():
    async with wool.WorkerPool(size=2):
        assert await fibonacci(12) == 144


async def test_ten_thousand_concurrent_calls_return_in_order(pool):
    results = await asyncio.gather(*(add(i, 1) for i in range(10_000)))
    assert results == [i + 1 for i in range(10_000)]


async def test_64_mb_argument_round_trips(pool):
    data = os.urandom(64 * 2**20)
    assert await echo(data) == data


async def test_cancelling_the_caller_cancels_the_task_on_the_worker(tmp_path):
    # One worker, one connection: frames are handled in the order they were
    # sent, so `exists` sees that the task started. A CANCEL takes effect at
    # the task's next step, which a task accepted right behind it may beat on
    # 3.12+ (it runs as it comes): so the marker is awaited, not asked for.
    marker, started = tmp_path / "marker", tmp_path / "started"
    async with wool.WorkerPool(size=1) as pool:
        call = asyncio.ensure_future(wait_cancelled(str(marker), str(started)))
        await in_flight(pool)
        assert await exists(str(started))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(marker.exists)  # the task saw CancelledError there
    assert marker.read_text() == "cancelled"


async def test_timeout_cancels_the_task_on_the_worker(tmp_path):
    marker = tmp_path / "marker"
    async with wool.WorkerPool(size=1):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await wait_cancelled(str(marker))
        await until(marker.exists)  # the task saw CancelledError there
    assert marker.read_text() == "cancelled"


class Recording(wool.RoundRobinLoadBalancer):
    def __init__(self):
        super().__init__()
        self.seen, self.selected = [], asyncio.Event()

    def select(self, workers, task):
        self.seen.append((dict(workers), task.fn.__name__))
        self.selected.set()
        return super().select(workers, task)


async def test_custom_load_balancer_sees_workers_and_in_flight_counts(tmp_path):
    balancer = Recording()
    async with wool.WorkerPool(size=2, loadbalancer=balancer) as pool:
        busy = asyncio.ensure_future(wait_cancelled(str(tmp_path / "m")))
        await balancer.selected.wait()  # `busy` is in flight
        assert await add(1, 2) == 3
        assert set(balancer.seen[1][0]) == set(pool.workers)
        busy.cancel()
    assert [name for _, name in balancer.seen] == ["wait_cancelled", "add"]
    assert sorted(balancer.seen[0][0].values()) == [0, 0]
    assert sorted(balancer.seen[1][0].values()) == [0, 1]


async def test_balancer_that_returns_a_stranger_gets_a_clear_error():
    class Bad:
        def select(self, workers, task):
            return "nobody"

    async with wool.WorkerPool(size=1, loadbalancer=Bad()):
        with pytest.raises(
            TypeError, match="returned 'nobody', which is not one of the workers"
        ):
            await add(1)


class OnlyUid:
    """A discovery filter: the one worker with this uid."""

    def __init__(self, uid: str):
        self.uid = uid

    def __call__(self, info: wool.WorkerInfo) -> bool:
        return info.uid == self.uid


HELD: dict[str, asyncio.Event] = {}  # for tasks on in-process workers


@wool.work
async def hold(name: str):
    HELD[name].set()
    await asyncio.Event().wait()


@wool.work
async def where_am_i() -> str:
    return wool.current_worker().uid


async def test_refused_task_goes_to_another_worker_and_balancer_is_asked_again():
    class PreferFull:
        def __init__(self):
            self.seen = []

        def select(self, workers, task):
            self.seen.append({w.uid for w in workers})
            return min(workers, key=lambda w: w.uid != full.uid)

    namespace, local = f"t{os.getpid()}f", wool.LocalDiscoveryService
    balancer, HELD["full"] = PreferFull(), asyncio.Event()
    try:
        async with (
            wool.Worker(max_tasks=1, discovery=local(namespace)) as full,
            wool.Worker(discovery=local(namespace)) as other,
            wool.WorkerPool(discovery=local(namespace, filter=OnlyUid(full.uid))),
        ):
            held = asyncio.ensure_future(hold("full"))  # another caller's task
            await HELD["full"].wait()
            async with wool.WorkerPool(
                discovery=local(namespace), loadbalancer=balancer
            ) as pool:
                await pool.wait_for_workers(2)
                assert await where_am_i() == other.uid  # `full` refused it
            held.cancel()
    finally:
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)
    assert balancer.seen == [{full.uid, other.uid}, {other.uid}]  # asked again


async def test_leaving_the_pool_leaves_no_process_or_shared_memory():
    async with wool.WorkerPool(size=2) as pool:
        pids = [w.pid for w in pool.workers]
        assert segment(pool).exists()
    assert not any(alive(p) for p in pids)
    assert not segment(pool).exists()
    assert repr(pool) == "<WorkerPool stopped 0/2>"


async def test_leaving_the_pool_by_exception_cleans_up_too():
    with pytest.raises(Boom):
        async with wool.WorkerPool(size=2) as pool:
            pids = [w.pid for w in pool.workers]
            raise Boom()
    assert not any(alive(p) for p in pids)
    assert not segment(pool).exists()


def test_a_killed_caller_whose_worker_is_blocked_leaves_no_namespace_either():
    result = run_script(
        """
        import asyncio, os, time, wool

        @wool.work
        async def block(marker):
            open(marker, "w").close()
            time.sleep(60)  # the worker's event loop: stuck

        async def main():
            async with wool.WorkerPool(size=1, grace=0.2) as pool:
                print(pool._spawner.service.path, pool.workers[0].pid, flush=True)
                marker = pool._spawner.service.path + ".blocked"
                call = asyncio.ensure_future(block(marker))
                while not os.path.exists(marker):  # until it blocks
                    await asyncio.sleep(0.01)
                os.unlink(marker)
                os.kill(os.getpid(), 9)
        asyncio.run(main())
        """
    )
    path, pid = result.stdout.split()[:2]
    wait_exit(int(pid))  # its lifeline ends it after grace + 2 s
    assert not Path(path).exists()


def test_killed_caller_leaves_no_worker_behind():
    result = run_script(
        """
        import asyncio, os, wool
        async def main():
            async with wool.WorkerPool(size=2) as pool:
                print(pool._spawner.service.path, *[w.pid for w in pool.workers], flush=True)
                os.kill(os.getpid(), 9)
        asyncio.run(main())
        """
    )
    path, *pids = result.stdout.split()
    assert len(pids) == 2
    for p in pids:  # they see their stdin close and stop
        wait_exit(int(p))
    assert not Path(path).exists()  # and the last one out removed the namespace


# -- Frames ------------------------------------------------------------------------


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def sealed(*frames) -> bytes:
    """(kind, rid, body) frames as one sender (session key KEY) writes them."""
    seal = wool._Seal(KEY)
    return b"".join(frame(kind, rid, body, seal) for kind, rid, body in frames)


def test_frame_split_across_reads_decodes_once():
    body = pickle.dumps({"x": list(range(100))})
    data = sealed((wool.TASK, 7, body), (wool.CANCEL, 8, b""))
    frames, error, _ = decode(bytewise(data))
    assert frames == [(wool.TASK, 7, body), (wool.CANCEL, 8, b"")] and error is None


def test_large_body_is_received_into_its_own_buffer():
    body = os.urandom(wool.LARGE * 3 + 5)
    data = sealed((wool.RESULT, 1, body), (wool.STOP, 2, b""))
    for size in (1000, 4096, len(data)):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        frames, error, _ = decode(chunks)
        assert frames == [(wool.RESULT, 1, body), (wool.STOP, 2, b"")] and error is None
        assert type(frames[0][2]) is bytearray  # the buffer the kernel filled


@pytest.mark.parametrize("size", [10, wool.LARGE * 2])
def test_altered_frames_fail_their_mac_check_before_delivery(size):
    one, two = (wool.RESULT, 1, b"x" * size), (wool.STOP, 2, b"")
    data = sealed(one, two)
    flipped = bytearray(data)
    flipped[wool.HEADER.size + size // 2] ^= 1  # one bit of the first body
    replayed = sealed(one) * 2  # the same frame again
    swapped = data[len(sealed(one)) :] + data[: len(sealed(one))]  # reordered
    forged = frame(*one, seal=wool._Seal(b"another key"))
    for bad in (flipped, replayed, swapped, forged):
        frames, error, transport = decode([bytes(bad)])
        assert str(error).startswith("a frame failed its MAC check")
        assert frames[:1] in ([], [one]) and transport.aborted
        assert len(frames) <= (bad is replayed)


def test_eof_inside_header_or_body_is_a_protocol_error():
    data = sealed((wool.RESULT, 1, b"x" * 10))
    _, error, _ = decode([data[:5]])
    assert str(error) == "stream ended inside a frame header"
    _, error, _ = decode([data[:-3]])
    assert str(error) == "stream ended inside a frame of 10 bytes"


def test_oversized_frame_is_refused_before_its_body_is_read():
    header = wool.HEADER.pack(80 * 2**20, wool.TASK, 1)
    frames, error, transport = decode([header], max_frame=64 * 2**20)
    assert str(error) == "frame of 80 MiB is over max_frame (64 MiB)"
    assert frames == [] and transport.aborted


def test_held_frames_wait_for_release():
    frames, lost, transport = [], [], Transport()
    protocol = frames_taking_every_kind(transport, 1024, frames.append, lost.append)
    data = sealed((wool.CANCEL, 1, b""), (wool.CANCEL, 2, b""))
    protocol.hold()
    protocol.get_buffer(-1)[: len(data)] = data
    protocol.buffer_updated(len(data))
    assert frames == [] and transport.paused
    protocol.release()
    assert [f[1] for f in frames] == [1, 2] and not transport.paused


async def test_a_lone_frame_leaves_at_once_and_a_turns_others_at_its_end():
    """A frame sent while its connection has nothing waiting goes to the
    socket as it is sent (a lone call's TASK, a quick task's RESULT: no wait
    for the loop's turn); the others sent in that turn leave together once
    the handles it scheduled have run, in the order they were sealed (urgent
    ones ahead of those waiting)."""
    mine, theirs = socket.socketpair()
    theirs.setblocking(False)
    _, writer = await asyncio.open_connection(sock=mine)
    out = wool._Outbox(writer.transport, wool._Seal(KEY))
    out.send(wool.TASK, 1, b"first")
    first = theirs.recv(4096)
    assert first == frame(wool.TASK, 1, b"first", wool._Seal(KEY))
    for rid in range(2, 102):
        out.send(wool.TASK, rid, pickle.dumps(rid))
    out.send(wool.CANCEL, 102)
    out.send(wool.TAKEN, 7)  # urgent: ahead of those waiting
    with pytest.raises(BlockingIOError):
        theirs.recv(4096)  # the turn has not ended
    rest = [(wool.TASK, r, pickle.dumps(r)) for r in range(2, 102)]
    rest = [(wool.TAKEN, 7, b""), *rest, (wool.CANCEL, 102, b"")]
    got, size = bytearray(first), len(first) + len(sealed(*rest))
    while len(got) < size:
        got += await asyncio.get_running_loop().sock_recv(theirs, 2**16)
    frames, error, _ = decode([bytes(got)])  # (in order: each tag checks its number)
    assert error is None and frames == [(wool.TASK, 1, b"first"), *rest]
    writer.close()
    theirs.close()


def test_result_over_max_frame_is_a_clear_error():
    with pytest.raises(
        TypeError, match=r"over max_frame \(0 MiB\); pass a file path instead"
    ):
        wool._dump_value(b"x" * 2**20, None, add, 1000)


# -- The worker: handshake and hostile input ------------------------------------


@pytest.fixture
async def worker():
    async with wool.Worker(authkey=b"secret") as worker:
        yield worker


async def test_connection_without_the_key_never_unpickles(worker, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    reader, writer = await asyncio.open_connection(worker.info.host, worker.info.port)
    await reader.readexactly(len(wool.MAGIC) + wool.NONCE)
    payload = pickle.dumps(Evil())
    writer.write(frame(wool.TASK, 1, payload) * 10)  # skips the handshake
    assert await reader.read() == b""  # closed: it is not a wool caller
    assert not marker.exists()


async def test_wrong_key_is_refused_with_a_clear_error(worker):
    with pytest.raises(wool.AuthenticationError, match="refused the key"):
        source = wool._Source(None, b"wrong", None)
        await wool._Connection.open(worker.info, source, wool._Roster(None, 0, None))


async def test_pool_with_the_wrong_key_raises_authentication_error(tmp_path):
    namespace = f"t{os.getpid()}k"
    service = wool.LocalDiscoveryService(namespace)
    try:
        async with wool.Worker(authkey=b"right", discovery=service):
            async with wool.WorkerPool(
                discovery=wool.LocalDiscoveryService(namespace),
                authkey=b"wrong",
                wait=5,
            ):
                with pytest.raises(
                    wool.AuthenticationError, match="every worker refused this pool"
                ):
                    await add(1)
    finally:
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


async def test_worker_lifecycle_shows_in_its_repr_and_starts_once():
    worker = wool.Worker()
    assert repr(worker) == "<Worker new 127.0.0.1:0>"
    async with worker:
        assert repr(worker) == f"<Worker ready {worker.info.address}>"
        with pytest.raises(RuntimeError, match="cannot be started twice"):
            await worker.start()
    assert repr(worker).startswith("<Worker stopped ")


async def test_wait_for_workers_returns_them_or_says_how_many_came():
    async with wool.WorkerPool(size=2) as pool:
        assert set(await pool.wait_for_workers(2)) == set(pool.workers)
        with pytest.raises(
            wool.NoWorkersAvailable,
            match=r"^2 of 3 workers connected within 0.1 s; waited on "
            r"LocalDiscoveryService\('p",
        ):
            await pool.wait_for_workers(3, timeout=0.1)
    with pytest.raises(wool.NoWorkersAvailable, match="is not running"):
        await pool.wait_for_workers(1)


async def test_worker_refuses_public_address_without_key():
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without a key"):
        await wool.Worker(host="0.0.0.0").start()


@wool.work
async def say_until_cancelled():
    print("started", flush=True)
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        print("cancelled", flush=True)
        raise


def test_caller_killed_mid_task_has_its_task_cancelled():
    """A durable worker in a subprocess; a caller that is SIGKILLed mid-task."""
    namespace = f"t{os.getpid()}c"
    worker = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import asyncio, wool
            async def main():
                async with wool.Worker(discovery=wool.LocalDiscoveryService({namespace!r})) as w:
                    print("ready", flush=True)
                    await w.stopped()
            asyncio.run(main())
        """)],
        cwd=HERE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout.readline() == "ready\n"
        caller = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import asyncio, wool, test_wool
                async def main():
                    async with wool.WorkerPool(discovery=wool.LocalDiscoveryService({namespace!r})):
                        await test_wool.say_until_cancelled()
                asyncio.run(main())
            """)],
            cwd=HERE,
        )  # fmt: skip
        assert worker.stdout.readline() == "started\n"  # printed by the task
        caller.kill()
        caller.wait()
        assert worker.stdout.readline() == "cancelled\n"  # the connection dropped
        assert asyncio.run(add_in(namespace)) == 3  # and it serves other callers
    finally:
        worker.kill()
        worker.wait()
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


async def add_in(namespace: str) -> int:
    async with wool.WorkerPool(discovery=wool.LocalDiscoveryService(namespace)):
        return await add(1, 2)


# -- Local discovery -------------------------------------------------------------


async def test_local_discovery_sees_added_updated_dropped_and_stale():
    namespace = f"t{os.getpid()}d"
    service = wool.LocalDiscoveryService(namespace)
    info = wool.WorkerInfo("u1", "127.0.0.1", 1, os.getpid(), "0", {"a"})
    ghost = wool.WorkerInfo("u2", "127.0.0.1", 2, 2**22 + 12345, "0")  # no such pid
    try:
        await service.publish(wool.DiscoveryEvent("worker-added", info))
        await service.publish(wool.DiscoveryEvent("worker-added", ghost))
        events = wool.LocalDiscoveryService(namespace).subscribe()
        assert await anext(events) == wool.DiscoveryEvent("worker-added", info)
        updated = wool.WorkerInfo("u1", "127.0.0.1", 1, os.getpid(), "0", {"b"})
        await service.publish(wool.DiscoveryEvent("worker-updated", updated))
        assert await anext(events) == wool.DiscoveryEvent("worker-updated", updated)
        await service.publish(wool.DiscoveryEvent("worker-dropped", updated))
        assert await anext(events) == wool.DiscoveryEvent("worker-dropped", updated)
        await events.aclose()
    finally:
        await service.close()
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


def test_a_process_that_publishes_and_leaves_never_removes_the_namespace():
    namespace = f"t{os.getpid()}r"
    try:
        result = run_script(
            f"""
            import asyncio, os, wool_discovery as d
            async def main():
                s = d.LocalDiscoveryService({namespace!r})
                info = d.WorkerInfo("x", "127.0.0.1", 1, os.getppid(), "0")
                await s.publish(d.DiscoveryEvent("worker-added", info))
            asyncio.run(main())
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        (record,) = wool.LocalDiscoveryService(namespace).records().values()
        assert record.uid == "x"  # outlives its publisher (its pid: ours)
        assert os.stat(f"/dev/shm/wool-{namespace}").st_mode & 0o777 == 0o700
    finally:
        wool.LocalDiscoveryService(namespace).remove()


async def test_bad_namespace_and_oversized_record_are_refused():
    with pytest.raises(ValueError, match="namespace 'a/b' must be"):
        wool.LocalDiscoveryService("a/b")
    service = wool.LocalDiscoveryService(f"t{os.urandom(5).hex()}")
    huge = wool.WorkerInfo("x", "127.0.0.1", 1, os.getpid(), "0", {"t" * 2**17})
    try:
        with pytest.raises(
            ValueError, match=r"a worker record of \d+ bytes is over 65536"
        ):
            await service.publish(wool.DiscoveryEvent("worker-added", huge))
        assert service.records() == {}
    finally:
        service.remove()


# -- Entry points ------------------------------------------------------------------


def test_wool_demo_runs_the_quick_start():
    result = subprocess.run(
        [sys.executable, "-m", "wool", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE,
    )
    assert result.returncode == 0, result.stderr
    assert "fibonacci(12) = 144" in result.stdout
    assert "countdown yielded 1" in result.stdout
    assert "caught ValueError" in result.stdout


@wool.work
async def loop_kind() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_works_on_uvloop_and_its_spawned_workers_do_too():
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with wool.WorkerPool(size=2):
            return await add(1, 2), [x async for x in count(3)], await fibonacci(8)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == (3, [0, 1, 2], 21)
        assert runner.run(_in_pool(loop_kind)) == "uvloop"
    assert asyncio.run(_in_pool(loop_kind)) == "asyncio"


async def _in_pool(fn):
    async with wool.WorkerPool(size=1):
        return await fn()


def test_the_modules_type_check():
    """Projects that vendor the two files often run mypy over them."""
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "wool.py", "wool_discovery.py"],
        capture_output=True, text=True, timeout=120, cwd=HERE,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout


USER_CODE = """
import wool

@wool.work
async def double(x: int) -> int:
    return 2 * x

def square(x: int) -> str:
    return str(x * x)

async def main() -> None:
    async with wool.WorkerPool(size=1) as pool:
        reveal_type(await double(2))
        async for a in pool.map(double, [1, 2]):
            reveal_type(a)
        async for b in pool.map(square, [1, 2]):
            reveal_type(b)
    with wool.Executor(1) as executor:
        reveal_type(executor.submit(double, 2))
        reveal_type(executor.submit(square, 2))
        reveal_type(list(executor.map(square, [1])))
        executor.submit(square, "2")  # an error mypy finds
"""


def test_mypy_users_see_the_types_of_calls_maps_and_futures(tmp_path):
    """As mypy sees wool vendored, or installed with follow_untyped_imports."""
    pytest.importorskip("mypy")
    (tmp_path / "use.py").write_text(USER_CODE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", str(tmp_path / "use.py")],
        capture_output=True, text=True, timeout=120, cwd=HERE,
        env={**os.environ, "MYPYPATH": str(HERE)},
    )  # fmt: skip
    revealed = [
        line.split('"')[1] for line in result.stdout.splitlines() if "Revealed" in line
    ]
    assert revealed == [
        "int", "int", "str", "concurrent.futures._base.Future[int]",
        "concurrent.futures._base.Future[str]", "list[str]",
    ], result.stdout  # fmt: skip
    assert 'No overload variant of "submit"' in result.stdout


async def test_a_namespace_with_odd_entries_lists_the_good_records_and_clears_the_rest():
    namespace = f"t{os.urandom(5).hex()}"
    service = wool.LocalDiscoveryService(namespace)
    good = wool.WorkerInfo("good", "127.0.0.1", 1, os.getpid(), "0")
    await service.publish(wool.DiscoveryEvent("worker-added", good))
    path = Path(service.path)
    try:
        (path / "a-directory").mkdir()
        os.mkfifo(path / "a-fifo")  # opening it would block the event loop
        (path / "a-link").symlink_to(path / good.uid.encode().hex())
        fields = good.to_json().decode()
        for name, record in {
            "pid-as-text": fields.replace(f'"pid":{os.getpid()}', '"pid":"abc"'),
            "pid-zero": fields.replace(f'"pid":{os.getpid()}', '"pid":0'),
            "pid-huge": fields.replace(f'"pid":{os.getpid()}', f'"pid":{2**80}'),
            "uid-a-list": fields.replace('"uid":"good"', '"uid":["x"]'),
            ".99999999.dead-writer": fields,  # a writer that died mid-write
        }.items():
            (path / name).write_text(record)
        async with asyncio.timeout(10):
            events = service.subscribe()
            assert await anext(events) == wool.DiscoveryEvent("worker-added", good)
            await events.aclose()
        assert os.listdir(path) == [good.uid.encode().hex()]  # the rest cleared
    finally:
        service.remove()
