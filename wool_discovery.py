"""Discovery for wool: how callers find workers, and workers announce themselves.

    info = WorkerInfo(uid, host, port, pid, version, tags, secure)
    await service.publish(DiscoveryEvent("worker-added", info))    # a worker
    async for event in service.subscribe():                        # a pool
        ...  # "worker-added" | "worker-updated" | "worker-dropped"

Three services, all picklable descriptions (a task can carry "its pool" to a
worker, which then opens the same service to dispatch nested calls):

    LocalDiscoveryService(namespace)   a discovery table in /dev/shm, this machine
    LanDiscoveryService(filter)        DNS-SD over mDNS, `_wool._tcp.local.`
    DnsDiscoveryService(*names)        what DNS names resolve to (clouds,
                                       Kubernetes), or fixed addresses

Any object with an async `subscribe()` yielding DiscoveryEvents (and, where
workers announce themselves through it, an async `publish(event)`) works as
`WorkerPool(discovery=...)`. Discovery only says where a worker *is*: whether
it is alive is learnt from its TCP connection, never from these records.

Sections: worker records, local discovery (the discovery table), LAN discovery,
DNS discovery.

wool is licensed Apache-2.0; https://github.com/wool-labs/wool"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from socket import SOCK_STREAM
from stat import S_ISDIR
from typing import Any, Literal

__all__ = [
    "DiscoveryEvent", "DnsDiscoveryService", "LanDiscovery", "LanDiscoveryService",
    "LocalDiscovery", "LocalDiscoveryService", "WorkerInfo",
]  # fmt: skip

SERVICE_TYPE = "_wool._tcp.local."
RECORD = 2**16  # bytes of a local record read, at most
POLL_MIN = 0.002  # seconds between polls of a discovery table after a change,
POLL_MAX = 0.05  # ... backing off to this when nothing changes
LIVENESS_EVERY = 0.5  # seconds between checks that listed local pids still run
REANNOUNCE_EVERY = 5.0  # seconds between mDNS re-announcements of a worker

EventType = Literal["worker-added", "worker-updated", "worker-dropped"]
log = logging.getLogger("wool")


# -- Worker records -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """Where a worker listens and what it offers; a discovery filter's argument."""

    uid: str
    host: str
    port: int
    pid: int
    version: str
    tags: frozenset[str] = frozenset()
    secure: bool = False  # the worker speaks TLS

    def __post_init__(self):  # a record is data from elsewhere: of these types, or none
        object.__setattr__(self, "tags", frozenset(self.tags))
        fields = (self.uid, self.host, self.port, self.pid, self.version, self.secure)
        strings = all(isinstance(t, str) for t in self.tags)
        if list(map(type, fields)) != [str, str, int, int, str, bool] or not strings:
            raise TypeError(f"not a worker record: {self!r}")

    def __hash__(self):  # pools look workers up per task: keep it cheap
        return hash(self.uid)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        return f"{host}:{self.port}"

    def to_json(self, **extra) -> bytes:
        fields = dataclasses.asdict(self) | {"tags": sorted(self.tags)} | extra
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> WorkerInfo:
        fields = json.loads(data)
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class DiscoveryEvent:
    """A change in the set of workers a discovery service sees."""

    type: EventType
    info: WorkerInfo


def _changes(known: dict[str, WorkerInfo], seen: dict[str, WorkerInfo], filter):
    """Events that turn `known` into `seen` (filtered); updates `known`."""
    seen = {u: i for u, i in seen.items() if filter is None or filter(i)}
    for uid in [u for u in known if u not in seen]:
        yield DiscoveryEvent("worker-dropped", known.pop(uid))
    for uid, info in seen.items():
        if (old := known.get(uid)) != info:
            known[uid] = info
            yield DiscoveryEvent("worker-updated" if old else "worker-added", info)


def _describe(cls_name: str, arg: str, filter) -> str:
    if filter is None:
        return f"{cls_name}({arg})"
    name = getattr(filter, "__qualname__", None) or repr(filter)
    return f"{cls_name}({arg}{', ' if arg else ''}filter={name})"


# -- Local discovery: a discovery table in /dev/shm ---------------------------------
#
# A namespace is a directory, /dev/shm/wool-<namespace>, of one file per
# worker: its WorkerInfo as JSON (never pickle: a record is data, whoever
# wrote it), written whole under a temporary name and renamed into place, so
# a reader never sees half of one. Every record added or removed changes the
# directory's mtime, which readers poll. Only a directory of our own user,
# private to it, is used: another user could otherwise squat the name or
# forge records. Records whose pid is not a running process of ours are stale
# (a SIGKILLed worker) or foreign, and are removed by whoever sees them next.


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):  # gone, another
        return False  # user's, or no pid at all
    return pid > 0


def _private(path: str) -> os.stat_result:
    """The stat of directory `path`, which must be ours and private."""
    stat = os.stat(path, follow_symlinks=False)  # FileNotFoundError if absent
    if not S_ISDIR(stat.st_mode) or stat.st_uid != os.getuid() or stat.st_mode & 0o77:
        what = "" if S_ISDIR(stat.st_mode) else " is not a directory, and"
        raise PermissionError(
            f"the discovery table {path}{what} belongs to uid {stat.st_uid} with mode "
            f"{stat.st_mode & 0o777:o}; wool uses only a directory its own user made "
            "private: remove it (its owner or root can) or use another namespace"
        )
    return stat


class LocalDiscoveryService:
    """Workers on this machine, listed in a discovery table under a namespace.

    Unrelated processes that use the same namespace see each other: `wool
    worker --discovery local:NAME` publishes there and
    `WorkerPool(discovery=LocalDiscoveryService("NAME"))` finds it. A named
    namespace (`/dev/shm/wool-NAME`) outlives its workers; an ephemeral
    pool's private one is removed when the pool exits. With `create=False`,
    publishing never creates it: it fails (FileNotFoundError) once it is gone."""

    def __init__(self, namespace: str | None = None, *, filter=None, create=True):
        namespace = namespace or "default"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", namespace):
            raise ValueError(
                f"local discovery namespace {namespace!r} must be 1-64 letters, "
                "digits, '_', '.' or '-'"
            )
        self.namespace, self.filter, self.create = namespace, filter, create
        self.path = f"/dev/shm/wool-{namespace}"

    def __repr__(self):
        return _describe("LocalDiscoveryService", repr(self.namespace), self.filter)

    def records(self, cache: dict | None = None) -> dict[str, WorkerInfo]:
        """uid -> WorkerInfo of the live records; removes stale ones. `cache`
        (file name -> (inode, info)) spares reading a record twice."""
        cache, seen = {} if cache is None else cache, {}
        for entry in os.scandir(self.path):
            if entry.name.startswith("."):  # being written, by a live writer?
                writer = entry.name.split(".")[1]
                if writer.isdigit() and _pid_alive(int(writer)):
                    continue
                info = None
            elif not entry.is_file(follow_symlinks=False):  # no FIFO, no link
                info = None
            elif (cached := cache.get(entry.name)) and cached[0] == entry.inode():
                info = cached[1]
            else:
                try:
                    with open(entry.path, "rb") as f:
                        info = WorkerInfo.from_json(f.read(RECORD))
                except FileNotFoundError:  # removed meanwhile
                    continue
                except Exception:  # a torn or foreign record: stale
                    info = None
            if info is None or not _pid_alive(info.pid):
                remove = os.rmdir if entry.is_dir(follow_symlinks=False) else os.unlink
                with contextlib.suppress(OSError):
                    remove(entry.path)
                continue
            seen[entry.name] = (entry.inode(), info)
        cache.clear()
        cache.update(seen)
        return {info.uid: info for _, info in seen.values()}

    async def publish(self, event: DiscoveryEvent) -> None:
        """Add, update or withdraw `event.info` in the namespace."""
        if self.create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path, 0o700)
        _private(self.path)
        info, name = event.info, event.info.uid.encode().hex()
        if event.type == "worker-dropped":
            return self.withdraw(info.uid)
        if len(data := info.to_json()) > RECORD:
            raise ValueError(
                f"a worker record of {len(data)} bytes is over {RECORD}; use fewer "
                "or shorter tags"
            )
        written = f"{self.path}/.{os.getpid()}.{name}"
        with open(written, "wb") as f:
            f.write(data)
        os.replace(written, f"{self.path}/{name}")

    async def subscribe(self) -> AsyncIterator[DiscoveryEvent]:
        """Events for the namespace's workers: those present first, as added."""
        known, files = dict[str, WorkerInfo](), dict[str, tuple]()
        delay, seen, checked = POLL_MIN, None, 0.0
        while True:
            now = time.monotonic()
            with contextlib.suppress(FileNotFoundError):  # not yet made
                changed = _private(self.path).st_mtime_ns
                if changed != seen or now - checked > LIVENESS_EVERY:
                    seen, checked = changed, now
                    for event in _changes(known, self.records(files), self.filter):
                        delay = POLL_MIN
                        yield event
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    def withdraw(self, uid: str) -> None:
        """Remove worker `uid`'s record now (also from a thread, or a process
        on its way out)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.path}/{uid.encode().hex()}")

    async def close(self):
        """Nothing to release (a record stays until it is withdrawn)."""

    def remove(self) -> None:
        """Remove the namespace and its records (an ephemeral pool's)."""
        shutil.rmtree(self.path, ignore_errors=True)


# -- LAN discovery: DNS-SD over mDNS ----------------------------------------------
#
# One service per worker, `<uid>._wool._tcp.local.`, its address records the
# worker's addresses, its TXT record the rest of its WorkerInfo. zeroconf is
# imported here only, so `import wool` works without it.


def _interface_addresses() -> list[str]:
    """This machine's IPv4 and IPv6 addresses, IPv4 first, without loopback
    and link-local ones (what a worker on 0.0.0.0 announces)."""
    import ifaddr  # a dependency of zeroconf

    ips = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips]
    found = [a if isinstance(a, str) else a[0] for a in ips]  # IPv6: (address, ...)
    found = [a for a in found if not (a.startswith(("127.", "fe80")) or a == "::1")]
    return sorted(found, key=lambda a: ":" in a) or ["127.0.0.1"]  # IPv4 first


def _to_service(info: WorkerInfo, addresses: list[str]):
    from zeroconf.asyncio import AsyncServiceInfo

    properties = {
        "uid": info.uid, "pid": str(info.pid), "version": info.version,
        "tags": ",".join(sorted(info.tags)), "secure": "1" if info.secure else "0",
    }  # fmt: skip
    return AsyncServiceInfo(
        SERVICE_TYPE, f"{info.uid}.{SERVICE_TYPE}", port=info.port,
        properties=properties, server=f"wool-{info.uid}.local.",
        parsed_addresses=addresses,
    )  # fmt: skip


def _from_service(service) -> WorkerInfo | None:
    props = {k.decode(): (v or b"").decode() for k, v in service.properties.items()}
    addresses = service.parsed_addresses()
    if not addresses or not {"uid", "pid", "version"} <= props.keys():
        return None  # not a wool worker, or not resolved
    addresses.sort(key=lambda a: ":" in a)  # IPv4 first
    tags = frozenset(t for t in props.get("tags", "").split(",") if t)
    with contextlib.suppress(ValueError):  # a pid that is not a number
        return WorkerInfo(
            props["uid"], addresses[0], service.port, int(props["pid"]),
            props["version"], tags, props.get("secure") == "1",
        )  # fmt: skip
    return None


class LanDiscoveryService:
    """Workers on the local network, found with DNS-SD over mDNS (which
    does not cross routers, and most clouds block). `interfaces` goes to
    zeroconf: None for all, or a list of addresses. A worker re-announces
    itself every REANNOUNCE_EVERY seconds, so browsers that missed it (a
    partition that healed) find it without a restart."""

    def __init__(self, filter: Callable | None = None, *, interfaces=None):
        if isinstance(interfaces, str):
            raise TypeError(f"interfaces is a list of addresses, like [{interfaces!r}]")
        self.filter, self.interfaces = filter, interfaces
        self._zc: Any = None  # this process's publishing zeroconf
        self._services: dict[str, object] = {}
        self._announcer: asyncio.Task | None = None

    def __repr__(self):
        arg = f"interfaces={self.interfaces!r}" if self.interfaces else ""
        return _describe("LanDiscoveryService", arg, self.filter)

    def __getstate__(self):  # a description: what it published stays here
        return self.__dict__ | {"_zc": None, "_services": {}, "_announcer": None}

    def _zeroconf(self):
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        if self.interfaces is None:
            return AsyncZeroconf(interfaces=InterfaceChoice.All)
        v4 = all(":" not in i for i in self.interfaces if isinstance(i, str))
        version = IPVersion.V4Only if v4 else IPVersion.All
        return AsyncZeroconf(interfaces=self.interfaces, ip_version=version)

    async def publish(self, event: DiscoveryEvent) -> None:
        """Register, update or withdraw `event.info` on the network."""
        info = event.info
        zc = self._zc = self._zc or self._zeroconf()
        if event.type == "worker-dropped":
            if (service := self._services.pop(info.uid, None)) is not None:
                await (await zc.async_unregister_service(service))
            return
        wildcard = info.host in ("0.0.0.0", "::", "")
        service = _to_service(info, _interface_addresses() if wildcard else [info.host])
        if info.uid in self._services:
            self._services[info.uid] = service
            return await (await zc.async_update_service(service))
        # Skipping the uniqueness probes is safe: the name holds a fresh uid.
        await (await zc.async_register_service(service, cooperating_responders=True))
        self._services[info.uid] = service
        if self._announcer is None:
            self._announcer = asyncio.ensure_future(self._reannounce())

    async def _reannounce(self):
        # After its start-up queries a browser only refreshes records it knows;
        # one that missed our announcement (a partition) would never see us.
        while True:
            await asyncio.sleep(REANNOUNCE_EVERY)
            for service in list(self._services.values()):
                with contextlib.suppress(Exception):
                    await (await self._zc.async_update_service(service))

    async def subscribe(self) -> AsyncIterator[DiscoveryEvent]:
        """Events for the wool workers on the network: present ones first."""
        from zeroconf import ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

        zc = self._zeroconf()
        changes, resolving = asyncio.Queue[Any](), set[asyncio.Task]()

        async def resolve(name: str):
            service = AsyncServiceInfo(SERVICE_TYPE, name)
            if await service.async_request(zc.zeroconf, 3000):
                changes.put_nowait((name, _from_service(service)))

        def on_change(zeroconf, service_type, name, state_change):
            if state_change is ServiceStateChange.Removed:
                changes.put_nowait((name, None))
            else:
                task = asyncio.ensure_future(resolve(name))
                resolving.add(task)
                task.add_done_callback(resolving.discard)

        browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=[on_change])
        current, known = dict[str, WorkerInfo | None](), dict[str, WorkerInfo]()
        try:
            while True:
                name, current[name] = await changes.get()  # None: gone
                seen = {i.uid: i for i in current.values() if i is not None}
                for event in _changes(known, seen, self.filter):
                    yield event
        finally:
            for task in resolving:
                task.cancel()
            await browser.async_cancel()
            await zc.async_close()

    async def close(self):
        """Withdraw what this process published and release the network."""
        if self._announcer is not None:
            self._announcer.cancel()
            self._announcer = None
        if self._zc is not None:
            zc, self._zc = self._zc, None
            self._services.clear()
            await zc.async_close()  # sends goodbyes for what is still registered


# -- DNS discovery: what names resolve to ------------------------------------------
#
# Orchestrators publish workers as DNS names (a Kubernetes headless service
# resolves to one address per ready pod). A record here is only an address:
# who answers there is learnt from the worker itself, after the handshake, and
# that is what `filter` sees (the pool applies it).


def _split(name: str, port: int | None) -> tuple[str, int]:
    """(host, port) of "host", "host:port", "[v6]:port" or a bare IPv6 address."""
    host, given = name, None
    if name.startswith("["):
        host, _, rest = name[1:].partition("]")
        given = rest[1:] if rest.startswith(":") else None
    elif name.count(":") == 1:
        host, _, given = name.partition(":")
    if given is not None:
        if not given.isdigit():
            raise ValueError(f"{name!r}: the port must be a number")
        return host, int(given)
    if port is None:
        raise ValueError(f"{name!r} has no port; write {name}:PORT or give port=")
    return host, port


def _literal(host: str) -> str | None:
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    return None


class DnsDiscoveryService:
    """Workers at the addresses DNS names resolve to, re-resolved every
    `interval` seconds: each name a DNS name or an address, with `:port`
    (`[v6]:port`) or `port`, as in DnsDiscoveryService("10.0.0.5:7000",
    "workers.svc.cluster.local", port=7000). Every address (A and AAAA) is
    a worker, dropped once it is gone from the answers; a name that does not
    resolve is logged once per change and tried again. Records carry no uid,
    pid or tags: the pool learns them from the worker, and applies `filter`."""

    def __init__(self, *names: str, port=None, interval: float = 5.0, filter=None):
        if not names:
            raise TypeError("DnsDiscoveryService needs at least one name or address")
        if not interval > 0:
            raise ValueError(f"interval must be seconds > 0, not {interval!r}")
        self.names, self.port, self.interval = names, port, interval
        self.filter, self.quiet = filter, False  # quiet: failures at DEBUG
        self.targets = [_split(name, port) for name in names]

    def __repr__(self):
        names = ", ".join(map(repr, self.names))
        return _describe("DnsDiscoveryService", names, self.filter)

    async def resolve(self, errors: dict | None = None) -> dict[str, WorkerInfo]:
        """What the names resolve to now: a record per address, by its uid
        ("address:port"). A name that fails is logged when its error changes
        (`errors` remembers: name -> last error)."""
        loop, found = asyncio.get_running_loop(), {}
        errors = {} if errors is None else errors
        for host, port in self.targets:
            try:
                answers: list = [(0, 0, 0, "", (_literal(host), port))]
                if answers[0][4][0] is None:  # not an address: resolve it
                    answers = await loop.getaddrinfo(host, port, type=SOCK_STREAM)
            except OSError as e:  # socket.gaierror: no such name, no DNS server
                if errors.get(host) != str(e):  # (quiet in a worker's nested pool,
                    log.log(  # where the caller's list stands in)
                        logging.DEBUG if self.quiet else logging.WARNING,
                        "%r: %s does not resolve (%s); trying again", self, host, e,
                    )  # fmt: skip
                errors[host] = str(e)
                continue
            if errors.pop(host, None) is not None:
                log.warning("%r: %s resolves again", self, host)
            for *_, sockaddr in answers:
                address = ipaddress.ip_address(sockaddr[0].split("%")[0]).compressed
                uid = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
                found[uid] = WorkerInfo(uid, address, port, 0, "")
        return found

    async def subscribe(self) -> AsyncIterator[DiscoveryEvent]:
        """Events for the addresses: those resolved first, as added."""
        known, errors = dict[str, WorkerInfo](), dict[str, str]()
        while True:
            for event in _changes(known, await self.resolve(errors), None):
                yield event
            await asyncio.sleep(self.interval)


LocalDiscovery = LocalDiscoveryService
LanDiscovery = LanDiscoveryService
