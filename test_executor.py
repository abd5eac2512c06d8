"""Sync code and batch work: wool.Executor (concurrent.futures), pool.map, and
a pool started without a block (notebooks). Real worker processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

import wool
from conftest import until
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
    with wool.Executor(size=1) as executor:
        future = executor.submit(wait_cancelled, str(marker), str(started))
        while not executor.submit(exists, str(started)).result(timeout=10):
            pass  # the task runs on the worker
        assert future.cancel() and future.cancelled()
        while not executor.submit(exists, str(marker)).result(timeout=10):
            pass
    assert marker.read_text() == "cancelled"


def test_shutdown_cancels_pending_futures_and_refuses_new_ones(tmp_path):
    executor = wool.Executor(size=1)
    futures = [executor.submit(wait_cancelled, str(tmp_path / f"m{i}")) for i in range(5)]
    executor.shutdown(cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(square, 1)
    assert not executor._thread.is_alive()


def test_executor_arguments_are_checked_where_they_are_given():
    with pytest.raises(TypeError, match=r"write size=N"):
        wool.Executor(4)


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
        Path(f"/dev/shm/wool-{namespace}").unlink(missing_ok=True)


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
