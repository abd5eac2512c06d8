"""Several "hosts" on one machine: network namespaces joined by a bridge that
lives in a namespace of its own, so the machine's real network never sees
the test's mDNS. Needs root and iproute2 (CI runs as root).

    caller 10.77.0.10 --.
    h1     10.77.0.11 ---+-- br0 (in its own namespace); a link is cut by
    h2     10.77.0.12 ---|   setting its bridge-side veth down
    h3     10.77.0.13 --'
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import HERE

RUN = f"run-{os.getpid()}"
pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and ip"
    ),
    pytest.mark.timeout(120),
]
ADDRESSES = {
    "c": "10.77.0.10",
    "h1": "10.77.0.11",
    "h2": "10.77.0.12",
    "h3": "10.77.0.13",
}


def ip(*args: str):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Lan:
    """Namespaces `<prefix>-br` (the bridge) and one per host."""

    def __init__(self):
        self.prefix = f"w{uuid.uuid4().hex[:6]}"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def build(self):
        bridge = self.ns("br")
        ip("netns", "add", bridge)
        self.made.append(bridge)
        ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge, "link", "set", "br0", "up")
        for host, address in ADDRESSES.items():
            ns = self.ns(host)
            ip("netns", "add", ns)
            self.made.append(ns)
            ip(
                "-n",
                bridge,
                "link",
                "add",
                f"v-{host}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            ip("-n", bridge, "link", "set", f"v-{host}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def link(self, host: str, state: str):
        ip("-n", self.ns("br"), "link", "set", f"v-{host}", state)

    def run(self, host: str, *argv: str, cwd=HERE, env=None, **kw) -> subprocess.Popen:
        """A process on `host`. Hosts are machines of their own here: large
        buffers go through the network, not through shared memory."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *argv],
            cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "WOOL_SHARE": "0", **(env or {})}, **kw,
        )  # fmt: skip

    def hosts_file(self, host: str, lines: list[str]) -> Path:
        """`host`'s own /etc/hosts (ip netns exec bind-mounts this file over it)."""
        path = Path("/etc/netns") / self.ns(host) / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:  # in place: the mount follows the inode
            f.write("\n".join(["127.0.0.1 localhost", *lines]) + "\n")
        return path

    def destroy(self):
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


@pytest.fixture
def lan():
    lan = Lan()
    try:
        lan.build()
    except subprocess.CalledProcessError as e:
        lan.destroy()
        pytest.skip(f"cannot make network namespaces here: {e.stderr.decode().strip()}")
    yield lan
    lan.destroy()


CALLER = """
import asyncio, sys, wool
from test_durable import where, forever, slow_add

async def main():
    lan = {discovery}
    async with wool.WorkerPool(discovery=lan, authkey=b"s3cret") as pool:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while command := (await stdin.readline()).split():
            verb, n = command[0].decode(), int(command[1])
            if verb == "workers":  # wait until exactly n workers are connected
                await pool._until(lambda: len(pool.workers) == n, 60)
                hosts = [w.host for w in pool.workers]
            elif verb == "hang":  # n calls that never return, one per worker
                hanging = [asyncio.ensure_future(forever()) for _ in range(n)]
                await pool._until(lambda: sum(pool.load.values()) == n, 10)
                hosts = [w.host for w in pool.workers]
            elif verb == "info":  # who the workers say they are
                hosts = [f"{{w.pid}}:{{','.join(sorted(w.tags))}}" for w in pool.workers]
            elif verb == "slow":  # n calls in flight for a while
                slow = [asyncio.ensure_future(slow_add(i, 1)) for i in range(n)]
                await pool._until(lambda: sum(pool.load.values()) == n, 10)
                hosts = ["started"]
            elif verb == "finished":  # the slow calls' results
                hosts = [str(sum(await asyncio.gather(*slow)))]
            elif verb == "lost":  # wait for n hanging calls to fail; how, how fast
                start = loop.time()
                while sum(c.done() for c in hanging) < n:
                    await asyncio.wait(hanging, return_when=asyncio.FIRST_COMPLETED)
                failed = [type(c.exception()).__name__ for c in hanging if c.done()]
                hosts = [*failed, "fast" if loop.time() - start < 10 else "slow"]
            else:  # run n tasks; the hosts they ran on
                hosts = [t for _, tags in await asyncio.gather(*(where() for _ in range(n)))
                         for t in tags if t.startswith("h")]
            print(" ".join(sorted(set(hosts))), flush=True)

asyncio.run(main())
"""


def start_caller(lan, discovery: str):
    """CALLER in the caller's namespace: (process, ask), ask(line) -> answer."""
    caller = lan.run("c", sys.executable, "-c", CALLER.format(discovery=discovery))

    def ask(line: str) -> str:
        caller.stdin.write(line + "\n")
        caller.stdin.flush()
        return caller.stdout.readline().strip()

    return caller, ask


def test_discovery_dispatch_cut_and_heal_across_hosts(lan, tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"s3cret")
    workers = []

    def start_worker(host: str):
        address = ADDRESSES[host]
        bind = "0.0.0.0" if host == "h2" else address  # h2 advertises its address
        proc = lan.run(
            host, sys.executable, "-m", "wool", "worker", "--host", bind,
            "--tag", RUN, "--tag", host, "--discovery", "lan", "--interface", address,
            "--authkey-file", str(key),
        )  # fmt: skip
        workers.append(proc)
        assert "listening on" in proc.stdout.readline()

    discovery = f"wool.LanDiscoveryService(lambda w: {RUN!r} in w.tags, "
    discovery += f"interfaces=[{ADDRESSES['c']!r}])"
    caller, ask = start_caller(lan, discovery)

    try:
        start_worker("h1")
        start_worker("h2")
        assert ask("workers 2") == "10.77.0.11 10.77.0.12"
        assert ask("run 20") == "h1 h2"

        assert ask("hang 2") == "10.77.0.11 10.77.0.12"  # one call on each
        lan.link("h1", "down")  # silent: no FIN, no RST; keepalive finds it
        assert ask("lost 1") == "WorkerLost fast"
        assert ask("workers 1") == "10.77.0.12"
        assert ask("run 20") == "h2"

        lan.link("h3", "down")
        start_worker("h3")  # announces itself into the void
        lan.link("h1", "up")  # h1 is listed still: the pool reconnects
        lan.link("h3", "up")  # h3 re-announces itself
        assert ask("workers 3") == "10.77.0.11 10.77.0.12 10.77.0.13"
        assert ask("run 30") == "h1 h2 h3"
    finally:
        for proc in [caller, *workers]:
            proc.kill()
            proc.wait()


def test_dns_discovery_follows_a_name_across_hosts(lan, tmp_path):
    """The caller's namespace resolves workers.test through its own hosts file
    (ip netns exec bind-mounts /etc/netns/NS/hosts over /etc/hosts)."""
    key = tmp_path / "key"
    key.write_bytes(b"s3cret")

    def resolve_to(*names: str):
        return lan.hosts_file("c", [f"{ADDRESSES[h]} workers.test" for h in names])

    hosts = resolve_to("h1", "h2", "h3")
    workers = {}
    for host in ("h1", "h2", "h3"):
        workers[host] = lan.run(
            host, sys.executable, "-m", "wool", "worker", "--host", ADDRESSES[host],
            "--port", "7000", "--tag", RUN, "--tag", host, "--discovery", "none",
            "--authkey-file", str(key),
        )  # fmt: skip
        assert "listening on" in workers[host].stdout.readline()
    discovery = "wool.DnsDiscoveryService('workers.test', port=7000, interval=0.5)"
    caller, ask = start_caller(lan, discovery)

    try:
        assert ask("workers 3") == "10.77.0.11 10.77.0.12 10.77.0.13"
        assert ask("info 0") == " ".join(
            sorted(f"{p.pid}:{h},{RUN}" for h, p in workers.items())
        )  # their real pids and tags, learnt from the workers themselves
        assert ask("run 30") == "h1 h2 h3"
        assert ask("slow 6") == "started"  # two on each worker
        resolve_to("h1", "h3")  # h2 leaves the name
        assert ask("workers 2") == "10.77.0.11 10.77.0.13"
        assert ask("finished 0") == str(sum(range(1, 7)))  # in flight: finished
        assert ask("run 20") == "h1 h3"
        resolve_to("h1", "h2", "h3")  # and comes back
        assert ask("workers 3") == "10.77.0.11 10.77.0.12 10.77.0.13"
    finally:
        hosts.unlink(missing_ok=True)
        for proc in [caller, *workers.values()]:
            proc.kill()
            proc.wait()


CHAOS_CALLER = """
import asyncio, json, sys, wool
from pathlib import Path
from test_faults import chaos

async def main():
    lan = wool.LanDiscoveryService(lambda w: {run!r} in w.tags, interfaces=[{address!r}])
    async with wool.WorkerPool(discovery=lan, authkey=b"s3cret", wait=15) as pool:
        await pool.wait_for_workers(3)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        outcomes = await chaos(pool, Path({path!r}), 60, stdin.readline, callers=100)
        print(json.dumps(outcomes), flush=True)

asyncio.run(main())
"""


@pytest.mark.chaos
def test_link_cuts_under_load_run_no_task_twice(lan, tmp_path):
    key, ran = tmp_path / "key", tmp_path / "ran"
    key.write_bytes(b"s3cret")
    ran.touch()
    procs = []
    try:
        for host in ("h1", "h2", "h3"):
            procs.append(lan.run(
                host, sys.executable, "-m", "wool", "worker", "--host", ADDRESSES[host],
                "--tag", RUN, "--discovery", "lan", "--interface", ADDRESSES[host],
                "--authkey-file", str(key),
            ))  # fmt: skip
            assert "listening on" in procs[-1].stdout.readline()
        code = CHAOS_CALLER.format(run=RUN, address=ADDRESSES["c"], path=str(ran))
        caller = lan.run("c", sys.executable, "-c", code)
        procs.append(caller)
        assert caller.stdout.readline() == "ready\n"
        for host in ["h1", "h2", "h3", "h1", "h2"]:  # a link down for 7 s, in turn
            lan.link(host, "down")
            time.sleep(7.0)  # the outage itself, longer than wool.DEAD_AFTER
            lan.link(host, "up")
            time.sleep(1.0)  # load on a healed network
        caller.stdin.write("stop\n")
        caller.stdin.flush()
        outcomes = json.loads(caller.stdout.readline())  # chaos() found 0 duplicates
        assert outcomes["WorkerLost"] > 0, outcomes  # the cuts hit calls in flight
        assert caller.wait(timeout=30) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


DEAD_HOST_CALLER = """
import asyncio, wool
from test_reliability import echo

async def main():
    listed = wool.DnsDiscoveryService("{address}:7000")
    async with wool.WorkerPool(discovery=listed, authkey=b"s3cret") as pool:
        await pool.wait_for_workers(1)
        data = bytes(50 * 2**20)
        print("ready", flush=True)
        try:
            while True:  # 50 MiB on the wire, one way then the other
                assert await echo(data) == data
        except wool.WorkerLost as e:
            print(type(e).__name__, e, flush=True)

asyncio.run(main())
"""


def test_a_link_cut_with_50_mib_in_flight_is_worker_lost_within_10_s(lan, tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"s3cret")
    worker = lan.run(
        "h1", sys.executable, "-m", "wool", "worker", "--host", ADDRESSES["h1"],
        "--port", "7000", "--discovery", "none", "--authkey-file", str(key),
    )  # fmt: skip
    code = DEAD_HOST_CALLER.format(address=ADDRESSES["h1"])
    caller = lan.run("c", sys.executable, "-c", code)
    try:
        assert "listening on" in worker.stdout.readline()
        assert caller.stdout.readline() == "ready\n"
        lan.link("h1", "down")  # silent: no FIN, no RST, the data unacknowledged
        cut = time.monotonic()
        line = caller.stdout.readline()
        assert line.startswith("WorkerLost lost worker 10.77.0.11:7000 ("), line
        assert time.monotonic() - cut < 10, line
    finally:
        for proc in [caller, worker]:
            proc.kill()
            proc.wait()


FIRST_TIME_TASKS = """
import wool
import mathlib  # installed on h1 and h2; h3 was deployed without it

@wool.work
async def where(i: int) -> str:
    return wool.current_worker().address

@wool.work
async def fib(n: int) -> int:
    return n if n <= 1 else await fib(n - 1) + await fib(n - 2)

@wool.work
async def square(i: int) -> int:
    return mathlib.square(i)
"""

FIRST_TIME_CALLER = """
import asyncio, json, ssl, sys, wool
sys.path.insert(0, "lib")  # mathlib, as installed here
import mytasks  # on this machine only: it travels (modules=)

async def main():
    context = ssl.create_default_context(cafile="ca.crt")
    context.load_cert_chain("caller.crt", "caller.key")
    dns = wool.DnsDiscoveryService("workers.test", port=7000)  # resolves here only
    async with wool.WorkerPool(discovery=dns, authkey=open("key", "rb").read(),
                               ssl=context, wait=8, modules=[mytasks]) as pool:
        await pool.wait_for_workers(3)
        where = await asyncio.gather(*(mytasks.where(i) for i in range(30)))
        squares = await asyncio.gather(*(mytasks.square(i) for i in range(30)))
        print(json.dumps({"where": sorted(set(where)), "fib": await mytasks.fib(10),
                          "squares": squares == [i * i for i in range(30)]}), flush=True)

asyncio.run(main())
"""


def test_an_operators_first_time_across_machines(lan, tmp_path):
    """Three worker machines that hold wool but not the task module (one also
    lacks a library the tasks use), on 0.0.0.0:7000 with mutual TLS made by
    the README's recipe; DNS names that resolve on the caller only."""
    from test_durable import readme_block

    recipe = readme_block("<!-- the TLS recipe")
    for host in ("h1", "h2", "h3"):  # one CA; a certificate per worker address
        env = {**os.environ, "WORKER_IP": ADDRESSES[host]}
        subprocess.run(["bash", "-ec", recipe], cwd=tmp_path, env=env, check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        for ext in ("crt", "key"):
            (tmp_path / f"worker.{ext}").rename(tmp_path / f"{host}.{ext}")
    (tmp_path / "key").write_bytes(b"s3cret")
    (tmp_path / "mytasks.py").write_text(FIRST_TIME_TASKS)
    (tmp_path / "caller.py").write_text(FIRST_TIME_CALLER)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mathlib.py").write_text("def square(i):\n    return i * i\n")
    (tmp_path / "empty").mkdir()  # where the workers start: no task module there
    hosts = lan.hosts_file("c", [f"{ADDRESSES[h]} workers.test" for h in ADDRESSES if h != "c"])
    procs = []
    try:
        for host in ("h1", "h2", "h3"):
            lib = ["--path", str(tmp_path / "lib")] if host != "h3" else []
            procs.append(lan.run(
                host, sys.executable, "-m", "wool", "worker", "--host", "0.0.0.0",
                "--port", "7000", "--discovery", "none", "--authkey-file", "../key",
                "--tls-cert", f"../{host}.crt", "--tls-key", f"../{host}.key",
                "--tls-ca", "../ca.crt", *lib, cwd=tmp_path / "empty",
            ))  # fmt: skip
            assert "listening on 0.0.0.0:7000" in procs[-1].stdout.readline()
        caller = lan.run("c", sys.executable, "caller.py", cwd=tmp_path)
        procs.append(caller)
        result = json.loads(caller.stdout.readline())
        assert result == {
            "where": [f"{ADDRESSES[h]}:7000" for h in ("h1", "h2", "h3")],
            "fib": 55,  # nested calls, from workers where workers.test does not resolve
            "squares": True,  # h3 refused square(); the others ran all of them
        }
        status = lan.run(
            "c", sys.executable, "-m", "wool", "status", "--discovery", "dns:workers.test:7000",
            "--authkey-file", "key", "--tls-ca", "ca.crt", "--tls-cert", "caller.crt",
            "--tls-key", "caller.key", cwd=tmp_path,
        )  # fmt: skip
        procs.append(status)
        lines = status.stdout.read().splitlines()
        assert status.wait(timeout=30) == 0
        assert sorted(line.split()[1] for line in lines) == [
            f"{ADDRESSES[h]}:7000" for h in ("h1", "h2", "h3")
        ]  # each machine by its address, not 0.0.0.0
    finally:
        hosts.unlink(missing_ok=True)
        for proc in procs:
            proc.kill()
            proc.wait()


def test_the_readmes_first_example_runs_as_written_on_a_lan(lan):
    from test_readme import COMPLETE

    (quick_start,) = [b for b in COMPLETE if "LanDiscoveryService" in b]
    key = {"WOOL_AUTHKEY": "s3cret"}  # the example relies on the environment's key
    worker = lan.run(
        "h1", sys.executable, "-m", "wool", "worker", "--host", ADDRESSES["h1"],
        "--tag", "production", "--discovery", "lan", env=key,
    )  # fmt: skip
    try:
        assert "listening on" in worker.stdout.readline()
        caller = lan.run("c", sys.executable, "-c", quick_start, env=key)
        out, _ = caller.communicate(timeout=60)
        assert caller.returncode == 0 and out.splitlines() == ["55", "55"]
    finally:
        worker.kill()
        worker.wait()
