"""Control for real workloads: wool.ContextVar, timeouts, worker capacity,
least-loaded balancing, current_worker()."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import shutil

import wool
from conftest import in_flight
from test_wool import add, exists, wait_cancelled

request_id = wool.ContextVar("test.request_id", default="none")
trail = wool.ContextVar("test.trail")  # no default


@wool.work
async def read_and_set(value):
    seen = request_id.get()
    request_id.set(value)
    return seen


@wool.work
async def hop(depth: int) -> list:
    """Three calls deep: each level appends to the trail and passes it on."""
    trail.set(trail.get() + [f"{depth}:{request_id.get()}"])
    if depth < 3:
        await hop(depth + 1)
    return trail.get()


@wool.work
async def isolated(value, gate: str):
    request_id.set(value)
    await exists(gate)  # a nested call: the other task runs meanwhile
    return request_id.get()


@wool.work
async def stream_ids(n: int):
    for i in range(n):
        request_id.set(f"step {i}")
        yield i


@wool.work
async def has_trail() -> bool:
    try:
        trail.get()
    except LookupError:
        return False
    return True


# -- wool.ContextVar ---------------------------------------------------------------


async def test_context_var_travels_to_the_worker_and_back():
    async with wool.WorkerPool(size=1):
        token = request_id.set("r-1")
        assert await read_and_set("r-2") == "r-1"
        assert request_id.get() == "r-2"  # the task's change came back
        request_id.reset(token)
        assert request_id.get() == "none"
        assert await read_and_set("r-3") == "none"  # defaults do not travel


async def test_only_values_explicitly_set_travel():
    async with wool.WorkerPool(size=1):
        assert await has_trail() is False
        trail.set([])
        assert await has_trail() is True


async def test_context_var_through_a_chain_three_calls_deep():
    async with wool.WorkerPool(size=2):
        request_id.set("chain")
        trail.set(["caller"])
        assert await hop(1) == ["caller", "1:chain", "2:chain", "3:chain"]
        assert trail.get() == ["caller", "1:chain", "2:chain", "3:chain"]


async def test_concurrent_tasks_on_one_worker_never_see_each_others_values():
    async with wool.WorkerPool(size=1):
        results = await asyncio.gather(*(isolated(f"v{i}", "/") for i in range(20)))
        assert results == [f"v{i}" for i in range(20)]


async def test_generator_yields_bring_changes_back():
    async with wool.WorkerPool(size=1):
        async for i in stream_ids(3):
            assert request_id.get() == f"step {i}"


async def test_unpicklable_value_raises_type_error_naming_the_variable():
    async with wool.WorkerPool(size=1):
        request_id.set(threading.Lock())
        with pytest.raises(
            TypeError, match="wool.ContextVar 'test.request_id' holds 'lock'"
        ):
            await add(1)


def test_context_var_mirrors_contextvars():
    var = wool.ContextVar(f"test.{uuid.uuid4().hex}")
    with pytest.raises(LookupError, match="has no value"):
        var.get()
    assert var.get("fallback") == "fallback"
    token = var.set(1)
    assert var.get() == 1
    var.reset(token)
    assert var.get(None) is None
    assert repr(var).startswith("<wool.ContextVar 'test.")


# -- Timeouts -----------------------------------------------------------------------


@wool.work(timeout=0.2)
async def bounded(marker: str):
    return await wait_cancelled.__wool_work__(marker)


async def test_work_timeout_cancels_on_the_worker_and_raises_timeout_error(tmp_path):
    marker = tmp_path / "marker"
    async with wool.WorkerPool(size=1):
        with pytest.raises(TimeoutError) as caught:
            await bounded(str(marker))
        assert "Traceback" in str(caught.value.__cause__)  # raised on the worker
        assert await exists(str(marker))
    assert marker.read_text() == "cancelled"


async def test_timeout_block_overrides_the_decorator(tmp_path):
    marker = tmp_path / "marker"
    async with wool.WorkerPool(size=1):
        with wool.timeout(0.2):
            with pytest.raises(TimeoutError):
                await wait_cancelled(str(marker))  # no timeout of its own
            assert await add(1, 1) == 2  # quick calls are unaffected
        assert await exists(str(marker))


# -- Capacity ------------------------------------------------------------------------

_running = _peak = 0


@wool.work
async def occupy(seconds: float) -> tuple[int, int]:
    """Hold a slot for `seconds` (the work itself); the peak concurrency seen."""
    global _running, _peak
    _running += 1
    _peak = max(_peak, _running)
    try:
        await asyncio.sleep(seconds)
    finally:
        _running -= 1
    return _peak, os.getpid()


async def test_max_tasks_per_worker_bounds_concurrency():
    async with wool.WorkerPool(size=2, max_tasks_per_worker=1) as pool:
        results = await asyncio.gather(*(occupy(0.05) for _ in range(8)))
        assert {peak for peak, _ in results} == {1}
        assert {pid for _, pid in results} == {w.pid for w in pool.workers}


async def test_a_call_waits_for_room_on_busy_workers_past_the_wait(tmp_path):
    """Waiting for room is a queue: `wait` bounds how long a call waits for a
    worker to exist, not for a busy one to have room."""
    async with wool.WorkerPool(size=2, max_tasks_per_worker=1, wait=0.3) as pool:
        busy = [
            asyncio.ensure_future(wait_cancelled(str(tmp_path / f"m{i}")))
            for i in range(2)
        ]
        await in_flight(pool, 2)
        queued = asyncio.ensure_future(add(1))
        done, _ = await asyncio.wait([queued], timeout=1.0)  # past the wait
        assert not done
        busy[0].cancel()
        assert await queued == 1  # it got the room
        busy[1].cancel()
        assert await add(1, 1) == 2


held: asyncio.Event  # set by hold(), which runs in this process here


@wool.work
async def hold():
    held.set()
    await asyncio.Event().wait()


def in_pool(pool, coro) -> asyncio.Task:
    """Run `coro` as a task whose @work calls go to `pool`."""
    context = contextvars.copy_context()
    context.run(wool._current_pool.set, pool)
    return asyncio.get_running_loop().create_task(coro, context=context)


async def test_a_full_worker_refuses_before_accepting():
    namespace = f"t{uuid.uuid4().hex[:10]}"
    local = wool.LocalDiscoveryService
    try:
        async with wool.Worker(max_tasks=1, discovery=local(namespace)):
            first = wool.WorkerPool(discovery=local(namespace))
            second = wool.WorkerPool(discovery=local(namespace), wait=0.3)
            async with first, second:
                for pool in (first, second):
                    await pool.wait_for_workers(1)
                global held
                held = asyncio.Event()
                busy = in_pool(first, hold())
                await held.wait()  # the in-process worker runs it
                queued = in_pool(second, add(2, 2))  # refused, asked again later
                done, _ = await asyncio.wait([queued], timeout=1.0)  # past the wait
                assert not done
                busy.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await busy
                assert await queued == 4
    finally:
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


async def test_a_balancer_that_picks_a_worker_left_out_gets_a_clear_error():
    """Asked again without the worker that refused a call (full), a balancer
    that picks that one anyway is told it is not among those it was given."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    local = wool.LocalDiscoveryService

    class Stubborn:  # always the busy worker, listed or not
        known: dict = {}

        def select(self, workers, task):
            self.known |= {info.uid: info for info in workers}
            return self.known[(a if a.running else b).uid]

    try:
        async with wool.Worker(max_tasks=1, discovery=local(namespace)) as a, \
                wool.Worker(max_tasks=1, discovery=local(namespace)) as b:  # fmt: skip
            first = wool.WorkerPool(discovery=local(namespace))
            second = wool.WorkerPool(
                discovery=local(namespace), loadbalancer=Stubborn()
            )
            async with first, second:
                for pool in (first, second):
                    await pool.wait_for_workers(2)
                global held
                held = asyncio.Event()
                busy = in_pool(first, hold())
                await held.wait()
                with pytest.raises(
                    TypeError, match="not one of the workers it was given"
                ):
                    await in_pool(second, add(2, 2))
                busy.cancel()
    finally:
        shutil.rmtree(f"/dev/shm/wool-{namespace}", ignore_errors=True)


# -- Balancing and current_worker() --------------------------------------------


@wool.work
async def whoami() -> wool.WorkerInfo:
    return wool.current_worker()


async def test_least_loaded_sends_work_away_from_a_busy_worker(tmp_path):
    balancer = wool.LeastLoadedLoadBalancer()
    async with wool.WorkerPool(size=2, loadbalancer=balancer) as pool:
        started = tmp_path / "started"
        busy = asyncio.ensure_future(wait_cancelled(str(tmp_path / "m"), str(started)))
        await in_flight(pool)
        busy_worker = next(i for i, n in pool.load.items() if n)
        others = {(await whoami()).uid for _ in range(10)}
        assert others and busy_worker.uid not in others
        busy.cancel()


async def test_current_worker_is_none_in_the_caller_and_the_worker_in_a_task():
    assert wool.current_worker() is None
    async with wool.WorkerPool(size=1) as pool:
        assert await whoami() == pool.workers[0]


@wool.work(timeout=0.1)
async def stuck(marker: str):
    time.sleep(3)  # blocks the worker's event loop: it cannot time the task out
    Path(marker).touch()


async def test_timeout_holds_when_the_worker_is_stuck_in_synchronous_code(tmp_path):
    marker = tmp_path / "done"
    async with wool.WorkerPool(size=1):
        with pytest.raises(TimeoutError):
            await stuck(str(marker))
        assert not marker.exists()  # the caller did not wait for the worker
