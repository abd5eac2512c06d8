"""Benchmark wool against the raw asyncio floor and the tools a user would pick
instead, in one run on this machine, and print ratios.

    python bench/bench.py [--rounds 5] [--json out.json] [--quick] [--uvloop]

Measures, each the median of --rounds rounds, with 2 worker processes:
  latency     one no-op call, awaited alone (µs)
  throughput  20,000 concurrent no-op calls (calls/s)
  side by side  wool and the floor up at once, measured in turn, round after
              round: latency, burst calls/s, and the CPU µs per call the burst
              costs the caller (getrusage; of which its garbage collector, by
              gc.callbacks) and the workers (/proc/PID/stat); each ratio the
              median of the rounds' ratios, as the machine drifts between them
              (with --uvloop the floor's servers run on uvloop too)
  payload     a 10 MB bytes echo (MB/s, counting one direction's bytes)
  array       an 80 MB float64 numpy array echo (MB/s, likewise), and the
              caller's peak memory during it (resident, shared files mapped
              counted whole) above a warm baseline, plus the array's (x the
              payload);
              for wool also through the socket (WOOL_SHARE=0), as between
              machines, where on one machine the buffers go by shared memory
  sync map    Executor.map of 20,000 no-op sync calls (calls/s), against
              ProcessPoolExecutor.map with chunksize 1 and 100
  socket      the ceiling: a raw TCP echo of the same bytes between two
              processes (sendall, recv_into a preallocated buffer)
  fanout      fib(15) where every call is a task (1,973 tasks; s)
  startup     WorkerPool(size=2) to the first result, and exit (s)
  memory      caller RSS growth over 100,000 tasks after warm-up (MiB)
  fleet       one caller over 16 and 1,024 workers (in one other process,
              listed by address): caller CPU per call and calls/s in a
              5,000-call burst, caller memory per connected worker, and the
              caller's CPU while connected and idle (5 s)

Peers: a raw asyncio RPC (length-prefixed pickle frames over TCP, the floor
wool's design stands on), concurrent.futures.ProcessPoolExecutor, and, when
installed, Ray and Dask distributed (skipped with a note when absent).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import importlib.util
import json
import os
import pickle
import resource
import statistics
import struct
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wool  # noqa: E402

CALLS = 20_000
UVLOOP = False  # --uvloop: the floor's servers run on it too, as wool's workers do
TLS = ("", "", "")  # (CA, certificate, key) for TLS echoes, made by main()
PAYLOAD = 10 * 10**6
ARRAY = 80 * 10**6


@wool.work
async def noop(x=None):
    return x


@wool.work
async def along(x, n: int):
    """A pipeline of n + 1 tasks, each handing `x` on to the next (nested)."""
    return x if n == 0 else await along(x, n - 1)


@wool.work
async def fib(n: int) -> int:
    if n <= 1:
        return n
    return await fib(n - 1) + await fib(n - 2)


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf(
        "SC_PAGE_SIZE"
    )


def memory() -> int:
    """Resident memory (anonymous and file pages), and whole each shared file
    mapped (memfd transfer, see echo_array)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    total = sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
    for line in open("/proc/self/maps"):
        if "/memfd:wool." in line:
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            total += end - start
    return total


def cpu(pids=()) -> float:
    """CPU seconds used so far by this process, or by processes `pids`."""
    if not pids:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    stats = [
        Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split() for p in pids
    ]
    return sum(int(f[11]) + int(f[12]) for f in stats) / ticks


GC = [0.0, 0.0]  # when the collector last started; seconds it took in all


def collecting(phase, info):  # a gc.callbacks entry: the caller's time in the GC
    if phase == "start":
        GC[0] = time.process_time()
    else:
        GC[1] += time.process_time() - GC[0]


async def measure(call, latency_n=2000):
    """(latency µs, throughput calls/s, payload MB/s) for an async `call(x)`."""
    for _ in range(200):
        await call(None)
    times = []
    for _ in range(latency_n):
        t = time.perf_counter()
        await call(None)
        times.append(time.perf_counter() - t)
    latency = statistics.median(times) * 1e6
    t = time.perf_counter()
    await asyncio.gather(*(call(i) for i in range(CALLS)))
    throughput = CALLS / (time.perf_counter() - t)
    return latency, throughput, await echo_bytes(call)


async def small_calls(call, pids) -> dict:
    """One round of small calls: the latency of 500 in turn, then a burst of
    CALLS at once, its calls/s and CPU µs per call: the caller's (and of that
    its garbage collector's) and the workers' (`pids`)."""
    times = []
    for _ in range(500):
        t = time.perf_counter()
        await call(None)
        times.append(time.perf_counter() - t)
    GC[1], _ = 0.0, gc.callbacks.append(collecting)
    t, mine, theirs = time.perf_counter(), cpu(), cpu(pids)
    await asyncio.gather(*(call(i) for i in range(CALLS)))
    elapsed, mine, theirs = time.perf_counter() - t, cpu() - mine, cpu(pids) - theirs
    gc.callbacks.remove(collecting)
    return {"latency_us": statistics.median(times) * 1e6, "throughput": CALLS / elapsed,
            "caller_cpu_us": mine / CALLS * 1e6, "caller_gc_us": GC[1] / CALLS * 1e6,
            "worker_cpu_us": theirs / CALLS * 1e6}  # fmt: skip


async def echo_bytes(call) -> float:
    """MB/s of a 10 MB bytes echo."""
    data = os.urandom(PAYLOAD)
    await call(data)
    t = time.perf_counter()
    for _ in range(5):
        assert len(await call(data)) == PAYLOAD
    return 5 * PAYLOAD / (time.perf_counter() - t) / 1e6


# -- wool ------------------------------------------------------------------------


async def echo_array(call) -> tuple[float, float]:
    """(MB/s, peak memory growth / payload) of an 80 MB float64 array echo.
    The memory is the caller's resident memory with each shared file it maps
    counted whole, resident or not (an array received and never read is
    still memory it holds); its growth from a warm baseline, plus the
    array's 80 MB (not what making it cost the allocator), is the array and
    the one that comes back (not the files a connection keeps for its next
    messages: SPARE, see README's Large data). Sampled
    during echoes of their own: reading /proc/self/maps every millisecond
    would slow the timed ones."""
    import numpy as np

    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], memory())
            time.sleep(0.001)

    array = np.random.default_rng(0).random(ARRAY // 8)
    assert np.array_equal(await call(array), array)
    for _ in range(3):  # steady state: each connection has used its files once
        await call(array)
    t = time.perf_counter()
    for _ in range(6):
        await call(array)
    elapsed = time.perf_counter() - t
    await asyncio.sleep(0)  # (the loop lets go of the last reply)
    base = memory() - array.nbytes  # warm: threads, buffers and files made
    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(3):  # each held a while, as a caller that uses it would
        back = await call(array)
        await asyncio.sleep(0.01)
        del back
    done.set()
    sampler.join()
    return 6 * ARRAY / elapsed / 1e6, (peak[0] - base) / ARRAY


async def bench_wool():
    async with wool.WorkerPool(size=2) as pool:
        latency, throughput, payload = await measure(noop)
        array, array_rss = await echo_array(noop)
        for _ in range(6):  # the workers' nested pools connect, and warm up
            await along(bytearray(ARRAY), 2)
        piped, _ = await echo_array(lambda x: along(x, 2))
        await fib(10)
        t = time.perf_counter()
        assert await fib(15) == 610
        fanout = time.perf_counter() - t
        for start in range(0, 20_000, 2000):
            await asyncio.gather(*(noop(i) for i in range(start, start + 2000)))
        before = rss()
        for start in range(0, 100_000, 2000):
            await asyncio.gather(*(noop(i) for i in range(start, start + 2000)))
        memory = (rss() - before) / 2**20
    t = time.perf_counter()
    pool = wool.WorkerPool(size=2)
    await pool.__aenter__()
    await noop(1)
    startup = time.perf_counter() - t
    t = time.perf_counter()
    await pool.__aexit__(None, None, None)
    shutdown = time.perf_counter() - t
    return {
        "latency_us": latency,
        "throughput": throughput,
        "payload_mbs": payload,
        "array_mbs": array,
        "array_rss_x": array_rss,
        "pipeline_x": array / piped,  # three tasks' time over one echo's
        "fanout_s": fanout,
        "startup_s": startup,
        "exit_s": shutdown,
        "memory_mib": memory,
    }


async def bench_wool_socket():
    """Large data through the socket and its MACs, as between machines."""
    os.environ["WOOL_SHARE"] = "0"
    wool._machine.cache_clear()
    try:
        async with wool.WorkerPool(size=2):
            payload, (array, _) = await echo_bytes(noop), await echo_array(noop)
    finally:
        del os.environ["WOOL_SHARE"]
        wool._machine.cache_clear()
    return {"payload_mbs": payload, "array_mbs": array}


async def bench_wool_tls():
    """Large data through TLS between a pool and a `wool worker` that verify
    each other's certificates: TLS authenticates it, no MAC over it."""
    ca, cert, key = TLS
    keyfile = Path(cert).with_name("key")
    keyfile.write_text("bench")
    worker = subprocess.Popen(
        [sys.executable, "-m", "wool", "worker", "--authkey-file", str(keyfile),
         "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "WOOL_SHARE": "0"},
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        address = worker.stdout.readline().split()[5]
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(cert, key)
        listed = wool.DnsDiscoveryService(address)
        async with wool.WorkerPool(discovery=listed, authkey=b"bench", ssl=context):
            payload, (array, _) = await echo_bytes(noop), await echo_array(noop)
    finally:
        worker.terminate()
        worker.wait()
    return {"payload_mbs": payload, "array_mbs": array}


# -- The floor: a raw asyncio RPC, length-prefixed pickle over TCP -----------------

SERVER = """
import asyncio, pickle, struct, sys
H = struct.Struct("!IQ")
async def serve(reader, writer):
    while True:
        try:
            n, rid = H.unpack(await reader.readexactly(H.size))
            body = await reader.readexactly(n)
        except asyncio.IncompleteReadError:
            return
        fn, args = pickle.loads(body)
        out = pickle.dumps(args[0], 5)
        writer.write(H.pack(len(out), rid) + out)
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


class RawClient:
    H = struct.Struct("!IQ")

    def __init__(self, port):
        self.port, self.pending, self.next = port, {}, 0

    async def start(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.task = asyncio.ensure_future(self.read())

    async def read(self):
        while True:
            n, rid = self.H.unpack(await self.reader.readexactly(self.H.size))
            self.pending.pop(rid).set_result(
                pickle.loads(await self.reader.readexactly(n))
            )

    async def call(self, x):
        self.next += 1
        future = self.pending[self.next] = asyncio.get_running_loop().create_future()
        body = pickle.dumps(("noop", (x,)), 5)
        self.writer.write(self.H.pack(len(body), self.next) + body)
        return await future


@contextlib.asynccontextmanager
async def floor():
    """The floor's two servers, and a call(x) that goes round-robin to them."""
    code = ("import uvloop; uvloop.install()\n" if UVLOOP else "") + SERVER
    servers = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        clients = [RawClient(int(s.stdout.readline())) for s in servers]
        for c in clients:
            await c.start()
        turn = iter(range(10**9))

        async def call(x):
            return await clients[next(turn) % 2].call(x)

        yield call, [s.pid for s in servers]
        for c in clients:
            c.task.cancel()
    finally:
        for s in servers:
            s.kill()
            s.wait()


async def bench_raw():
    async with floor() as (call, _):
        latency, throughput, payload = await measure(call)
    return {"latency_us": latency, "throughput": throughput, "payload_mbs": payload}


async def bench_paired(rounds: int) -> dict:
    """Small calls through wool and through the floor side by side: both up
    at once, a round of each in turn (after one to warm up); a ratio is the
    median of the rounds' ratios, so that the machine's drift, which moves
    both alike within a round, cancels."""
    async with floor() as raw, wool.WorkerPool(size=2) as pool:
        sides = {"wool": (noop, [w.pid for w in pool.workers]), "raw": raw}
        rows: dict = {name: [] for name in sides}
        for r in range(rounds + 1):
            for name, (call, pids) in sides.items():
                row = await small_calls(call, pids)
                if r:
                    rows[name].append(row)
    x = {k: statistics.median(w[k] / f[k] for w, f in zip(rows["wool"], rows["raw"]))
         for k in rows["wool"][0]}  # fmt: skip
    return {"wool": median_of(rows["wool"]), "raw": median_of(rows["raw"]), "x": x}


# -- ProcessPoolExecutor --------------------------------------------------------------


def plain_noop(x):
    return x


async def bench_executor():
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(2) as executor:

        async def call(x):
            return await loop.run_in_executor(executor, plain_noop, x)

        latency, throughput, payload = await measure(call, latency_n=500)
        array, _ = await echo_array(call)
    return {
        "latency_us": latency,
        "throughput": throughput,
        "payload_mbs": payload,
        "array_mbs": array,
    }


SOCKET_ECHO = """
import socket, ssl, struct, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
if sys.argv[2]:  # TLS, with this certificate and key
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*sys.argv[2:4])
    conn = context.wrap_socket(conn, server_side=True)
buffer = bytearray(int(sys.argv[1]))
def fill(view):
    got = 0
    while got < len(view):
        got += conn.recv_into(view[got:]) or sys.exit()
while True:
    head = bytearray(8)
    fill(memoryview(head))
    view = memoryview(buffer)[: struct.unpack("!Q", head)[0]]
    fill(view)
    conn.sendall(head)
    conn.sendall(view)
"""


def tls_files() -> tuple[str, str, str]:
    """(CA, certificate, key) for 127.0.0.1, made with openssl once per run."""
    where = Path(tempfile.mkdtemp(prefix="wool-bench-"))
    sh = (
        "openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
        "-keyout ca.key -out ca.crt -days 1 -subj /CN=ca "
        "-addext keyUsage=critical,keyCertSign,cRLSign && "
        "openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
        "-keyout w.key -out w.csr -subj /CN=w && printf 'subjectAltName=IP:127.0.0.1\\n"
        "extendedKeyUsage=serverAuth,clientAuth\\n' > w.ext && openssl x509 -req "
        "-in w.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile w.ext "
        "-out w.crt"
    )
    subprocess.run(["sh", "-c", sh], cwd=where, check=True, capture_output=True)
    return str(where / "ca.crt"), str(where / "w.crt"), str(where / "w.key")


def bench_sync_map() -> dict:
    """Executor.map of CALLS no-op sync calls: wool's and the standard one's."""

    def rate(executor, chunksize=1) -> float:
        list(executor.map(plain_noop, range(200), chunksize=chunksize))  # warm
        t = time.perf_counter()
        assert (
            len(list(executor.map(plain_noop, range(CALLS), chunksize=chunksize)))
            == CALLS
        )
        return CALLS / (time.perf_counter() - t)

    with wool.Executor(size=2) as executor:
        wool_rate = rate(executor)
    with concurrent.futures.ProcessPoolExecutor(2) as executor:
        return {
            "wool": wool_rate,
            "executor_1": rate(executor),
            "executor_100": rate(executor, 100),
        }


def bench_socket(tls: bool = False) -> dict:
    """The ceiling: the same echoes over a plain socket (or TLS), blocking
    calls, no serialization, into buffers allocated once."""
    ca, cert, key = TLS if tls else ("", "", "")
    server = subprocess.Popen(
        [sys.executable, "-c", SOCKET_ECHO, str(ARRAY), cert, key],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        conn = socket.create_connection(("127.0.0.1", int(server.stdout.readline())))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            context = ssl.create_default_context(cafile=ca)
            conn = context.wrap_socket(conn, server_hostname="127.0.0.1")
        buffer = bytearray(ARRAY)

        def rate(size: int, rounds: int) -> float:
            data, view = os.urandom(size), memoryview(buffer)[:size]
            t = time.perf_counter()
            for _ in range(rounds):
                conn.sendall(struct.pack("!Q", size))
                conn.sendall(data)
                for part in (memoryview(bytearray(8)), view):
                    got = 0
                    while got < len(part):
                        got += conn.recv_into(part[got:])
            return rounds * size / (time.perf_counter() - t) / 1e6

        rate(PAYLOAD, 2), rate(ARRAY, 2)  # warm, as wool's echoes are
        return {"payload_mbs": rate(PAYLOAD, 5), "array_mbs": rate(ARRAY, 6)}
    finally:
        conn.close()
        server.wait()


# -- Optional peers ----------------------------------------------------------------------


async def bench_dask():
    from dask.distributed import Client, LocalCluster

    async with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, asynchronous=True, dashboard_address=None) as cluster:  # fmt: skip
        async with Client(cluster, asynchronous=True) as client:

            async def call(x):
                return await client.submit(plain_noop, x, pure=False)

            global CALLS
            saved, CALLS = CALLS, 2000
            try:
                latency, throughput, payload = await measure(call, latency_n=100)
            finally:
                CALLS = saved
    return {"latency_us": latency, "throughput": throughput, "payload_mbs": payload}


async def bench_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(plain_noop)

        async def call(x):
            return await remote.remote(x)

        latency, throughput, payload = await measure(call, latency_n=300)
    finally:
        ray.shutdown()
    return {"latency_us": latency, "throughput": throughput, "payload_mbs": payload}


# -- Report -----------------------------------------------------------------------------

TARGETS = [
    # (metric, label, check against results, text)
    ("latency", lambda r: r["paired"]["x"]["latency_us"] <= (1.3 if UVLOOP else 1.1), "<= 1.1x raw (uvloop: 1.3x), side by side"),
    ("throughput", lambda r: r["paired"]["x"]["throughput"] >= 0.9, ">= 0.9x raw, side by side"),
    ("throughput vs executor", lambda r: r["wool"]["throughput"] >= 2 * r["executor"]["throughput"], ">= 2x executor"),
    ("payload", lambda r: r["wool"]["payload_mbs"] >= r["executor"]["payload_mbs"], ">= executor"),
    ("fanout", lambda r: r["wool"]["fanout_s"] < 1.0, "fib(15) < 1 s"),
    ("startup", lambda r: r["wool"]["startup_s"] < 0.5, "< 0.5 s"),
    ("exit", lambda r: r["wool"]["exit_s"] < 0.3, "< 0.3 s"),
    ("memory", lambda r: r["wool"]["memory_mib"] < 5, "< 5 MiB over 100k tasks"),
    ("array vs socket", lambda r: r["wool"]["array_mbs"] >= 0.5 * r["socket"]["array_mbs"], ">= 0.5x socket, 80 MB array"),
    ("array vs executor", lambda r: r["wool"]["array_mbs"] >= 4 * r["executor"]["array_mbs"], ">= 4x executor, 80 MB array"),
    ("bytes vs executor", lambda r: r["wool"]["payload_mbs"] >= 2 * r["executor"]["payload_mbs"], ">= 2x executor, 10 MB bytes"),
    ("array memory", lambda r: r["wool"]["array_rss_x"] <= 3, "caller peak <= 3x payload"),
    ("sync map", lambda r: r["sync_map"]["wool"] >= r["sync_map"]["executor_1"], ">= executor, chunksize 1"),
    ("array vs socket, 1.5x", lambda r: r["wool"]["array_mbs"] >= 1.5 * r["socket"]["array_mbs"], ">= 1.5x socket, 80 MB array, same host"),
    ("tls vs raw tls", lambda r: r["wool tls"]["array_mbs"] >= 0.8 * r["tls"]["array_mbs"], ">= 0.8x raw TLS echo, 80 MB array"),
    ("array memory, 2x", lambda r: round(r["wool"]["array_rss_x"], 2) <= 2, "caller peak <= 2x payload (to 1%)"),
    ("pipeline", lambda r: r["wool"]["pipeline_x"] <= 1, "3 tasks passing 80 MB along <= 1 echo"),
    ("caller CPU per call", lambda r: r["paired"]["x"]["caller_cpu_us"] <= 1.2, "<= 1.2x raw, side by side"),
    ("worker CPU per call", lambda r: r["paired"]["x"]["worker_cpu_us"] <= 1.5, "<= 1.5x raw, side by side"),
    ("fleet CPU per call", lambda r: r["fleet"][1024]["cpu_us"] <= 1.3 * r["fleet"][16]["cpu_us"], "1,024 workers <= 1.3x 16"),
    ("fleet memory", lambda r: r["fleet"][1024]["kib"] <= 32, "<= 32 KiB per idle connection"),
    ("fleet idle", lambda r: r["fleet"][1024]["idle"] <= 0.01, "<= 1% of a core, 1,024 idle workers"),
]  # fmt: skip
FLEET = (16, 1024)  # workers in the fleet rows


FLEET_HOST = """
import asyncio, sys, wool
async def main(n):
    workers = [wool.Worker(authkey=b"fleet") for _ in range(n)]
    for w in workers:
        await w.start()
    print(" ".join(w.info.address for w in workers), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main(int(sys.argv[1])))
"""


async def bench_fleet(n: int, calls: int = 5000) -> dict:
    """One caller over `n` workers (in one other process, on loopback, listed
    by address): its CPU per no-op call and calls/s in a burst, its memory
    per connected worker, and its CPU while connected and idle."""
    host = subprocess.Popen(
        [sys.executable, "-c", FLEET_HOST, str(n)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        addresses = host.stdout.readline().split()
        before = rss()
        listed = wool.DnsDiscoveryService(*addresses)
        async with wool.WorkerPool(discovery=listed, authkey=b"fleet") as pool:
            await pool.wait_for_workers(n, timeout=120)
            for _ in range(3):  # warm: every connection, every worker's function
                await asyncio.gather(*(noop(i) for i in range(n)))
            memory = (rss() - before) / n
            t, c = time.perf_counter(), cpu()
            await asyncio.sleep(5)
            idle = (cpu() - c) / (time.perf_counter() - t)
            t, c = time.perf_counter(), cpu()
            await asyncio.gather(*(noop(i) for i in range(calls)))
            wall, used = time.perf_counter() - t, cpu() - c
    finally:
        host.stdin.close()
        host.wait(timeout=60)
    return {"cpu_us": used / calls * 1e6, "rate": calls / wall,
            "kib": memory / 1024, "idle": idle}  # fmt: skip


def mac_cost() -> dict:
    """What binding frames to their session costs: every frame is sealed by
    its sender and checked by its receiver (wool._Seal.tag), so a call's
    frames (TASK, RESULT, and ACCEPTED unless the task's first step
    answered) cost at most six tags, and a payload echo through the socket
    four passes over the payload."""
    seal, small, large = wool._Seal(os.urandom(32)), b"x" * 100, os.urandom(PAYLOAD)
    header = wool.HEADER.pack(100, wool.TASK, 1)
    t = time.perf_counter()
    for _ in range(100_000):
        seal.tag(header, small)
    per_tag = (time.perf_counter() - t) / 100_000
    t = time.perf_counter()
    for _ in range(5):
        seal.tag(header, large)
    per_payload = (time.perf_counter() - t) / 5
    return {"call_us": 6 * per_tag * 1e6, "echo_ms": 4 * per_payload * 1e3}


def median_of(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--uvloop", action="store_true", help="run everything on uvloop"
    )
    args = parser.parse_args()
    global TLS, UVLOOP
    TLS = tls_files()
    loop = "asyncio"
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        loop, UVLOOP = "uvloop", True
    systems = {
        "wool": bench_wool,
        "wool socket": bench_wool_socket,
        "wool tls": bench_wool_tls,
        "raw": bench_raw,
        "executor": bench_executor,
    }
    notes = []
    for name, module, fn in [
        ("dask", "distributed", bench_dask),
        ("ray", "ray", bench_ray),
    ]:
        if importlib.util.find_spec(module):
            systems[name] = fn
        else:
            notes.append(f"{name}: not installed, skipped (pip install {module})")
    results = {}
    for name, fn in systems.items():
        rounds = 1 if name in ("dask", "ray") else args.rounds
        results[name] = median_of([asyncio.run(fn()) for _ in range(rounds)])
        print(f"measured {name}", file=sys.stderr)
    socket_rates = median_of([bench_socket() for _ in range(args.rounds)])
    tls_rates = median_of([bench_socket(tls=True) for _ in range(args.rounds)])
    sync_map = median_of([bench_sync_map() for _ in range(args.rounds)])

    floor = results["raw"]
    print(
        f"\n{'system':<10} {'1 call µs':>10} {'x raw':>6} {'calls/s':>9} {'x raw':>6} {'MB/s':>7}"
    )
    for name, r in results.items():
        if "latency_us" not in r:
            continue
        print(
            f"{name:<10} {r['latency_us']:>10.0f} {r['latency_us'] / floor['latency_us']:>6.2f} "
            f"{r['throughput']:>9.0f} {r['throughput'] / floor['throughput']:>6.2f} "
            f"{r['payload_mbs']:>7.0f}"
        )
    print(f"\n{'large data, MB/s':<20} {'10 MB bytes':>12} {'80 MB array':>12}")
    for name, r in [*results.items(), ("socket", socket_rates), ("tls", tls_rates)]:
        array = f"{r['array_mbs']:>12.0f}" if "array_mbs" in r else f"{'-':>12}"
        print(f"{name:<20} {r['payload_mbs']:>12.0f} {array}")
    results["socket"], results["tls"] = socket_rates, tls_rates
    print(
        f"\nExecutor.map, 20,000 no-op sync calls: wool {sync_map['wool']:.0f}/s, "
        f"ProcessPoolExecutor {sync_map['executor_1']:.0f}/s (chunksize 1), "
        f"{sync_map['executor_100']:.0f}/s (chunksize 100)"
    )
    results["sync_map"] = sync_map
    w = results["wool"]
    print(
        f"wool's caller peak memory (RSS, shared files mapped whole) during the 80 MB echo: {w['array_rss_x']:.2f}x the "
        "payload above its baseline; three nested tasks passing it along: "
        f"{w['pipeline_x']:.2f}x an echo's time"
    )
    print(
        f"\nwool fib(15), 1,973 tasks: {w['fanout_s']:.2f} s; start-up to first result "
        f"{w['startup_s']:.2f} s, exit {w['exit_s']:.2f} s; caller RSS growth over "
        f"100,000 tasks {w['memory_mib']:.1f} MiB"
    )
    mac = median_of([mac_cost() for _ in range(args.rounds)])
    echo_ms = PAYLOAD / (results["wool socket"]["payload_mbs"] * 1e6) * 1e3
    print(
        f"frame MACs: {mac['call_us']:.1f} µs per call "
        f"({mac['call_us'] / w['latency_us']:.1%} of wool's latency), "
        f"{mac['echo_ms']:.1f} ms per 10 MB echo through the socket "
        f"({mac['echo_ms'] / echo_ms:.0%} of it; shared memory skips them)"
    )
    fleet = {n: median_of([asyncio.run(bench_fleet(n)) for _ in range(args.rounds)])
             for n in FLEET}  # fmt: skip
    results["fleet"] = fleet
    print(f"\n{'fleet':<14} {'caller CPU/call':>16} {'calls/s':>8} {'KiB/worker':>11} "
          f"{'idle CPU':>9}")  # fmt: skip
    for n, f in fleet.items():
        print(f"{n:>5} workers {f['cpu_us']:>13.0f} µs {f['rate']:>8.0f} {f['kib']:>11.1f} "
              f"{f['idle']:>9.2%}")  # fmt: skip
    rounds = max(8, 4 * args.rounds)
    paired = results["paired"] = asyncio.run(bench_paired(rounds))
    print(f"\nsmall calls side by side ({loop}; medians of {rounds} rounds, x: of their "
          f"ratios); CPU µs per call in the {CALLS:,}-call burst\n{'':7} {'latency µs':>10} "
          f"{'calls/s':>9} {'caller CPU':>14} {'(GC)':>6} {'workers':>7}")  # fmt: skip
    for name in ("wool", "raw", "x"):
        r, d = paired[name], 2 if name == "x" else 1
        print(f"  {name:<5} {r['latency_us']:10.{d}f} {r['throughput']:9.{2 * d - 2}f} "
              f"{r['caller_cpu_us']:14.{d}f} ({r['caller_gc_us']:4.{d}f}) "
              f"{r['worker_cpu_us']:7.{d}f}")  # fmt: skip
    print("\ntargets:")
    for name, check, text in TARGETS:
        print(f"  {'met ' if check(results) else 'MISS'}  {name:<24} {text}")
    for note in notes:
        print(f"note: {note}")
    print(
        f"(median of {args.rounds} rounds; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
