"""Sync code and batch work: wool.Executor (concurrent.futures), pool.map, and
a pool started without a block (notebooks). Real worker processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import gc
import os
import signal
import sys
import threading
import time
import tracemalloc
import uuid
import weakref
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import shutil

import wool
from conftest import until, wait_exit
from test_control import read_and_set, request_id
from test_wool import add, exists, fibonacci, wait_cancelled


def square(x):
    return x * x


async def async_square(x):
    return x * x


def thread_name(_):
    return threading.current_thread().name


def boom(x):
    raise ValueError(f"boom {x}")


async def nested_fibonacci(n):
    return await fibonacci(n)  # a @work call from a submitted function


def slow(seconds):
    time.sleep(seconds)
    return seconds


@pytest.fixture(scope="module")
def executor():
    with wool.Executor(size=2) as executor:
        yield executor


def test_sync_and_async_functions_decorated_or_not(executor):
    assert executor.submit(square, 7).result(timeout=10) == 49
    assert executor.submit(async_square, 8).result(timeout=10) == 64
    assert executor.submit(add, 2, b=3).result(timeout=10) == 5  # @wool.work
    worker_thread = executor.submit(thread_name, 0).result(timeout=10)
    assert worker_thread != "MainThread"  # sync code runs off the worker's loop


def test_map_keeps_order_and_takes_several_iterables(executor):
    assert list(executor.map(square, range(50))) == [x * x for x in range(50)]
    assert list(executor.map(pow, [2, 3], [10, 3], chunksize=4)) == [1024, 27]


def test_map_timeout_raises_timeout_error(executor):
    results = executor.map(slow, [0, 5], timeout=0.5)
    assert next(results) == 0
    with pytest.raises(TimeoutError):
        next(results)


def test_the_submitting_threads_context_variables_travel(executor):
    def submit_in_a_thread(value):
        request_id.set(value)
        seen = executor.submit(read_and_set, "set by the task").result()
        return seen, request_id.get()  # a task's changes stay with its future

    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        seen = list(threads.map(submit_in_a_thread, ["a", "b", "c", "d"]))
    assert seen == [(v, v) for v in ["a", "b", "c", "d"]]


def test_an_exception_carries_the_workers_traceback(executor):
    with pytest.raises(ValueError, match="boom 3") as caught:
        executor.submit(boom, 3).result(timeout=10)
    assert "in boom" in str(caught.value.__cause__)
    results = executor.map(boom, [1, 2])
    with pytest.raises(ValueError, match="boom 1"):
        next(results)  # raised when its result is reached


def test_nested_calls_from_a_submitted_function(executor):
    assert executor.submit(nested_fibonacci, 10).result(timeout=30) == 55


def test_a_function_that_cannot_travel_is_a_type_error_at_submit(executor):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="can be neither imported nor pickled"):
        executor.submit(lambda: lock)
    with pytest.raises(TypeError, match="is not a function that returns a value"):
        executor.submit(42)


async def test_run_in_executor(executor):
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(executor, square, 12) == 144


def test_cancel_reaches_the_task_on_the_worker(tmp_path):
    marker, started = tmp_path / "marker", tmp_path / "started"
    with wool.Executor(1, max_tasks_per_worker=2) as executor:  # room to look
        future = executor.submit(wait_cancelled, str(marker), str(started))
        while not executor.submit(exists, str(started)).result(timeout=10):
            pass  # the task runs on the worker
        assert future.cancel() and future.cancelled()
        while not executor.submit(exists, str(marker)).result(timeout=10):
            pass
    assert marker.read_text() == "cancelled"


def test_shutdown_cancels_pending_futures_leaves_running_ones_and_refuses_new_ones():
    executor = wool.Executor(1)  # one call at a time
    futures = [executor.submit(slow, 1) for _ in range(5)]
    deadline = time.monotonic() + 10
    while not futures[0].running():  # polled: a future has no event for it
        assert time.monotonic() < deadline, "the first call never started"
        time.sleep(0.005)
    assert not futures[0].cancel()  # a plain function cannot be stopped
    executor.shutdown(cancel_futures=True)
    assert futures[0].result() == 1
    assert all(f.cancelled() for f in futures[1:])
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(square, 1)


def test_constructor_arguments_are_the_standards_and_checked_with_its_messages():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            wool.Executor(max_workers=bad)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        wool.Executor(1, initializer=3)
    with pytest.raises(TypeError, match="give max_workers= or its alias size=, not both"):
        wool.Executor(2, size=3)
    with wool.Executor(max_workers=1, mp_context=None) as executor:
        assert executor.submit(square, 3).result(timeout=10) == 9
        with pytest.raises(ValueError, match=r"chunksize must be >= 1\."):
            executor.map(square, [1], chunksize=0)


# -- What the standard library's executor tests expect ----------------------------


def record_pid(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def fail(_):
    raise RuntimeError("no set-up here")


def test_the_initializer_runs_once_in_each_worker_before_its_calls(tmp_path):
    ran = tmp_path / "initialized"
    with wool.Executor(2, initializer=record_pid, initargs=(str(ran),)) as executor:
        pids = set(executor.map(os_getpid, range(40)))
    assert sorted(map(int, ran.read_text().split())) == sorted(pids)  # once each


def os_getpid(_):
    return os.getpid()


def test_a_failed_initializer_breaks_the_executor(tmp_path):
    executor = wool.Executor(1, initializer=fail, initargs=(1,))
    with pytest.raises(BrokenProcessPool, match="initializer fail failed"):
        executor.submit(square, 2).result(timeout=10)
    with pytest.raises(BrokenProcessPool):
        executor.submit(square, 2)
    executor.shutdown()


def test_a_plain_function_runs_one_at_a_time_per_worker(tmp_path):
    with wool.Executor(1) as executor:  # ProcessPoolExecutor(1) would, too
        assert max(executor.map(slow_peak, [str(tmp_path)] * 6, timeout=30)) == 1


def slow_peak(folder):
    """How many of these run at once in this worker (each leaves a file)."""
    mine = Path(folder) / f"{os.getpid()}-{threading.get_ident()}-{time.time_ns()}"
    mine.touch()
    time.sleep(0.05)
    peak = sum(1 for p in Path(folder).iterdir() if p.name.startswith(f"{os.getpid()}-"))
    mine.unlink()
    return peak


class Counter:
    def __init__(self, start):
        self.start = start

    def plus(self, n):
        return self.start + n

    @classmethod
    def name(cls):
        return cls.__name__

    @staticmethod
    def double(n):
        return 2 * n

    def __call__(self, n):
        return -n


def capture(*args, **kwargs):
    return args, kwargs


def test_any_callable_and_any_argument_names(executor):
    assert executor.submit(Counter(10).plus, 5).result(timeout=10) == 15
    assert executor.submit(Counter.name).result(timeout=10) == "Counter"
    assert executor.submit(Counter.double, 4).result(timeout=10) == 8
    assert executor.submit(Counter(0), 7).result(timeout=10) == -7
    assert executor.submit(functools.partial(pow, 2), 5).result(timeout=10) == 32
    assert executor.submit(lambda x: x + 1, 1).result(timeout=10) == 2
    future = executor.submit(capture, 1, self=2, fn=3)
    assert future.result(timeout=10) == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock' object"):
        executor.submit(functools.partial(capture, threading.Lock())).result(10)


class Big:
    def method(self):
        return 1


def test_no_references_are_kept_past_a_call(executor):
    big = Big()
    alive = weakref.ref(big)
    assert executor.submit(big.method).result(timeout=10) == 1
    del big
    gc.collect()
    assert alive() is None
    tracemalloc.start()
    try:
        for _ in range(2):  # the second round must not grow on the first
            before = tracemalloc.get_traced_memory()[0]
            futures = [executor.submit(Big().method) for _ in range(5_000)]
            assert sum(f.result(timeout=60) for f in futures) == 5_000
            del futures
            gc.collect()
        assert tracemalloc.get_traced_memory()[0] - before < 2**20
    finally:
        tracemalloc.stop()


def test_an_executor_that_is_collected_stops_its_workers():
    executor = wool.Executor(2)
    pids = {w.pid for w in executor._pool.workers}
    assert len(pids) == 2
    del executor
    gc.collect()
    for pid in pids:
        wait_exit(pid, timeout=30)


def test_running_is_true_once_the_worker_started_it():
    with wool.Executor(1, max_tasks_per_worker=2) as executor:
        future = executor.submit(slow, 1)
        deadline = time.monotonic() + 10
        while not future.running():  # polled: a future has no event for it
            assert time.monotonic() < deadline, "never started"
            time.sleep(0.005)
        assert not future.cancel() and future.result(timeout=10) == 1


def exit_now(code):
    sys.exit(code)


def test_sys_exit_fails_its_future_at_once_and_the_next_call_works(executor):
    with pytest.raises(wool.RemoteError, match="SystemExit: 3"):
        executor.submit(exit_now, 3).result(timeout=10)
    assert executor.submit(square, 5).result(timeout=10) == 25


def test_a_lost_worker_is_a_broken_process_pool(tmp_path):
    with wool.Executor(1) as executor:
        pid = executor.submit(os.getpid).result(timeout=10)
        future = executor.submit(slow, 30)
        deadline = time.monotonic() + 10
        while not future.running():
            assert time.monotonic() < deadline, "never started"
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool) as lost:
            future.result(timeout=30)
        assert isinstance(lost.value, concurrent.futures.BrokenExecutor)
        assert isinstance(lost.value, wool.WorkerLost)
        assert executor.submit(square, 6).result(timeout=30) == 36  # replaced


def test_tqdm_drives_it_as_its_executor_class():
    tqdm = pytest.importorskip("tqdm.contrib.concurrent")
    squares = tqdm._executor_map(  # what process_map does, with wool.Executor
        wool.Executor, square, range(50), max_workers=2, disable=True,
        _initializer=os.getpid, _initargs=(),  # tqdm's own lock cannot travel
    )  # fmt: skip
    assert squares == [x * x for x in range(50)]


def test_a_context_variable_annotates_like_the_standard_one():
    tenant_id: wool.ContextVar[str] = wool.ContextVar("tenant_id")
    assert wool.ContextVar[str] is not None and tenant_id.name == "tenant_id"


# -- pool.map ---------------------------------------------------------------------

RUNNING = {"now": 0, "peak": 0}  # tasks of in_flight() running in this process


@wool.work
async def in_flight(x):
    RUNNING["now"] += 1
    RUNNING["peak"] = max(RUNNING["peak"], RUNNING["now"])
    await asyncio.sleep(0.001 * (4 - x % 5))  # the work itself: later ones end first
    RUNNING["now"] -= 1
    return x


@pytest.fixture
async def local_pool():
    """A pool of one in-process worker: its tasks run where the test can see."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    local = wool.LocalDiscoveryService
    try:
        async with wool.Worker(discovery=local(namespace)):
            async with wool.WorkerPool(discovery=local(namespace)) as pool:
                await pool.wait_for_workers(1)
                yield pool
    finally:
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


async def test_map_yields_in_order_with_bounded_calls_in_flight(local_pool):
    RUNNING["peak"] = 0
    produced, consumed = [0], 0

    def items():
        for i in range(300):
            produced[0] += 1
            assert produced[0] - consumed <= 7 + 1  # consumed lazily
            yield i

    results = []
    async for result in local_pool.map(in_flight, items(), concurrency=7):
        results.append(result)
        consumed += 1
    assert results == list(range(300))
    assert RUNNING["peak"] == 7  # observed on the worker


async def test_map_in_completion_order_over_an_async_iterable(local_pool):
    async def items():
        for i in range(100):
            yield i

    results = [r async for r in local_pool.map(in_flight, items(), ordered=False)]
    assert sorted(results) == list(range(100)) and results != list(range(100))


async def test_map_stops_at_the_first_exception_and_cancels_the_rest(tmp_path):
    async with wool.WorkerPool(size=1) as pool:
        calls = pool.map(boom_at_3, range(1000), concurrency=4)
        seen = []
        with pytest.raises(ValueError, match="boom 3"):
            async for result in calls:
                seen.append(result)
        assert seen == [0, 1, 2]
        await until(lambda: not any(pool.load.values()))


async def test_map_takes_a_partial_or_a_lambda_around_a_work_function(local_pool):
    bound = functools.partial(add, 10)  # unwrapped here: add() goes to a worker
    assert [x async for x in local_pool.map(bound, range(3))] == [10, 11, 12]
    around = local_pool.map(lambda i: add(i, 100), range(3))  # awaited on the worker
    assert [x async for x in around] == [100, 101, 102]


async def test_map_refuses_a_concurrency_below_one(local_pool):
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="concurrency must be a whole number >= 1"):
            async for _ in local_pool.map(square, range(3), concurrency=bad):
                pass


async def boom_at_3(x):
    if x == 3:
        raise ValueError(f"boom {x}")
    await asyncio.sleep(0.01 * (x > 3))
    return x


# -- A pool that outlives a notebook cell ------------------------------------------------


async def test_a_started_pool_serves_tasks_that_do_not_share_its_context():
    async def first_cell():
        return await wool.WorkerPool(size=1).start()

    pool = await asyncio.create_task(first_cell(), context=contextvars.Context())
    assert wool._current_pool.get() is None  # nothing set here
    second_cell = asyncio.create_task(add(2, 3), context=contextvars.Context())
    assert await second_cell == 5
    await pool.stop()
    with pytest.raises(wool.NoWorkersAvailable, match="outside a WorkerPool"):
        await add(1)  # stopped: calls fail at once again
    with pytest.raises(RuntimeError, match="cannot be started twice"):
        await pool.start()
