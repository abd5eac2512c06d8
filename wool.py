"""wool: run async functions as tasks on a pool of worker processes.

    @wool.work
    async def fibonacci(n: int) -> int:
        if n <= 1:
            return n
        return await fibonacci(n - 1) + await fibonacci(n - 2)

    async with wool.WorkerPool(size=4):
        print(await fibonacci(10))

How a call travels (one TCP connection per pool and worker, many tasks on it):

    caller ------ HELLO, DEFINE, TASK, NEXT/THROW/CLOSE, CANCEL ------> worker
      ^  <----------- ACCEPTED | REFUSED, RESULT | ERROR | STOP ------'  |
      '-- WorkerPool <- discovery (shared memory, mDNS) <- publish ------'

Each frame is a fixed header (body length, kind, request id) and a pickle
body. A connection opens with an HMAC challenge-response on a shared key:
nothing is unpickled before the peer proved it holds the key.

Sections, top-down: errors; the public API (`work`, `timeout`, `ContextVar`,
`WorkerPool`, load balancers); frames (pure); streams (handshake, receiving,
sending); the worker; pool internals (connections, calls, generators); entry
points (spawned worker, CLI, demo).

Version 0.1.0. Licensed Apache-2.0. https://github.com/wool-labs/wool
"""

from __future__ import annotations

import argparse
import asyncio
import collections.abc
import contextlib
import contextvars
import enum
import functools
import hmac
import importlib
import inspect
import itertools
import logging
import os
import pickle
import secrets
import signal
import socket
import ssl
import struct
import sys
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, Self, TypeVar, overload

import cloudpickle

from wool_discovery import (
    DiscoveryEvent,
    LanDiscovery,
    LanDiscoveryService,
    LocalDiscovery,
    LocalDiscoveryService,
    WorkerInfo,
)

__all__ = [
    "AuthenticationError",
    "ContextVar",
    "DiscoveryEvent",
    "LanDiscovery",
    "LanDiscoveryService",
    "LeastLoadedLoadBalancer",
    "LocalDiscovery",
    "LocalDiscoveryService",
    "NoWorkersAvailable",
    "ProtocolError",
    "RemoteError",
    "RoundRobinLoadBalancer",
    "Task",
    "WoolError",
    "Worker",
    "WorkerInfo",
    "WorkerLost",
    "WorkerPool",
    "current_worker",
    "routine",
    "timeout",
    "work",
]

__version__ = "0.1.0"

MAX_FRAME = 256 * 2**20  # bytes in one frame; larger data belongs in a file
HANDSHAKE_TIMEOUT = 5.0  # seconds a new connection has to authenticate
WAIT = 30.0  # seconds a call waits for a worker to appear before giving up
GRACE = 5.0  # seconds in-flight tasks get to finish when a worker stops
KEEPALIVE = 1.0  # seconds of silence before the kernel probes a peer ...
DEAD_AFTER = 3.0  # ... and seconds without an answer before the link is dead
MAX_CONNECTIONS = 1024  # per worker; more are closed at once
HIGH_WATER = 4 * 2**20  # unsent reply bytes at which a worker stops reading
RESPAWNS_PER_MINUTE = 10  # per pool, so a task that kills workers cannot fork-bomb

log = logging.getLogger("wool")

P = ParamSpec("P")
R = TypeVar("R")


# -- Errors -------------------------------------------------------------------
#
#   WoolError
#   +-- NoWorkersAvailable   no worker could take the task within the wait
#   +-- WorkerLost           the worker's connection died with the task on it
#   +-- AuthenticationError  the key (or certificate) was refused
#   +-- ProtocolError        a peer sent bytes that are not wool frames
#   +-- RemoteError          a worker's exception that could not be rebuilt here


class WoolError(Exception):
    """Base of the errors wool raises itself."""


class NoWorkersAvailable(WoolError):
    """No worker could take the task: outside a pool, or none within the wait."""


class WorkerLost(WoolError):
    """The worker's connection died after it accepted the task. The task may
    or may not have run; wool does not run it again (at-most-once)."""


class AuthenticationError(WoolError):
    """The peer refused our key, or did not prove it holds the same key."""


class ProtocolError(WoolError):
    """A peer sent something that is not a valid wool frame."""


class RemoteError(WoolError):
    """A worker's exception that could not be pickled or rebuilt in the caller.

    Carries the original type name, message and the worker's traceback text.
    """

    def __init__(self, type_name: str, message: str, traceback: str):
        super().__init__(type_name, message, traceback)
        self.type_name, self.message, self.traceback = type_name, message, traceback

    def __str__(self):
        return f"{self.type_name}: {self.message}"


class _RemoteTraceback(Exception):
    """The worker's traceback, attached as `__cause__` (as concurrent.futures)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb.rstrip("\n")

    def __str__(self):
        return self.tb


class _NotAccepted(Exception):
    """Internal: the worker never accepted the task, so another one may run it."""


# -- The public API: work, WorkerPool, load balancers ----------------------------


@overload
def work(fn: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def work(
    *, timeout: float | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
def work(fn: Callable[P, R] | None = None, /, *, timeout: float | None = None):
    """Make an async function (or async generator) run as a task on a worker.

    Calling the result returns what the function would: a coroutine, which
    dispatches when awaited, or an async generator, which dispatches when
    first iterated and then pulls one value per step from the worker. The
    task goes to the pool of the enclosing `async with WorkerPool()`, or, in
    a worker, to the pool that sent the running task.

    `@work(timeout=s)` bounds each call's run on the worker: past `s`
    seconds the task is cancelled there and the caller gets TimeoutError
    (`with wool.timeout(s):` overrides it for the calls made in a block).
    On methods, `@work` is the innermost decorator (`@classmethod` above it).
    Raises TypeError at decoration time for anything but `async def`.
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
    if fn is None:
        return functools.partial(work, timeout=timeout)
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return _RemoteGenerator(wrapper, args, kwargs)

    elif inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            return await _dispatch(wrapper, args, kwargs)

    else:
        hint = ""
        if isinstance(fn, (classmethod, staticmethod)):
            hint = f"; put @wool.work below @{type(fn).__name__}"
        raise TypeError(
            f"@wool.work needs an `async def` function or async generator, "
            f"not {fn!r}{hint}"
        )
    wrapper.__wool_work__ = fn  # what the worker runs
    wrapper.__wool_timeout__ = timeout
    return wrapper


routine = work  # the upstream project's name


# The wrappers above name nothing but module-level functions and classes, so
# a closure's wrapper pickles by value without dragging module state along.
async def _dispatch(fn, args, kwargs):
    pool = _current_pool.get()
    if pool is None:
        raise NoWorkersAvailable(_outside_pool(fn))
    return await pool._run(fn, args, kwargs)


def current_worker() -> WorkerInfo | None:
    """The WorkerInfo of the worker running the current task; None in a caller."""
    return _current_worker.get()


@contextlib.contextmanager
def timeout(seconds: float | None):
    """Within the block, each @work call may run `seconds` on its worker
    (None: no limit), overriding `@work(timeout=)`. Past it the task is
    cancelled on the worker and the caller gets TimeoutError."""
    token = _timeout.set(seconds)
    try:
        yield
    finally:
        _timeout.reset(token)


_MISSING: Any = object()
_timeout: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "wool.timeout", default=_MISSING
)
_registry: dict[str, contextvars.ContextVar] = {}  # wool.ContextVar name -> var
_set_by_task: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "wool.set_by_task", default=None
)  # in a worker task: names of the wool.ContextVars it set


class ContextVar:
    """A context variable whose value travels with @work calls.

        request_id = wool.ContextVar("request_id", default=None)

    Like contextvars.ContextVar (`get`, `set`, `reset` with a token): a value
    set in the caller is seen by the task on the worker, and by the tasks it
    dispatches in turn; values the task sets come back to the caller when the
    call returns or the generator yields. Only values explicitly set travel,
    and they must pickle (else TypeError at dispatch, naming the variable).
    Concurrent tasks never see each other's values. The name identifies the
    variable across processes: one variable per name.
    """

    def __init__(self, name: str, *, default: Any = _MISSING):
        self.name, self.default = name, default
        self._var = _registry.setdefault(name, contextvars.ContextVar(f"wool:{name}"))

    def __repr__(self):
        return f"<wool.ContextVar {self.name!r}>"

    def __reduce__(self):
        return ContextVar._make, (self.name, self.default)

    @staticmethod
    def _make(name, default):
        return ContextVar(name, default=default)

    def get(self, default: Any = _MISSING) -> Any:
        value = self._var.get(_MISSING)
        if value is _MISSING:
            value = self.default if default is _MISSING else default
            if value is _MISSING:
                raise LookupError(f"wool.ContextVar {self.name!r} has no value")
        return value

    def set(self, value: Any) -> contextvars.Token:
        if (changed := _set_by_task.get()) is not None:
            changed.add(self.name)
        return self._var.set(value)

    def reset(self, token: contextvars.Token) -> None:
        if (changed := _set_by_task.get()) is not None:
            changed.add(self.name)
        self._var.reset(token)


def _context_values() -> dict[str, Any] | None:
    """The wool.ContextVars set in this context: what a call carries."""
    values = {}
    for name, var in _registry.items():
        if (value := var.get(_MISSING)) is not _MISSING:
            values[name] = value
    return values or None


def _enter_context(values: dict[str, Any] | None) -> set[str]:
    """In a new worker task: take on the caller's values; track changes."""
    for name, value in (values or {}).items():
        _registry.setdefault(name, contextvars.ContextVar(f"wool:{name}")).set(value)
    changed: set[str] = set()
    _set_by_task.set(changed)
    return changed


def _context_changes(changed: set[str]) -> dict[str, Any] | None:
    """The values a worker task set, to send back (and forget)."""
    if not changed:
        return None
    values = {
        n: v for n in changed if (v := _registry[n].get(_MISSING)) is not _MISSING
    }
    changed.clear()
    return values or None


def _apply_changes(values: dict[str, Any]) -> None:
    for name, value in values.items():
        ContextVar(name).set(value)


class Task:
    """One call of a @work function, as a load balancer sees it."""

    __slots__ = ("args", "fn", "kwargs")

    def __init__(self, fn: Callable, args: tuple, kwargs: dict):
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __repr__(self):
        return f"<Task {self.fn.__qualname__}>"


class RoundRobinLoadBalancer:
    """Send each task to the next worker in turn.

    A load balancer is any object with `select(workers, task)` returning one
    key of `workers`: a mapping of the connected workers' WorkerInfo to the
    number of this caller's tasks in flight on each. When the chosen worker
    fails before accepting the task, the pool asks again without it:

        class PreferGpu:
            def select(self, workers, task):
                gpu = [w for w in workers if "gpu" in w.tags]
                return min(gpu or workers, key=workers.get)
    """

    def __init__(self):
        self._turn = 0

    def select(self, workers: Mapping[WorkerInfo, int], task: Task) -> WorkerInfo:
        self._turn += 1
        return next(itertools.islice(workers, self._turn % len(workers), None))


class LeastLoadedLoadBalancer:
    """Send each task to the worker with the fewest of this caller's tasks in
    flight: better than round-robin when task durations vary widely."""

    def select(self, workers: Mapping[WorkerInfo, int], task: Task) -> WorkerInfo:
        return min(workers, key=workers.__getitem__)


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


_current_pool: contextvars.ContextVar[WorkerPool | _NestedPool | None]
_current_pool = contextvars.ContextVar("wool.pool", default=None)
_current_worker: contextvars.ContextVar[WorkerInfo | None]
_current_worker = contextvars.ContextVar("wool.worker", default=None)


def _outside_pool(fn) -> str:
    return (
        f"{fn.__qualname__}() was called outside a WorkerPool; call it inside "
        "`async with wool.WorkerPool():`"
    )


class WorkerPool:
    """Workers that run the @work calls made inside `async with` it.

        async with WorkerPool(size=4): ...                     # ephemeral
        async with WorkerPool(discovery=LanDiscoveryService()): ...  # durable
        async with WorkerPool("gpu", size=2, discovery=lan): ...     # hybrid

    `size` (alias `spawn`) worker processes are started on this machine, given
    the positional `tags`; with neither `size` nor `discovery`, one per CPU.
    `discovery` adds the workers a discovery service finds, at most `lease` of
    them. `loadbalancer` picks a worker per task (default round-robin).
    A call waits up to `wait` seconds for a worker to appear.

    Resource handling: spawned workers get `authkey` (else WOOL_AUTHKEY, else
    a fresh random key), never published; leaving the block stops them gracefully (in-flight tasks
    get `grace` seconds), kills stragglers, and removes the pool's shared
    memory, also when the block raised or was cancelled. A spawned worker
    that dies is replaced, at most RESPAWNS_PER_MINUTE times a minute.

    Error handling: a task goes to another worker when its worker could not
    be reached or refused it before accepting. Once accepted it is never run
    again by wool: if the worker dies the caller gets WorkerLost. With no
    worker after `wait` seconds a call raises NoWorkersAvailable; when every
    worker refused the key, AuthenticationError.
    """

    def __init__(
        self,
        *tags: str,
        size: int | None = None,
        spawn: int | None = None,
        discovery=None,
        lease: int | None = None,
        loadbalancer=None,
        authkey: bytes | None = None,
        ssl=None,
        wait: float = WAIT,
        grace: float = GRACE,
        max_frame: int = MAX_FRAME,
        max_tasks_per_worker: int | None = None,
    ):
        if spawn is not None:
            if size is not None and size != spawn:
                raise TypeError("give size= or its alias spawn=, not both")
            size = spawn
        if size is None and discovery is None:
            size = os.cpu_count() or 1
        if size is not None and (not isinstance(size, int) or size < 0):
            raise ValueError(f"size must be a whole number >= 0, not {size!r}")
        if lease is not None and lease < 0:
            raise ValueError(f"lease must be >= 0, not {lease!r}")
        if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
            raise ValueError(
                f"max_tasks_per_worker must be >= 1, not {max_tasks_per_worker!r}"
            )
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
        self.tags = frozenset(tags)
        self.size = size or 0
        self.discovery = discovery
        self.lease = lease
        self.loadbalancer = loadbalancer or RoundRobinLoadBalancer()
        self.authkey = authkey
        self.ssl = ssl
        self.wait = wait
        self.grace = grace
        self.max_frame = max_frame
        self.max_tasks_per_worker = max_tasks_per_worker
        self._state = _State.NEW
        self._waiting = 0  # calls waiting for a worker with room
        self._local: LocalDiscoveryService | None = None  # spawned workers' namespace
        self._spawn_key = authkey
        self._procs: set[asyncio.subprocess.Process] = set()
        self._respawns: list[float] = []
        self._failed_start: int | None = (
            None  # exit code of a worker that could not start
        )
        self._listed: dict[str, tuple[WorkerInfo, int]] = {}  # uid -> info, source
        self._conns: dict[WorkerInfo, _Connection] = {}
        self._loads: dict[WorkerInfo, int] = {}  # what the balancer sees
        self._refused: dict[str, AuthenticationError] = {}  # uid -> why
        self._leased: set[str] = set()  # uids of admitted discovered workers
        self._failed: dict[int, Exception] = {}  # source index -> why it failed
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self._token = None
        self._hello = b""
        self._sources: list = []

    def __repr__(self):
        expected = f"/{self.size}" if self.size and not self.discovery else ""
        return f"<WorkerPool {self._state.value} {len(self._conns)}{expected}>"

    @property
    def workers(self) -> list[WorkerInfo]:
        """The workers this pool is connected to now."""
        return list(self._conns)

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"{self!r} cannot be entered twice")
        self._state = _State.STARTING
        self._token = _current_pool.set(self)
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        self._state = _State.READY
        return self

    async def __aexit__(self, *exc_info):
        await self._stop()

    async def _start(self):
        if self.size:
            self._local = LocalDiscoveryService(f"p{uuid.uuid4().hex[:12]}")
            self._local._create()
            self._spawn_key = _authkey(self.authkey) or secrets.token_bytes(32)
            self._sources.append(self._local)
        if self.discovery is not None:
            self._sources.append(self.discovery)
        self._hello = _dumps(self._sources)
        self._discover()
        if self.size:
            await asyncio.gather(*(self._spawn() for _ in range(self.size)))
            await self._wait_spawned()

    async def _wait_spawned(self):
        """Ready when every spawned worker is connected."""
        try:
            async with asyncio.timeout(self.wait):
                while sum(1 for i in self._conns if i.pid in self._pids()) < self.size:
                    if self._failed_start is not None:
                        raise RuntimeError(
                            f"a spawned worker exited with code {self._failed_start} "
                            "as it started; its error is on stderr"
                        )
                    await self._changed.wait()
        except TimeoutError:
            raise RuntimeError(
                f"spawned workers did not start within {self.wait:g} s"
            ) from None

    def _pids(self) -> set[int]:
        return {p.pid for p in self._procs}

    async def _stop(self):
        if self._state in (_State.STOPPING, _State.STOPPED):
            return
        self._state = _State.STOPPING
        self._notify()
        try:
            procs = list(self._procs)
            for proc in procs:  # closing stdin is the worker's signal to stop
                with contextlib.suppress(Exception):
                    proc.stdin.close()
            if procs:
                _done, _pending = await asyncio.wait(
                    [asyncio.ensure_future(p.wait()) for p in procs],
                    timeout=self.grace + 1.0,
                )
                for proc in procs:
                    if proc.returncode is None:
                        log.warning(
                            "killing worker pid %d: it outlived its grace", proc.pid
                        )
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                        await proc.wait()
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            for conn in list(self._conns.values()):
                conn.close()
            if self._conns:
                await asyncio.wait(
                    [c.closed for c in self._conns.values()], timeout=1.0
                )
        finally:
            if self._local is not None:
                self._local._unlink()
            if self._token is not None:
                with contextlib.suppress(ValueError):
                    _current_pool.reset(self._token)
                self._token = None
            self._state = _State.STOPPED

    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _notify(self):
        self._changed.set()
        self._changed = asyncio.Event()

    # Spawned workers: `python -c "import wool; wool._spawned()"`, configured
    # through stdin, which stays open: its EOF tells the worker to stop, also
    # when this process is killed.

    async def _spawn(self):
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import wool; wool._spawned()"
        )
        here = os.path.dirname(os.path.abspath(__file__))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, here,
            stdin=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the caller, which stops us
        )  # fmt: skip
        config = {
            "path": sys.path,
            "namespace": self._local.namespace,
            "authkey": self._spawn_key,
            "tags": sorted(self.tags),
            "max_frame": self.max_frame,
            "max_tasks": self.max_tasks_per_worker,
            "grace": self.grace,
            "log_level": logging.getLogger("wool").getEffectiveLevel(),
        }
        data = pickle.dumps(config)
        proc.stdin.write(struct.pack("!I", len(data)) + data)
        self._procs.add(proc)
        self._spawn_task(self._watch(proc))

    async def _watch(self, proc):
        code = await proc.wait()
        self._procs.discard(proc)
        self._notify()
        if self._state is _State.STARTING:  # a bad set-up: replacing it won't help
            self._failed_start = code
            return
        if self._state is not _State.READY:
            return
        now = time.monotonic()
        self._respawns = [t for t in self._respawns if now - t < 60] + [now]
        if len(self._respawns) > RESPAWNS_PER_MINUTE:
            log.error(
                "worker pid %d exited with %s; not replacing it: %d workers died "
                "in the last minute",
                proc.pid, code, len(self._respawns) - 1,
            )  # fmt: skip
            return
        log.warning(
            "worker pid %d exited with %s; starting a replacement", proc.pid, code
        )
        await self._spawn()

    # Discovered workers: one _link task per listed worker keeps a connection
    # to it while it is listed, reconnecting after a drop. Liveness comes from
    # the connection, never from discovery records.

    def _discover(self):
        for index, source in enumerate(self._sources):
            self._spawn_task(self._follow(source, index))

    async def _follow(self, source, index: int):
        try:
            async for event in source.subscribe():
                self._learn(event, index)
        except Exception as e:  # a broken filter, a missing zeroconf, ...
            log.error("discovery %r failed: %r", source, e)
            self._failed[index] = e
            self._notify()

    def _learn(self, event: DiscoveryEvent, index: int):
        info = event.info
        if event.type == "worker-dropped":
            self._listed.pop(info.uid, None)
            self._refused.pop(info.uid, None)
            if (conn := self._find(info.uid)) is not None:
                self._loads.pop(conn.info, None)  # no new tasks go there
                self._spawn_task(conn.retire())
            self._notify()
            return
        known = self._listed.get(info.uid)
        self._listed[info.uid] = (info, index)
        if known is None:
            self._spawn_task(self._link(info.uid))
        elif (conn := self._find(info.uid)) is not None and conn.info != info:
            self._rekey(conn, info)

    def _find(self, uid: str) -> _Connection | None:
        return next((c for i, c in self._conns.items() if i.uid == uid), None)

    def _rekey(self, conn: _Connection, info: WorkerInfo):
        self._loads[info] = self._loads.pop(conn.info, 0)
        self._conns[info] = self._conns.pop(conn.info)
        conn.info = info
        self._notify()

    async def _link(self, uid: str):
        """Keep a connection to worker `uid` while it is listed, reconnecting
        after a drop (discovery may list a dead worker for a long time)."""
        delay = 0.05
        try:
            while uid in self._listed and self._state in (
                _State.STARTING,
                _State.READY,
            ):
                info, index = self._listed[uid]
                spawned = self._local is not None and index == 0
                if not spawned and self.lease is not None and uid not in self._leased:
                    if len(self._leased) >= self.lease:
                        await self._changed.wait()
                        continue
                    self._leased.add(uid)
                key = self._spawn_key if spawned else _authkey(self.authkey)
                ssl = None if spawned else self.ssl  # spawned: loopback, fresh key
                try:
                    conn = await _Connection.open(
                        info, key, ssl, self._hello, self.max_frame
                    )
                except AuthenticationError as e:
                    self._refused[uid] = e
                    self._notify()
                    log.warning("%s", e)
                except (
                    OSError,
                    asyncio.IncompleteReadError,
                    ProtocolError,
                    TimeoutError,
                ) as e:
                    log.debug("cannot connect to worker %s: %r", info.address, e)
                else:
                    self._refused.pop(uid, None)
                    self._conns[conn.info] = conn
                    self._loads[conn.info] = 0
                    self._notify()
                    await conn.closed
                    self._conns.pop(conn.info, None)
                    self._loads.pop(conn.info, None)
                    self._notify()
                    delay = 0.05
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        finally:
            if uid in self._leased:
                self._leased.discard(uid)
                self._notify()

    # Dispatch.

    async def _connection(
        self, task: Task, exclude: set[str], deadline: float
    ) -> _Connection:
        """A connected worker with room for `task`, waiting until `deadline`
        (time.monotonic()) for one."""
        pause, cap = 0.01, self.max_tasks_per_worker
        while True:
            loads = self._loads
            if exclude or cap:
                loads = {
                    i: n
                    for i, n in loads.items()
                    if i.uid not in exclude and (cap is None or n < cap)
                }
            if loads:
                info = self.loadbalancer.select(loads, task)
                conn = self._conns.get(info)
                if conn is None:
                    raise TypeError(
                        f"{self.loadbalancer!r}.select() returned {info!r}, "
                        "which is not one of the workers it was given"
                    )
                return conn
            if self._state not in (_State.READY, _State.STARTING):
                raise NoWorkersAvailable(f"{self!r} is closed; call inside its block")
            if self._failed and len(self._failed) == len(self._sources):
                raise NoWorkersAvailable(
                    f"no worker for {task.fn.__qualname__}(): discovery failed: "
                    + "; ".join(
                        f"{self._sources[i]!r}: {e!r}" for i, e in self._failed.items()
                    )
                )
            if self._refused and len(self._refused) >= len(self._listed):
                raise AuthenticationError(
                    "every worker refused the key: "
                    + "; ".join(str(e) for e in self._refused.values())
                )
            now = time.monotonic()
            if now >= deadline:
                raise NoWorkersAvailable(self._none_took(task))
            # Wait for a worker to appear or one of our tasks to end; workers
            # that refused (full with others' tasks) get asked again after a
            # pause that doubles each time.
            self._waiting += 1
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(
                        min(deadline - now, pause) if exclude else deadline - now
                    ):
                        await self._changed.wait()
            finally:
                self._waiting -= 1
            if exclude:
                exclude.clear()
                pause = min(pause * 2, 1.0)

    def _none_took(self, task: Task) -> str:
        what = f"no worker took {task.fn.__qualname__}() within {self.wait:g} s"
        if self._conns:
            cap = (
                f" (max_tasks_per_worker={self.max_tasks_per_worker})"
                if self.max_tasks_per_worker
                else ""
            )
            return f"{what}: all {len(self._conns)} workers were full{cap}"
        return f"{what}; waited on {self._waited_on()}"

    def _waited_on(self) -> str:
        sources = [repr(s) for s in self._sources] or ["no discovery"]
        return ", ".join(sources)

    async def _run(self, fn, args, kwargs):
        conn, rid, _, (kind, data) = await self._place(fn, args, kwargs, False)
        conn.pending.pop(rid, None)
        return _load_reply(kind, data, fn)

    async def _place(self, fn, args, kwargs, generator: bool):
        """Send a call to a worker that accepts it: (connection, request id,
        call, first reply), the reply being a coroutine's result or a
        generator's first step. Fails over to another worker while none has
        accepted (unreachable, or REFUSED), for up to `wait` seconds."""
        body, definition = _dump_task(fn, args, kwargs, self.max_frame)
        task, exclude = Task(fn, args, kwargs), set()
        deadline = time.monotonic() + self.wait
        seconds = None if generator else _time_limit(fn)
        while True:
            conn = await self._connection(task, exclude, deadline)
            info, rid, kind = conn.info, None, REFUSED
            self._loads[info] += 1
            try:
                rid, call = conn.start(body, definition, generator)
                reply = conn.answer(rid, call)
                if seconds is not None:  # the worker times out; this is in case
                    reply = asyncio.wait_for(reply, seconds + 1.0)  # it is stuck
                kind, data = await reply
            except _NotAccepted:
                pass
            finally:
                if info in self._loads:
                    self._loads[info] -= 1
                if self._waiting:  # a call may be waiting for room
                    self._notify()
            if kind != REFUSED:
                return conn, rid, call, (kind, data)
            conn.pending.pop(rid, None)
            exclude.add(info.uid)


class _NestedPool:
    """In a worker: the pool that sent the running task, opened on first use.

    Nested calls go to the same discovery sources as the caller's pool, with
    this worker's own key and TLS settings; one pool per source list, kept
    for the worker's life.
    """

    def __init__(self, worker: Worker, hello: bytes):
        self.worker, self.hello = worker, hello

    async def _run(self, fn, args, kwargs):
        return await self._pool()._run(fn, args, kwargs)

    def _pool(self) -> WorkerPool:
        pool = self.worker._nested.get(self.hello)
        if pool is None:
            pool = WorkerPool(
                size=0, authkey=self.worker.authkey, ssl=self.worker.client_ssl
            )
            pool._sources, pool._hello = pickle.loads(self.hello), self.hello
            pool._state = _State.READY
            pool._discover()
            self.worker._nested[self.hello] = pool
        return pool


def _authkey(key: bytes | None) -> bytes:
    """The key to use: the one given, else WOOL_AUTHKEY, else none (b"")."""
    if key is not None:
        return key
    return os.environ.get("WOOL_AUTHKEY", "").encode()


# -- Frames: objects <-> bytes. No sockets, no await. ----------------------------

HEADER = struct.Struct("!IBQ")  # body length, kind, request id; then a pickle

# caller -> worker
HELLO = 1  # body: the caller's discovery sources, for nested calls; rid 0
TASK = 2  # body: (function reference, args, kwargs, context values, timeout)
NEXT = 3  # body: value sent into a generator (empty: None)
THROW = 4  # body: exception thrown into a generator
CLOSE = 5  # no body: close the generator
CANCEL = 6  # no body: cancel the task
DEFINE = 7  # body: a function pickled by value; rid: the number TASKs name it by
# worker -> caller
ACCEPTED = 16  # no body: the task runs here; it will not run anywhere else
REFUSED = 17  # no body: not accepted (stopping or full); try another worker
RESULT = 18  # body: (value returned or yielded, context values the task set)
ERROR = 19  # body: (type name, message, traceback text, pickled exception)
STOP = 20  # no body: the generator finished

_TO_CALLER = frozenset({ACCEPTED, REFUSED, RESULT, ERROR, STOP})


def encode(kind: int, rid: int, body: bytes = b"") -> bytes:
    """One frame: header and body together, ready for a single write."""
    return HEADER.pack(len(body), kind, rid) + body


def decode_header(data, max_frame: int, at: int = 0) -> tuple[int, int, int]:
    """(body length, kind, request id) of the header at data[at:]; checks the
    length before any body is read."""
    size, kind, rid = HEADER.unpack_from(data, at)
    if size > max_frame:
        raise ProtocolError(
            f"frame of {size / 2**20:.0f} MiB is over max_frame "
            f"({max_frame / 2**20:.0f} MiB)"
        )
    return size, kind, rid


_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def _plain(obj) -> bool:
    """Whether plain pickle makes the same bytes as cloudpickle (builtin data)."""
    kind = type(obj)
    if kind in _PLAIN:
        return True
    if kind is tuple or kind is list:
        return _PLAIN.issuperset(map(type, obj))
    if kind is dict:
        return _PLAIN.issuperset(map(type, obj.values()))
    return False


def _dumps(obj) -> bytes:
    # cloudpickle can pickle functions and classes from __main__ by value, at
    # about five times the cost of pickle: worth skipping for builtin data.
    if _plain(obj):
        return pickle.dumps(obj, 5)
    return cloudpickle.dumps(obj, protocol=5)


def _too_big(what: str, size: int, max_frame: int) -> TypeError:
    return TypeError(
        f"{what} is {size / 2**20:.0f} MiB, over max_frame "
        f"({max_frame / 2**20:.0f} MiB); pass a file path instead"
    )


_refs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_function_ids = itertools.count(1)


def _ref(fn) -> tuple[tuple[str, str] | int, bytes | None]:
    """How a @work function travels: (reference, definition). The reference
    is (module, qualname) when the worker can import it, with no definition;
    else a number, and the definition is the function pickled by value
    (functions in __main__, closures), sent once per connection in DEFINE."""
    try:
        return _refs[fn]
    except KeyError:
        pass
    module, name = fn.__module__, fn.__qualname__
    by_value = module == "__main__" or any(
        module == m or module.startswith(m + ".")
        for m in cloudpickle.list_registry_pickle_by_value()
    )
    if not by_value:
        try:
            by_value = _lookup(module, name) is not fn
        except Exception:
            by_value = True
    ref = (next(_function_ids), _dumps(fn)) if by_value else ((module, name), None)
    _refs[fn] = ref
    return ref


def _lookup(module: str, qualname: str):
    obj = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "__func__", obj)  # a classmethod's function


@functools.lru_cache(maxsize=1024)
def _resolve(ref: tuple[str, str] | bytes) -> tuple[Callable, bool]:
    """The function a worker runs for a (module, qualname) or a definition,
    and whether it is an async generator function."""
    fn = (pickle.loads(ref) if isinstance(ref, bytes) else _lookup(*ref)).__wool_work__
    return fn, inspect.isasyncgenfunction(fn)


def _time_limit(fn) -> float | None:
    """Seconds a call of `fn` may run: wool.timeout() if set, else @work's."""
    seconds = _timeout.get()
    return fn.__wool_timeout__ if seconds is _MISSING else seconds


def _pickle(parts: tuple, plain: bool) -> bytes:
    return pickle.dumps(parts, 5) if plain else cloudpickle.dumps(parts, protocol=5)


def _unpicklable_variable(values: dict | None) -> str:
    """Which wool.ContextVar value could not be pickled, for an error message."""
    for name, value in (values or {}).items():
        try:
            _dumps(value)
        except Exception:
            return f" (wool.ContextVar {name!r} holds {type(value).__name__!r})"
    return ""


def _dump_task(fn, args, kwargs, max_frame: int) -> tuple[bytes, tuple | None]:
    """A TASK body: (function reference, args, kwargs, context, timeout), and
    the function's (id, definition) when it travels by value."""
    context, seconds = _context_values(), _time_limit(fn)
    plain = _plain(args) and (not kwargs or _plain(kwargs))
    try:
        if context is not None:
            plain = plain and _plain(context)
        ref, definition = _ref(fn)
        body = _pickle((ref, args, kwargs, context, seconds), plain)
    except Exception as e:
        raise TypeError(
            f"cannot send {fn.__qualname__}() and its arguments to a worker"
            f"{_unpicklable_variable(context)}: {e}"
        ) from e
    if len(body) > max_frame:
        raise _too_big(f"the call of {fn.__qualname__}()", len(body), max_frame)
    return body, definition and (ref, definition)


def _dump_value(value, changes: dict | None, fn, max_frame: int) -> bytes:
    """A RESULT body: (value, the wool.ContextVar values the task set)."""
    plain = _plain(value) and (changes is None or _plain(changes))
    try:
        body = _pickle((value, changes), plain)
    except Exception as e:
        raise TypeError(
            f"cannot send the value of {fn.__qualname__}() back to the caller"
            f"{_unpicklable_variable(changes)}: {e}"
        ) from e
    if len(body) > max_frame:
        raise _too_big(f"the value of {fn.__qualname__}()", len(body), max_frame)
    return body


def _dump_error(exc: BaseException) -> bytes:
    tb = "".join(traceback.format_exception(exc))
    try:
        message = str(exc)
    except Exception:
        message = "<str() failed>"
    try:
        payload = _dumps(exc)
    except Exception:
        payload = None
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return pickle.dumps((name, message, tb, payload))


def _load_error(data: bytes) -> BaseException:
    name, message, tb, payload = pickle.loads(data)
    exc = None
    if payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:
            pass
    if not isinstance(exc, BaseException):
        exc = RemoteError(name, message, tb)
    exc.__cause__ = _RemoteTraceback(tb)
    return exc


def _load_reply(kind: int, data: bytes, fn):
    if kind == ERROR:
        raise _load_error(data)
    try:
        value, changes = pickle.loads(data)
    except Exception as e:
        raise TypeError(
            f"cannot load the value of {fn.__qualname__}() in the caller: {e}"
        ) from e
    if changes:
        _apply_changes(changes)
    return value


# -- Streams: handshake, reading and writing frames ------------------------------
#
# Handshake (raw bytes, nothing pickled), with a deadline on each side:
#   worker -> caller   MAGIC, worker nonce (32)
#   caller -> worker   MAGIC, HMAC(key, "caller" + worker nonce), caller nonce (32)
#   worker -> caller   "+" and HMAC(key, "worker" + caller nonce), or "-" and close

MAGIC = b"wool\x00\x01"  # protocol version 1
NONCE = 32  # bytes of a random challenge
DIGEST = 32  # bytes of an HMAC-SHA256


def _digest(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, role + nonce, "sha256").digest()


async def _authenticate_caller(reader, writer, key: bytes) -> None:
    """Worker side: prove the caller holds the key, then prove we do."""
    nonce = secrets.token_bytes(NONCE)
    writer.write(MAGIC + nonce)
    data = await reader.readexactly(len(MAGIC) + DIGEST + NONCE)
    if data[: len(MAGIC)] != MAGIC:
        raise ProtocolError(f"not a wool caller (it sent {data[:8]!r}...)")
    proof, their_nonce = data[len(MAGIC) : -NONCE], data[-NONCE:]  # DIGEST, NONCE
    if not hmac.compare_digest(proof, _digest(key, b"caller", nonce)):
        writer.write(b"-")
        raise AuthenticationError("the caller does not hold this worker's key")
    writer.write(b"+" + _digest(key, b"worker", their_nonce))


async def _authenticate_worker(reader, writer, key: bytes, address: str) -> None:
    """Caller side: answer the worker's challenge, then check its answer."""
    data = await reader.readexactly(len(MAGIC) + NONCE)
    if data[: len(MAGIC)] != MAGIC:
        raise ProtocolError(f"{address} is not a wool worker (it sent {data[:8]!r}...)")
    nonce = secrets.token_bytes(NONCE)
    writer.write(MAGIC + _digest(key, b"caller", data[len(MAGIC) :]) + nonce)
    try:
        verdict = await reader.readexactly(1)
    except (asyncio.IncompleteReadError, ConnectionError):
        verdict = b"-"
    if verdict != b"+":
        raise AuthenticationError(
            f"worker {address} refused the key; give the pool its key "
            "(authkey= or WOOL_AUTHKEY)"
        )
    proof = await reader.readexactly(DIGEST)
    if not hmac.compare_digest(proof, _digest(key, b"worker", nonce)):
        raise AuthenticationError(f"worker {address} does not hold the pool's key")


LARGE = 64 * 2**10  # bytes; a larger body is received into its own buffer
BUFFER = 256 * 2**10  # bytes of a connection's reusable receive buffer


class _Frames(asyncio.BufferedProtocol):
    """A connection past its handshake: bytes in, frames out.

    Small frames are cut from one reusable buffer; the kernel writes a body
    larger than LARGE straight into its own bytearray, which is what gets
    unpickled (no copy). Each frame goes to `on_frame(kind, rid, body)`, which
    may raise ProtocolError to close the connection; `on_lost(error)` is called
    once, with None for a clean close. `hold()` stops delivery and reading
    until `release()`: a worker's backpressure.
    """

    def __init__(self, transport, max_frame: int, on_frame, on_lost, on_writable=None):
        self.transport, self.max_frame = transport, max_frame
        self.on_frame, self.on_lost, self.on_writable = on_frame, on_lost, on_writable
        self.buf = bytearray(BUFFER)
        self.start = self.end = 0  # buf[start:end]: received, not yet delivered
        self.large: bytearray | None = None  # a large body being received,
        self.filled, self.head = 0, (0, 0)  # its bytes so far, its kind and rid
        self.held = self.lost = False

    def get_buffer(self, sizehint: int):
        if self.large is not None:
            return memoryview(self.large)[self.filled :]
        if self.end == len(self.buf):  # move the undelivered tail to the front
            tail = self.end - self.start
            self.buf[:tail] = self.buf[self.start : self.end]
            self.start, self.end = 0, tail
        return memoryview(self.buf)[self.end :]

    def buffer_updated(self, nbytes: int):
        try:
            if self.large is None:
                self.end += nbytes
            else:
                self.filled += nbytes
                if self.filled == len(self.large):
                    body, self.large = self.large, None
                    self.on_frame(*self.head, body)
            self.deliver()
        except ProtocolError as e:
            self.fail(e)

    def deliver(self):
        buf = self.buf
        while (
            not self.held
            and self.large is None
            and self.end - self.start >= HEADER.size
        ):
            size, kind, rid = decode_header(buf, self.max_frame, self.start)
            at = self.start + HEADER.size
            if size > LARGE:
                got = min(size, self.end - at)
                self.large = bytearray(size)
                self.large[:got] = buf[at : at + got]
                self.start, self.filled, self.head = at + got, got, (kind, rid)
                if got == size:
                    body, self.large = self.large, None
                    self.on_frame(kind, rid, body)
            elif self.end - at < size:
                break
            else:
                self.start = at + size
                self.on_frame(kind, rid, bytes(buf[at : self.start]))
        if self.start == self.end:
            self.start = self.end = 0

    def hold(self):
        self.held = True
        self.transport.pause_reading()

    def release(self):
        self.held = False
        self.transport.resume_reading()
        try:
            self.deliver()
        except ProtocolError as e:
            self.fail(e)

    def fail(self, error: Exception):
        self.transport.abort()
        self.lose(error)

    def lose(self, error: Exception | None):
        if not self.lost:
            self.lost = True
            self.on_lost(error)

    def eof_received(self):
        if self.large is not None:
            size = len(self.large)
        elif self.end - self.start >= HEADER.size:
            size = HEADER.unpack_from(self.buf, self.start)[0]
        elif self.end > self.start:
            self.lose(ProtocolError("stream ended inside a frame header"))
            return False
        else:
            return False  # a clean end: the transport closes
        self.lose(ProtocolError(f"stream ended inside a frame of {size} bytes"))
        return False

    def connection_lost(self, exc: Exception | None):
        self.lose(exc)

    def resume_writing(self):
        if self.on_writable is not None:
            self.on_writable()


class _Outbox:
    """Writes frames with few syscalls and no added latency: the first frame of
    an event-loop turn goes out at once; the rest of the turn's frames wait
    and leave together in one write at the end of the turn. Sending never
    blocks; readers apply backpressure (see backlog)."""

    __slots__ = ("loop", "parts", "size", "transport", "corked")

    def __init__(self, transport: asyncio.Transport):
        self.transport, self.parts, self.size = transport, [], 0
        self.loop = asyncio.get_running_loop()
        self.corked = False

    def send(self, kind: int, rid: int, body: bytes = b""):
        header = HEADER.pack(len(body), kind, rid)
        if self.corked:
            self.parts.append(header)
            if body:
                self.parts.append(body)
                self.size += len(body)
        else:
            self.corked = True
            self.loop.call_soon(self.flush)
            if self.transport.is_closing():
                return
            if len(body) < LARGE:
                self.transport.write(header + body)
            else:  # no copy of a large body
                self.transport.write(header)
                self.transport.write(body)

    def flush(self):
        parts, self.parts, self.size, self.corked = self.parts, [], 0, False
        if parts and not self.transport.is_closing():
            self.transport.writelines(parts)

    def backlog(self) -> int:
        """Bytes sent but not yet on the wire."""
        return self.size + self.transport.get_write_buffer_size()


def _tune(writer: asyncio.StreamWriter):
    """Let the kernel find a dead peer: keepalive probes answer even while
    the peer's event loop is busy with a long synchronous task, and
    TCP_USER_TIMEOUT bounds how long sent data may go unacknowledged."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in [
        ("TCP_KEEPIDLE", KEEPALIVE),
        ("TCP_KEEPINTVL", KEEPALIVE),
        ("TCP_KEEPCNT", max(1, int(DEAD_AFTER / KEEPALIVE) - 1)),
        ("TCP_USER_TIMEOUT", DEAD_AFTER * 1000),
    ]:
        if hasattr(socket, name):
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.IPPROTO_TCP, getattr(socket, name), max(1, int(value))
                )


# -- The worker -------------------------------------------------------------------


class Worker:
    """A worker server: runs the tasks that authenticated callers send it.

        async with Worker("gpu", authkey=key, discovery=LanDiscoveryService()) as w:
            print(w.info.address)
            await w.stopped()

    Listens on `host:port` (port 0: any free one) and publishes itself to
    `discovery` when started; `stop()` withdraws it first, lets in-flight tasks
    finish within `grace` seconds, then cancels the rest. Every task runs as
    an asyncio task in this process; nested calls go to the caller's pool.
    With `max_tasks`, a task arriving while that many run (`running`) is
    refused before it is accepted, and its caller tries another worker.

    Raises ValueError when asked to listen on a non-loopback address with
    neither a key nor TLS, unless `insecure`: anyone who can reach the port
    could run code here.
    """

    def __init__(
        self,
        *tags: str,
        host: str = "127.0.0.1",
        port: int = 0,
        authkey: bytes | None = None,
        ssl=None,
        client_ssl=None,
        discovery=None,
        advertise: str | None = None,
        insecure: bool = False,
        grace: float = GRACE,
        max_frame: int = MAX_FRAME,
        max_connections: int = MAX_CONNECTIONS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_tasks: int | None = None,
    ):
        self.tags = frozenset(tags)
        self.host, self.port = host, port
        self.authkey = _authkey(authkey)
        self.ssl, self.client_ssl = ssl, client_ssl
        self.discovery = discovery
        self.advertise = advertise
        self.insecure = insecure
        self.grace = grace
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.max_tasks = max_tasks  # running at once; more are REFUSED
        self.running = 0
        self._connections = 0
        self._shaking: set[asyncio.StreamWriter] = set()  # not yet authenticated
        self.uid = uuid.uuid4().hex
        self.info: WorkerInfo | None = None
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._peers: set[_Peer] = set()
        self._nested: dict[bytes, WorkerPool] = {}
        self._stopped = asyncio.Event()

    def __repr__(self):
        where = self.info.address if self.info else f"{self.host}:{self.port}"
        return f"<Worker {where}>"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info):
        await self.stop()

    async def start(self):
        verifies = getattr(self.ssl, "verify_mode", None) == ssl.CERT_REQUIRED
        if not (self.authkey or verifies or self.insecure or _is_loopback(self.host)):
            raise ValueError(
                f"refusing to listen on {self.host} without a key: anyone who can "
                "reach the port could run code here. Set a key (--authkey-file, "
                "WOOL_AUTHKEY or authkey=), or TLS with client certificates "
                "(--tls-ca), or pass --insecure"
            )
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self.port,
            ssl=self.ssl,
            backlog=1024,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl else None,
        )
        port = self._server.sockets[0].getsockname()[1]
        # A worker on every interface (0.0.0.0) is listed as such: LAN discovery
        # announces each of the machine's addresses, and on this machine
        # 0.0.0.0 reaches it too.
        self.info = WorkerInfo(
            self.uid,
            self.advertise or self.host,
            port,
            os.getpid(),
            __version__,
            self.tags,
            self.ssl is not None,
        )
        if self.discovery is not None:
            await self.discovery.publish(DiscoveryEvent("worker-added", self.info))
        log.info(
            "worker %s listening (tags: %s)",
            self.info.address,
            ",".join(sorted(self.tags)),
        )

    async def stop(self, grace: float | None = None):
        """Withdraw, stop listening, drain in-flight tasks, then cancel them."""
        if self.stopping:
            return await self._stopped.wait()
        self.stopping = True
        grace = self.grace if grace is None else grace
        try:
            if self.discovery is not None and self.info is not None:
                with contextlib.suppress(Exception):
                    await self.discovery.publish(
                        DiscoveryEvent("worker-dropped", self.info)
                    )
            if self._server is not None:
                self._server.close()
            tasks = [t for p in self._peers for t in p.tasks.values()]
            if tasks:
                await asyncio.wait(tasks, timeout=grace)
            for writer in self._shaking:
                writer.close()
            peers = list(self._peers)
            for peer in peers:
                peer.close()
            if peers:
                await asyncio.wait([p.closed for p in peers], timeout=1.0)
                for peer in peers:  # a caller that does not read its replies
                    peer.writer.transport.abort()
            for pool in self._nested.values():
                await pool._stop()
            if self._server is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), 1.0)
        finally:
            if (close := getattr(self.discovery, "close", None)) is not None:
                with contextlib.suppress(Exception):
                    await close()
            self._stopped.set()

    async def stopped(self):
        """Wait until the worker has stopped."""
        await self._stopped.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """Authenticate a new connection, then hand it to a _Peer."""
        address = _peer_address(writer)
        if self._connections >= self.max_connections:
            log.warning(
                "refused connection from %s: %d already open",
                address,
                self._connections,
            )
            writer.close()
            return
        self._connections += 1
        self._shaking.add(writer)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await _authenticate_caller(reader, writer, self.authkey)
        except (TimeoutError, asyncio.IncompleteReadError, WoolError, OSError) as e:
            self._connections -= 1
            writer.close()
            if isinstance(e, TimeoutError):
                e = f"no handshake within {self.handshake_timeout:g} s"
            elif isinstance(e, asyncio.IncompleteReadError):
                e = "it closed the connection during the handshake"
            log.warning("closed connection from %s: %s", address, e)
            return
        finally:
            self._shaking.discard(writer)
        _tune(writer)
        self._peers.add(_Peer(self, writer, address))


class _Peer:
    """A worker's side of one authenticated caller's connection: the tasks it
    sent, run as asyncio tasks in the context HELLO set up."""

    def __init__(self, worker: Worker, writer: asyncio.StreamWriter, address: str):
        self.worker, self.writer, self.address = worker, writer, address
        self.loop = asyncio.get_running_loop()
        transport = writer.transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.out = _Outbox(transport)
        self.frames = _Frames(
            transport, worker.max_frame, self.on_frame, self.on_lost, self.on_writable
        )
        transport.set_protocol(self.frames)
        self.context: contextvars.Context | None = None  # set up by HELLO
        self.tasks: dict[int, asyncio.Task] = {}
        self.inboxes: dict[int, asyncio.Queue] = {}
        self.functions: dict[int, bytes | tuple] = {}  # DEFINE'd, then resolved
        self.burst = 0  # tasks accepted since they last got to run
        self.closed = self.loop.create_future()
        no_hello = ProtocolError(f"no HELLO within {worker.handshake_timeout:g} s")
        self.deadline = self.loop.call_later(
            worker.handshake_timeout, self.frames.fail, no_hello
        )

    def on_frame(self, kind: int, rid: int, body: bytes):
        if self.context is None:
            if kind != HELLO:
                raise ProtocolError("it did not start with HELLO")
            self.deadline.cancel()
            # Tasks run in copies of this context: nested calls go to the
            # caller's pool, and current_worker() answers.
            self.context = contextvars.copy_context()
            self.context.run(_current_pool.set, _NestedPool(self.worker, body))
            self.context.run(_current_worker.set, self.worker.info)
        elif kind == TASK:
            if rid in self.tasks:
                raise ProtocolError(f"request id {rid} is already running")
            worker = self.worker
            if worker.stopping or worker.running == worker.max_tasks:
                self.out.send(REFUSED, rid)  # the caller tries another worker
                return
            self.out.send(ACCEPTED, rid)  # on the wire before the task runs
            coro = self._run(rid, body)
            task = self.tasks[rid] = self.loop.create_task(
                coro, context=self.context.copy()
            )
            task.add_done_callback(functools.partial(self._done, rid))
            worker.running += 1
            # Backpressure: let the tasks just accepted run now and then, and
            # stop reading while replies pile up, so a caller that does not read
            # its replies stalls only itself, at a bounded cost in memory.
            self.burst += 1
            if self.burst >= 16 or self.out.backlog() > HIGH_WATER:
                self.frames.hold()
                self.loop.call_soon(self._breathe)
        elif kind == DEFINE:
            self.functions[rid] = body  # unpickled by the first task that needs it
        elif kind == CANCEL:
            if (task := self.tasks.get(rid)) is not None:
                task.cancel()
        elif kind in (NEXT, THROW, CLOSE):
            if rid in self.tasks:  # the task may not have started yet
                self.inboxes.setdefault(rid, asyncio.Queue()).put_nowait((kind, body))
        else:
            raise ProtocolError(f"unknown frame kind {kind} from a caller")

    def _resolve(self, ref) -> tuple[Callable, bool]:
        if type(ref) is not int:
            return _resolve(ref)
        if (found := self.functions.get(ref)) is None:
            raise ProtocolError(f"function {ref} was never defined on this connection")
        if type(found) is bytes:
            found = self.functions[ref] = _resolve(found)
        return found

    def _done(self, rid: int, task: asyncio.Task):
        del self.tasks[rid]
        self.worker.running -= 1

    def _breathe(self):
        self.burst = 0
        self.out.flush()
        if self.out.backlog() <= HIGH_WATER:
            self.frames.release()
        # else the transport paused writing, and on_writable releases us

    def on_writable(self):
        if self.frames.held:
            self.frames.release()

    def on_lost(self, error: Exception | None):
        self.deadline.cancel()
        self.worker._connections -= 1
        self.worker._peers.discard(self)
        if isinstance(error, WoolError):
            log.warning("closed connection from %s: %s", self.address, error)
        elif error is not None:
            log.info("connection from %s ended: %r", self.address, error)
        for task in self.tasks.values():
            task.cancel()
        self.closed.set_result(None)

    def close(self):
        for task in self.tasks.values():
            task.cancel()
        self.out.flush()
        self.writer.close()

    async def _run(self, rid: int, body: bytes):
        out, worker = self.out, self.worker
        try:
            ref, args, kwargs, context, seconds = pickle.loads(body)
            fn, generator = self._resolve(ref)
            changed = _enter_context(context)
            if generator:
                return await self._drive(rid, fn, fn(*args, **kwargs), changed)
            async with asyncio.timeout(seconds):
                value = await fn(*args, **kwargs)
            out.send(
                RESULT,
                rid,
                _dump_value(value, _context_changes(changed), fn, worker.max_frame),
            )
        except BaseException as e:  # CancelledError too: the caller may be waiting
            out.send(ERROR, rid, _dump_error(e))

    async def _drive(self, rid: int, fn, agen, changed: set[str]):
        """Run a generator one step per NEXT/THROW; CLOSE or cancel closes it."""
        inbox = self.inboxes.setdefault(rid, asyncio.Queue())
        out, max_frame = self.out, self.worker.max_frame
        try:
            while True:
                kind, body = await inbox.get()
                try:
                    if kind == CLOSE:
                        await agen.aclose()
                        out.send(STOP, rid)
                        return
                    value = pickle.loads(body) if body else None
                    if kind == NEXT:
                        value = await agen.asend(value)
                    else:
                        value = await agen.athrow(value)
                    reply = _dump_value(value, _context_changes(changed), fn, max_frame)
                except StopAsyncIteration:
                    out.send(STOP, rid)
                    return
                except BaseException as e:
                    out.send(ERROR, rid, _dump_error(e))
                    return
                out.send(RESULT, rid, reply)
        finally:
            self.inboxes.pop(rid, None)
            await agen.aclose()  # runs the generator's `finally` if it is open


def _is_loopback(host: str) -> bool:
    return host in ("localhost",) or host.startswith("127.") or host == "::1"


def _peer_address(writer) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


# -- Pool internals: connections, calls, generators ----------------------------------
#
# Rules: every request id on a connection gets at most one reply per request
# frame; only the reader task resolves reply futures; whoever awaits a reply
# decodes its body, so one bad body fails one call, not the connection. A
# call is "accepted" once ACCEPTED (or any reply) arrived: from then on a lost
# connection means WorkerLost, before it, failover.


class _Call:
    __slots__ = ("accepted", "reply")

    def __init__(self, reply: asyncio.Future):
        self.accepted, self.reply = False, reply


class _Connection:
    """A caller's connection to one worker, multiplexing many tasks."""

    def __init__(self, info: WorkerInfo, writer: asyncio.StreamWriter, max_frame: int):
        # Keep the writer: when a StreamWriter is collected, it closes its transport.
        self.info, self.writer = info, writer
        self.out = _Outbox(writer.transport)
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, _Call] = {}
        self.rids = itertools.count(1)
        self.defined: set[int] = set()  # functions sent by value on this connection
        self.lost: str | None = None
        self.closed = self.loop.create_future()
        frames = _Frames(writer.transport, max_frame, self._on_frame, self._lose)
        writer.transport.set_protocol(frames)

    @classmethod
    async def open(cls, info, key, ssl, hello: bytes, max_frame: int) -> _Connection:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                info.host, info.port, ssl=ssl
            )
            try:
                await _authenticate_worker(reader, writer, key, info.address)
            except BaseException:
                writer.close()
                raise
        _tune(writer)
        conn = cls(info, writer, max_frame)
        conn.out.send(HELLO, 0, hello)
        return conn

    def _on_frame(self, kind: int, rid: int, body: bytes):
        if kind not in _TO_CALLER:
            raise ProtocolError(f"unknown frame kind {kind} from a worker")
        call = self.pending.get(rid)
        if call is None:
            return  # a reply to a call that was cancelled
        call.accepted = True
        if kind != ACCEPTED and not call.reply.done():
            call.reply.set_result((kind, body))

    def _lose(self, error: Exception | None):
        reason = "closed by the worker" if error is None else str(error) or repr(error)
        if isinstance(error, ProtocolError):
            log.warning("closed connection to worker %s: %s", self.info.address, error)
        self.lost = reason
        self.writer.close()
        for call in self.pending.values():
            if call.reply.done():
                continue
            if call.accepted:
                lost = f"lost worker {self.info.address} ({reason}) with the task on it"
                call.reply.set_exception(WorkerLost(lost))
            else:
                call.reply.set_exception(_NotAccepted())
        self.pending.clear()
        if not self.closed.done():  # a pool that stopped cancelled it
            self.closed.set_result(None)

    def close(self):
        self.writer.close()

    async def retire(self):
        """Close once the calls in flight got their replies (a worker that
        withdrew is draining them)."""
        while self.pending:
            await asyncio.wait([call.reply for call in self.pending.values()])
        self.close()

    def start(self, body: bytes, definition: tuple | None, generator: bool):
        """Send a TASK (the first time, its function's DEFINE before it; for a
        generator, its first NEXT behind it): (request id, call)."""
        if self.lost is not None:
            raise _NotAccepted()
        if definition is not None and definition[0] not in self.defined:
            self.defined.add(definition[0])
            self.out.send(DEFINE, *definition)
        rid = next(self.rids)
        call = self.pending[rid] = _Call(self.loop.create_future())
        self.out.send(TASK, rid, body)
        if generator:
            self.out.send(NEXT, rid)
        return rid, call

    async def answer(self, rid: int, call: _Call) -> tuple[int, bytes]:
        """The next reply (kind, body) to a request. Cancelling the caller
        cancels the task on the worker."""
        try:
            return await call.reply
        except asyncio.CancelledError:
            self.cancel(rid)
            raise

    async def step(self, rid: int, call: _Call, kind: int, body: bytes = b""):
        """One generator step on an open request."""
        if self.lost is not None:
            raise WorkerLost(
                f"lost worker {self.info.address} ({self.lost}) with the generator on it"
            )
        call.reply = self.loop.create_future()
        self.out.send(kind, rid, body)
        return await self.answer(rid, call)

    def cancel(self, rid: int):
        if self.pending.pop(rid, None) is not None and self.lost is None:
            self.out.send(CANCEL, rid)


class _RemoteGenerator(collections.abc.AsyncGenerator):
    """A @work async generator call: pulls one value per step from a worker.

    The task is sent on the first step, to the pool current at that time.
    `asend`, `athrow` and `aclose` reach the generator on the worker; a
    generator dropped unfinished (an `async for` left early) is closed there.
    """

    def __init__(self, fn, args, kwargs):
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._conn: _Connection | None = None
        self._rid, self._call = 0, None
        self._loads: dict[WorkerInfo, int] = {}  # the pool's in-flight counts
        self._done = False

    def __repr__(self):
        return f"<wool generator {self._fn.__qualname__}>"

    async def _start(self):
        pool = _current_pool.get()
        if pool is None:
            raise NoWorkersAvailable(_outside_pool(self._fn))
        if isinstance(pool, _NestedPool):
            pool = pool._pool()
        conn, self._rid, self._call, reply = await pool._place(
            self._fn, self._args, self._kwargs, True
        )
        self._conn, self._loads = conn, pool._loads
        if conn.info in self._loads:  # the balancer counts it in flight
            self._loads[conn.info] += 1
        return reply

    async def _step(self, kind: int, body: bytes = b""):
        try:
            if self._conn is None:
                reply_kind, data = await self._start()
            else:
                reply_kind, data = await self._conn.step(
                    self._rid, self._call, kind, body
                )
        except BaseException:
            self._finish()
            raise
        if reply_kind == RESULT:
            return _load_reply(reply_kind, data, self._fn)
        self._finish()
        if reply_kind == STOP:
            raise StopAsyncIteration
        raise _load_error(data)

    def _finish(self):
        if self._conn is not None and not self._done:
            self._conn.pending.pop(self._rid, None)
            if self._conn.info in self._loads:
                self._loads[self._conn.info] -= 1
        self._done = True

    async def asend(self, value):
        if self._done:
            raise StopAsyncIteration
        if self._conn is None and value is not None:
            raise TypeError(
                "can't send non-None value to a just-started async generator"
            )
        body = b"" if value is None else _dumps(value)
        return await self._step(NEXT, body)

    async def athrow(self, typ, val=None, tb=None):
        if isinstance(typ, BaseException):
            exc = typ
        elif isinstance(val, BaseException):
            exc = val
        else:
            exc = typ() if val is None else typ(val)
        if self._done or self._conn is None:
            self._done = True
            raise exc
        return await self._step(THROW, _dumps(exc))

    async def aclose(self):
        if self._done or self._conn is None:
            self._done = True
            return
        try:
            await self._step(CLOSE)
        except StopAsyncIteration:
            pass

    def __del__(self):
        if self._done or self._conn is None:
            return
        conn, rid = self._conn, self._rid
        self._done = True
        if conn.info in self._loads:
            self._loads[conn.info] -= 1
        try:
            if asyncio.get_running_loop() is conn.loop:
                conn.cancel(rid)  # runs the generator's `finally` there
                return
        except RuntimeError:  # collected outside the loop's thread
            pass
        if not conn.loop.is_closed():
            conn.loop.call_soon_threadsafe(conn.cancel, rid)


# -- Entry points: spawned worker, CLI, demo -------------------------------------------


def _spawned():
    """Main of a worker spawned by a WorkerPool: config on stdin, whose EOF
    (the pool closed it, or the caller died) means stop."""
    (size,) = struct.unpack("!I", sys.stdin.buffer.read(4))
    config = pickle.loads(sys.stdin.buffer.read(size))
    sys.path[:] = config["path"]
    logging.basicConfig(
        level=config["log_level"], format="wool worker %(process)d: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve_spawned(config))


async def _serve_spawned(config):
    loop = asyncio.get_running_loop()
    eof = loop.create_future()

    class Lifeline(asyncio.Protocol):
        def connection_lost(self, exc):
            if not eof.done():
                eof.set_result(None)

    await loop.connect_read_pipe(Lifeline, sys.stdin)
    worker = Worker(
        *config["tags"],
        authkey=config["authkey"],
        discovery=LocalDiscoveryService(config["namespace"]),
        grace=config["grace"],
        max_frame=config["max_frame"],
        max_tasks=config["max_tasks"],
    )
    loop.add_signal_handler(signal.SIGTERM, lambda: eof.done() or eof.set_result(None))
    await worker.start()
    await eof
    await worker.stop()


def main(argv: list[str] | None = None) -> int:
    """The `wool` command: `wool worker`, `wool ls`, `wool demo`."""
    parser = argparse.ArgumentParser(prog="wool", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="serve tasks until SIGTERM or SIGINT")
    worker.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    worker.add_argument("--port", type=int, default=0, help="default: any free port")
    worker.add_argument("--advertise", help="address callers use (default: --host)")
    worker.add_argument("--tag", action="append", default=[], help="repeatable")
    worker.add_argument("--authkey-file", help="the key (else WOOL_AUTHKEY)")
    worker.add_argument("--tls-cert", help="this worker's certificate (PEM)")
    worker.add_argument("--tls-key", help="its private key (PEM)")
    worker.add_argument("--tls-ca", help="CA that callers' certificates must chain to")
    worker.add_argument(
        "--insecure", action="store_true", help="allow no key off loopback"
    )
    worker.add_argument("--grace", type=float, default=GRACE, help="seconds to drain")
    worker.add_argument(
        "--max-tasks", type=int, help="tasks run at once (default: no limit)"
    )
    worker.add_argument("--max-frame", type=int, default=MAX_FRAME, help="bytes")

    ls = commands.add_parser("ls", help="list the workers a discovery service sees")
    ls.add_argument("--wait", type=float, help="seconds to listen (lan 2, local 0.1)")
    for command in (worker, ls):
        command.add_argument(
            "--discovery",
            default="local",
            help="lan, local or local:NAME (default local)",
        )
        command.add_argument(
            "--interface", action="append", help="mDNS interface address (repeatable)"
        )

    demo = commands.add_parser("demo", help="run the quick start on a local pool")
    demo.add_argument(
        "--size", type=int, default=2, help="worker processes (default 2)"
    )
    for command in (worker, ls, demo):
        command.add_argument("--log-level", default="WARNING", help="default WARNING")

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="wool: %(message)s")
    try:
        if args.command == "worker":
            return asyncio.run(_serve_cli(args))
        if args.command == "ls":
            return asyncio.run(_ls(args))
        return asyncio.run(_demo(args.size))
    except (ValueError, OSError) as e:
        print(f"wool {args.command}: {e}", file=sys.stderr)
        return 2


def _discovery(spec: str, interfaces: list[str] | None):
    if spec == "lan":
        return LanDiscoveryService(interfaces=interfaces)
    if spec == "local" or spec.startswith("local:"):
        return LocalDiscoveryService(spec.partition(":")[2] or None)
    raise ValueError(f"--discovery {spec!r}: use lan, local or local:NAME")


def _tls(cert, key, ca, purpose):
    """An SSLContext from PEM files, or None; verifies the peer when `ca`."""
    if not (cert or ca):
        return None
    context = ssl.create_default_context(purpose, cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    if ca and purpose is ssl.Purpose.CLIENT_AUTH:
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    return context


async def _serve_cli(args) -> int:
    authkey = None
    if args.authkey_file:
        with open(args.authkey_file, "rb") as f:
            authkey = f.read().rstrip(b"\r\n")
    worker = Worker(
        *args.tag,
        host=args.host,
        port=args.port,
        advertise=args.advertise,
        authkey=authkey,
        ssl=_tls(args.tls_cert, args.tls_key, args.tls_ca, ssl.Purpose.CLIENT_AUTH),
        client_ssl=_tls(
            args.tls_cert, args.tls_key, args.tls_ca, ssl.Purpose.SERVER_AUTH
        ),
        discovery=_discovery(args.discovery, args.interface),
        insecure=args.insecure,
        grace=args.grace,
        max_frame=args.max_frame,
        max_tasks=args.max_tasks,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.stop()))
    await worker.start()
    info = worker.info
    print(
        f"wool worker {info.uid} listening on {info.address} pid {info.pid}", flush=True
    )
    await worker.stopped()
    print(f"wool worker {info.uid} stopped", flush=True)
    return 0


async def _ls(args) -> int:
    service = _discovery(args.discovery, args.interface)
    wait = (
        args.wait if args.wait is not None else 2.0 if args.discovery == "lan" else 0.1
    )
    workers: dict[str, WorkerInfo] = {}

    async def listen():
        async for event in service.subscribe():
            if event.type == "worker-dropped":
                workers.pop(event.info.uid, None)
            else:
                workers[event.info.uid] = event.info

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            await listen()
    for w in sorted(workers.values(), key=lambda w: (w.host, w.port)):
        tags = ",".join(sorted(w.tags)) or "-"
        tls = " tls" if w.secure else ""
        print(f"{w.uid}  {w.address}  pid {w.pid}  tags {tags}  v{w.version}{tls}")
    return 0


@work
async def _demo_fibonacci(n: int) -> int:
    if n <= 1:
        return n
    return await _demo_fibonacci(n - 1) + await _demo_fibonacci(n - 2)


@work
async def _demo_where(label: str) -> str:
    return f"{label} ran in worker pid {os.getpid()}"


@work
async def _demo_countdown(n: int):
    for i in range(n, 0, -1):
        yield i, os.getpid()


@work
async def _demo_fail() -> None:
    raise ValueError("raised in a worker, caught in the caller")


async def _demo(size: int) -> int:
    start = time.perf_counter()
    async with WorkerPool(size=size) as pool:
        ready = time.perf_counter()
        print(f"started {pool!r} in {ready - start:.2f} s (caller pid {os.getpid()})")
        for line in await asyncio.gather(*(_demo_where(f"task {i}") for i in range(4))):
            print(" ", line)
        t = time.perf_counter()
        value = await _demo_fibonacci(12)
        print(
            f"  fibonacci(12) = {value}: 465 nested tasks in {time.perf_counter() - t:.2f} s"
        )
        async for i, pid in _demo_countdown(3):
            print(f"  countdown yielded {i} from worker pid {pid}")
        try:
            await _demo_fail()
        except ValueError as e:
            print(
                f"  caught ValueError({str(e)!r}) with the worker's traceback as its cause"
            )
    print(f"stopped the pool; {time.perf_counter() - start:.2f} s in all")
    return 0


if __name__ == "__main__":
    # `python -m wool` runs this file as __main__; use the real `wool` module so
    # tasks and the CLI share one copy of the module's state.
    import wool

    sys.exit(wool.main())
