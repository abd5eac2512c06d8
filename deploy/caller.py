"""The caller Job of the Kubernetes example: finds the workers by the
headless Service's DNS name (WOOL_WORKERS), with the key from the Secret
(WOOL_AUTHKEY), waits for WOOL_REPLICAS of them, and prints what they
computed and where."""

import asyncio
import os

import wool

import mytasks


async def main():
    names = os.environ.get("WOOL_WORKERS", "wool-workers:7000").split(",")
    async with wool.WorkerPool(discovery=wool.DnsDiscoveryService(*names)) as pool:
        found = await pool.wait_for_workers(int(os.environ.get("WOOL_REPLICAS", 1)))
        print("workers:", ", ".join(sorted(w.address for w in found)))
        print("fibonacci(15) =", await mytasks.fibonacci(15))
        ran_on = await asyncio.gather(*(mytasks.where() for _ in range(20)))
        print("ran on:", ", ".join(sorted(set(ran_on))))


if __name__ == "__main__":
    asyncio.run(main())
