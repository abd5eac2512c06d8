"""A fleet: many workers, one caller; what must not grow with the fleet."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

import wool
from conftest import until

KEY = b"fleet"


@wool.work
async def leaf() -> str:
    return wool.current_worker().uid


@wool.work
async def fan_out(n: int) -> list[str]:
    return await asyncio.gather(*(leaf() for _ in range(n)))


@pytest.mark.timeout(120)
async def test_a_nested_fan_out_over_64_workers_keeps_a_bounded_mesh_and_uses_all():
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(wool.Worker(authkey=KEY)) for _ in range(64)
        ]
        listed = wool.DnsDiscoveryService(*(w.info.address for w in workers))
        def meshes():  # each worker's connections to others, for nested calls
            return [w.status()["nested"] for w in workers]

        async with wool.WorkerPool(discovery=listed, authkey=KEY) as pool:
            await pool.wait_for_workers(64)
            await asyncio.gather(*(fan_out(16) for _ in range(64)))  # one on each
            await until(lambda: min(meshes()) == wool.NESTED)  # each mesh made
            ran = await asyncio.gather(*(fan_out(16) for _ in range(64)))
            assert max(meshes()) == wool.NESTED  # 16 each, not 64: a bounded mesh
        assert {uid for leaves in ran for uid in leaves} == {w.uid for w in workers}


async def test_the_balancers_pick_from_the_live_view_without_a_scan():
    class Counting(dict):
        scans = 0

        def __iter__(self):
            Counting.scans += 1
            return super().__iter__()

    ready = wool._Ready()  # as the pool keeps it
    infos = [wool.WorkerInfo(str(i), "127.0.0.1", i, 0, "") for i in range(1024)]
    ready.conns = Counting({i: type("C", (), {"calls": i.port % 3})() for i in infos})
    ready.order, ready.at = list(infos), {info: n for n, info in enumerate(infos)}
    for balancer in (wool.RoundRobinLoadBalancer(), wool.LeastLoadedLoadBalancer()):
        picks = {balancer.select(ready, None) for _ in range(200)}
        assert len(picks) > 50  # spread over the fleet
    assert Counting.scans == 0
