"""Durable workers: LAN and named local discovery, the `wool` CLI, hybrid pools,
keys and TLS. zeroconf binds 127.0.0.1 only; test_netns.py spans "hosts".

Each test run tags its workers `run-<pid>` and filters on that tag, so
concurrent runs on one machine never share workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import pickle
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import types
import uuid
from pathlib import Path

import pytest
import shutil

import wool
import wool_discovery
from conftest import HERE, in_flight, run_script, until
from test_wool import add, echo

RUN = f"run-{os.getpid()}"
LOOPBACK = ["127.0.0.1"]


def mine(w: wool.WorkerInfo) -> bool:
    return RUN in w.tags


def production(w: wool.WorkerInfo) -> bool:
    return RUN in w.tags and "production" in w.tags


@wool.work
async def where() -> tuple[int, frozenset[str]]:
    me = wool.current_worker()
    return me.pid, me.tags


@contextlib.contextmanager
def cli_worker(*args: str, env=None, cwd=HERE, argv0=(sys.executable, "-m", "wool")):
    """`python -m wool worker ARGS`; yields (process, uid) once it listens."""
    proc = subprocess.Popen(
        [*argv0, "worker", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stderr.read()
        proc.port = int(line.split()[5].rpartition(":")[2])
        yield proc, line.split()[2]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def wool_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    """`python -m wool ARGS`, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "wool", *args],
        cwd=HERE, capture_output=True, text=True, timeout=30, **kw,
    )  # fmt: skip


def ls(*args: str) -> list[str]:
    return wool_cli("ls", *args, check=True).stdout.splitlines()


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"s3cret\n")  # the trailing newline is not part of the key
    return str(path)


@pytest.fixture
def namespace():
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    shutil.rmtree(f"/dev/shm/wool-{name}", ignore_errors=True)


# -- LAN discovery ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lan_pair(uid: str):
    """A publisher and a subscriber that sees only worker `uid`, on 127.0.0.1."""
    publisher = wool.LanDiscoveryService(interfaces=LOOPBACK)
    events = wool.LanDiscoveryService(lambda w: w.uid == uid, interfaces=LOOPBACK)
    events = events.subscribe()
    try:
        yield publisher, events
    finally:
        await events.aclose()
        await publisher.close()


async def test_lan_discovery_sees_added_updated_dropped():
    uid = uuid.uuid4().hex
    info = wool.WorkerInfo(uid, "127.0.0.1", 4242, os.getpid(), "0.1.0", {RUN, "a"})
    updated = wool.WorkerInfo(uid, "127.0.0.1", 4242, os.getpid(), "0.1.0", {"b"}, True)
    async with lan_pair(uid) as (publisher, events):
        await publisher.publish(wool.DiscoveryEvent("worker-added", info))
        assert await anext(events) == wool.DiscoveryEvent("worker-added", info)
        await publisher.publish(wool.DiscoveryEvent("worker-updated", updated))
        assert await anext(events) == wool.DiscoveryEvent("worker-updated", updated)
        await publisher.publish(wool.DiscoveryEvent("worker-dropped", updated))
        assert await anext(events) == wool.DiscoveryEvent("worker-dropped", updated)


async def test_lan_worker_on_every_interface_announces_its_addresses():
    uid = uuid.uuid4().hex
    info = wool.WorkerInfo(uid, "0.0.0.0", 4242, os.getpid(), "0.1.0", {RUN})
    async with lan_pair(uid) as (publisher, events):
        await publisher.publish(wool.DiscoveryEvent("worker-added", info))
        event = await anext(events)
        assert event.info.host == wool_discovery._interface_addresses()[0] != "0.0.0.0"
        assert event.info.port == 4242


def test_discovery_services_are_picklable_descriptions():
    import cloudpickle

    lan = wool.LanDiscoveryService(lambda w: "x" in w.tags, interfaces=LOOPBACK)
    copy = cloudpickle.loads(cloudpickle.dumps(lan))
    assert copy.interfaces == LOOPBACK and copy.filter(
        wool.WorkerInfo("u", "h", 1, 1, "v", {"x"})
    )
    local = cloudpickle.loads(cloudpickle.dumps(wool.LocalDiscoveryService("ns")))
    assert local.namespace == "ns"


def test_import_wool_does_not_need_zeroconf():
    code = "import sys; sys.modules['zeroconf'] = None; import wool; print(wool.work)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# -- Durable workers from the CLI -------------------------------------------------


async def test_lan_pool_sends_tasks_only_to_production_workers(keyfile):
    lan = ["--discovery", "lan", "--interface", "127.0.0.1", "--authkey-file", keyfile]
    with (
        cli_worker("--tag", RUN, "--tag", "production", *lan) as (prod, prod_uid),
        cli_worker("--tag", RUN, "--tag", "staging", *lan) as (_, staging_uid),
    ):
        discovery = wool.LanDiscoveryService(production, interfaces=LOOPBACK)
        async with wool.WorkerPool(discovery=discovery, authkey=b"s3cret"):
            results = await asyncio.gather(*(where() for _ in range(20)))
        assert {pid for pid, _ in results} == {prod.pid}
        assert all("production" in tags for _, tags in results)

        # (mDNS answers take longer than ls's 2 s on a loaded machine: 5)
        listed = ls("--discovery", "lan", "--interface", "127.0.0.1", "--wait", "5")
        assert any(
            line.startswith(prod_uid) and "production" in line for line in listed
        )
        assert any(line.startswith(staging_uid) for line in listed)


async def test_local_named_pool_sends_tasks_only_to_production_workers(namespace):
    local = ["--discovery", f"local:{namespace}"]
    with (
        cli_worker("--tag", RUN, "--tag", "production", *local) as (prod, prod_uid),
        cli_worker("--tag", RUN, *local),
    ):
        discovery = wool.LocalDiscoveryService(namespace, filter=production)
        async with wool.WorkerPool(discovery=discovery):
            results = await asyncio.gather(*(where() for _ in range(20)))
        assert {pid for pid, _ in results} == {prod.pid}
        listed = ls("--discovery", f"local:{namespace}")
        assert len(listed) == 2
        line = next(line for line in listed if line.startswith(prod_uid))
        assert f"pid {prod.pid}" in line and "production" in line and "v0.1.0" in line


def test_sigterm_withdraws_drains_and_exits_zero(namespace):
    with cli_worker("--tag", RUN, "--discovery", f"local:{namespace}") as (proc, uid):
        assert ls("--discovery", f"local:{namespace}")[0].startswith(uid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "stopped" in proc.stdout.read()
        assert ls("--discovery", f"local:{namespace}") == []


async def test_sigterm_lets_an_in_flight_task_finish(namespace):
    with cli_worker("--tag", RUN, "--discovery", f"local:{namespace}") as (proc, _):
        async with wool.WorkerPool(
            discovery=wool.LocalDiscoveryService(namespace)
        ) as pool:
            assert await add(1) == 1  # connected
            call = asyncio.ensure_future(slow_add(2, 3))
            await in_flight(pool)
            assert await add(0) == 0  # ... and the worker has it
            proc.send_signal(signal.SIGTERM)
            assert await call == 5
        assert proc.wait(timeout=10) == 0


@wool.work
async def forever():
    await asyncio.Event().wait()


@wool.work
async def slow_add(a, b):
    await asyncio.sleep(0.5)  # the work itself; nothing waits on this timing
    return a + b


def test_cli_refuses_a_public_address_without_a_key():
    result = wool_cli(
        "worker", "--host", "0.0.0.0",
        env={k: v for k, v in os.environ.items() if k != "WOOL_AUTHKEY"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a key" in result.stderr
    assert "--authkey-file" in result.stderr


def test_cli_reports_a_missing_key_file():
    result = wool_cli("worker", "--authkey-file", "/nonexistent/key")
    assert result.returncode == 2
    assert (
        "wool worker: [Errno 2] No such file or directory: '/nonexistent/key'"
        in result.stderr
    )


@pytest.mark.parametrize(
    "command, spec", [("ls", "dns"), ("ls", "none"), ("worker", "dns:workers:7000")]
)
def test_cli_rejects_an_unknown_discovery(command, spec):
    result = wool_cli(command, "--discovery", spec)
    assert result.returncode == 2
    assert result.stderr == (
        f"wool {command}: --discovery {spec!r}: use lan, local, local:NAME, "
        "dns:NAME[:PORT] (ls) or none (worker)\n"
    )


# -- Pools over discovery ---------------------------------------------------------


async def test_pool_without_workers_names_what_it_waited_on(namespace):
    discovery = wool.LocalDiscoveryService(namespace, filter=production)
    async with wool.WorkerPool(discovery=discovery, wait=0.2):
        with pytest.raises(
            wool.NoWorkersAvailable,
            match=rf"no worker took add\(\) within 0.2 s; waited on "
            rf"LocalDiscoveryService\('{namespace}', filter=production\)",
        ):
            await add(1)


async def test_durable_pool_waits_for_a_worker_that_comes_later(namespace):
    discovery = wool.LocalDiscoveryService(namespace)
    async with wool.WorkerPool(discovery=discovery) as pool:
        call = asyncio.ensure_future(add(40, 2))
        await until(lambda: pool._roster.queued())  # the call waits for a worker
        async with wool.Worker(discovery=wool.LocalDiscoveryService(namespace)):
            assert await call == 42


async def test_hybrid_pool_with_lease(namespace):
    workers = [
        wool.Worker(RUN, discovery=wool.LocalDiscoveryService(namespace))
        for _ in range(3)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for w in workers:
            await stack.enter_async_context(w)
        discovery = wool.LocalDiscoveryService(namespace)
        async with wool.WorkerPool(
            "spawned", size=1, discovery=discovery, lease=2
        ) as pool:
            await pool.wait_for_workers(3)
            pids = {w.pid for w in pool.workers}
            spawned = [w for w in pool.workers if "spawned" in w.tags]
            assert len(spawned) == 1 and spawned[0].pid != os.getpid()
            assert pids == {spawned[0].pid, os.getpid()}  # 2 of 3 discovered workers
            assert sum(w.uid in {x.uid for x in workers} for w in pool.workers) == 2
            results = await asyncio.gather(*(where() for _ in range(9)))
            assert {pid for pid, _ in results} == pids


async def test_missing_and_wrong_keys_are_refused(namespace):
    async with wool.Worker(
        authkey=b"right", discovery=wool.LocalDiscoveryService(namespace)
    ):
        for key in (None, b"wrong"):
            discovery = wool.LocalDiscoveryService(namespace)
            async with wool.WorkerPool(discovery=discovery, authkey=key, wait=5):
                with pytest.raises(wool.AuthenticationError, match="refused the key"):
                    await add(1)
        async with wool.WorkerPool(
            discovery=wool.LocalDiscoveryService(namespace), authkey=b"right"
        ):
            assert await add(1, 1) == 2


async def test_key_from_environment(namespace, monkeypatch):
    monkeypatch.setenv("WOOL_AUTHKEY", "from-env")
    async with wool.Worker(discovery=wool.LocalDiscoveryService(namespace)) as worker:
        assert worker.authkey == b"from-env"
        async with wool.WorkerPool(discovery=wool.LocalDiscoveryService(namespace)):
            assert await add(2, 2) == 4


async def test_killed_worker_is_dropped_and_a_new_one_admitted(namespace):
    async with wool.WorkerPool(discovery=wool.LocalDiscoveryService(namespace)) as pool:
        for _ in range(2):
            with cli_worker("--discovery", f"local:{namespace}") as (proc, uid):
                pid, _ = await where()
                assert pid == proc.pid
                proc.kill()
                proc.wait()
            await until(lambda: all(w.uid != uid for w in pool.workers))


# -- TLS ---------------------------------------------------------------------------


def make_certs(tmp_path: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    paths = {}

    def issue(name, key, issuer_name, issuer_key, ca=False, server=False):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=None), critical=True
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    issuer_key.public_key()
                ),
                critical=False,
            )
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    False, False, False, False, False, True, True, False, False
                ),
                critical=True,
            )
        else:
            usage = (
                ExtendedKeyUsageOID.SERVER_AUTH
                if server
                else ExtendedKeyUsageOID.CLIENT_AUTH
            )
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([usage]), critical=False
            )
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    def save(stem, cert, key=None):
        paths[f"{stem}.crt"] = str(tmp_path / f"{stem}.crt")
        Path(paths[f"{stem}.crt"]).write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
        )
        if key is not None:
            paths[f"{stem}.key"] = str(tmp_path / f"{stem}.key")
            Path(paths[f"{stem}.key"]).write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wool test CA")])
    save("ca", issue("wool test CA", ca_key, ca_name, ca_key, ca=True))
    for stem, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        save(stem, issue(stem, key, ca_name, ca_key, server=server), key)
    return paths


async def test_mutual_tls_accepts_the_right_certificates_and_refuses_others(
    tmp_path, namespace, monkeypatch
):
    # Large messages through TLS too, not beside it in shared memory.
    monkeypatch.setattr(wool, "_machine", lambda: None)
    certs = make_certs(tmp_path)
    args = [
        "--tls-cert",
        certs["server.crt"],
        "--tls-key",
        certs["server.key"],
        "--tls-ca",
        certs["ca.crt"],
    ]
    with cli_worker("--tag", RUN, "--discovery", f"local:{namespace}", *args) as (
        proc,
        uid,
    ):
        assert "tls" in ls("--discovery", f"local:{namespace}")[0]
        client = ssl.create_default_context(cafile=certs["ca.crt"])
        client.load_cert_chain(certs["client.crt"], certs["client.key"])
        async with wool.WorkerPool(
            discovery=wool.LocalDiscoveryService(namespace), ssl=client
        ):
            pid, _ = await where()
            assert pid == proc.pid
            data = os.urandom(10 * 2**20)
            assert await echo(data) == data
            (conn,) = wool._current_pool.get()._roster.conns.values()
            assert conn.out.peer is None

        no_cert = ssl.create_default_context(cafile=certs["ca.crt"])
        info = next(iter(await _listed(namespace)))
        with pytest.raises(wool.AuthenticationError, match="TLS client certificate"):
            source = wool._Source(None, b"", no_cert)
            await wool._Connection.open(info, source, wool._Roster(None, 0, None))
        reader, writer = await asyncio.open_connection(
            info.host, info.port
        )  # plain TCP
        writer.write(wool.MAGIC + bytes(64))
        assert not (await reader.read()).startswith(wool.MAGIC)  # a TLS alert, or EOF
        writer.close()
        assert proc.poll() is None  # and the worker keeps serving
        async with wool.WorkerPool(
            discovery=wool.LocalDiscoveryService(namespace), ssl=client
        ):
            assert await add(1, 2) == 3


def readme_block(marker: str) -> str:
    """The fenced block that follows `marker` in the README."""
    text = (HERE / "README.md").read_text().partition(marker)[2]
    return text.partition("```sh\n")[2].partition("```")[0]


async def test_the_readme_tls_recipe_serves_mutual_tls_nested_calls_and_the_cli(
    tmp_path, namespace
):
    recipe = readme_block("<!-- the TLS recipe")
    env = {**os.environ, "WORKER_IP": "127.0.0.1"}
    subprocess.run(["bash", "-ec", recipe], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    f = {name: str(tmp_path / name) for name in os.listdir(tmp_path)}
    serve = ["--discovery", f"local:{namespace}", "--tls-cert", f["worker.crt"],
             "--tls-key", f["worker.key"], "--tls-ca", f["ca.crt"]]  # fmt: skip
    caller = ["--discovery", f"local:{namespace}", "--tls-ca", f["ca.crt"]]
    with cli_worker(*serve) as (one, _), cli_worker(*serve) as (two, _):
        client = ssl.create_default_context(cafile=f["ca.crt"])
        client.load_cert_chain(f["caller.crt"], f["caller.key"])
        discovery = wool.LocalDiscoveryService(namespace)
        async with wool.WorkerPool(discovery=discovery, ssl=client) as pool:
            await pool.wait_for_workers(2)
            assert [await nested_add(i, 1) for i in range(4)] == [1, 2, 3, 4]
        mine = [*caller, "--tls-cert", f["caller.crt"], "--tls-key", f["caller.key"]]
        listed = ls(*mine)
        assert len(listed) == 2 and all(line.endswith(" tls") for line in listed)
        assert {f"pid {one.pid}", f"pid {two.pid}"} <= {
            " ".join(l.split()[2:4]) for l in listed
        }
        status = wool_cli("status", *mine)
        assert status.returncode == 0 and len(status.stdout.splitlines()) == 2
        for line in ls(*caller):  # no certificate of ours: each says why
            assert "does not answer: worker 127.0.0.1:" in line
            assert "refused our TLS client certificate" in line

    # A worker certificate for serverAuth only: direct calls work, nested ones
    # fail, saying what the certificate lacks.
    (tmp_path / "worker.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    subprocess.run(
        ["openssl", "x509", "-req", "-in", "worker.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "1", "-extfile", "worker.ext", "-out", "worker.crt"],
        cwd=tmp_path, check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    with cli_worker(*serve):
        async with wool.WorkerPool(discovery=discovery, ssl=client):
            assert await add(1, 2) == 3
            with pytest.raises(
                wool.AuthenticationError,
                match=r"nested calls needs a "
                r"certificate whose extendedKeyUsage has clientAuth",
            ):
                await nested_add(1, 2)


async def _listed(namespace):
    events = wool.LocalDiscoveryService(namespace).subscribe()
    try:
        return [(await anext(events)).info]
    finally:
        await events.aclose()


class FixedWorkers:
    """A hand-written discovery: workers at known host:port addresses."""

    def __init__(self, *addresses):
        self.addresses = addresses

    async def subscribe(self):
        for address in self.addresses:
            host, port = address.rsplit(":", 1)
            info = wool.WorkerInfo(address, host, int(port), pid=0, version="")
            yield wool.DiscoveryEvent("worker-added", info)


@wool.work
async def nested_add(a, b):
    return await add(a, b)


async def test_a_custom_discovery_needs_only_uid_host_and_port():
    async with wool.Worker(authkey=b"k") as w1, wool.Worker(authkey=b"k") as w2:
        fixed = FixedWorkers(w1.info.address, w2.info.address)
        async with wool.WorkerPool(discovery=fixed, authkey=b"k") as pool:
            assert await nested_add(2, 3) == 5  # nested: the worker opens `fixed` too
            await pool.wait_for_workers(2)
            assert set(pool.workers) == {w1.info, w2.info}  # who they say they are


async def test_a_filter_that_raises_fails_calls_at_once_with_its_error(namespace):
    async with wool.Worker(discovery=wool.LocalDiscoveryService(namespace)):
        broken = wool.LocalDiscoveryService(namespace, filter=lambda w: w.tags["gpu"])
        async with wool.WorkerPool(discovery=broken):
            with pytest.raises(
                wool.NoWorkersAvailable, match="discovery failed: .*TypeError"
            ):
                await add(1)


# -- Deployments that work the first time -------------------------------------------


def tls_worker(certs, namespace, *extra):
    return cli_worker(
        "--discovery", f"local:{namespace}", "--tls-cert", certs["server.crt"],
        "--tls-key", certs["server.key"], *extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["no ssl= for a TLS worker", "no client certificate", "TLS to a plain worker"],
)
async def test_a_tls_mismatch_fails_fast_with_authentication_error(
    tmp_path, namespace, case
):
    certs = make_certs(tmp_path)
    trusting = ssl.create_default_context(cafile=certs["ca.crt"])
    worker, context, message = {
        "no ssl= for a TLS worker": (
            tls_worker(certs, namespace),
            None,
            "speaks TLS; give this pool ssl=",
        ),
        "no client certificate": (
            tls_worker(certs, namespace, "--tls-ca", certs["ca.crt"]),
            trusting,
            "refused our TLS client certificate, or wants one",
        ),
        "TLS to a plain worker": (
            cli_worker("--discovery", f"local:{namespace}"),
            trusting,
            "does not speak TLS",
        ),
    }[case]
    with worker:
        discovery = wool.LocalDiscoveryService(namespace)
        async with wool.WorkerPool(discovery=discovery, ssl=context) as pool:
            start = asyncio.get_running_loop().time()
            with pytest.raises(wool.AuthenticationError, match=message):
                await add(1)
            assert asyncio.get_running_loop().time() - start < 10
            assert pool.workers == []


@pytest.fixture
def project(tmp_path):
    """A project directory with a task module, as a user would have."""
    (tmp_path / "mytasks.py").write_text(
        "import wool\n\n@wool.work\nasync def double(x):\n    return 2 * x\n"
    )
    return tmp_path


async def test_the_wool_command_imports_task_modules_from_its_directory(
    project, namespace, monkeypatch
):
    monkeypatch.syspath_prepend(str(project))
    import mytasks

    command = str(Path(sys.executable).parent / "wool")  # the console script
    with cli_worker("--discovery", f"local:{namespace}", cwd=project, argv0=[command]):
        async with wool.WorkerPool(discovery=wool.LocalDiscoveryService(namespace)):
            assert await mytasks.double(21) == 42


async def test_a_task_module_the_worker_cannot_import_names_module_worker_and_fix(
    project, namespace, monkeypatch
):
    monkeypatch.syspath_prepend(str(project))
    import mytasks

    with cli_worker("--discovery", f"local:{namespace}"):  # started elsewhere
        discovery = wool.LocalDiscoveryService(namespace)
        async with wool.WorkerPool(discovery=discovery) as pool:
            (worker,) = await pool.wait_for_workers(1)
            with pytest.raises(
                ModuleNotFoundError,
                match=rf"worker {worker.address} cannot import 'mytasks' for double\(\)"
                r".*--path DIR or --preload mytasks",
            ):
                await mytasks.double(1)


async def test_a_worker_that_cannot_import_the_task_is_skipped_for_it(
    project, namespace, monkeypatch, caplog
):
    monkeypatch.syspath_prepend(str(project))
    import mytasks

    local = ["--discovery", f"local:{namespace}"]
    with cli_worker(*local), cli_worker(*local, cwd=project) as (good, _):
        discovery = wool.LocalDiscoveryService(namespace)
        async with wool.WorkerPool(discovery=discovery) as pool:
            await pool.wait_for_workers(2)
            assert await asyncio.gather(*(mytasks.double(i) for i in range(20))) == [
                2 * i for i in range(20)
            ]
            by_pid = {s["pid"]: s for s in await pool.status()}
            assert by_pid.pop(good.pid)["done"] == 20
            (bad,) = by_pid.values()  # it refused: neither done nor failed
            assert (bad["done"], bad["failed"]) == (0, 0)
    skipped = [
        r for r in caplog.records if "cannot run double(), so others" in r.message
    ]
    assert len(skipped) == 1 and "cannot import 'mytasks'" in skipped[0].message
    assert skipped[0].message.startswith("127.0.0.1:")  # names the worker


async def test_modules_sends_a_module_the_workers_do_not_have(
    tmp_path, namespace, monkeypatch
):
    (tmp_path / "boxes.py").write_text(
        "class Box:\n    def __init__(self, v):\n        self.v = v\n"
    )
    (tmp_path / "carried.py").write_text(
        "import wool\nfrom boxes import Box\n\n@wool.work\nasync def double(x):\n"
        "    return Box(2 * x.v) if isinstance(x, Box) else await twice(x)\n\n"
        "@wool.work\nasync def twice(x):\n    return 2 * x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import boxes
    import carried

    with cli_worker("--discovery", f"local:{namespace}"):  # started elsewhere
        discovery = wool.LocalDiscoveryService(namespace)
        async with wool.WorkerPool(discovery=discovery, modules=[carried, boxes]):
            assert await carried.double(21) == 42  # and its nested call
            box = await carried.double(boxes.Box(4))
            assert type(box) is boxes.Box and box.v == 8
    with pytest.raises(
        TypeError, match=r"modules= takes imported modules, not 'carried'"
    ):
        wool.WorkerPool(modules=["carried"])


async def test_a_task_module_that_runs_its_program_on_import_gets_the_main_hint(
    project, namespace, monkeypatch
):
    (project / "script.py").write_text(
        "import asyncio, wool\n\n@wool.work\nasync def one():\n    return 1\n\n"
        "async def main():\n    print(await one())\n\nasyncio.run(main())\n"
    )
    monkeypatch.syspath_prepend(str(project))
    with cli_worker("--discovery", f"local:{namespace}", cwd=project):
        discovery = wool.LocalDiscoveryService(namespace)
        async with wool.WorkerPool(discovery=discovery) as pool:
            await pool.wait_for_workers(1)
            script = types.ModuleType("script")  # as the caller has it, not run
            text = (project / "script.py").read_text().rpartition("asyncio.run")[0]
            exec(compile(text, str(project / "script.py"), "exec"), script.__dict__)
            monkeypatch.setitem(sys.modules, "script", script)
            with pytest.raises(
                RuntimeError,
                match=r"failed to import 'script' for one\(\).*"
                r'under `if __name__ == "__main__":`',
            ):
                await script.one()


def test_preloading_a_missing_module_stops_the_worker_with_one_line():
    result = wool_cli("worker", "--preload", "no_such_module")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "wool worker: cannot preload 'no_such_module': "
        "ModuleNotFoundError(\"No module named 'no_such_module'\")"
    ]


async def test_a_burst_after_wait_for_workers_reaches_every_worker(namespace):
    local = wool.LocalDiscoveryService
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(wool.Worker(discovery=local(namespace)))
        async with wool.WorkerPool(discovery=local(namespace)) as pool:
            await pool.wait_for_workers(3)
            ran_on = await asyncio.gather(*(where_uid() for _ in range(300)))
            assert set(ran_on) == {w.uid for w in pool.workers}


@wool.work
async def where_uid() -> str:
    return wool.current_worker().uid


@wool.work
async def nested_where() -> str:
    return await where_uid()


async def test_a_refused_key_is_logged_once_per_worker_saying_who_saw_it(
    namespace, caplog
):
    caplog.set_level(logging.WARNING, logger="wool")
    local = wool.LocalDiscoveryService
    async with (
        wool.Worker(authkey=b"one", discovery=local(namespace)) as one,
        wool.Worker(authkey=b"two", discovery=local(namespace)) as two,
        wool.WorkerPool(discovery=local(namespace), authkey=b"one") as pool,
    ):
        await pool.wait_for_workers(1)
        for _ in range(20):  # nested calls: worker one's pool finds two as well
            assert await nested_where() == one.uid
        await until(lambda: any("nested" in r.getMessage() for r in caplog.records))
    lines = [
        r.getMessage() for r in caplog.records if "refused the key" in r.getMessage()
    ]
    assert sorted(lines) == sorted(
        [
            f"this pool: worker {two.info.address} refused the key; give callers and "
            "workers the same key (authkey=, --authkey-file or WOOL_AUTHKEY)",
            f"worker {one.info.address}'s nested pool: worker {two.info.address} "
            "refused the key; give callers and workers the same key (authkey=, "
            "--authkey-file or WOOL_AUTHKEY)",
        ]
    )


# -- DNS discovery ---------------------------------------------------------------------


async def test_dns_names_and_addresses_find_workers_who_say_who_they_are(caplog):
    caplog.set_level(logging.DEBUG, logger="wool")
    async with (
        wool.Worker("a", RUN, authkey=b"k") as a,
        wool.Worker("b", RUN, host="0.0.0.0", authkey=b"k") as b,  # two addresses
    ):
        dns = wool.DnsDiscoveryService(
            f"localhost:{a.info.port}", f"127.0.0.1:{b.info.port}",
            f"127.0.0.2:{b.info.port}", interval=0.2, filter=mine,
        )  # fmt: skip
        async with wool.WorkerPool(discovery=dns, authkey=b"k") as pool:
            found = {w.uid: w for w in await pool.wait_for_workers(2)}
            assert set(found) == {a.uid, b.uid}  # their own uids, not addresses
            assert found[a.uid].tags == {"a", RUN} and found[a.uid].pid == os.getpid()
            await until(
                lambda: any("another address" in r.getMessage() for r in caplog.records)
            )
            assert len(pool.workers) == 2  # b, at two addresses, counts once
            assert len(pool._roster.listed) == 3
            assert {await where_uid() for _ in range(20)} == {a.uid, b.uid}


async def test_a_dns_filter_sees_the_workers_own_tags():
    async with (
        wool.Worker("gpu", authkey=b"k") as gpu,
        wool.Worker("cpu", authkey=b"k") as cpu,
    ):
        dns = wool.DnsDiscoveryService(
            gpu.info.address, cpu.info.address, filter=lambda w: "gpu" in w.tags
        )
        async with wool.WorkerPool(discovery=dns, authkey=b"k") as pool:
            assert [w.uid for w in await pool.wait_for_workers(1)] == [gpu.uid]
            assert {await where_uid() for _ in range(10)} == {gpu.uid}
            assert pool.workers == [gpu.info]


async def test_a_name_that_does_not_resolve_is_logged_once_and_fails_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="wool")
    async with wool.Worker(authkey=b"k") as w:
        dns = wool.DnsDiscoveryService("no-such-host.invalid:7000", w.info.address)
        errors: dict[str, str] = {}
        for _ in range(3):  # three rounds of resolving, as subscribe() does
            assert list(await dns.resolve(errors)) == [w.info.address]
        async with wool.WorkerPool(discovery=dns, authkey=b"k"):
            assert await add(1, 2) == 3  # the other name serves
    lines = [r.getMessage() for r in caplog.records if "no-such-host" in r.getMessage()]
    assert len(lines) == 2, lines  # one per subscriber: the loop above, the pool
    assert "no-such-host.invalid does not resolve" in lines[0]


def test_dns_names_are_checked():
    with pytest.raises(ValueError, match="'workers' has no port; write workers:PORT"):
        wool.DnsDiscoveryService("workers")
    with pytest.raises(ValueError, match="the port must be a number"):
        wool.DnsDiscoveryService("workers:http")
    with pytest.raises(TypeError, match="needs at least one name"):
        wool.DnsDiscoveryService()
    service = wool.DnsDiscoveryService("[fd00::7]:7000", "10.0.0.5", port=7001)
    assert service.targets == [("fd00::7", 7000), ("10.0.0.5", 7001)]
    assert pickle.loads(pickle.dumps(service)).targets == service.targets


async def test_a_worker_of_another_protocol_version_is_refused_naming_both():
    async def old_worker(reader, writer):
        writer.write(b"wool\x00\x01" + bytes(wool.NONCE))
        await reader.read()

    server = await asyncio.start_server(old_worker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        dns = wool.DnsDiscoveryService(f"127.0.0.1:{port}")
        async with wool.WorkerPool(discovery=dns, wait=5):
            with pytest.raises(
                wool.AuthenticationError,
                match=r"speaks wool protocol 0001, this caller 0002; run one wool",
            ):
                await add(1)
    finally:
        server.close()


def test_wool_ls_dials_dns_listed_workers_given_the_key(keyfile):
    with cli_worker(
        "--tag", RUN, "--discovery", "none", "--authkey-file", str(keyfile)
    ) as (proc, uid):
        port = proc.port
        (bare,) = ls("--discovery", f"dns:localhost:{port}")
        assert bare == f"127.0.0.1:{port}  listed; give the key to see who answers"
        (dialled,) = ls(
            "--discovery", f"dns:localhost:{port}", "--authkey-file", str(keyfile)
        )
        assert dialled.startswith(
            f"{uid}  127.0.0.1:{port}  pid {proc.pid}  tags {RUN}"
        )


def kubernetes_documents() -> dict[str, dict]:
    yaml = pytest.importorskip("yaml")
    text = (HERE / "deploy" / "kubernetes.yaml").read_text()
    return {d["kind"]: d for d in yaml.safe_load_all(text)}


def test_the_kubernetes_example_is_valid_and_its_commands_parse():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kinds = kubernetes_documents()
    assert set(kinds) == {"Deployment", "Service", "Job"}  # no Secret to reset a key
    for document in kinds.values():  # strict: unknown fields are errors too
        kubernetes_validate.validate(document, "1.30", strict=True)
    dockerfile = (HERE / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["wool"]' in dockerfile
    assert "pip install --no-cache-dir /src" in dockerfile  # this checkout, not PyPI
    assert "COPY deploy/mytasks.py deploy/caller.py /app/" in dockerfile
    assert kinds["Service"]["spec"]["clusterIP"] == "None"  # headless
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "command" not in container  # the image's entrypoint: wool
    args = wool._parser().parse_args(container["args"])
    assert (args.command, args.host, args.port) == ("worker", "0.0.0.0", 7000)
    assert args.authkey_file == "/etc/wool/key" and args.discovery == "none"
    assert args.grace < pod["terminationGracePeriodSeconds"]
    (mount,) = container["volumeMounts"]
    assert Path(args.authkey_file).parent == Path(mount["mountPath"])
    assert pod["volumes"][0]["secret"]["secretName"] == "wool-key"
    probe = container["readinessProbe"]["tcpSocket"]["port"]
    assert probe == container["ports"][0]["name"]
    (caller,) = kinds["Job"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in caller["env"]}
    secret = env["WOOL_AUTHKEY"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "wool-key", "key": "key"}
    service = kinds["Service"]["metadata"]["name"]
    assert env["WOOL_WORKERS"]["value"] == f"{service}:{args.port}"
    assert env["WOOL_REPLICAS"]["value"] == str(kinds["Deployment"]["spec"]["replicas"])


def test_the_kubernetes_caller_runs_against_workers_started_as_the_manifest_says(
    tmp_path,
):
    kinds = kubernetes_documents()
    (worker,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    (caller,) = kinds["Job"]["spec"]["template"]["spec"]["containers"]
    key = tmp_path / "key"
    key.write_text(secrets.token_hex(32))  # as `kubectl create secret` makes it
    here = ("--host", "--port", "--advertise", "--authkey-file")  # pod -> 127.0.0.1
    args = [a for a in worker["args"][1:] if not a.startswith(here)]
    args += ["--host=127.0.0.1", "--port=0", f"--authkey-file={key}"]
    deploy = HERE / "deploy"  # the image's /app
    with cli_worker(*args, cwd=deploy) as (one, _), cli_worker(*args, cwd=deploy) as (
        two, _
    ):  # fmt: skip
        workers = sorted([f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"])
        env = {**os.environ, "WOOL_WORKERS": ",".join(workers), "WOOL_REPLICAS": "2"}
        env["WOOL_AUTHKEY"] = key.read_text()  # as the Job's secretKeyRef gives it
        assert caller["command"][0] == "python"
        result = subprocess.run(
            [sys.executable, *caller["command"][1:]], cwd=deploy, env=env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"workers: {', '.join(workers)}",
        "fibonacci(15) = 610",
        f"ran on: {', '.join(workers)}",
    ]


async def test_a_readiness_probe_logs_nothing_above_debug(caplog):
    caplog.set_level(logging.DEBUG, "wool")
    probed = "closed before the handshake"
    async with wool.Worker() as worker:
        for reset in (False, True, False, True):  # a tcpSocket probe: connect,
            _, writer = await asyncio.open_connection(
                worker.info.host, worker.info.port
            )
            if reset:  # and close before a byte, with a FIN or with an RST
                linger = struct.pack("ii", 1, 0)
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, linger
                )
            writer.close()
        await until(lambda: sum(probed in r.message for r in caplog.records) == 4)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_worker_address_where_nothing_listens_is_named_with_the_cause(caplog):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # a port of ours, where nothing listens
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        nobody = wool.DnsDiscoveryService(address)
        async with wool.WorkerPool(discovery=nobody, wait=0.5):
            with pytest.raises(
                wool.NoWorkersAvailable,
                match=rf"waited on DnsDiscoveryService\('{address}'\); "
                rf"worker {address}: Connection refused$",
            ):
                await add(1)
    (logged,) = [r.message for r in caplog.records if address in r.message]
    assert logged == f"this pool: worker {address}: Connection refused"  # once


def test_a_pool_that_could_never_have_a_worker_is_refused_at_once():
    with pytest.raises(ValueError, match=r"WorkerPool\(size=0\) would have no worker"):
        wool.WorkerPool(size=0)


def test_a_main_function_that_reads_an_unpicklable_global_names_it():
    result = run_script(
        """
        import asyncio, threading, wool
        lock = threading.Lock()

        @wool.work
        async def guarded():
            with lock:
                return 1

        async def main():
            async with wool.WorkerPool(size=1):
                await guarded()

        try:
            asyncio.run(main())
        except TypeError as e:
            print(e)
        """
    )
    assert result.stdout.startswith("cannot send guarded() to a worker: cannot pickle")
    assert result.stdout.rstrip().endswith(
        "(its global 'lock' holds 'lock'); define it in a module the workers "
        "import, or make that value in it"
    ), result.stdout + result.stderr


def unsealed_evil(marker: Path, kind: int, rid: int) -> bytes:
    """A frame over _Seal.SMALL whose tag is the zeros of an unsealed body:
    what a relay would inject if TLS trust were granted where it must not."""
    body = pickle.dumps(RunsOnLoad(str(marker), "x" * 2 * wool._Seal.SMALL))
    return wool.HEADER.pack(len(body), kind, rid) + body + bytes(wool.TAG)


class RunsOnLoad:
    def __init__(self, marker, padding):
        self.marker, self.padding = marker, padding

    def __reduce__(self):  # writes the padding: a body over _Seal.SMALL
        return (Path.write_text, (Path(self.marker), self.padding))


@pytest.mark.parametrize("verifying", [True, False])
async def test_a_tls_relay_runs_nothing_and_only_verified_tls_goes_unsealed(
    tmp_path, verifying, caplog
):
    """A fake record points a pool at a relay that ends the caller's TLS with
    a certificate of its own, opens TLS to the real worker and passes the
    wool handshake on, then injects unsealed frames both ways. A caller that
    verifies refuses the relay's certificate; one that does not keeps every
    MAC (no side verified the other), so the injection is caught."""
    (tmp_path / "ours").mkdir()
    (tmp_path / "relays").mkdir()
    certs, other = make_certs(tmp_path / "ours"), make_certs(tmp_path / "relays")
    on_worker, on_caller = tmp_path / "worker-pwned", tmp_path / "caller-pwned"
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(certs["server.crt"], certs["server.key"])
    relays = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    relays.load_cert_chain(other["server.crt"], other["server.key"])  # not trusted
    onward = ssl.create_default_context(cafile=certs["ca.crt"])

    async def relay(reader, writer):
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", real.info.port, ssl=onward
        )
        writer.write(await up_reader.readexactly(len(wool.MAGIC) + wool.NONCE))
        up_writer.write(await reader.readexactly(len(wool.MAGIC) + 64))
        writer.write(await up_reader.readexactly(1 + wool.DIGEST))

        answered = asyncio.Event()  # the worker took (or refused) the relay's task

        async def pump(src, dst, inject=False):
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    header = await src.readexactly(wool.HEADER.size)
                    size, kind, rid = wool.HEADER.unpack(header)
                    frame = header + await src.readexactly(size + wool.TAG)
                    if rid == 99 and not inject:
                        answered.set()  # its answer is the relay's, not passed on
                        continue
                    dst.write(frame)
                    if inject and kind == wool.HELLO:  # a task of its own, then
                        dst.write(unsealed_evil(on_worker, wool.TASK, 99))
                        await answered.wait()  # the caller's, once it was seen
                    elif inject and kind == wool.TASK:  # an answer of its own
                        writer.write(unsealed_evil(on_caller, wool.RESULT, rid))
            answered.set()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=relays)
    port = server.sockets[0].getsockname()[1]
    caller = ssl.create_default_context(cafile=certs["ca.crt"])
    if not verifying:
        caller.check_hostname, caller.verify_mode = False, ssl.CERT_NONE
    listed = wool.DnsDiscoveryService(f"127.0.0.1:{port}")
    try:
        async with wool.Worker(authkey=b"k", ssl=served) as real:
            async with wool.WorkerPool(
                discovery=listed, authkey=b"k", ssl=caller, wait=3
            ):
                with pytest.raises((wool.WorkerLost, wool.NoWorkersAvailable,
                                    wool.AuthenticationError)):  # fmt: skip
                    await add(1, 2)
            assert not on_worker.exists() and not on_caller.exists()
            lines = " ".join(r.getMessage() for r in caplog.records)
            if verifying:
                assert "has a certificate we do not trust" in lines
            else:
                assert "a frame failed its MAC check" in lines
    finally:
        server.close()


async def test_verified_tls_leaves_large_bodies_unsealed_and_plain_tcp_does_not(
    tmp_path, namespace
):
    certs = make_certs(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(certs["server.crt"], certs["server.key"])
    caller = ssl.create_default_context(cafile=certs["ca.crt"])
    data = os.urandom(3 * 2**20)
    for tls in (True, False):
        async with wool.Worker(authkey=b"k", ssl=served if tls else None) as worker:
            listed = wool.DnsDiscoveryService(worker.info.address)
            async with wool.WorkerPool(
                discovery=listed, authkey=b"k", ssl=caller if tls else None
            ) as pool:
                assert await echo(data) == data
                (conn,) = pool._roster.conns.values()
                (peer,) = worker._peers
                seals = [
                    conn.out.seal,
                    conn.frames.seal,
                    peer.out.seal,
                    peer.frames.seal,
                ]
                assert [s.trusted for s in seals] == [tls] * 4


class CallerOnly(FixedWorkers):
    """FixedWorkers in the caller, and nothing on a worker (as a DNS name
    that resolves only where the caller is)."""

    async def subscribe(self):
        if wool.current_worker() is not None:
            await asyncio.Event().wait()
        async for event in super().subscribe():
            yield event


async def test_a_seed_that_cannot_be_reached_is_forgotten_quietly(caplog):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # a port of ours, where nothing listens
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
        async with wool.Worker(authkey=b"k") as worker:
            listed = CallerOnly(worker.info.address, dead)
            async with wool.WorkerPool(discovery=listed, authkey=b"k") as pool:
                await pool.wait_for_workers(1)
                assert await nested_add(2, 3) == 5  # through the seed that works
                ((nested, _),) = worker._nested.values()
                await until(lambda: dead not in nested._roster.listed)
    nested_lines = [r.message for r in caplog.records if "nested pool" in r.message]
    assert not [line for line in nested_lines if dead in line]  # a hint, not an error
