"""Large data: out-of-band buffers (pickle protocol 5) through real workers.

Correctness, not speed (bench/bench.py measures that): arrays of many kinds
round-trip equal and writable, in arguments, results, exceptions and
generator steps, both through the socket and through shared files (memfd,
between processes on one machine); a message over max_frame is refused
before it is sent; a frame whose buffer lengths lie is refused like any bad
frame; shared files are closed once taken, or when the peer dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import mmap
import os
import pickle
import signal
import sys
import time
import uuid
import weakref

import pytest

import wool
from conftest import HELLO, KEY, Session, decode, frame, until

np = pytest.importorskip("numpy")


@wool.work
async def echo(x):
    return x


@wool.work
async def describe(x) -> tuple:
    """What the worker received: type, and for arrays, whether it is writable."""
    flags = getattr(x, "flags", None)
    return type(x).__name__, flags.writeable if flags is not None else None


class Carrier(Exception):
    def __init__(self, array):
        super().__init__("carries an array")
        self.array = array


@wool.work
async def fail_with(array):
    raise Carrier(array)


@wool.work
async def chunks(array, n: int):
    for part in np.array_split(array, n):
        reply = yield part
        if reply is not None:
            yield reply * 2


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    big = rng.random((512, 300))  # 1.2 MB, C order
    return {
        "float64 C": big,
        "float64 Fortran": np.asfortranarray(big),
        "non-contiguous slice": big[::3, ::2],
        "int8 3-d": rng.integers(-128, 127, (64, 64, 64), dtype=np.int8),
        "zero-length": np.empty((0, 7)),
        "structured": np.array(
            [(i, i * 0.5, b"x" * 8) for i in range(20_000)],
            dtype=[("id", "i4"), ("value", "f8"), ("tag", "S8")],
        ),
        "small": np.arange(10),
    }


@pytest.fixture(params=["shared", "socket"])
async def pool(request, monkeypatch):
    """A pool of one spawned worker. Its large buffers go by shared files
    (the default on one machine) or, with WOOL_SHARE=0, through the socket."""
    with monkeypatch.context() as env:
        if request.param == "socket":
            env.setenv("WOOL_SHARE", "0")
        wool._machine.cache_clear()
        async with wool.WorkerPool(size=1) as pool:
            pool.path = request.param
            yield pool
    wool._machine.cache_clear()


def no_more(before: set[str]) -> bool:
    """Whether the shared files open are among those open `before`."""
    gc.collect()  # arrays in reference cycles
    return shared_files() <= before


def shared_files() -> set[str]:
    """The wool shared files (memfds) this process holds open, mapped too."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if (link := os.readlink(f"/proc/self/fd/{fd}")).startswith("/memfd:wool."):
                found.add(f"{fd} {link}")
    return found


async def test_arrays_round_trip_equal_and_writable(pool, arrays):
    for name, array in arrays.items():
        back = await echo(array)
        assert back.dtype == array.dtype and back.shape == array.shape, name
        assert np.array_equal(back, array), name
        assert back.flags.writeable, name
        back[...] = back  # writable in place, no copy needed
        assert await describe(array) == ("ndarray", True), name


async def test_large_buffers_take_the_path_asked_for_and_leave_no_file_open(
    pool, arrays
):
    before = shared_files()
    back = await echo(arrays["float64 C"])
    assert np.array_equal(back, arrays["float64 C"])
    memory = back
    while isinstance(memory, np.ndarray):
        memory = memory.base
    mapped = type(memoryview(memory).obj) is mmap.mmap  # a view of the file
    assert mapped == (pool.path == "shared")
    del memory
    del back
    # The reply's mapping goes with the array (once the event loop lets go of
    # the reply's future); the file we sent, once the worker said TAKEN, is
    # kept for the next message, which is written into it: one file.
    (conn,) = pool._roster.conns.values()
    kept = None
    for _ in range(2):
        await until(lambda: not conn.out.files)  # TAKEN
        spare = {f"{fd} /memfd:wool.{s} (deleted)" for s, fd in conn.out.spare}
        await until(lambda: no_more(before | spare))  # the reply's mapping went too
        assert len(spare) == (pool.path == "shared") and kept in (None, spare)
        kept = spare  # the next echo's message goes into the same file
        again = await echo(arrays["float64 C"])
        del again


@pytest.mark.skipif(
    sys.version_info >= (3, 13), reason="3.13 maps without a descriptor"
)
async def test_short_of_descriptors_a_receiver_copies_instead_of_mapping(
    arrays, monkeypatch
):
    monkeypatch.setattr(wool, "_mapped", range(10**9))  # past any descriptor limit
    async with wool.WorkerPool(size=1) as pool:
        await pool.wait_for_workers(1, timeout=10)
        (conn,) = pool._roster.conns.values()
        assert conn.out.peer  # the reply comes in a shared file...
        back = await echo(arrays["float64 C"])
    assert np.array_equal(back, arrays["float64 C"]) and back.flags.writeable
    memory = back
    while isinstance(memory, np.ndarray):
        memory = memory.base
    copy = memoryview(memory).obj  # ... copied out of it: just the buffer
    assert type(copy) is bytearray and len(copy) == back.nbytes


async def test_a_killed_worker_leaves_no_shared_file_open(arrays):
    before = shared_files()
    async with wool.WorkerPool(size=1) as pool:
        await pool.wait_for_workers(1, timeout=10)
        conn = next(iter(pool._roster.conns.values()))
        os.kill(conn.info.pid, signal.SIGSTOP)  # it will never say TAKEN
        call = asyncio.ensure_future(echo(arrays["float64 C"]))
        await until(lambda: conn.out.files)  # the file is made and its frame sent
        assert shared_files() > before
        os.kill(conn.info.pid, signal.SIGKILL)
        with pytest.raises(wool.WorkerLost):
            await call
        assert no_more(before)


async def test_shared_files_spoken_by_hand_are_passed_on_then_taken():
    """A caller that says it shares the machine (HELLO's rid: its pid) sends
    a TASK whose buffer is in a shared file: the worker maps it and, as it
    sends the unwritten array back, passes that same file on (no copy),
    holding its mapping, and so our file, until our TAKEN of its reply; then
    it says TAKEN of ours (with our TAKEN's "may be mapped still", passed on)
    and keeps nothing (the file was never its own)."""
    array = np.arange(2**18, dtype=float)  # 2 MiB
    async with wool.Worker(authkey=KEY) as worker:
        session = await Session.open(worker.info, KEY)
        session.send(wool.HELLO, os.getpid(), HELLO)
        task = wool._pickle(((__name__, "echo"), (array,), {}, None, None), oob=True)
        fd, serial = wool._share(task.buffers)
        body = wool.FILE.pack(fd, serial) + task.wire()[0]
        session.send(wool.TASK | wool.BUFFERS | wool.SHARED, 1, body)
        kind, rid, reply = await session.read()
        assert (kind, rid) == (wool.RESULT | wool.BUFFERS | wool.SHARED, 1)
        assert wool.FILE.unpack_from(reply)[1] == serial  # our own file, passed on
        value, _ = wool._loads(wool._Parts.read(reply, wool.MAX_FRAME, worker.info.pid))
        assert np.array_equal(value, array) and value.flags.writeable
        (peer,) = worker._peers
        assert list(peer.out.files) == list(peer.out.held) == [serial]
        session.send(wool.STATUS, 2)  # answered at once: no TAKEN went before it
        assert (await session.read())[:2] == (wool.RESULT, 2)
        session.send(wool.TAKEN, serial, b"!")  # "it may be mapped still": and
        assert await session.read() == (wool.TAKEN, serial, b"!")  # so it says on
        assert not peer.out.files and not peer.out.held and not peer.out.spare
        wool._unsafe.discard(serial)  # (this process is the worker's too)
        os.close(fd)
        session.writer.close()


KEPT: dict = {}  # (on a worker) arrays tasks keep


@wool.work
async def along(x, n: int):
    """Hand `x` on through n more tasks (nested), then back."""
    return x if n == 0 else await along(x, n - 1)


@wool.work
async def keep(x, name: str, then: int = 0):
    """Keep `x` here under `name`, handing it on through `then` tasks first."""
    KEPT[name] = await along(x, then) if then else x
    return x


@wool.work
async def kept(name: str, fill: float | None = None) -> float:
    """The sum of the array kept as `name`; after filling it, if asked (and
    then letting it go)."""
    if fill is None:
        return float(KEPT[name].sum())
    KEPT[name][:] = fill
    return float(KEPT.pop(name).sum())


@wool.work
async def write_one(x, at: int, n: int):
    """`x` with one element written, handed on through n tasks."""
    x[at] = -1
    return await along(x, n)


def file_of(array) -> int:
    """The serial of the shared file whose mapping `array` views (/proc/self/maps)."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            if start <= address < end:
                return int(line.split("/memfd:wool.")[1].split()[0])
    raise AssertionError("not a mapping of a shared file")


async def test_an_unwritten_array_handed_along_tasks_travels_in_its_first_file(pool):
    """Through three tasks and back, the array the caller gets views the
    file the caller wrote: each task passed it on, none copied it."""
    array = np.random.default_rng(1).random(2**18)  # 2 MiB
    back = await along(array, 2)
    assert np.array_equal(back, array) and back.flags.writeable
    if pool.path == "shared":
        assert file_of(back) >> 32 == os.getpid()  # (a serial holds its maker's pid)


async def test_an_array_written_before_it_is_handed_on_goes_on_as_written(pool):
    """One element written (one page copied, the file's other pages still
    mapped) is enough for the array to go on in a copy, with the write."""
    array = np.random.default_rng(2).random(2**18)
    for at in (0, 2**17, 2**18 - 1):
        expected = array.copy()
        expected[at] = -1
        assert np.array_equal(await write_one(array, at, 2), expected), at
    assert np.array_equal(array, np.random.default_rng(2).random(2**18))


async def test_arrays_received_are_each_receivers_own(pool):
    """The caller's writes to what it got back do not reach the task that
    kept the array, nor the task's writes what the caller holds."""
    array = np.arange(2**18, dtype=float)
    back = await keep(array, "isolated")
    back[:] = 7  # the caller's write
    assert await kept("isolated") == array.sum()
    assert await kept("isolated", fill=3) == 3 * array.size  # the task's write
    assert np.array_equal(back, np.full(array.size, 7.0))


async def test_a_file_passed_on_is_not_written_again_while_it_is_mapped(pool):
    """A task that hands the array on to one that keeps it: the caller's
    file stays the kept array's (the first task holds it until the last says
    TAKEN), so the caller's next messages go into other files."""
    array = np.arange(2**18, dtype=float)
    assert np.array_equal(await keep(array, "held", then=1), array)
    for i in range(4):  # each a message the size of the first, which may reuse it
        assert np.array_equal(await echo(array + i), array + i)
    assert await kept("held") == array.sum()
    assert await kept("held", fill=0) == 0


@wool.work
async def make(value: float):
    """A 2 MiB array made here: it goes back in a shared file of this process."""
    return np.full(2**18, value)


async def test_a_file_passed_to_a_connection_since_closed_is_never_written_again(
    pool,
):
    """The caller hands an array it got from its worker W (in W's file) to
    worker D, which keeps it; the caller's pool to D closes before D said
    TAKEN, D lives on. Once the caller lets go of its array, W closes that
    file instead of writing its next messages into it: D maps it still."""
    array = await make(1.0)
    namespace = f"t{uuid.uuid4().hex[:12]}"
    async with wool.Worker(discovery=wool.LocalDiscoveryService(namespace)):
        async with wool.WorkerPool(discovery=wool.LocalDiscoveryService(namespace)):
            await keep(array, "closed")  # D is in this process: KEPT is its own
        del array
        gc.collect()
        for value in (5.0, 6.0, 7.0):  # each as large: W's spare file, if any
            assert (await make(value))[0] == value
        assert KEPT.pop("closed").sum() == 2**18


@wool.work
async def fork_with(array) -> int:
    """Fork a child that holds `array` (as a fork-started multiprocessing
    child does) and, when told, answers its sum."""
    go, answer = os.pipe(), os.pipe()
    if (pid := os.fork()) == 0:
        os.read(go[0], 1)
        os.write(answer[1], str(float(array.sum())).encode())
        os._exit(0)
    KEPT["child"] = (pid, go[1], answer[0])
    return pid


@wool.work
async def forked_sum() -> float:
    pid, go, answer = KEPT.pop("child")
    os.write(go, b".")
    total = float(os.read(answer, 100))
    os.waitpid(pid, 0)
    return total


async def test_a_file_mapped_by_a_forked_child_is_never_written_again(pool):
    """A task forks while it maps a received array: once the task is done,
    the caller must not write its next messages into that file, which the
    child maps still."""
    array = np.ones(2**18)
    await fork_with(array)
    for value in (5.0, 6.0, 7.0):  # each as large: into the caller's spare file
        assert (await echo(np.full(2**18, value)))[0] == value
    assert await forked_sum() == 2**18


async def test_the_arguments_of_a_call_lost_are_let_go_without_the_collector():
    """A call that ends in WorkerLost holds nothing once the error is let go:
    no reference cycle keeps its arguments (or their shared files) alive
    until the garbage collector runs."""
    array = np.arange(2**18, dtype=float)
    gone = weakref.ref(array)
    async with wool.WorkerPool(size=1) as pool:
        await pool.wait_for_workers(1, timeout=10)
        (conn,) = pool._roster.conns.values()
        os.kill(conn.info.pid, signal.SIGSTOP)  # the task is sent, never answered
        gc.disable()
        try:
            call = asyncio.ensure_future(echo(array))
            await until(lambda: conn.out.files)  # its file made and its frame sent
            os.kill(conn.info.pid, signal.SIGKILL)
            try:
                await call
            except wool.WorkerLost:
                lost = True
            del call
            del array
            await asyncio.sleep(0)  # (the loop lets go of its last handle's reply)
            assert lost and gone() is None
        finally:
            gc.enable()


async def test_a_receive_buffer_is_used_again_only_once_nothing_views_it(pool):
    """A process receives a large body into the memory of the last one of its
    size when nothing views that any more: arrays still alive keep theirs."""
    a = np.arange(2**20, dtype=float)  # 8 MiB
    first, second = await echo(a), await echo(a + 1)
    del second  # its memory is free for the next
    third = await echo(a + 2)
    assert np.array_equal(first, a) and np.array_equal(third, a + 2)
    third[:] = -1  # writable, and no one else's
    assert np.array_equal(first, a) and np.array_equal(await echo(a + 3), a + 3)


@wool.work
async def occupy_threads(seconds: float):
    """Fill the worker's default executor with blocking calls, as sync tasks do."""
    loop = asyncio.get_running_loop()
    for _ in range(40):  # more than it has threads
        loop.run_in_executor(None, time.sleep, seconds)


async def test_large_values_are_not_held_up_by_a_busy_default_executor(pool, arrays):
    await occupy_threads(3)
    async with asyncio.timeout(1.5):  # its threads are asleep for 3 s
        assert np.array_equal(await echo(arrays["float64 C"]), arrays["float64 C"])


async def test_bytes_bytearray_and_memoryview_round_trip(pool):
    data = bytes(range(256)) * 4096  # 1 MiB
    assert await echo(data) == data and type(await echo(data)) is bytes
    assert await echo(bytearray(data)) == bytearray(data)
    view = await echo(memoryview(data))
    assert type(view) is memoryview and view == memoryview(data)
    assert await echo(b"small") == b"small"


async def test_containers_of_many_buffers(pool, arrays):
    nested = {"arrays": list(arrays.values()), "more": [np.ones(100_000)] * 5}
    back = await echo(nested)
    for mine, theirs in zip(
        nested["arrays"] + nested["more"], back["arrays"] + back["more"]
    ):
        assert np.array_equal(mine, theirs)


async def test_an_exception_carrying_an_array_reaches_the_caller(pool, arrays):
    with pytest.raises(Carrier) as caught:
        await fail_with(arrays["float64 C"])
    assert np.array_equal(caught.value.array, arrays["float64 C"])


async def test_generator_steps_carry_buffers_both_ways(pool, arrays):
    big = arrays["float64 C"]
    steps = chunks(big, 3)
    first = await anext(steps)
    assert np.array_equal(first, np.array_split(big, 3)[0])
    doubled = await steps.asend(big)  # a buffer sent into the generator
    assert np.array_equal(doubled, big * 2) and doubled.flags.writeable
    rest = [part async for part in steps]
    assert np.array_equal(np.concatenate([first, *rest]), big)


async def test_a_message_over_max_frame_through_its_buffers_is_refused():
    async with wool.WorkerPool(size=1, max_frame=2**20):
        with pytest.raises(
            TypeError, match=r"echo\(\) and its arguments .* over max_frame \(1 MiB\)"
        ):
            await echo(np.zeros(2**20 // 8 + 1))  # its buffer alone is over


def sealed_buffers_frame(table: bytes, body: bytes) -> bytes:
    """A TASK frame flagged as carrying buffers, with the given table."""
    return frame(wool.TASK | wool.BUFFERS, 1, table + body, wool._Seal(KEY))


@pytest.mark.parametrize(
    "table, why",
    [
        (b"\x00\x00", "a frame's buffer table is cut short"),
        (
            b"\x00\x00\x00\x02" + (2**40).to_bytes(8, "big") + bytes(8),
            "2 buffers are longer",
        ),
    ],
)
def test_a_frame_whose_buffer_lengths_lie_is_refused(table, why):
    body = pickle.dumps("x") + bytes(wool.LARGE)
    frames, error, transport = decode([sealed_buffers_frame(table, body)])
    assert why in str(error) and frames == [] and transport.aborted


def test_only_value_frames_may_carry_buffers():
    data = frame(wool.HELLO | wool.BUFFERS, 0, bytes(wool.LARGE + 8), wool._Seal(KEY))
    _, error, _ = decode([data])
    assert str(error) == "frame kind 1 cannot carry buffers"
