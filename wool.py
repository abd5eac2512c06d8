"""wool: run async functions as tasks on a pool of worker processes.

    @wool.work
    async def fibonacci(n: int) -> int:
        if n <= 1:
            return n
        return await fibonacci(n - 1) + await fibonacci(n - 2)

    async with wool.WorkerPool(size=4):
        print(await fibonacci(10))

How a call travels: one TCP connection per pool and worker, many tasks on it.

  WorkerPool._run -> _Connection (the caller's end)     _Peer (the worker's end)
     == HELLO, DEFINE, TASK | STREAM, NEXT/THROW/CLOSE, CANCEL, STATUS =>  -> fn
    <= INFO, ACCEPTED | REFUSED, RESULT | ERROR | STOP, GOODBYE ==
       (and TAKEN, either way, in memfd transfer)
  _Roster <- discovery (the discovery table, mDNS, DNS) <- Worker.start publishes

Each frame is a fixed header (body length, kind, request id), a pickle body
(its large buffers out of band beside it) and a MAC. A connection opens with
an HMAC challenge-response on a shared key; the MAC of every later frame is
under a key of that session alone, over the frame's number, header and body,
checked before the body is unpickled. Only buffers in memfd transfer (between
processes of one user on one machine, in a file the MAC'd frame names) carry
none: those processes could read each other's memory anyway; and bodies over
1 KiB on TLS where a certificate was verified: TLS authenticates them (_trust).

Sections, top-down: errors; @work and its options; WorkerPool and its load
balancers; the roster and the spawner; the caller's end of a connection;
Executor; messages (pickling); frames; handshake; streams (_Frames, _Outbox);
memfd transfer; liveness; the worker; _Peer, the worker's end; entry points.

Version 0.1.0. Licensed Apache-2.0. https://github.com/wool-labs/wool"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import ctypes
import dataclasses
import enum
import errno
import functools
import hashlib
import hmac
import importlib
import inspect
import itertools
import json
import linecache
import logging
import mmap
import os
import pathlib
import pickle
import random
import resource
import secrets
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import types
import uuid
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple, ParamSpec, Self, TypeVar, cast, overload

import cloudpickle  # type: ignore[import-untyped]

# Discovery's __all__, each name listed in ours too (PEP 8's case for `import *`).
if __package__:  # vendored into a package: its own sibling, never another copy
    from .wool_discovery import *  # type: ignore[import-not-found]
else:
    from wool_discovery import *

__all__ = [
    "AuthenticationError", "ContextVar", "DiscoveryEvent", "DnsDiscoveryService",
    "Executor", "LanDiscovery", "LanDiscoveryService", "LeastLoadedLoadBalancer",
    "LocalDiscovery", "LocalDiscoveryService", "NoWorkersAvailable",
    "ProtocolError", "RemoteError", "RoundRobinLoadBalancer", "Task", "WoolError",
    "Worker", "WorkerInfo", "WorkerLost", "WorkerPool", "current_worker",
    "retries", "routine", "timeout", "work",
]  # fmt: skip

__version__ = "0.1.0"

MAX_FRAME = 256 * 2**20  # bytes in one frame; larger data belongs in a file
HANDSHAKE_TIMEOUT = 5.0  # seconds a new connection has to authenticate
MAX_HANDSHAKES = 64  # unauthenticated connections a worker holds; the oldest yields
MAX_CONNECTIONS = 1024  # authenticated connections per worker; more are closed
LISTEN_BACKLOG = 1024  # connections the kernel queues before the worker takes them
WAIT = 30.0  # seconds a call waits for a worker to appear before giving up
SEEDS = 32  # workers of each discovery source a HELLO lists, for nested pools,
NESTED = 16  # ... each of which connects to this many of them: a bounded mesh
START = 60.0  # seconds spawned workers get to start, however loaded the machine
GRACE = 5.0  # seconds in-flight tasks get to finish when a worker stops
PATIENCE = 1.0  # seconds a peer gets to close, or a stuck worker to answer, first
KEEPALIVE = 1.0  # seconds of silence before the kernel probes a peer ...
DEAD_AFTER = 5.0  # ... and seconds its kernel may not answer: then it is gone
HIGH_WATER = 4 * 2**20  # unsent bytes at which a connection holds its frames back
TRIM = 2**16  # characters of an error's message, and of its traceback, that travel
ACCEPT_BURST = 64  # tasks a worker takes from one connection before they get to run
MAX_DEFINED = 64 * 2**20  # bytes of functions one connection may define (DEFINE)
RECONNECT = (0.05, 2.0)  # seconds between tries to reach a listed worker, doubling
ASK_AGAIN = (0.01, 1.0)  # seconds before asking full workers again, doubling
RESPAWNS = 10  # replacements per RESPAWN_WINDOW, so a task that kills workers ...
RESPAWN_WINDOW = 60.0  # ... cannot fork-bomb; past the bound they wait their turn
LOG_BURST = 5  # warnings about one peer host per LOG_WINDOW; the rest are counted
LOG_WINDOW = 60.0
LOG_HOSTS = 4096  # peer hosts whose warnings are counted at once

log = logging.getLogger("wool")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
Items = Iterable[T] | AsyncIterable[T]


# -- Errors --------------------------------------------------------------------
#
#   WoolError
#   +-- NoWorkersAvailable   no worker could take the task within the wait
#   +-- WorkerLost           the connection died after the task was sent (a
#                            concurrent.futures BrokenProcessPool too)
#   +-- AuthenticationError  the key, a certificate or the protocol version was refused
#   +-- ProtocolError        a peer sent bytes that are not wool frames
#   +-- RemoteError          a worker's exception that could not be rebuilt here


class WoolError(Exception):
    """Base of the errors wool raises itself."""


class NoWorkersAvailable(WoolError):
    """No worker could take the task: outside a pool, or none within the wait."""


class WorkerLost(WoolError, BrokenProcessPool):
    """The worker's connection died after the task was sent to it. The task
    may or may not have run; wool does not run it again (at-most-once). A
    BrokenProcessPool, so that code written for executors catches it."""


class AuthenticationError(WoolError):
    """The peer refused our key, TLS certificate or protocol version, or did
    not prove it holds the same key: a configuration error, not retried."""


class ProtocolError(WoolError):
    """A peer sent something that is not a valid wool frame."""


class RemoteError(WoolError):
    """A worker's exception that could not be pickled or rebuilt in the caller.

    Carries the original type name, message and the worker's traceback text."""

    def __init__(self, type_name: str, message: str, traceback: str):
        super().__init__(type_name, message, traceback)
        self.type_name, self.message, self.traceback = type_name, message, traceback

    def __str__(self):
        return f"{self.type_name}: {self.message}"


class _RemoteTraceback(Exception):
    """The worker's traceback, attached as `__cause__` (as concurrent.futures):
    one part per worker the failure passed through, deepest first, each
    headed by the worker's pid and address."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb.rstrip("\n")

    def __str__(self):
        return "\n" + self.tb


class _NotSent(Exception):
    """Internal: the task provably never reached the worker; another may run it."""


# -- @work and its options: timeout, retries, wool.ContextVar ------------------
@overload
def work(fn: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def work(
    *, timeout: float | None = None, retries: int = 0
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
def work(fn=None, /, *, timeout=None, retries=0):
    """Make an async function (or async generator) run as a task on a worker.

    Calling the result returns what the function would: a coroutine that
    dispatches when awaited, or an async generator that dispatches when first
    iterated and pulls one value per step. The task goes to the pool of the
    enclosing `async with WorkerPool()` (in a worker: the pool that sent the
    running task). `timeout=s` bounds each run (each generator step) on the
    worker: past it the task is cancelled there, and the caller gets
    TimeoutError. `retries=n` sends a call again after WorkerLost, up to n
    times: for idempotent tasks. wool.timeout() and wool.retries() set both
    for a block. On methods, @work is innermost. TypeError for anything but
    `async def`."""
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a whole number >= 0, not {retries!r}")
    if fn is None:
        return functools.partial(work, timeout=timeout, retries=retries)
    wrapper: Any
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return _remote_generator(wrapper, args, kwargs)

    elif inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            return await _pool_for(wrapper)._run(wrapper, args, kwargs)

    else:
        below = f"; put @wool.work below @{type(fn).__name__}"
        raise TypeError(
            f"@wool.work needs an `async def` function or async generator, "
            f"not {fn!r}" + below * isinstance(fn, (classmethod, staticmethod))
        )
    wrapper.__wool_work__ = fn  # what the worker runs
    wrapper.__wool_timeout__, wrapper.__wool_retries__ = timeout, retries
    return wrapper


routine = work  # the upstream project's name


# The wrappers above name nothing but module-level functions and classes, so
# a closure's wrapper pickles by value without dragging module state along.
def _pool_for(fn) -> WorkerPool:
    """The pool a call of `fn` goes to: the current one, or in a worker the
    one that sent the running task, or else the last one start()ed."""
    if (pool := _current_pool.get() or next(reversed(_started), None)) is None:
        raise NoWorkersAvailable(
            f"{fn.__qualname__}() was called outside a WorkerPool; call it inside "
            "`async with wool.WorkerPool():`"
        )
    return pool if isinstance(pool, WorkerPool) else pool.get()


def current_worker() -> WorkerInfo | None:
    """The WorkerInfo of the worker running the current task; None in a caller."""
    return _current_worker.get()


def timeout(seconds: float | None) -> contextlib.AbstractContextManager:
    """Within the block, each @work call may run `seconds` on its worker
    (None: no limit), overriding `@work(timeout=)`. Past it the task is
    cancelled on the worker and the caller gets TimeoutError."""
    return _setting(_timeout, seconds)


def retries(n: int) -> contextlib.AbstractContextManager:
    """Within the block, each @work call is sent again up to `n` times after
    WorkerLost (to another worker where there is one), overriding
    `@work(retries=)`. For idempotent tasks only: a lost task may have run."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"retries must be a whole number >= 0, not {n!r}")
    return _setting(_retries, n)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


_MISSING: Any = object()
_NOBODY = frozenset[str]()  # no workers' uids (not a singleton: made once)
_NO_REASONS: Mapping[str, bytes] = types.MappingProxyType({})  # (no dict per call)
_timeout = contextvars.ContextVar[float | None]("wool.timeout", default=_MISSING)
_retries = contextvars.ContextVar[int]("wool.retries", default=_MISSING)
_registry: dict[str, contextvars.ContextVar] = {}  # wool.ContextVar name -> var
# In a worker task: the names of the wool.ContextVars it set.
_set_by_task = contextvars.ContextVar[set[str] | None]("wool.set_by_task", default=None)


class ContextVar:
    """A context variable whose value travels with @work calls, as
    contextvars.ContextVar does in a process (`get`, `set`, `reset`): to the
    task and the tasks it dispatches, and back when a call returns or a
    generator yields. Only values explicitly set travel, and they must pickle
    (else TypeError at dispatch, naming the variable). The name identifies
    the variable across processes: one variable per name."""

    __class_getitem__: Any = classmethod(types.GenericAlias)  # ContextVar[str]

    def __init__(self, name: str, *, default: Any = _MISSING):
        self.name, self.default = name, default
        self._var = _registry.setdefault(name, contextvars.ContextVar(f"wool:{name}"))

    def __repr__(self):
        return f"<wool.ContextVar {self.name!r}>"

    def __reduce__(self):
        return functools.partial(ContextVar, default=self.default), (self.name,)

    def get(self, default: Any = _MISSING) -> Any:
        if (value := self._var.get(_MISSING)) is _MISSING:
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


def _context_values(names: Iterable[str] = _registry) -> dict[str, Any] | None:
    """The wool.ContextVars set in this context (of `names`): what a call carries."""
    values = {n: _registry[n].get(_MISSING) for n in names}
    return {n: v for n, v in values.items() if v is not _MISSING} or None


def _enter_context(values: dict[str, Any] | None) -> set[str]:
    """In a new worker task: take on the caller's values; track changes."""
    for name, value in (values or {}).items():
        _registry.setdefault(name, contextvars.ContextVar(f"wool:{name}")).set(value)
    _set_by_task.set(changed := cast("set[str]", set()))  # (set[str]() is slow)
    return changed


def _context_changes(changed: set[str]) -> dict[str, Any] | None:
    """The values a worker task set, to send back (and forget)."""
    values = _context_values(changed) if changed else None
    changed.clear()
    return values


# -- WorkerPool and its load balancers -----------------------------------------
class Task:
    """One call of a @work function, as a load balancer sees it (and, to its
    pool, its request on the connection it went to: see _Connection)."""

    __slots__ = ("accepted", "args", "fn", "kwargs", "reply", "started")

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, started=None):
        self.fn, self.args, self.kwargs, self.started = fn, args, kwargs, started
        self.accepted, self.reply = False, cast(asyncio.Future, None)

    def __repr__(self):
        return f"<Task {self.fn.__qualname__}>"


class RoundRobinLoadBalancer:
    """Send each task to the next worker in turn. (A load balancer is any
    object whose `select(workers, task)` returns a key of `workers`: the
    workers with room, each mapped to its load, see WorkerPool.load. It runs
    per call: a scan of `workers` costs as much as the fleet is large; their
    `order`, a list where present, costs nothing. When the chosen worker
    refuses the task, the pool asks again without it.)"""

    _turn = 0  # how many it chose (select's `+=` makes it the instance's own)

    def select(self, workers: Mapping[WorkerInfo, int], task: Task) -> WorkerInfo:
        self._turn += 1
        order = getattr(workers, "order", None) or list(workers)  # no scan: _Ready
        return order[self._turn % len(order)]


class LeastLoadedLoadBalancer:
    """Send each task to the less loaded (fewer of this caller's tasks in
    flight) of two workers drawn at random, the least loaded of all among
    two: better than round-robin when task durations vary widely, and as
    cheap at a thousand workers as at two ("the power of two choices")."""

    def select(self, workers: Mapping[WorkerInfo, int], task: Task) -> WorkerInfo:
        order = getattr(workers, "order", None) or list(workers)
        a, b = random.sample(order, 2) if len(order) > 1 else order * 2
        return a if workers[a] <= workers[b] else b


# The lifecycle of a pool or a worker, in this order, each state once:
_State = enum.Enum("_State", "NEW STARTING READY STOPPING STOPPED")

_started: dict[WorkerPool, None] = {}  # pools start()ed and not stopped, oldest first
_current_pool: contextvars.ContextVar[WorkerPool | _Peer | None]
_current_pool = contextvars.ContextVar("wool.pool", default=None)
_current_worker = contextvars.ContextVar[WorkerInfo | None]("wool.worker", default=None)


class WorkerPool:
    """Workers that run the @work calls made inside `async with` it.

        async with WorkerPool(size=4): ...                     # ephemeral
        async with WorkerPool(discovery=LanDiscoveryService()): ...  # durable
        async with WorkerPool("gpu", size=2, discovery=lan): ...     # hybrid

    `size` (alias `spawn`) processes are started here with the positional
    `tags` and `authkey` (else WOOL_AUTHKEY, else a random key), one per CPU
    without `size` or `discovery`; `discovery` adds the workers it finds, at
    most `lease`; `modules` travel by value. A call waits up to `wait` s for
    a worker to exist, then for room as long as it takes, in turn. Leaving
    the block stops the spawned workers (`grace` s for their tasks), kills
    stragglers and removes their discovery table, whatever ended the block;
    one that dies is replaced (RESPAWNS per RESPAWN_WINDOW at most). A task
    goes to another worker only while it provably did not start (REFUSED, or
    never sent); else a dead connection is WorkerLost. No worker in time:
    NoWorkersAvailable; every worker refused us: AuthenticationError."""

    # Rules: the pool is a lifecycle and a dispatcher. Its _Roster owns the
    # workers it knows, the connections to them and the signal of a change;
    # its _Spawner owns the processes it started; a _Connection owns its
    # calls in flight, which the balancer sees as a read-only mapping.

    def __init__(
        self, *tags: str, size: int | None = None, spawn: int | None = None,
        discovery=None, lease: int | None = None, loadbalancer=None,
        authkey: bytes | None = None, ssl=None, wait: float = WAIT,
        grace: float = GRACE, max_frame: int = MAX_FRAME,
        max_tasks_per_worker: int | None = None,
        modules: Iterable[types.ModuleType] = (),
    ):  # fmt: skip
        if spawn is not None and size is not None and size != spawn:
            raise TypeError("give size= or its alias spawn=, not both")
        size = spawn if size is None else size
        if size is None and discovery is None:
            size = os.cpu_count() or 1
        if size is not None and (not isinstance(size, int) or size < 0):
            raise ValueError(f"size must be a whole number >= 0, not {size!r}")
        if size == 0 and discovery is None:
            raise ValueError("WorkerPool(size=0) would have no worker: give discovery=")
        if lease is not None and lease < 0:
            raise ValueError(f"lease must be >= 0, not {lease!r}")
        if (cap := max_tasks_per_worker) is not None and cap < 1:
            raise ValueError(f"max_tasks_per_worker must be >= 1, not {cap!r}")
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
        self.modules = tuple(modules)
        if bad := [m for m in self.modules if not isinstance(m, types.ModuleType)]:
            raise TypeError(f"modules= takes imported modules, not {bad[0]!r}")
        self.tags, self.size = _check_tags(tags, "WorkerPool"), size or 0
        self.discovery, self.lease = discovery, lease
        self.authkey, self.ssl, self.max_tasks_per_worker = authkey, ssl, cap
        self.loadbalancer = loadbalancer or RoundRobinLoadBalancer()
        self.wait, self.grace, self.max_frame = wait, grace, max_frame
        self._state, self._roster = _State.NEW, _Roster(lease, max_frame, cap)
        self._spawner: _Spawner | None = None
        self._token: contextvars.Token | None = None

    @classmethod
    def _nested(cls, worker: Worker, services: list, wait: float) -> WorkerPool:
        """A worker's pool for nested calls: the discovery services a caller's
        HELLO named, with its `wait`, reached with the worker's own key and
        TLS settings."""
        key, ssl = worker.authkey, worker.client_ssl
        pool = cls(size=0, discovery=services, lease=NESTED, authkey=key, ssl=ssl,
                   wait=wait)  # fmt: skip
        roster = pool._roster
        roster.who = f"worker {worker.info and worker.info.address}'s nested pool"
        roster.nested = True
        sources = [_Source(s, key, ssl) for s in services]
        for service in services:  # names the caller resolved may not resolve here
            if isinstance(service, DnsDiscoveryService):
                service.quiet = True
        roster.follow(sources, _pickle((services, True, wait)))
        pool._state = _State.READY
        return pool

    def __repr__(self):
        expected = f"/{self.size}" if self.size and not self.discovery else ""
        return f"<WorkerPool {self._state.name.lower()} {len(self.workers)}{expected}>"

    @property
    def workers(self) -> list[WorkerInfo]:
        """The workers this pool is connected to and sends tasks to now."""
        return list(self.load)

    @property
    def load(self) -> Mapping[WorkerInfo, int]:
        """Each connected worker's calls in flight from this pool (its load,
        as balancers see it): tasks sent and not answered, and generators
        open there."""
        conns = self._roster.conns.items()
        return types.MappingProxyType({i: c.calls for i, c in conns if not c.retiring})

    async def __aenter__(self) -> Self:
        await self._start()
        self._token = _current_pool.set(self)
        return self

    async def __aexit__(self, *exc_info):
        await self.stop()

    async def start(self) -> Self:
        """Start the pool without a block, as in a notebook: `pool = await
        WorkerPool().start()`, later `await pool.stop()`. Calls made where no
        pool is set in the context (another cell, another task) go to the
        pool of this process that was started last and still runs."""
        await self._start()
        _started[self] = None
        return self

    async def _start(self):
        if self._state is not _State.NEW:
            raise RuntimeError(f"{self!r} cannot be started twice")
        self._state = _State.STARTING
        _more_files()
        for module in self.modules:  # from now on their code travels by value
            if module.__name__ not in cloudpickle.list_registry_pickle_by_value():
                cloudpickle.register_pickle_by_value(module)
                _refs.clear()  # functions sent by reference so far
        try:
            sources, key = [], _authkey(self.authkey)
            if self.size:
                self._spawner = _Spawner(self)
                service = self._spawner.service  # on loopback only, not leased:
                sources.append(_Source(service, self._spawner.key, None, False))
            if self.discovery is not None:
                sources.append(_Source(self.discovery, key, self.ssl))
            services = [s.service for s in sources]
            self._roster.follow(sources, _pickle((services, False, self.wait)))
            if self._spawner is not None:
                await self._spawner.start()
        except BaseException:
            await self.stop()
            raise
        self._state = _State.READY

    async def wait_for_workers(
        self, n: int = 1, timeout: float | None = None
    ) -> list[WorkerInfo]:
        """The connected workers' WorkerInfo, once at least `n` are connected;
        NoWorkersAvailable after `timeout` seconds (default: the pool's `wait`),
        saying how many of `n` were found, or at once if the pool is not running."""
        seconds = self.wait if timeout is None else timeout
        try:
            await self._until(lambda: len(self.workers) >= n, seconds)
        except TimeoutError:
            raise NoWorkersAvailable(
                f"{len(self.workers)} of {n} workers connected within {seconds:g} s;"
                f" waited on {self._waited_on()}"
            ) from None
        return self.workers

    async def status(self) -> list[dict]:
        """What each connected worker is doing, one dict each (see
        Worker.status), asked over its authenticated connection."""
        conns = [c for c in self._roster.conns.values() if not c.retiring]
        return list(await asyncio.gather(*(conn.status() for conn in conns)))

    @overload  # typed for its callers: what an async `fn` returns is awaited
    def map(
        self, fn: Callable[[T], Awaitable[R]], iterable: Items[T], *,
        concurrency: int | None = None, ordered: bool = True,
    ) -> AsyncIterator[R]: ...  # fmt: skip
    @overload
    def map(
        self, fn: Callable[[T], R], iterable: Items[T], *,
        concurrency: int | None = None, ordered: bool = True,
    ) -> AsyncIterator[R]: ...  # fmt: skip
    async def map(self, fn, iterable, *, concurrency=None, ordered=True):
        """Call `fn` (any callable Executor.submit takes) on each item of
        `iterable`, or async iterable, consumed lazily with at most
        `concurrency` calls in flight (default 4 per connected worker), and
        yield the results in input order (or as they come: `ordered=False`).
        The first exception cancels the calls in flight, and is raised."""
        running = collections.deque[asyncio.Task]()
        limit = 4 * max(1, len(self.workers)) if concurrency is None else concurrency
        if not isinstance(limit, int) or limit < 1:  # (then it is `concurrency`)
            raise ValueError(f"concurrency must be a whole number >= 1, not {limit!r}")
        sync = not hasattr(iterable, "__aiter__")
        rest = iter(iterable) if sync else aiter(iterable)  # the items not pulled yet
        try:
            while True:
                while len(running) < limit:
                    item = next(rest, _MISSING) if sync else await anext(rest, _MISSING)
                    if item is _MISSING:
                        limit = 0  # exhausted
                        break
                    each = _as_call(fn, (item,), {})
                    running.append(asyncio.ensure_future(self._run(*each)))
                if not running:
                    return
                if ordered:
                    yield await running.popleft()
                    continue
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for call in [c for c in running if c.done()]:
                    running.remove(call)
                    yield call.result()
        finally:
            for call in running:
                call.cancel()

    async def _until(self, ready: Callable[[], bool], seconds: float):
        """Wait until `ready()`, rechecked at each change of the pool; raises
        TimeoutError after `seconds`."""
        deadline = time.monotonic() + seconds
        while not ready():
            if self._state not in (_State.STARTING, _State.READY):
                raise NoWorkersAvailable(f"{self!r} is not running")
            if (left := deadline - time.monotonic()) <= 0:
                raise TimeoutError
            await self._roster.wait_change(left)

    async def stop(self):
        """Stop a started pool, as leaving its block would."""
        if self._state in (_State.STOPPING, _State.STOPPED):
            return
        self._state = _State.STOPPING
        try:
            if self._spawner is not None:
                await self._spawner.stop()
            await self._roster.close()
        finally:
            _started.pop(self, None)
            if self._spawner is not None:
                self._spawner.service.remove()
            if self._token is not None:
                with contextlib.suppress(ValueError):
                    _current_pool.reset(self._token)
                self._token = None
            self._state = _State.STOPPED

    # Dispatch. A call waits for a worker to exist for up to `wait` seconds
    # (counted while there is none), and for room on a busy one as long as it
    # takes, as a queue: wool.timeout() or asyncio.timeout bound that.

    async def _connection(self, task: Task, refused, lost, unable) -> _Connection:
        """A worker for `task` (see _choose), once there is one (after _run
        found none at once), in turn behind the calls that wait for room
        already; those that `refused` it (full with others' tasks) are asked
        again after a pause that doubles each time, those `unable` to run it
        (uid -> why) never."""
        pause, deadline = ASK_AGAIN[0], time.monotonic() + self.wait
        roster = self._roster
        refused |= frozenset(unable)  # for this call, as if full
        while True:
            if self._state not in (_State.READY, _State.STARTING):
                raise NoWorkersAvailable(f"{self!r} is closed; call inside its block")
            roster.check(task, unable)
            now = time.monotonic()
            if roster.conns:  # busy, not absent: no deadline
                deadline = now + self.wait
            elif now >= deadline:
                raise NoWorkersAvailable(
                    f"no worker took {task.fn.__qualname__}() within {self.wait:g} "
                    f"s; waited on {self._waited_on()}"
                )
            if refused - frozenset(unable):
                await asyncio.sleep(pause)
                refused, pause = frozenset(unable), min(pause * 2, ASK_AGAIN[1])
            else:
                seconds = None if roster.conns else deadline - now
                await roster.wait_change(seconds, queued=True)
            if (conn := self._choose(task, refused, lost)) is not None:
                return conn

    def _choose(self, task: Task, refused: frozenset[str], lost: frozenset[str]):
        """A connected worker with room for `task` that has not `refused` it
        (uids), and where it was not `lost` if another has room; or None. The
        balancer sees the roster's live view (no copy: the same cost at any
        size), or, when some workers are to be left out, a filtered copy."""
        roster = self._roster
        loads: Mapping[WorkerInfo, int] = roster.ready
        if refused or lost or task.fn in roster.cannot:
            usable = lambda i, c: i.uid not in refused and task.fn not in c.cannot
            loads = {i: c.calls for i, c in roster.ready.conns.items() if usable(i, c)}
            if lost and any(info.uid not in lost for info in loads):
                loads = {i: n for i, n in loads.items() if i.uid not in lost}
            loads = types.MappingProxyType(loads)
        if not loads:
            return None
        info = self.loadbalancer.select(loads, task)
        conn = roster.ready.conns.get(info)
        if conn is None or loads is not roster.ready and info not in loads:
            raise TypeError(
                f"{self.loadbalancer!r}.select() returned {info!r}, "
                "which is not one of the workers it was given"
            )
        return conn

    def _waited_on(self) -> str:
        """The discovery sources, and why the workers they list cannot be used."""
        roster = self._roster
        sources = ", ".join(repr(s.service) for s in roster.sources) or "no discovery"
        return "; ".join([sources, *map(str, roster.errors.values())][:9])

    async def _run(self, fn, args, kwargs, generator: bool = False, started=None):
        """Send a call to a worker that accepts it: its value; or, for a
        generator, (connection, request id, call, first step's reply). Goes
        to another worker while the task provably did not start (REFUSED, or
        never sent); after WorkerLost, `retries` times. `started()` is
        called when a worker says it started the task."""
        seconds = _time_limit(fn)  # on the worker (for a generator: each step's)
        body, definition = _dump_task(fn, args, kwargs, seconds, self.max_frame)
        task, lost = Task(fn, args, kwargs, started), cast("tuple[WorkerInfo, ...]", ())
        retries = fn.__wool_retries__ if (n := _retries.get()) is _MISSING else n
        refused = avoid = _NOBODY  # uids: workers that refused it, that lost it
        unable = _NO_REASONS  # uid -> why this call cannot run there (one made then)
        while True:
            # A worker with room now (no coroutine: the common case), else wait:
            seen = refused | frozenset(unable) if unable else refused  # as if full
            conn = None if self._roster.queued() else self._choose(task, seen, avoid)
            conn = conn or await self._connection(task, refused, avoid, unable)
            try:
                rid = conn.start(task, body, definition, generator)
                if seconds is None or generator:  # as conn.answer(), no coroutine
                    kind, data = await task.reply
                else:  # the worker times out; this is in case it hangs
                    reply = conn.answer(rid, task)
                    kind, data = await asyncio.wait_for(reply, seconds + PATIENCE)
            except asyncio.CancelledError:
                conn.cancel(rid)
                raise
            except _NotSent:
                kind = REFUSED
            except WorkerLost as e:
                del task.reply  # (it holds e, whose traceback holds this frame)
                lost += (conn.info,)
                if len(lost) > retries:
                    if retries:
                        where = ", ".join(i.address for i in lost)
                        sent = f"sent {len(lost)} times (retries={retries}), to {where}"
                        e.args = (f"{e}; {sent}",)
                    raise
                log.warning("%s; sending %s() again", e, fn.__qualname__)
                avoid |= {conn.info.uid}
                continue
            else:
                if kind != REFUSED and generator:
                    return conn, rid, task, (kind, data)
                conn.finish(rid)
                if kind != REFUSED:
                    return _load_reply(kind, data, fn)
                if data is not None:  # it cannot run there: this call, or ever
                    whole, unable = data[0], {**unable, conn.info.uid: data[1]}
                    if whole and fn not in conn.cannot:  # skip it for fn: say so
                        conn.cannot[fn] = data[1]
                        self._roster.cannot.add(fn)
                        why = _load_error(data[1])
                        log.warning("%s cannot run %s(), so others will: %s",
                                    conn.info.address, fn.__qualname__, why)  # fmt: skip
            refused |= {conn.info.uid}


def _check_tags(tags: tuple, who: str) -> frozenset[str]:
    if bad := [t for t in tags if not isinstance(t, str)]:
        hint = " (for a number of workers, write size=N)" if who == "WorkerPool" else ""
        raise TypeError(f"{who} tags must be strings, not {bad[0]!r}{hint}")
    return frozenset(tags)


@functools.cache
def _more_files():
    """Raise the soft limit on open files to the hard one, as servers do: a
    pool or a worker holds a socket per peer, and 1,024 is a common default."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _authkey(key: bytes | None) -> bytes:
    """The key to use: the one given, else WOOL_AUTHKEY, else none (b"")."""
    return os.environ.get("WOOL_AUTHKEY", "").encode() if key is None else key


def _spawn(tasks: set[asyncio.Task], coro) -> None:
    """Run `coro` in a task, kept in `tasks` until it is done."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


# -- The roster and the spawner: the workers a pool knows ----------------------
class _Roster:
    """The workers a pool's discovery sources list, and its connections to
    them. Liveness comes from a connection, never from discovery records (a
    killed worker can stay listed for a long time).

    Rules: discovery events (and a caller's seeds) change `listed` and
    nothing else; each listed worker has one `link` task, the only code that
    opens, registers in `conns` and forgets a connection to it; `ready`, what
    balancers see, changes in update() alone. A worker that comes or goes is
    notify(), a call that starts or ends room(); calls waiting for a worker
    or for room wait their turn in `queue` (wait_change(queued=True)), and
    room() wakes the oldest. The roster's tasks end with close()."""

    def __init__(self, lease: int | None, max_frame: int, cap: int | None):
        self.lease, self.max_frame = lease, max_frame
        self.cap = cap  # of the pool's calls on one worker (Executor: 1)
        self.ready = _Ready()  # the connections that take a task now
        self.cannot: set[Callable] = set()  # functions some worker REFUSED
        self.seeded: set[str] = set()  # uids a HELLO listed, and discovery not
        self.who = "this pool"  # or, in a worker, "worker X's nested pool"
        self.sources: list[_Source] = []
        self.hello = b""  # (services, nested, wait) pickled, for workers' nested calls
        self.nested = False  # a worker's nested pool: its TLS is the worker's
        self.listed: dict[str, tuple[WorkerInfo, _Source]] = {}  # by uid
        self.conns: dict[WorkerInfo, _Connection] = {}  # open ones, retiring too
        self.errors: dict[str, Exception] = {}  # uid -> why it cannot be used
        self.leased: set[str] = set()  # uids of admitted discovered workers
        self.failed: dict[int, Exception] = {}  # id(source) -> why it failed
        self.queue: collections.deque[asyncio.Future] = collections.deque()
        self.watchers: list[asyncio.Future] = []  # other waits: _until(), lease
        self.tasks: set[asyncio.Task] = set()  # watch() and link() tasks
        self.running = True  # until close()

    def follow(self, sources: list[_Source], hello: bytes):
        self.sources, self.hello = sources, hello
        for source in sources:
            _spawn(self.tasks, self.watch(source))

    def greeting(self, verified: bool) -> bytes:
        """HELLO's body: `hello`, and a sample of SEEDS workers each source
        lists, so that a worker's nested pool knows some before (or without)
        discovery, and nested calls spread over the fleet."""
        seeds = []
        for o in self.sources:  # not ours: on loopback, others cannot reach them
            each = [i for i, s in self.listed.values() if s is o and o.leased]
            sample = random.sample(each, min(SEEDS, len(each)))
            seeds.append([dataclasses.astuple(i) for i in sample])
        return pickle.dumps((self.hello, seeds, verified))

    def seed(self, seeds: list):
        """In a nested pool: learn the workers a caller's HELLO listed."""
        for source, infos in zip(self.sources, seeds):
            for info in (WorkerInfo(*fields) for fields in infos):
                if info.uid not in self.listed:
                    self.learn(DiscoveryEvent("worker-added", info), source)
                    self.seeded.add(info.uid)

    def notify(self, conn: _Connection | None = None):
        """A worker came or went (`conn`'s, if given): wake every waiting call."""
        self.watchers = [*self.queue, *self.watchers]  # the queue's first, in turn
        self.queue.clear()
        self.room(conn, freed=False)

    def update(self, conn: _Connection):
        """Keep `conn` in `ready` while it takes tasks: open and registered,
        not retiring, with room under the cap."""
        ok = not conn.retiring and not conn.lost
        ok = ok and (self.cap is None or conn.calls < self.cap)
        if ok != conn.ready:  # (no lookups while nothing changes: twice per call)
            self.ready.put(conn, ok and self.conns.get(conn.info) is conn)

    def room(self, conn: _Connection | None = None, freed: bool = True):
        """A call of `conn` started, or ended (`freed` room): wake the
        watchers, and then the oldest call waiting in the queue."""
        if conn is not None:
            self.update(conn)
        for waiter in self.watchers:  # (their callbacks run later: none adds here)
            if not waiter.done():
                waiter.set_result(None)
        self.watchers.clear()
        while freed and self.queue:
            if not (waiter := self.queue.popleft()).done():
                return waiter.set_result(None)

    def queued(self) -> bool:
        """Whether calls wait in the queue (newcomers go behind them)."""
        while self.queue and self.queue[0].done():
            self.queue.popleft()
        return bool(self.queue)

    async def wait_change(self, seconds: float | None, queued: bool = False):
        """Until notify() or room() wakes us (in the queue, in turn), or
        `seconds` passed."""
        waiter = asyncio.get_running_loop().create_future()
        (self.queue.append if queued else self.watchers.append)(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.room()  # woken, then cancelled: the turn passes on
            raise

    async def close(self):
        """End its tasks, and with them the connections; wake those waiting."""
        self.running, conns = False, list(self.conns.values())
        self.notify()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=PATIENCE)

    def check(self, task: Task, unable: Mapping[str, bytes]):
        """Raise what makes waiting for a worker pointless: no worker can run
        this call (its function, or here `unable` its arguments: uid -> why),
        or every worker refused us, or discovery failed."""
        if task.fn in self.cannot or unable:
            conns = [c for c in self.conns.values() if not c.retiring]
            why = [c.cannot.get(task.fn) or unable.get(c.info.uid) for c in conns]
            if conns and all(why):
                raise _load_error(why[0])
        if self.failed and len(self.failed) == len(self.sources):
            failed = [f"{s.service!r}: {self.failed[id(s)]!r}" for s in self.sources]
            raise NoWorkersAvailable(
                f"no worker for {task.fn.__qualname__}(): discovery failed: "
                + "; ".join(failed)
            )
        refused = [e for e in self.errors.values() if type(e) is AuthenticationError]
        if refused and len(refused) >= len(self.listed):
            refusals = "; ".join(map(str, refused))
            raise AuthenticationError(f"every worker refused {self.who}: {refusals}")

    async def watch(self, source: _Source):
        try:
            async for event in source.service.subscribe():
                self.learn(event, source)
                self.seeded.discard(event.info.uid)
        except Exception as e:  # a broken filter, a missing zeroconf, ...
            log.error("discovery %r failed: %r", source.service, e)
            self.failed[id(source)] = e
            self.notify()

    def learn(self, event: DiscoveryEvent, source: _Source):
        info = event.info
        if event.type == "worker-dropped":
            self.listed.pop(info.uid, None)
            self.errors.pop(info.uid, None)
            if (conn := self.find(info.uid)) is not None:
                conn.retire()  # no new tasks; closes once its calls are answered
            return self.notify()
        known, self.listed[info.uid] = self.listed.get(info.uid), (info, source)
        if known is None:
            _spawn(self.tasks, self.link(info.uid))
        elif (conn := self.find(info.uid)) is not None and conn.info != info:
            self.ready.put(conn, False)
            self.conns[info], conn.info = self.conns.pop(conn.info), info
            self.notify(conn)

    def find(self, uid: str) -> _Connection | None:
        """The connection of the link for listed worker `uid`."""
        return next((c for c in self.conns.values() if c.listed_as == uid), None)

    async def link(self, uid: str):
        """Keep a connection to worker `uid` while it is listed, reconnecting
        after a drop."""
        delay, reached = RECONNECT[0], False  # reached: once, then it went away
        try:
            while uid in self.listed and self.running:
                info, source = self.listed[uid]
                if source.leased and self.lease is not None and uid not in self.leased:
                    if len(self.leased) >= self.lease:
                        await self.wait_change(None)
                        continue
                    self.leased.add(uid)
                try:
                    conn = await _Connection.open(info, source, self)
                except (OSError, asyncio.IncompleteReadError, WoolError) as e:
                    if not isinstance(e, WoolError):  # name the worker and the cause
                        number = getattr(e, "errno", None)
                        cause = os.strerror(number) if number else _why(e)
                        if number == errno.EMFILE:  # past the hard limit we raised to
                            cause += "; raise the hard limit on open files (ulimit -Hn)"
                        if isinstance(e, asyncio.IncompleteReadError):
                            cause = "it closed the connection during the handshake"
                        cause = cause or f"no answer within {HANDSHAKE_TIMEOUT:g} s" + (
                            " (a worker with TLS waits in silence for a caller "
                            "without)" * (source.ssl is None)
                        )
                        e = ConnectionError(f"worker {info.address}: {cause}")
                    if uid in self.seeded:  # a hint that failed: forgotten
                        self.seeded.discard(uid)
                        self.learn(DiscoveryEvent("worker-dropped", info), source)
                        continue
                    if uid not in self.errors and source.leased and not reached:
                        log.warning("%s: %s", self.who, e)  # once, not at each try
                    self.errors[uid] = e
                    self.leased.discard(uid)  # its lease goes to another meanwhile
                    self.notify()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT[1])
                else:
                    self.errors.pop(uid, None)
                    conn.listed_as, delay, reached = uid, RECONNECT[0], True
                    if await self.unwanted(conn, source, info):
                        continue
                    self.conns[conn.info] = conn
                    self.notify(conn)
                    try:
                        await conn.closed
                    finally:
                        conn.close()
                        self.conns.pop(conn.info, None)
                        self.notify(conn)
        finally:
            if uid in self.leased:
                self.leased.discard(uid)
                self.notify()

    async def unwanted(self, conn: _Connection, source: _Source, info: WorkerInfo):
        """Whether to drop a new connection: its worker (as it says who it is)
        fails the source's filter, or is connected already at another of its
        addresses (a dual-stack host). If so, wait until that may change."""
        filter = getattr(source.service, "filter", None)
        rejected = filter is not None and not filter(conn.info)
        uid, real = conn.listed_as, conn.info.uid
        twice = lambda: real in {i.uid for i in self.conns}
        if not rejected and not twice():
            return False
        why = "fails the filter" if rejected else "is connected at another address"
        log.debug("worker %s at %s %s: not used", real, conn.info.address, why)
        conn.close()
        while self.listed.get(uid, (None,))[0] == info and (rejected or twice()):
            await self.wait_change(None)
        return True


class _Ready(Mapping[WorkerInfo, int]):
    """The connections that take a task now, as balancers see them: each
    worker's WorkerInfo -> its calls in flight from the pool. Kept as calls
    start and end (see _Roster.update), so a balancer that picks from
    `order` (a list, in no particular order) need not scan the fleet."""

    def __init__(self):
        self.conns: dict[WorkerInfo, _Connection] = {}
        self.order: list[WorkerInfo] = []
        self.at: dict[WorkerInfo, int] = {}  # each one's index in order

    def __getitem__(self, info: WorkerInfo) -> int:
        return self.conns[info].calls

    def __iter__(self):
        return iter(self.conns)

    def __len__(self):
        return len(self.conns)

    def put(self, conn: _Connection, ready: bool):
        info = conn.info
        if ready and info not in self.conns:
            self.conns[info], self.at[info] = conn, len(self.order)
            self.order.append(info)
        elif not ready and self.conns.get(info) is conn:
            del self.conns[info]
            at, last = self.at.pop(info), self.order.pop()
            if last is not info:  # the last one takes its place
                self.order[at], self.at[last] = last, at
        conn.ready = self.conns.get(info) is conn


class _Source(NamedTuple):
    """A discovery service, and the key and TLS settings for its workers.
    `leased`: its workers count against the pool's `lease` (not spawned)."""

    service: Any
    key: bytes
    ssl: Any
    leased: bool = True


class _Spawner:
    """The worker processes a pool starts on this machine, listed in a private
    local namespace: only the spawner starts and stops them. Each is `python
    -c "import wool; wool._spawned()"`, configured through stdin, whose EOF
    tells it to stop (also when this process is killed). One that dies while
    the pool is ready is replaced, RESPAWNS per RESPAWN_WINDOW at most."""

    def __init__(self, pool: WorkerPool):
        self.pool, self.key = pool, _authkey(pool.authkey) or secrets.token_bytes(32)
        self.service = LocalDiscoveryService(f"p{uuid.uuid4().hex[:12]}")
        self.procs: set[asyncio.subprocess.Process] = set()
        self.replaced = collections.deque[float](maxlen=RESPAWNS)  # when, last ones
        self.failed: int | None = None  # exit code of a worker that could not start
        self.watchers: set[asyncio.Task] = set()

    async def start(self):
        """Start the workers; return once all are connected to the pool."""
        pool = self.pool
        os.mkdir(self.service.path, 0o700)  # ours alone, and new
        await asyncio.gather(*(self.spawn() for _ in range(pool.size)))

        def ready():
            pids = {p.pid for p in self.procs}
            connected = sum(1 for info in pool.workers if info.pid in pids)
            return self.failed is not None or connected >= pool.size

        with contextlib.suppress(TimeoutError):
            await pool._until(ready, START)
        if self.failed is not None:
            raise RuntimeError(
                f"a spawned worker exited with code {self.failed} as it "
                "started; its error is on stderr"
            )
        if not ready():
            raise RuntimeError(f"spawned workers did not start within {START:g} s")

    async def spawn(self):
        pool = self.pool
        # Import this module under the name the caller knows it by (vendored,
        # it may be `myproject._vendor.wool`): one copy of its state.
        code = "import importlib, sys; sys.path.insert(0, sys.argv[1]); "
        code += "importlib.import_module(sys.argv[2])._spawned()"
        root = os.path.abspath(__file__ + "/.." * (__name__.count(".") + 1))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, root, __name__, stdin=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the caller, which stops us
        )  # fmt: skip
        worker = dict(authkey=self.key, grace=pool.grace, max_frame=pool.max_frame,
                      max_tasks=pool.max_tasks_per_worker)  # fmt: skip
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # uvloop?
        data = pickle.dumps((sys.path, log.getEffectiveLevel(), loop, sorted(pool.tags),
                             self.service.namespace, worker))  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(struct.pack("!I", len(data)) + data)
        self.procs.add(proc)
        _spawn(self.watchers, self.watch(proc))

    async def watch(self, proc: asyncio.subprocess.Process):
        code = await proc.wait()
        self.procs.discard(proc)
        self.pool._roster.notify()
        if self.pool._state is _State.STARTING:  # a bad set-up: replacing won't help
            self.failed = code
        if self.pool._state is not _State.READY:  # or the pool is stopping
            return
        log.warning("worker pid %d exited with %s; replacing it", proc.pid, code)
        while len(self.replaced) == RESPAWNS:  # (rechecked: others may have waited)
            if (delay := self.replaced[0] + RESPAWN_WINDOW - time.monotonic()) <= 0:
                break
            log.error("%d workers were replaced in %g s; the next starts in %.1f s",
                      RESPAWNS, RESPAWN_WINDOW, delay)  # fmt: skip
            await asyncio.sleep(delay)
        self.replaced.append(time.monotonic())
        await self.spawn()

    async def stop(self):
        """Stop the workers gracefully; kill those still running after grace.
        A replacement being started is stopped first (and killed)."""
        for watcher in self.watchers:
            watcher.cancel()
        await asyncio.gather(*self.watchers, return_exceptions=True)
        procs = list(self.procs)
        for proc in procs:  # closing stdin is the worker's signal to stop
            with contextlib.suppress(Exception):
                proc.stdin.close()  # type: ignore[union-attr]
        if waits := [asyncio.ensure_future(p.wait()) for p in procs]:
            await asyncio.wait(waits, timeout=self.pool.grace + PATIENCE)
        for proc in procs:
            if proc.returncode is None:
                log.warning("killing worker pid %d: it outlived its grace", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.procs.clear()


# -- The caller's end of a connection: _Connection, remote generators ----------
class _Connection:
    """A caller's connection to one worker, multiplexing many tasks.

    Rules: the connection owns its requests in flight (`pending`): only its
    methods add and remove them; its load is `calls`, the tasks among them.
    Each request gets at most one reply; whoever awaits a reply decodes its
    body, so one bad body fails one call, not the connection. When the
    connection dies, a call whose TASK never left this process goes to
    another worker (_NotSent); any other gets WorkerLost: at most once."""

    def __init__(self, info: WorkerInfo, streams, seals, max_frame: int, on_change):
        # Keep the writer: when a StreamWriter is collected, it closes its transport.
        self.info, self.writer, self.on_change = info, streams[1], on_change
        self.loop = asyncio.get_running_loop()
        self.introduced = self.loop.create_future()  # by the worker's INFO
        self.pending: dict[int, Task] = {}
        self.asking = 0  # STATUS requests among them
        self.rids = itertools.count(1)
        self.defined: set[int] = set()  # functions sent by value on this connection
        self.defined_bytes = 0
        self.cannot: dict[Callable, Any] = {}  # @work functions it REFUSED, and why
        self.lost: str | None = None
        self.listed_as = info.uid  # the discovery record it was opened for
        self.goodbye = self.retiring = self.ready = False  # ready: in roster.ready
        self.closed = self.loop.create_future()
        self.frames, self.out = _switch(streams[1], seals, max_frame, self._lose)
        self.verified = _verified(streams[1])  # the worker's TLS certificate
        unknown = f"worker {info.address} did not start with INFO"
        self.frames.begin({INFO: self._introduce}, unknown, streams[0])

    @classmethod
    async def open(cls, info: WorkerInfo, source: _Source, roster: _Roster):
        """A connection to `info` for `roster`, past the handshake and INFO."""
        nested, tls, address = roster.nested, source.ssl, info.address
        if info.secure and tls is None:
            raise AuthenticationError(
                f"worker {address} speaks TLS; give {roster.who} "
                + ("--tls-cert" if nested else "ssl= (an SSLContext)")
            )
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            try:
                streams = await asyncio.open_connection(info.host, info.port, ssl=tls)
            except ssl.SSLError as e:
                raise _tls_refused(address, e, nested) from None
            try:
                seals = await _authenticate_worker(*streams, source.key, address)
                conn = cls(info, streams, seals, roster.max_frame, roster.room)
                await conn.introduced  # the worker's INFO
            except BaseException as e:
                streams[1].close()
                no_magic = isinstance(e, asyncio.IncompleteReadError) and not e.partial
                if tls is None or not (no_magic or isinstance(e, ssl.SSLError)):
                    raise
                raise _tls_refused(address, e, nested) from None
        hello = roster.greeting(conn.verified)
        conn.out.send(HELLO, os.getpid() if conn.out.peer else 0, hello)
        return conn

    def _introduce(self, kind: int, rid: int, body):
        """INFO: who answers at this address (as it says; discovery gave the
        address), and whether it shares this machine with us."""
        try:
            record, fields = WorkerInfo.from_json(body), json.loads(body)
        except (ValueError, TypeError, KeyError) as e:  # JSON that is not ours
            raise ProtocolError(
                f"worker {self.info.address} sent no record: {e}"
            ) from None
        host, port = self.info.host, self.info.port  # where we reached it
        self.info = dataclasses.replace(record, host=host, port=port)
        machine = fields.get("machine")  # this one (see _machine), and its /proc:
        ours = machine is not None and machine == _machine()
        if ours and os.access(f"/proc/{record.pid}/fd", os.R_OK | os.X_OK):
            self.out.share_with(record.pid)
        _trust(self.frames, self.verified or fields.get("verified") is True)
        replies = {kind: self._reply for kind in _REPLIES}  # what it sends after INFO
        self.frames.handlers = replies | {GOODBYE: self._goodbye, TAKEN: self.out.taken}
        self.frames.unknown = f"unknown frame kind {{}} from worker {record.address}"
        self.introduced.set_result(None)

    def _goodbye(self, kind: int, rid: int, body):
        self.goodbye = True
        self.retire()

    def _reply(self, kind: int, rid: int, body):
        if (call := self.pending.get(rid)) is None:
            return  # a reply to a call that was cancelled
        if kind == REFUSED:  # it never ran: check that, and why
            body = _refusal(self.info.address, rid, call, body)
        elif not call.accepted:
            call.accepted = True
            if call.started is not None:
                call.started()
        if kind != ACCEPTED and not call.reply.done():
            call.reply.set_result((kind, body))

    def _lose(self, error: Exception | None):
        reason = "closed by the worker" if error is None else str(error) or repr(error)
        self.lost = reason = "the worker stopped" if self.goodbye else reason
        if isinstance(error, ProtocolError):
            log.warning("closed connection to worker %s: %s", self.info.address, error)
        self.writer.close()
        if not self.introduced.done():
            self.introduced.set_exception(ConnectionError(reason))
        unsent = self.out.unsent()
        self.out.close()
        sent = "after sending it the task, which may or may not have run"
        for rid, call in self.pending.items():
            if not call.reply.done():
                what = "with the task on it" if call.accepted else sent
                lost = WorkerLost(f"lost worker {self.info.address} ({reason}) {what}")
                call.reply.set_exception(_NotSent() if rid in unsent else lost)
        self.pending.clear()
        self.on_change(self, False)
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self):
        self.out.flush()
        self.writer.close()

    def retire(self):
        """Take no new tasks; close once the calls in flight are answered (a
        worker that withdrew or is stopping is draining them)."""
        if not self.retiring:
            self.retiring = True
            self.on_change(self, False)
        if not self.pending:
            self.close()

    def start(self, task: Task, body, definition: tuple | None, generator: bool):
        """Send `task`: a TASK, or a STREAM for a generator (the first time,
        its function's DEFINE before it); its request id."""
        if self.lost is not None or self.retiring:
            raise _NotSent()
        if definition is not None and definition[0] not in self.defined:
            self.defined_bytes += len(definition[1])
            if self.defined_bytes > MAX_DEFINED:  # a new connection starts afresh
                self.retire()
                raise _NotSent()
            self.defined.add(definition[0])
            self.out.send(DEFINE, *definition)
        self.pending[rid := next(self.rids)] = task
        task.accepted, task.reply = False, self.loop.create_future()
        self.out.send(STREAM if generator else TASK, rid, body)
        self.on_change(self, False)
        return rid

    async def answer(self, rid: int, call: Task) -> tuple[int, Any]:
        """The next reply (kind, body) to a request. Cancelling the caller
        cancels the task on the worker."""
        try:
            return await call.reply
        except asyncio.CancelledError:
            self.cancel(rid)
            raise

    async def step(self, rid: int, call: Task, kind: int, body: bytes = b""):
        """One generator step on an open request."""
        if self.lost is not None:
            raise WorkerLost(
                f"lost worker {self.info.address} ({self.lost}) with the generator on it"
            )
        call.reply = self.loop.create_future()
        self.out.send(kind, rid, body)
        return await self.answer(rid, call)

    @property
    def calls(self) -> int:
        return len(self.pending) - self.asking

    async def status(self) -> dict:
        """The worker's status (Worker.status())."""
        rid, self.asking = next(self.rids), self.asking + 1
        call = self.pending[rid] = Task(self.status, (), {})
        call.reply = self.loop.create_future()
        self.out.send(STATUS, rid)
        try:
            _, data = await self.answer(rid, call)
        finally:
            self.asking -= 1
            self.finish(rid)
        return _loads(data)[0] | {"address": self.info.address}  # as we reach it

    def finish(self, rid: int):
        """The call got its last reply, or is abandoned."""
        if self.pending.pop(rid, None) is not None:
            if self.retiring and not self.pending:
                self.close()
            self.on_change(self, True)

    def cancel(self, rid: int):
        if rid in self.pending:
            if self.lost is None:
                self.out.send(CANCEL, rid)
            self.finish(rid)


def _refusal(address: str, rid: int, call: Task, body) -> tuple | None:
    """A REFUSED's body: None (full, or stopping), or (whole, error): the
    call cannot run there. A refusal of a task the worker said it started,
    or one that does not load, is a ProtocolError: that connection closes
    and the call is WorkerLost (it may have run)."""
    try:
        if call.accepted:
            raise ValueError(f"task {rid} was ACCEPTED")
        if not len(body):
            return None
        whole, data = pickle.loads(body)
        _load_error(data)  # it must be one
        return bool(whole), data
    except Exception as e:
        raise ProtocolError(
            f"worker {address} sent a REFUSED that makes no sense: {e!r}"
        ) from None


def _tls_refused(address: str, e: BaseException, nested: bool) -> AuthenticationError:
    """What a failed TLS handshake with a worker means, and what to do (in a
    worker's `nested` pool, its TLS settings are the worker's own)."""
    reason = getattr(e, "reason", None) or ""
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"):
        why = "does not speak TLS; give TLS to all workers and their callers or none"
    elif reason == "CERTIFICATE_VERIFY_FAILED":
        why = f"has a certificate we do not trust ({e}); trust the CA that signed it"
    elif nested:  # the worker presents its own certificate as a client one
        why = f"refused this worker's certificate as a client's ({e!r}): a worker "
        why += "that makes nested calls needs a certificate whose extendedKeyUsage "
        why += "has clientAuth as well as serverAuth (see the README's TLS guide)"
    else:  # a TLS 1.3 server refuses a client certificate after the handshake
        why = "refused our TLS client certificate, or wants one: load one from its "
        why += f"CA into ssl= (context.load_cert_chain) ({e!r})"
    return AuthenticationError(f"worker {address} {why}")


async def _remote_generator(fn, args, kwargs):
    """A @work async generator call, as a native async generator here: each
    step (a value pulled or sent, an exception thrown, aclose()) is one step
    of the generator on the worker, within the call's time limit; past it,
    or once this one is closed or dropped unfinished, that one is closed.
    The task is sent at the first step, to the pool current then; retries=
    apply before its first value only."""
    limit = _time_limit(fn)
    async with asyncio.timeout(limit):
        conn, rid, call, (kind, data) = await _pool_for(fn)._run(fn, args, kwargs, True)
    try:
        while kind == RESULT:
            try:
                sent = yield _load_reply(kind, data, fn)
                step = NEXT, b"" if sent is None else _pickle(_lift(sent), oob=True)
            except GeneratorExit:
                step = CLOSE, b""
            except BaseException as e:  # athrow()
                step = THROW, _pickle(e)
            async with asyncio.timeout(limit):
                kind, data = await conn.step(rid, call, *step)
            if step[0] == CLOSE:
                return
        if kind == ERROR:
            raise _load_error(data)
    finally:  # still open there (a value that did not load): cancelled
        conn.cancel(rid) if kind == RESULT else conn.finish(rid)


# -- Executor: a concurrent.futures face on a pool -----------------------------
class Executor(concurrent.futures.Executor):
    """A concurrent.futures.Executor over a WorkerPool: ProcessPoolExecutor's
    arguments and behaviour (a drop-in for it), with workers that may be on
    other machines. `max_workers` (alias `size`) workers, each running one call
    at a time (`max_tasks_per_worker=N` for more); WorkerPool's other arguments
    by keyword (`tags=` for its positional ones); `mp_context` is ignored.
    `submit` takes any callable: a plain one runs in a thread on the worker.
    A future is running() once its worker started it; cancel() then stops an
    async task there. The pool runs on an event loop in a thread of its own,
    stopped at shutdown(), when the executor is collected, or at exit."""

    def __init__(
        self, max_workers=None, mp_context=None, initializer=None, initargs=(),
        *, tags: tuple[str, ...] = (), **options,
    ):  # fmt: skip
        size = options.setdefault("size", max_workers)  # (None: WorkerPool's default)
        if max_workers is not None and size != max_workers:
            raise TypeError("give max_workers= or its alias size=, not both")
        if isinstance(size, int) and size <= 0 and options.get("discovery") is None:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._pool = WorkerPool(*tags, **options)  # checks them in the caller
        self._pool._roster.cap = options.get("max_tasks_per_worker") or 1
        self._init = initializer and (uuid.uuid4().hex, initializer, tuple(initargs))
        self._futures: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()  # guards _futures, _shutdown, _broken
        self._shutdown, self._broken = False, ""
        loop = self._loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="wool.Executor")
        thread.daemon = True  # no hang at exit
        thread.start()
        # Neither the thread nor this finalizer holds `self`: a collected
        # executor stops its pool, as one left open does at exit.
        self._close = weakref.finalize(self, _close, loop, self._pool, thread)
        try:
            asyncio.run_coroutine_threadsafe(self._pool._start(), loop).result()
        except BaseException:
            self._close()
            raise

    def __repr__(self):
        return f"<wool.Executor {self._pool!r}>"

    @overload  # typed for its callers: what an async `fn` returns is awaited
    def submit(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[R]: ...
    @overload
    def submit(
        self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[R]: ...
    def submit(self, fn, /, *args, **kwargs):
        task, args, kwargs = _as_call(fn, args, kwargs, self._init)
        future = _Future(inspect.iscoroutinefunction(getattr(fn, "__wool_work__", fn)))
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._futures.add(future)
        future.add_done_callback(self._forget)
        self._loop.call_soon_threadsafe(self._begin, future, task, args, kwargs)
        return future

    def _begin(self, future: _Future, task, args: tuple, kwargs: dict):
        """In the loop's thread: the call, unless the future was cancelled."""
        if future.cancelled():
            return future.start()  # False: it is done now, for wait() too
        run = self._pool._run(task, args, kwargs, started=future.start)
        call = self._loop.create_task(run)
        call.add_done_callback(functools.partial(self._settle, future))
        stop = lambda f: f.cancelled() and self._loop.call_soon_threadsafe(call.cancel)
        future.add_done_callback(stop)

    def _settle(self, future: _Future, call: asyncio.Task):
        if not future.start():
            return  # cancelled: now done, for wait() too
        error: BaseException | None = BrokenProcessPool("the executor stopped")
        error = error if call.cancelled() else call.exception()
        if isinstance(error, BrokenProcessPool) and not isinstance(error, WorkerLost):
            with self._lock:
                self._broken = str(error)  # the initializer failed
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled
            future.set_exception(error) if error else future.set_result(call.result())

    def _forget(self, future: concurrent.futures.Future):
        with self._lock:
            self._futures.discard(future)

    @overload  # typed as submit
    def map(
        self, fn: Callable[..., Awaitable[R]], *iterables: Iterable, timeout=None,
        chunksize=1,
    ) -> Iterator[R]: ...  # fmt: skip
    @overload
    def map(
        self, fn: Callable[..., R], *iterables: Iterable, timeout=None, chunksize=1
    ) -> Iterator[R]: ...
    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """As Executor.map; each item is its own task (`chunksize` is checked
        and otherwise ignored: calls are cheap here)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        return super().map(fn, *iterables, timeout=timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False):
        with self._lock:
            self._shutdown, pending = True, list(self._futures)
        if cancel_futures:
            for future in pending:
                if not future.running():  # those that run are left to finish
                    future.cancel()
        if not wait:  # the same, in a thread of its own
            return threading.Thread(target=self.shutdown).start()
        concurrent.futures.wait(pending)
        self._close()


def _close(loop, pool, thread):
    """Stop an executor's pool, then its loop and thread (from another
    thread, where the loop's own one is calling)."""
    if threading.current_thread() is thread:
        return threading.Thread(target=_close, args=(loop, pool, thread)).start()
    if loop.is_running():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(pool.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


class _Future(concurrent.futures.Future):
    """An Executor's future: running() once the worker started its task.
    cancel() stops a running async task too (`stoppable`), on the worker."""

    def __init__(self, stoppable: bool):
        super().__init__()
        self.stoppable = stoppable

    def start(self) -> bool:
        """The worker started it: False if it was cancelled first."""
        return self.running() or self.set_running_or_notify_cancel()

    def cancel(self) -> bool:
        with self._condition:  # a reentrant lock
            if self.stoppable and self._state == "RUNNING":
                self._state = "PENDING"  # as one that has not started yet
            return super().cancel()


def _as_call(fn, args: tuple, kwargs: dict, init=None) -> tuple[Callable, tuple, dict]:
    """A call of any callable as one of a @work function: fn itself (or a
    partial of one, unwrapped); a function, adapted once and kept on it (a
    plain one runs in a thread), checked here that it travels (else
    TypeError); any other callable, and any call of an executor with an
    `init`ializer, as the first argument of `_call`, pickled with each call."""
    if hasattr(fn, "__wool_work__"):
        return fn, args, kwargs
    if isinstance(fn, functools.partial) and hasattr(fn.func, "__wool_work__"):
        return fn.func, fn.args + args, {**fn.keywords, **kwargs}
    if not callable(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(f"{fn!r} is not a function that returns a value")
    if init is not None or type(fn) is not types.FunctionType:
        return _call, (fn if init is None else _Initialized(init, fn), *args), kwargs
    if (task := fn.__dict__.get("__wool_task__")) is None:
        plain = not inspect.iscoroutinefunction(fn)
        task = work(functools.partial(_in_thread, fn) if plain else fn)
        task.__qualname__ = fn.__qualname__
        try:
            _ref(task)
        except Exception as e:
            raise TypeError(
                f"{task.__qualname__} can be neither imported nor pickled: {e}"
            ) from e
        fn.__dict__["__wool_task__"] = task
    return task, args, kwargs


async def _in_thread(fn, /, *args, **kwargs):
    """On a worker: a plain function, in a thread, so the worker keeps answering;
    an awaitable it returns (a lambda around a @work call) is awaited here."""
    result = await asyncio.to_thread(fn, *args, **kwargs)
    return await result if inspect.isawaitable(result) else result


_call = work(_in_thread)  # any callable, as the first argument (see _as_call)
_call.__name__ = _call.__qualname__ = "_call"  # so the worker imports it

_initialized: set[str] = set()  # in a worker: the executors whose initializer ran
_initializing = threading.Lock()


class _Initialized:
    """A function of an executor with an initializer, which runs first, once
    in each worker process. If it fails, so does the call: BrokenProcessPool."""

    def __init__(self, init: tuple, fn):
        (self.key, self.initializer, self.initargs), self.fn = init, fn

    def __call__(self, *args, **kwargs):
        with _initializing:
            if self.key not in _initialized:
                try:
                    self.initializer(*self.initargs)
                except Exception as e:
                    raise BrokenProcessPool(
                        f"the executor's initializer {_name(self.initializer)} "
                        f"failed on worker pid {os.getpid()}: {e!r}"
                    ) from e
                _initialized.add(self.key)
        return self.fn(*args, **kwargs)


# -- Messages: what calls and answers pickle to. No sockets. -------------------
def _dump_task(fn, args, kwargs, seconds, max_frame: int) -> tuple[Any, tuple | None]:
    """A TASK body: (function reference, args, kwargs, context, timeout), and
    the function's (id, definition) when it travels by value."""
    context = _context_values() if _registry else None
    try:
        ref, definition = _ref(fn)
    except Exception as e:
        code = _target(fn)
        names = getattr(code, "__code__", None) and code.__code__.co_names
        used = {n: code.__globals__[n] for n in names or () if n in code.__globals__}
        raise TypeError(
            f"cannot send {fn.__qualname__}() to a worker: {e}"
            + _unpicklable(used, "its global")
            + "; define it in a module the workers import, or make that value in it"
        ) from e
    small = not kwargs and not context and _SMALL.issuperset(map(type, args))
    body = small and pickle.dumps((ref, args, kwargs, None, seconds), 5)  # the common
    if body and len(body) <= max_frame:  # call: builtin data, nothing out of band
        return body, None if definition is None else (ref, definition)
    if not small:
        args, kwargs = _lift(args), _lift(kwargs)
    plain = small or _plain(args) and _plain(kwargs) and _plain(context)
    name = fn.__qualname__  # (what() runs only on failure)
    what = lambda: f"{name}() and its arguments to a worker" + _unpicklable(context)
    # The reference and the timeout are plain data.
    body = _pickle((ref, args, kwargs, context, seconds), what, max_frame,
                   oob=not small, plain=plain)  # fmt: skip
    return body, None if definition is None else (ref, definition)


def _time_limit(fn) -> float | None:
    """Seconds a call of `fn` may run: wool.timeout() if set, else @work's."""
    return fn.__wool_timeout__ if (s := _timeout.get()) is _MISSING else s


def _unpicklable(values: dict | None, what: str = "wool.ContextVar") -> str:
    """Which of the named `values` cannot be pickled, for an error message."""
    for name, value in (values or {}).items():
        try:
            _pickle(value)
        except Exception:
            return f" ({what} {name!r} holds {type(value).__name__!r})"
    return ""


_refs: dict[int, tuple] = {}  # id(fn) -> _ref(fn), while fn lives
_function_ids = itertools.count(1)


def _ref(fn) -> tuple[tuple[str, str] | int, bytes | None]:
    """How a @work function travels: (reference, definition). The reference
    is (module, qualname) when the worker can import it, with no definition;
    else a number, and the definition is the function pickled by value
    (functions in __main__, closures), sent once per connection in DEFINE."""
    if (ref := _refs.get(id(fn))) is not None:  # (no WeakKeyDictionary: hot path)
        return ref
    module, name = fn.__module__, fn.__qualname__
    registered = tuple(m + "." for m in cloudpickle.list_registry_pickle_by_value())
    by_value = module == "__main__" or f"{module}.".startswith(registered)
    try:
        by_value = by_value or _lookup(module, name) is not fn
    except Exception:
        by_value = True
    ref = ((module, name), None)
    if by_value:  # with its file's name and lines, for readable tracebacks
        code = getattr(_target(fn), "__code__", None)
        where = code.co_filename if code else ""
        ref = (next(_function_ids), _pickle((fn, where, linecache.getlines(where))))
    _refs[id(fn)] = ref
    weakref.finalize(fn, _refs.pop, id(fn), None)
    return ref


@functools.lru_cache(maxsize=1024)
def _resolve(ref: tuple[str, str] | bytes) -> tuple[Callable, bool]:
    """The function a worker runs for a (module, qualname) or a definition,
    and whether it is an async generator function."""
    if not isinstance(ref, bytes):
        fn = _lookup(*ref).__wool_work__
        return fn, inspect.isasyncgenfunction(fn)
    wrapper, where, lines = pickle.loads(ref)
    # cloudpickle names the code it rebuilds "<dynamic-code>": name it again
    # (and the @work functions that came along in its globals, which nested
    # calls send on), and give linecache the file's lines if it is not here.
    fn, target = wrapper.__wool_work__, _target(wrapper)
    for other in [wrapper, *(getattr(target, "__globals__", {}).values())]:
        if hasattr(other, "__wool_work__") and (code := _target(other)) is not None:
            if code.__code__.co_filename == "<dynamic-code>" and where:
                code.__code__ = _relabel(code.__code__, where)
                other.__code__ = _relabel(other.__code__, __file__)
    if lines and where and not os.path.exists(where):
        linecache.cache[where] = (sum(map(len, lines)), None, lines, where)
    return fn, inspect.isasyncgenfunction(fn)


def _lookup(module: str, qualname: str):
    try:
        obj = sys.modules.get(module) or importlib.import_module(module)
    except Exception as e:
        where = f"worker {me.address}" if (me := _current_worker.get()) else "here"
        if not isinstance(e, ImportError):  # it ran a program as it was imported
            raise RuntimeError(
                f"{where} failed to import {module!r} for {qualname}(): {e!r}; put the "
                'code a module runs as a program under `if __name__ == "__main__":`'
            ) from e
        raise ModuleNotFoundError(
            f"{where} cannot import {module!r} for {qualname}(): {e}. Start the "
            f"worker where {module!r} imports (its working directory), give it "
            f"--path DIR or --preload {module}, or send it: WorkerPool(modules=)",
            name=module,
        ) from e
    obj = functools.reduce(getattr, qualname.split("."), obj)
    return getattr(obj, "__func__", obj)  # a classmethod's function


def _target(fn):
    """The user's function in a @work function (or in an Executor's adapter)."""
    fn = getattr(fn, "__wool_work__", fn)
    if isinstance(fn, functools.partial) and fn.func is _in_thread:
        fn = fn.args[0]
    return fn if hasattr(fn, "__code__") else None


def _name(fn) -> str:
    return getattr(_target(fn), "__qualname__", repr(fn))


def _relabel(code: types.CodeType, path: str) -> types.CodeType:
    each = lambda c: _relabel(c, path) if isinstance(c, types.CodeType) else c
    return code.replace(co_filename=path, co_consts=tuple(map(each, code.co_consts)))


def _pickle(obj, what=None, max_frame=MAX_FRAME, oob=False, plain=None) -> Any:
    """The one way wool pickles: plain pickle for builtin data (`plain`:
    _plain(obj), if the caller knows it more cheaply), else cloudpickle, at
    about five times the cost. With `oob`, buffers of LARGE bytes or more stay
    out of band: a _Parts, else bytes. A failure, or a message over max_frame,
    is a TypeError saying what could not be sent (`what()`, asked only then)."""
    kept: list = []  # the buffers that travel out of band (no closure: hot)
    try:
        module = pickle if (_plain(obj) if plain is None else plain) else cloudpickle
        aside = functools.partial(_aside, kept) if oob else None
        data: Any = module.dumps(obj, 5, buffer_callback=aside)
        if kept:
            data = _Parts(data, kept)
    except BaseException as e:  # a __reduce__ may raise anything, SystemExit too
        if what is None:
            raise
        raise TypeError(f"cannot send {what()}: {_why(e)}") from e
    if len(data) > max_frame:
        raise TypeError(
            f"{what() if what else 'a message'} is {len(data) / 2**20:.0f} MiB, "
            f"over max_frame ({max_frame / 2**20:.0f} MiB); pass a file path instead"
        )
    return data


def _aside(kept: list, buffer: pickle.PickleBuffer) -> bool:  # False: out of band
    if (view := buffer.raw()).nbytes >= LARGE:
        kept.append(view)
    return view.nbytes < LARGE


def _plain(obj, depth: int = 2) -> bool:
    """Whether plain pickle makes the same bytes as cloudpickle: builtin data,
    in containers nested at most `depth` deep. (Hot: no generators here.)"""
    kind = type(obj)
    if kind in _PLAIN:
        return True
    if kind is dict:
        if not _PLAIN.issuperset(map(type, obj)):
            return False
        obj = obj.values()
    elif kind is not tuple and kind is not list:
        return False
    if _PLAIN.issuperset(map(type, obj)):
        return True
    for item in obj:  # (not all plain types, so not empty)
        if not depth or not _plain(item, depth - 1):
            return False
    return True


def _lift(obj):
    """`obj`, and the tuple or dict it is (a call's args, kwargs), with its
    large bytes and its memoryviews ready to travel out of band."""
    kind = type(obj)
    if (kind is bytes or kind is bytearray) and len(obj) >= LARGE or kind is memoryview:
        return _Bytes(obj)
    if kind is tuple:  # unchanged in the common case, at C speed
        return obj if _LIFTED.isdisjoint(map(type, obj)) else tuple(map(_lift, obj))
    if kind is dict and not _LIFTED.isdisjoint(map(type, obj.values())):
        return {k: _lift(v) for k, v in obj.items()}
    return obj


class _Bytes:
    """Large `bytes` or bytearray, or a memoryview, in a message: its buffer
    travels out of band (pickle keeps bytes and bytearrays inside the pickle,
    a copy each way, and cannot pickle memoryviews); rebuilt on arrival with
    one copy, a memoryview as a view of the received memory."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | memoryview):
        self.data = data

    def __reduce_ex__(self, protocol):
        return type(self.data), (pickle.PickleBuffer(self.data),)


_LIFTED = frozenset({bytes, bytearray, memoryview})
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), _Bytes})
_SMALL = _PLAIN - _LIFTED  # plain data that never travels out of band


def _dump_value(value, changes: dict | None, fn, max_frame: int) -> Any:
    """A RESULT body: (value, the wool.ContextVar values the task set)."""
    small = not changes and type(value) in _SMALL  # (the common answer: at once)
    if (body := small and pickle.dumps((value, None), 5)) and len(body) <= max_frame:
        return body
    value = value if small else _lift(value)
    plain = small or _plain(changes) and _plain(value)
    what = lambda: (  # (only on failure: this is the hot path)
        f"the value of {_name(fn)}() back to the caller" + _unpicklable(changes)
    )
    return _pickle((value, changes), what, max_frame, oob=not small, plain=plain)


def _dump_error(exc: BaseException, max_frame: int = MAX_FRAME) -> bytes:
    """An ERROR body for `exc`, whatever it is or does: this never raises, so
    every call gets its one answer. The exception travels pickled if it can
    and fits half of max_frame; its type name, message and traceback text
    (each cut to TRIM characters) always, for a RemoteError where not."""
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message, tb = _trim(str(exc)), _trim(_traceback(exc))
    except BaseException as e:  # a __str__ that raises
        message, tb = f"<str() raised {type(e).__name__}>", ""
    payload = None
    with contextlib.suppress(BaseException):
        payload = _pickle(exc, None, max_frame // 2)
    return _pickle((name, message, tb, payload))


def _traceback(exc: BaseException) -> str:
    """The traceback text of `exc` on this worker, after that of the workers
    it came from (a remote cause): each hop once, headed by where it ran,
    without wool's own frames."""
    earlier, cause = "", exc.__cause__
    if isinstance(cause, _RemoteTraceback):
        earlier, exc.__cause__ = cause.tb + "\n\n", None
    try:
        report = traceback.TracebackException.from_exception(exc)
    finally:
        exc.__cause__ = cause
    ours = [frame for frame in report.stack if frame.filename != __file__]
    report.stack = traceback.StackSummary.from_list(ours)
    me = _current_worker.get()
    where = f"on worker pid {me.pid} at {me.address}" if me else f"in pid {os.getpid()}"
    return f"{earlier}[{where}]\n" + "".join(report.format())


def _trim(text: str) -> str:
    if len(text) <= TRIM:
        return text
    cut = f"\n[... {len(text) - TRIM} characters left out ...]\n"
    return text[: TRIM // 2] + cut + text[-TRIM // 2 :]


def _why(e: BaseException) -> str:
    return str(e) if isinstance(e, Exception) else repr(e)  # SystemExit(3), not 3


def _load_reply(kind: int, data, fn):
    if kind == ERROR:
        raise _load_error(data)
    try:
        value, changes = _loads(data)
    except BaseException as e:  # SystemExit from a __reduce__ too
        raise TypeError(
            f"cannot load the value of {fn.__qualname__}() in the caller: {_why(e)}"
        ) from e
    for name, changed in (changes or {}).items():  # the task's wool.ContextVars
        ContextVar(name).set(changed)
    return value


def _load_error(data) -> BaseException:
    name, message, tb, payload = pickle.loads(data)
    exc = None
    with contextlib.suppress(BaseException):
        exc = pickle.loads(payload)  # (None: it did not pickle)
    # SystemExit and KeyboardInterrupt would stop the caller's event loop
    # (asyncio lets them out of run()), though only a task ended: RemoteError.
    fatal = isinstance(exc, (SystemExit, KeyboardInterrupt))
    if not isinstance(exc, BaseException) or fatal:
        exc = RemoteError(name, message, tb)
    exc.__cause__ = _RemoteTraceback(tb)
    return exc


def _loads(body):
    """Unpickle a received body with its buffers (if any) given back in
    place: an array arrives as a writable view of the received memory."""
    if type(body) is _Parts:
        return pickle.loads(body.pickle, buffers=body.buffers)
    return pickle.loads(body)


# -- Frames: objects <-> bytes. No sockets, no await. --------------------------
#
# A frame is HEADER, a body of `length` bytes (a pickle, or empty) and a TAG:
# a MAC of the frame's sequence number in its direction, its header and its
# body, under the session's key for that direction (see Streams, _Seal).
# A receiver checks the length against max_frame before reading on, and the
# tag before the body goes anywhere. A new kind of frame is a constant here,
# an entry in the handler table of the side that takes it (_Peer.on_hello,
# _Connection._introduce) and its handler.

HEADER = struct.Struct("!IBQ")  # body length, kind, request id
TAG = 16  # bytes of a frame's MAC
FILE = struct.Struct("!IQ")  # a shared file: its sender's descriptor, its serial
FORGED = "a frame failed its MAC check: not from the peer of the handshake, or altered"
# The MAC of a body over SMALL on an end-to-end TLS connection: TLS
# authenticates those bytes already (see _trust); its tag is zeros.
_UNSEALED = types.SimpleNamespace(update=lambda data: None, digest=lambda: bytes(TAG))

# caller -> worker
HELLO = 1  # body: (a pickle of (the caller's discovery sources, whether it is a
#           worker's nested pool, its wait), workers its sources list, whether
#           it verified the worker's certificate); rid: the caller's pid if
#           INFO showed it shares this machine, else 0
TASK = 2  # body: (function reference, args, kwargs, context values, timeout)
NEXT = 3  # body: value sent into a generator (empty: None)
THROW = 4  # body: exception thrown into a generator
CLOSE = 5  # no body: close the generator
CANCEL = 6  # no body: cancel the task
DEFINE = 7  # body: a function pickled by value; rid: the number TASKs name it by
STREAM = 8  # body as TASK, for an async generator; its first NEXT is implied
STATUS = 9  # no body: what is the worker doing? Answered by a RESULT at once
# worker -> caller
ACCEPTED = 16  # no body: the task runs here (sent after its first step, if that
#              did not answer); it will not run anywhere else
REFUSED = 17  # not accepted, so try another worker. No body: stopping or full;
#              else (whole, an ERROR's body): it cannot run here, as its
#              function (whole) or this call's arguments did not load
RESULT = 18  # body: (value returned or yielded, context values the task set)
ERROR = 19  # body: (type name, message, traceback text, pickled exception)
STOP = 20  # no body: the generator finished
GOODBYE = 21  # no body, rid 0: the worker is stopping; send nothing more
INFO = 22  # body: the worker's WorkerInfo as JSON, its first frame; rid 0
# either way
TAKEN = 23  # done with shared file rid (its mapping is gone): its sender may write
#           the next message into it, or close it; with a body, only close it

# The kind byte's two high bits are flags, so kinds stay below 0x40.
BUFFERS = 0x80  # the body is a _Parts (pickle and out-of-band buffers)
SHARED = 0x40  # with BUFFERS: the buffers are in a shared file, not in the frame
_VALUES = frozenset({TASK, STREAM, NEXT, RESULT})  # the kinds that may carry them
_REPLIES = (ACCEPTED, REFUSED, RESULT, ERROR, STOP)  # to a request, from a worker
_URGENT = frozenset({ACCEPTED, REFUSED, GOODBYE, TAKEN})  # ahead of queued frames


def encode(kind: int, rid: int, body, seal: _Seal) -> list:
    """One frame as the parts to write in order: header, body (a _Parts as
    its parts, none copied, with BUFFERS in its kind), tag. (_Outbox.commit
    streams a body over CHUNK instead, its tag computed in a thread.)"""
    if type(body) is not _Parts:
        header = HEADER.pack(len(body), kind, rid)
        return [header, body, seal.tag(header, body)]
    header, parts = HEADER.pack(len(body), kind | BUFFERS, rid), body.wire()
    return [header, *parts, _tag(seal.begin(header, len(body)), parts)]


def _tag(mac, parts: list):
    for part in parts:
        mac.update(part)
    return mac.digest()[:TAG]


def _check_size(size: int, max_frame: int):
    if size > max_frame:
        raise ProtocolError(
            f"frame of {size / 2**20:.0f} MiB is over max_frame "
            f"({max_frame / 2**20:.0f} MiB)"
        )


class _Seal:
    """One direction of a session: makes (sender) or checks (receiver) each
    frame's tag, numbering frames so that none can be dropped, replayed or
    reordered unseen. Keyed BLAKE2b for bodies under SMALL bytes (a third of
    HMAC's cost per call), HMAC-SHA256 for larger ones (twice BLAKE2b's speed
    where the CPU has SHA instructions)."""

    __slots__ = ("blake", "hmac", "seq", "trusted")
    SMALL = 2**10

    def __init__(self, key: bytes):
        self.blake = hashlib.blake2b(key=_digest(key, b"blake2b", b""), digest_size=TAG)
        self.hmac, self.seq = hmac.new(key, digestmod="sha256"), -1  # the last one's
        self.trusted = False  # see _trust

    def begin(self, header, size: int) -> Any:
        """The next frame's MAC, fed its number and header; feed it the body."""
        self.seq += 1
        if self.trusted and size >= self.SMALL:
            return _UNSEALED
        mac: Any = self.blake.copy() if size < self.SMALL else self.hmac.copy()
        mac.update(self.seq.to_bytes(8, "big") + header)
        return mac

    def tag(self, header, body) -> bytes:
        mac = self.begin(header, len(body))
        mac.update(body)
        return mac.digest()[:TAG]


class _Parts:
    """A message whose large buffers travel beside its pickle, not inside it
    (pickle protocol 5, PEP 574): on the wire a table (count, then each
    buffer's length), the pickle, then the buffers. To a process on this
    machine the buffers go in a shared file instead (see _share), and the
    frame says which: FILE, then the table and the pickle. len() is its size."""

    __slots__ = ("buffers", "pickle", "size")

    def __init__(self, data, buffers: list):
        self.pickle, self.buffers = data, buffers
        self.size = 4 + 8 * len(buffers) + len(data) + sum(b.nbytes for b in buffers)

    def __len__(self):
        return self.size

    def wire(self) -> list:
        """The parts to write, none of the buffers copied: table and pickle first."""
        n, sizes = len(self.buffers), (b.nbytes for b in self.buffers)
        return [struct.pack(f"!I{n}Q", n, *sizes) + self.pickle, *self.buffers]

    @classmethod
    def read(cls, body, max_frame: int, shared_by=None, done=lambda: None) -> _Parts:
        """The parts of a received body: views of it, no copy, or of the
        shared file it names, which process `shared_by` sent (`done()` once
        they are gone). Raises ProtocolError when its lengths do not add up."""
        view, at = memoryview(body), FILE.size if shared_by else 0
        try:
            (n,) = struct.unpack_from("!I", view, at)
            lengths = struct.unpack_from(f"!{n}Q", view, at + 4)
        except (struct.error, MemoryError):
            raise ProtocolError("a frame's buffer table is cut short") from None
        at, size = at + 4 + 8 * n, sum(lengths)
        if shared_by:
            _check_size(len(view) + size, max_frame)
            fd, serial = FILE.unpack_from(view)
            memory, start, end = _map(shared_by, fd, serial, size, done), 0, None
        else:
            memory, start, end = view, len(view) - size, len(view) - size
            if start < at:
                raise ProtocolError(f"a frame's {n} buffers are longer than the frame")
        edges, mapping = itertools.accumulate(lengths, initial=start), memory
        memory = memoryview(memory)
        buffers = [memory[a:b] for a, b in itertools.pairwise(edges)]
        if type(mapping) is mmap.mmap:  # to pass on unwritten (_source)
            to = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            layout = list(zip(itertools.accumulate(lengths, initial=to), lengths))
            _received[to] = (shared_by, fd, serial, size, layout, weakref.ref(mapping))
            weakref.finalize(mapping, _received.pop, to, None)
        return cls(view[at:end], buffers)


def _verified(writer) -> bool:
    """Whether TLS on this connection verified the peer's certificate."""
    return bool((tls := writer.get_extra_info("ssl_object")) and tls.getpeercert())


def _trust(frames: _Frames, end_to_end: bool):
    """Where either side verified the other's TLS certificate, no one can
    stand between them (a relay would need that certificate's key), so TLS
    binds every byte to the peer that passed the handshake within it: the
    bodies over SMALL go unsealed, both ways (one MAC, not two). Each side
    says in INFO or HELLO, themselves sealed, whether it verified."""
    frames.seal.trusted = frames.out.seal.trusted = end_to_end


# -- Handshake: proving the key, both ways -------------------------------------
#
# Handshake (raw bytes, nothing pickled), with a deadline on each side:
#   worker -> caller   MAGIC, worker nonce (32)
#   caller -> worker   MAGIC, HMAC(key, "caller" + worker nonce), caller nonce (32)
#   worker -> caller   "+" and HMAC(key, "worker" + caller nonce), or "-" and close
# Both sides then derive the session's keys from the shared key and both
# nonces, one per direction, and seal every frame with them: whoever relays
# a handshake between a caller and a worker holds neither key, so can only
# pass frames on unchanged, in order.

MAGIC = b"wool\x00\x02"  # protocol version 2
NONCE = 32  # bytes of a random challenge
DIGEST = 32  # bytes of an HMAC-SHA256


def _digest(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, role + nonce, "sha256").digest()


def _session(key: bytes, worker_nonce: bytes, caller_nonce: bytes, inbound: bytes):
    """(seal for frames received, seal for frames sent) of one side; `inbound`
    names the side: b"caller" or b"worker"."""
    secret = _digest(key, b"session", worker_nonce + caller_nonce)
    sides = (inbound, b"caller" if inbound == b"worker" else b"worker")
    return tuple(_Seal(_digest(secret, b"to ", side)) for side in sides)


def _check_magic(data: bytes, peer: str, mismatch: type[WoolError]):
    """That `peer` ("caller", or "worker ADDRESS") opened with our MAGIC."""
    if data[: len(MAGIC)] == MAGIC:
        return
    us = "worker" if peer == "caller" else "caller"
    if data[:4] == MAGIC[:4]:  # refuse each other, naming both versions
        raise mismatch(
            f"{peer} speaks wool protocol {data[4:6].hex()}, this {us} "
            f"{MAGIC[4:].hex()}; run one wool version on both"
        )
    who = "not a wool caller" if us == "worker" else f"{peer[7:]} is not a wool worker"
    raise ProtocolError(f"{who} (it sent {data[:8]!r}...)")


async def _authenticate_caller(reader, writer, key: bytes):
    """Worker side: prove the caller holds the key, then prove we do. Returns
    the session's seals (received, sent)."""
    nonce = secrets.token_bytes(NONCE)
    writer.write(MAGIC + nonce)
    data = await reader.readexactly(len(MAGIC) + DIGEST + NONCE)
    _check_magic(data, "caller", ProtocolError)
    proof, their_nonce = data[len(MAGIC) : -NONCE], data[-NONCE:]  # DIGEST, NONCE
    if not hmac.compare_digest(proof, _digest(key, b"caller", nonce)):
        writer.write(b"-")
        raise AuthenticationError("the caller does not hold this worker's key")
    writer.write(b"+" + _digest(key, b"worker", their_nonce))
    return _session(key, nonce, their_nonce, b"worker")


async def _authenticate_worker(reader, writer, key: bytes, address: str):
    """Caller side: answer the worker's challenge, then check its answer.
    Returns the session's seals (received, sent)."""
    data = await reader.readexactly(len(MAGIC) + NONCE)
    _check_magic(data, f"worker {address}", AuthenticationError)
    their_nonce, nonce = data[len(MAGIC) :], secrets.token_bytes(NONCE)
    writer.write(MAGIC + _digest(key, b"caller", their_nonce) + nonce)
    verdict = b"-"  # (also if it closes instead)
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        verdict = await reader.readexactly(1)
    if verdict != b"+":
        raise AuthenticationError(
            f"worker {address} refused the key; give callers and workers the same "
            "key (authkey=, --authkey-file or WOOL_AUTHKEY)"
        )
    proof = await reader.readexactly(DIGEST)
    if not hmac.compare_digest(proof, _digest(key, b"worker", nonce)):
        raise AuthenticationError(f"worker {address} does not hold our key")
    return _session(key, their_nonce, nonce, b"caller")


# -- Streams: receiving (_Frames) and sending (_Outbox) ------------------------
LARGE = 64 * 2**10  # bytes; a larger body is received into its own buffer
CHUNK = 256 * 2**10  # bytes of a large message handed to the kernel at a time
BUFFER = (4 * 2**10, 256 * 2**10)  # bytes of a connection's receive buffer: idle,
#                                    and grown to while frames keep coming
SHARE = 2**20  # bytes of buffers from which a message to this machine is shared
SHARED_FILES = 64  # shared files a connection sent and awaits TAKEN of; more: socket
SPARE = 2  # files it keeps for its next messages once TAKEN (their memory with them)
BATCH = 48  # frames written to the transport at once while flushing a queue
# The last large body this process received, for the next of its size once
# nothing views it (it is ours alone: only our reference and getrefcount's):
# new memory costs more than receiving into it (the kernel faults it in).
_spare: list[bytearray] = []
# Threads of our own for tags and shared files: the event loop's default
# executor may be full of a user's blocking calls (sync tasks on a worker).
_THREADS = concurrent.futures.ThreadPoolExecutor(os.cpu_count(), "wool")


class _Frames(asyncio.BufferedProtocol):
    """A connection past its handshake: bytes in, checked frames out. Small
    frames are cut from one reusable buffer; the kernel writes a body
    larger than LARGE straight into its own bytearray, which is what gets
    unpickled (no copy). Each frame whose tag checks out goes to its handler
    in `handlers`, the table of kinds its owner takes now (kind -> handler(
    kind, rid, body)), which may raise ProtocolError to close the connection;
    any other kind closes it with `unknown`. `on_lost(error)` is called once,
    with None for a clean close. `hold()` stops delivery and reading until
    `release()`. The transport's pause_writing/resume_writing go to `out`."""

    def __init__(self, transport, max_frame: int, seal: _Seal, out, on_lost):
        self.transport, self.max_frame, self.seal = transport, max_frame, seal
        self.out, self.on_lost = out, on_lost
        self.handlers: dict[int, Callable] = {}  # set by the owner, as it goes
        self.unknown = "unknown frame kind {} from the peer"  # its error, formatted
        self.buf = bytearray(BUFFER[0])
        self.start = self.end = 0  # buf[start:end]: received, not yet delivered
        self.large: bytearray | None = None  # a large body being received,
        self.filled, self.head = 0, (0, 0)  # its bytes so far, its kind and rid,
        self.mac: Any = None  # its MAC (fed as the bytes arrive, while they are hot)
        self.untagged: tuple | None = None  # then (kind, rid, body) until its tag
        self.held = self.lost = False

    def begin(self, handlers: dict, unknown: str, reader: asyncio.StreamReader):
        """Deliver frames to `handlers`: first those that came in with the
        end of the handshake, still held by its `reader`."""
        self.handlers, self.unknown = handlers, unknown
        left, reader._buffer = reader._buffer, bytearray()  # type: ignore
        self.buf[: len(left)], self.end = left, len(left)  # (grows buf if need be)
        self.buffer_updated(0)

    def get_buffer(self, sizehint: int):
        if self.large is not None:
            return memoryview(self.large)[self.filled :]
        if self.end == len(self.buf):  # move the undelivered tail to the front,
            tail, buf = self.end - self.start, self.buf  # of a larger buffer if
            if 2 * tail > len(buf) and len(buf) < BUFFER[1]:  # it was half full
                self.buf = bytearray(min(2 * len(buf), BUFFER[1]))
            self.buf[:tail] = buf[self.start : self.end]
            self.start, self.end = 0, tail
        return memoryview(self.buf)[self.end :]

    def buffer_updated(self, nbytes: int):
        try:
            if self.large is None:
                if nbytes < BUFFER[0] < len(self.buf) and self.end == self.start == 0:
                    self.buf = self.buf[:nbytes] + bytes(BUFFER[0] - nbytes)  # idle
                self.end += nbytes
            else:
                at = self.filled
                self.mac.update(memoryview(self.large)[at : at + nbytes])
                self.filled += nbytes
                if self.filled == len(self.large):
                    self.untagged, self.large = (*self.head, self.large), None
            self.deliver()
            if not self.out.corked:  # after what the frames woke or started: their
                self.out.cork()  # answers go out together (see _Peer.started)
        except ProtocolError as e:
            self.fail(e)

    def deliver(self):
        buf = self.buf
        while not self.held and self.large is None:
            if self.untagged is not None:  # a large body, received: its tag
                if self.end - self.start < TAG:
                    break
                (kind, rid, body), self.untagged = self.untagged, None
                digest, at = self.mac.digest()[:TAG], self.start
            else:
                if self.end - self.start < HEADER.size:
                    break
                size, kind, rid = HEADER.unpack_from(buf, self.start)
                _check_size(size, self.max_frame)  # before any of the body is read
                at = self.start + HEADER.size
                if size > LARGE:
                    got = min(size, self.end - at)
                    spare = _spare.pop() if _spare else bytearray()  # see _spare
                    if len(spare) != size or sys.getrefcount(spare) > 2:
                        spare = bytearray(size)  # (another size, or in use)
                    self.large, _spare[:] = spare, [spare]
                    self.large[:got] = buf[at : at + got]
                    self.mac = self.seal.begin(buf[self.start : at], size)
                    self.mac.update(buf[at : at + got])
                    self.start, self.filled, self.head = at + got, got, (kind, rid)
                    if got == size:
                        self.untagged, self.large = (kind, rid, self.large), None
                    continue
                if self.end - at < size + TAG:
                    break
                header, body = buf[self.start : at], bytes(buf[at : at + size])
                digest, at = self.seal.tag(header, body), at + size
            self.start = at + TAG
            if not hmac.compare_digest(digest, buf[at : self.start]):
                raise ProtocolError(FORGED)
            self.give(kind, rid, body)
        if self.start == self.end:
            self.start = self.end = 0

    def give(self, kind: int, rid: int, body):
        """Hand a checked frame to its handler; one with buffers as a _Parts."""
        if kind & BUFFERS:
            kind &= ~BUFFERS
            if kind & ~SHARED not in _VALUES:
                raise ProtocolError(f"frame kind {kind & ~SHARED} cannot carry buffers")
            if not kind & SHARED:
                body = _Parts.read(body, self.max_frame)
            elif self.out.peer is None:
                raise ProtocolError("a shared file from a peer on another machine")
            else:  # memfd transfer: mapped; TAKEN once the mapping is gone
                done = functools.partial(self.out.release, FILE.unpack_from(body)[1])
                body = _Parts.read(body, self.max_frame, self.out.peer, done)
                kind &= ~SHARED
        if (handler := self.handlers.get(kind)) is None:
            raise ProtocolError(self.unknown.format(kind))
        handler(kind, rid, body)

    def hold(self):
        self.held = True
        self.transport.pause_reading()

    def release(self):
        self.held = False
        self.transport.resume_reading()
        self.buffer_updated(0)  # delivers what waits

    def fail(self, error: Exception):
        self.transport.abort()
        self.lose(error)

    def lose(self, error: Exception | None):
        if not self.lost:
            self.lost = True
            _LIVENESS.forget(self)
            self.on_lost(error)

    def eof_received(self):
        """The peer closed its side: a clean end only between frames."""
        ended = "stream ended inside a frame"
        if (body := self.large or self.untagged and self.untagged[2]) is not None:
            self.lose(ProtocolError(f"{ended} of {len(body)} bytes"))
        elif self.end - self.start >= HEADER.size:
            size = HEADER.unpack_from(self.buf, self.start)[0]
            self.lose(ProtocolError(f"{ended} of {size} bytes"))
        elif self.end > self.start:
            self.lose(ProtocolError(f"{ended} header"))
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None):
        self.lose(exc)

    def pause_writing(self):
        self.out.paused = True

    def resume_writing(self):
        self.out.paused = False
        self.out.feed()
        self.out.flush()


class _Outbox:
    """Seals and writes frames in the order it commits them: one sent while
    nothing waits at once, the loop turn's others together once the handles
    it scheduled have run (cork(); a delivery corks it, so the answers of what
    it woke go then), urgent ones (_URGENT) ahead of those waiting.
    A large message goes to the transport a CHUNK at a time, each once the
    last is sent (the kernel takes it whole, no copy), while a thread computes
    its tag; in memfd transfer (share_with) a thread writes its buffers into a
    shared file instead. Frames behind a large message wait for it (`large`).
    `full()` past HIGH_WATER unsent; `on_resume` when not; `on_flush` first
    thing as frames go out."""

    def __init__(self, transport, seal: _Seal, on_resume=None, on_flush=None):
        self.transport, self.seal, self.on_resume = transport, seal, on_resume
        self.on_flush = on_flush
        self.loop = asyncio.get_running_loop()
        self.queue: collections.deque[tuple[int, int, Any]] = collections.deque()
        self.urgent = 0  # how many frames at the queue's head are urgent
        self.queued = 0  # bytes of the bodies in the queue
        self.parts: list = []  # sealed small frames, written together
        self.large: _Large | None = None  # the message the frames behind wait for
        self.corked = self.paused = self.closed = self.wrote = False
        self.writable: asyncio.Future | None = None  # resolved by wake()
        self.peer: int | None = None  # memfd transfer: the peer's pid (share_with)
        self.share = False  # to send by shared files: until one cannot be made
        self.files: dict[int, int] = {}  # serial -> our fd of a file not yet TAKEN
        self.held: dict[int, list] = {}  # serial -> buffers of a file passed on
        self.spare: list[tuple[int, int]] = []  # (serial, fd) TAKEN, for reuse
        # Paused while it has a backlog: then chunks go to the kernel whole. A
        # TLS transport keeps a buffer of its own, HIGH_WATER at most.
        self.tls = transport.get_extra_info("sslcontext") is not None
        transport.set_write_buffer_limits(high=HIGH_WATER if self.tls else 0)

    def send(self, kind: int, rid: int, body=b""):
        busy = self.wrote or self.queue or self.paused or self.large or self.closed
        if not busy and type(body) is bytes and len(body) < CHUNK:  # a turn's first
            self.parts += encode(kind, rid, body, self.seal)  # small frame goes at
            self.wrote = True  # once (a lone call's sooner), the others together
            self.write()
        elif kind in _URGENT:
            self.queued += len(body)
            self.queue.insert(self.urgent, (kind, rid, body))
            self.urgent += 1
        else:
            self.queued += len(body)
            self.queue.append((kind, rid, body))
        if not self.corked:  # flushed at the turn's end
            self.cork()

    def cork(self):  # flush once the handles scheduled so far have run
        self.corked = True
        self.loop.call_soon(self.flush)

    def flush(self):
        if self.on_flush is not None:
            self.on_flush()
        self.corked = self.wrote = False
        queue = self.queue
        while queue and not self.paused and self.large is None:
            kind, rid, body = queue.popleft()
            self.urgent -= self.urgent > 0  # (no max(): per frame)
            self.queued -= len(body)
            self.commit(kind, rid, body)
            if len(self.parts) >= BATCH:  # so that a pause stops us soon
                self.write()
        self.write()
        if not self.full():
            self.wake()

    def commit(self, kind: int, rid: int, body):
        # In memfd transfer, large buffers go by a shared file while fewer than
        # SHARED_FILES wait for TAKEN (a peer that never says it: the socket):
        # the one they came in, if they are all of one, unwritten, else a new one.
        shared = type(body) is _Parts and body.size - len(body.pickle) >= SHARE
        if shared and self.share and len(self.files) < SHARED_FILES:
            if (on := _source(body.buffers)) and on[2] not in self.files:
                if (fd := _pass(*on)) is not None:  # held, and its sender's file
                    self.held[on[2]] = body.buffers
                    return self.shared(kind, rid, body, (fd, on[2]))
            self.large = _Large([])  # frames behind wait for the file
            spare = self.spare.pop() if self.spare else None
            done = self.loop.run_in_executor(_THREADS, _share, body.buffers, spare)
            done.add_done_callback(functools.partial(self.shared, kind, rid, body))
        elif len(body) < CHUNK:  # sealed here: a thread would cost more than it saves
            self.parts += encode(kind, rid, body, self.seal)
        else:
            parts = body.wire() if type(body) is _Parts else [body]
            kind |= BUFFERS if type(body) is _Parts else 0
            header = HEADER.pack(len(body), kind, rid)
            mac = self.seal.begin(header, len(body))
            self.parts.append(header)
            self.write()
            large = self.large = _Large(parts)
            tagged = self.loop.run_in_executor(_THREADS, _tag, mac, parts)
            tagged.add_done_callback(lambda _: self.sealed(large, tagged.result()))
            self.feed()

    def feed(self):
        if (large := self.large) is None:
            return
        chunks = large.chunks
        while chunks and not self.paused:
            chunk, chunks[0] = chunks[0][:CHUNK], chunks[0][CHUNK:]
            if not chunks[0]:
                chunks.popleft()
            large.left -= len(chunk)
            if not (self.closed or self.transport.is_closing()):
                self.transport.write(chunk)
        if not chunks and large.tag:
            self.parts.append(large.tag)
            self.large = None
            self.flush()

    def sealed(self, large: _Large, tag: bytes):
        large.tag = tag
        self.feed()

    def shared(self, kind: int, rid: int, body: _Parts, done):
        """The buffers of `body` are in a shared file (`done`: its descriptor
        and serial, or a future of them): send its frame."""
        self.large = None
        try:
            fd, serial = done if type(done) is tuple else done.result()
        except Exception as e:  # out of memory, of descriptors: the socket it is
            log.warning("cannot share a message's buffers (%r); sending them", e)
            self.share, fd = False, None
        if self.closed:
            if fd is not None:
                os.close(fd)
            return
        if fd is None:
            self.commit(kind, rid, body)
        else:
            self.files[serial] = fd
            frame = FILE.pack(fd, serial) + body.wire()[0]
            self.commit(kind | BUFFERS | SHARED, rid, frame)
        self.flush()

    def share_with(self, pid: int):
        """Turn memfd transfer on (both ends do, each on its own side):
        large buffers to and from process `pid` go by shared files."""
        self.peer, self.share = pid, True

    def taken(self, kind: int, serial: int, body):
        """The peer is done with shared file `serial`: keep it for a next
        message (SPARE at most), or close it."""
        held = self.held.pop(serial, None)  # a file passed on: not ours to keep
        if body:  # "it may be mapped still": so our own TAKEN of it says so too
            _unsafe.add(serial)
        if (fd := self.files.pop(serial, None)) is None:
            if not self.closed:
                raise ProtocolError(f"TAKEN for shared file {serial}, never sent")
        elif held is None and not body and len(self.spare) < SPARE and not self.closed:
            self.spare.append((serial, fd))
        else:
            os.close(fd)

    def release(self, serial: int):
        """Our mapping of the peer's shared file `serial` is gone (called
        from any thread, as it is collected): TAKEN."""
        body = b"!" if serial in _unsafe else b""  # (see _unsafe)
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self.loop.call_soon_threadsafe(self.send, TAKEN, serial, body)

    def write(self):
        parts, self.parts = self.parts, []
        if parts and not (self.closed or self.transport.is_closing()):
            self.transport.writelines(parts)

    def unsent(self) -> set[int]:
        """Request ids of the tasks whose frames never left this process."""
        return {rid for kind, rid, _ in self.queue if kind in (TASK, STREAM)}

    def close(self):
        """Drop what is queued and every later frame; wake those waiting."""
        self.closed, self.queued, self.large = True, 0, None
        self.queue.clear()
        for fd in [*self.files.values(), *(fd for _, fd in self.spare)]:
            os.close(fd)
        _unsafe.update(self.held)  # passed on, and maybe mapped there still
        self.files, self.spare, self.held = {}, [], {}
        self.wake()

    def full(self) -> bool:
        """Whether HIGH_WATER bytes wait here or in the transport (which
        holds none while not paused, unless TLS keeps its own limits)."""
        unsent = self.queued + (self.large.left if self.large else 0)
        if (self.paused or self.tls) and not self.transport.is_closing():
            unsent += self.transport.get_write_buffer_size()
        return unsent >= HIGH_WATER

    def wake(self):
        """No longer full: wake those waiting, tell the owner."""
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None
        if self.on_resume is not None and not self.closed:
            self.on_resume()

    async def drained(self):
        """Until fewer than HIGH_WATER bytes wait to be sent (at once if so
        now, or if the connection is closed)."""
        while self.full() and not self.closed:
            if self.writable is None:
                self.writable = self.loop.create_future()
            await self.writable


class _Large:
    """A large message on its way out, which the frames behind it wait for:
    its chunks left to feed the transport, their bytes, and its tag once a
    thread computed it; in memfd transfer, nothing until its file is written."""

    __slots__ = ("chunks", "left", "tag")

    def __init__(self, parts: list):
        self.chunks = collections.deque(memoryview(p).cast("B") for p in parts)
        self.left, self.tag = sum(map(len, self.chunks)), b""


def _switch(writer: asyncio.StreamWriter, seals, max_frame, on_lost, **out):
    """Move a connection past its handshake to our own protocol: (frames,
    outbox); the owner sets the frames' handlers."""
    outbox = _Outbox(writer.transport, seals[1], **out)
    frames = _Frames(writer.transport, max_frame, seals[0], outbox, on_lost)
    writer.transport.set_protocol(frames)
    if (sock := writer.get_extra_info("socket")) is not None:
        _LIVENESS.watch(frames, sock)
    return frames, outbox


# -- Memfd transfer: large buffers between processes of one machine ------------
#
# Between two processes on one machine, a message's large buffers skip the
# socket and its MAC: the sender writes them to a memfd (an anonymous file in
# memory, gone when its last descriptor closes: a killed process leaves
# nothing behind), the frame names it by descriptor number and serial, and
# the receiver opens it through /proc/PID/fd, checks its name and size and
# maps it copy-on-write: arrays view the mapping, no copy, writable, and a
# page written is the writer's own, so no receiver sees another's writes.
# Once that mapping is gone it says TAKEN, and the sender writes a next
# message into the file (its pages are there already: writing into new ones
# costs three times as much) or closes it. A value sent on whose buffers are
# all those of a file received, unwritten (the kernel's pagemap tells which
# pages are still the file's), goes on in that file: the one who passes it on
# keeps its mapping, so its sender's file, until the next receiver's TAKEN.
# Only peers that see the same machine token in INFO share files: same boot,
# PID namespace and user, which may read each other's memory anyway (a MAC
# would guard nothing there).

_serials = itertools.count(1)
_mapped: weakref.WeakSet = weakref.WeakSet()  # (< 3.13: each holds a descriptor)
# Received shared files mapped: address -> (its sender's pid and fd, its serial,
# size, (address, length) of each buffer it came as, its mapping, weakly)
_received: dict[int, tuple] = {}
_UNWRITTEN = bytes(b for b in range(256) if not b & 0xC0 or b & 0x20)  # see _pass
# Serials of files that someone may map still when we are done with them: we
# passed them on to a connection that closed before its TAKEN, or forked while
# mapping them. Our TAKEN of one says so (a body): its sender closes it, never
# writes a next message into it, and says so upstream in turn.
_unsafe: set[int] = set()
os.register_at_fork(before=lambda: _unsafe.update(r[2] for r in [*_received.values()]))


@functools.cache
def _machine() -> str | None:
    """This machine, as far as sharing memory goes; None where we cannot
    (or WOOL_SHARE=0 says not to)."""
    if os.environ.get("WOOL_SHARE") == "0":
        return None
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        return f"{f.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}/{os.getuid()}"
    return None


def _share(buffers: list, spare: tuple[int, int] | None = None) -> tuple[int, int]:
    """Write `buffers` one after another into a memfd: a `spare` one (serial,
    descriptor), whose pages are there already, else a new one. (descriptor,
    serial); in a thread (os.pwrite lets go of the GIL)."""
    serial, fd = spare or (os.getpid() << 32 | next(_serials), -1)
    fd = os.memfd_create(f"wool.{serial}", os.MFD_CLOEXEC) if fd < 0 else fd
    try:
        at = 0
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            while view:
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
        os.ftruncate(fd, at)  # a spare may be longer
    except BaseException:
        os.close(fd)
        raise
    return fd, serial


def _source(buffers: list) -> tuple | None:
    """The received file (_received) that `buffers` are all of, in order, as
    (its sender's pid and fd, serial, address, size): to pass on, not copy."""
    try:
        at = [
            (ctypes.addressof(ctypes.c_char.from_buffer(b)), b.nbytes) for b in buffers
        ]
    except TypeError:  # read-only, so not a view of our mapping
        return None
    if not (seen := _received.get(at[0][0])) or seen[4] != at or seen[5]() is None:
        return None  # (a mapping being collected may be unmapped already)
    return (*seen[:3], at[0][0], seen[3])


def _pass(pid: int, fd: int, serial: int, address: int, size: int) -> int | None:
    """Our own descriptor of received file `serial`, mapped at `address`, to
    send on, if no page of our mapping was written (a written page is not the
    file's any more: pagemap's top byte lacks its 0x20, page of a file)."""
    pages = -(-size // mmap.PAGESIZE)
    with contextlib.suppress(OSError), open("/proc/self/pagemap", "rb", 0) as pagemap:
        entries = os.pread(pagemap.fileno(), 8 * pages, address // mmap.PAGESIZE * 8)
        if len(entries) == 8 * pages and not entries[7::8].translate(None, _UNWRITTEN):
            own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            if os.readlink(f"/proc/self/fd/{own}") == f"/memfd:wool.{serial} (deleted)":
                return own  # (its sender may have closed it since: then not that)
            os.close(own)
    return None


def _map(pid: int, fd: int, serial: int, size: int, done: Callable[[], Any]):
    """The shared file `serial` that process `pid` holds as `fd`, mapped (private)
    (or, where descriptors run short, copied); `done()` once it is not."""
    try:
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ProtocolError(
            f"cannot open the shared file of process {pid} ({e.strerror}); where "
            "/proc/PID/fd is closed to a user's own processes, set WOOL_SHARE=0"
        ) from None
    try:
        name = os.readlink(f"/proc/self/fd/{own}")
        if name != f"/memfd:wool.{serial} (deleted)" or os.fstat(own).st_size != size:
            raise ProtocolError(f"the shared file {fd} is not the one sent ({name})")
        if sys.version_info >= (3, 13):
            mapping = mmap.mmap(own, size, access=mmap.ACCESS_COPY, trackfd=False)
        else:
            mapping = mmap.mmap(own, size, access=mmap.ACCESS_COPY)
            if len(_mapped) >= resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4:
                with mapping:  # descriptors run short: copy, and let it go
                    copy = bytearray(mapping)
                done()
                return copy
            _mapped.add(mapping)
        weakref.finalize(mapping, done)
        return mapping
    except ValueError as e:  # an empty file
        raise ProtocolError(f"the shared file {fd} cannot be mapped: {e}") from None
    finally:
        os.close(own)


# -- Liveness: busy is not dead ------------------------------------------------
#
# A peer is dead when its kernel stops answering, never because its event
# loop is busy: a busy peer's kernel acknowledges every probe, advertising a
# zero window. TCP_USER_TIMEOUT cannot tell the two apart (Linux aborts a
# zero-window connection with it too), so wool does not set it. Keepalive
# ends an idle connection to a peer that is gone; for one with data in
# flight, a thread of ours reads each socket's TCP_INFO once a KEEPALIVE,
# however blocked our loop is: retransmissions or probes unanswered for
# DEAD_AFTER seconds mean the peer's machine is gone or the link is cut.
# (Linux backs its probes of a zero window off to 2 minutes: a peer that dies
# after being busy that long is found after two of them.)

_TCP_INFO = struct.Struct("=2xBB52xI")  # retransmits, probes, ms since the last ACK


class _Liveness:
    """The thread that watches connections' TCP_INFO (see above)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.watched: dict[_Frames, tuple] = {}  # -> (socket, loop); under lock
        self.thread: threading.Thread | None = None

    def watch(self, frames: _Frames, sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        probes = dict(TCP_KEEPIDLE=KEEPALIVE, TCP_KEEPINTVL=KEEPALIVE)
        for name, value in (probes | {"TCP_KEEPCNT": DEAD_AFTER / KEEPALIVE}).items():
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), int(value))
        if not hasattr(socket, "TCP_INFO"):  # not Linux: the kernel's keepalive only
            return
        with self.lock:
            self.watched[frames] = (sock, asyncio.get_running_loop())
            if self.thread is None:
                name = "wool liveness"
                self.thread = threading.Thread(target=self.run, name=name, daemon=True)
                self.thread.start()

    def forget(self, frames: _Frames):
        with self.lock:
            self.watched.pop(frames, None)

    def run(self):
        while True:
            time.sleep(KEEPALIVE)
            with self.lock:
                watched = list(self.watched.items())
            for frames, (sock, loop) in watched:
                # With the GIL held, a socket closed meanwhile fails (EBADF):
                # its descriptor cannot be another one's yet.
                try:
                    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 60)
                    retransmits, probes, silent = _TCP_INFO.unpack_from(info)
                except (OSError, struct.error):
                    continue
                if (retransmits or probes > 1) and silent > DEAD_AFTER * 1000:
                    self.forget(frames)
                    gone = TimeoutError(
                        f"its machine has not answered for {silent / 1000:.0f} s: "
                        "it is gone, or the link is cut"
                    )
                    with contextlib.suppress(RuntimeError):  # its loop is closed
                        loop.call_soon_threadsafe(frames.fail, gone)


_LIVENESS = _Liveness()


# -- The worker ----------------------------------------------------------------
class Worker:
    """A worker server: runs the tasks that authenticated callers send it
    (`async with Worker(...) as w: await w.stopped()`). Listens on
    `host:port` (port 0: any free one) and publishes itself to `discovery`;
    `stop()` withdraws it, tells its callers GOODBYE, lets in-flight tasks
    finish within `grace` seconds, then cancels the rest. Tasks run as
    asyncio tasks here; nested calls go to the caller's pool. With
    `max_tasks` running, a new task is REFUSED (its caller tries another
    worker). Raises ValueError when asked to listen off loopback with neither
    a key nor TLS, unless `insecure`; RuntimeError on a second start()."""

    def __init__(
        self, *tags: str, host: str = "127.0.0.1", port: int = 0,
        authkey: bytes | None = None, ssl=None, client_ssl=None, discovery=None,
        advertise: str | None = None, insecure: bool = False, grace: float = GRACE,
        max_frame: int = MAX_FRAME, max_connections: int = MAX_CONNECTIONS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT, max_tasks: int | None = None,
    ):  # fmt: skip
        self.tags, self.authkey = _check_tags(tags, "Worker"), _authkey(authkey)
        self.host, self.port, self.advertise = host, port, advertise
        self.ssl, self.client_ssl, self.insecure = ssl, client_ssl, insecure
        self.discovery, self.grace, self.max_frame = discovery, grace, max_frame
        self.max_connections = max_connections
        self.handshake_timeout, self.max_tasks = handshake_timeout, max_tasks
        self.running = self.done = self.failed = 0  # tasks: only tally() changes them
        self.uid, self.state = uuid.uuid4().hex, _State.NEW
        self.info: WorkerInfo | None = None
        self._server: asyncio.Server | None = None
        self._shaking: dict[asyncio.StreamWriter, str] = {}  # handshakes, oldest first
        self._peers: set[_Peer] = set()  # authenticated; each removes itself
        self._nested: dict[bytes, tuple] = {}  # HELLO -> (pool, _Peers keeping it)
        self._closing: set[asyncio.Task] = set()  # nested pools being stopped
        self._log, self._stopped = _LogLimit(), asyncio.Event()

    def __repr__(self):
        where = self.info.address if self.info else f"{self.host}:{self.port}"
        return f"<Worker {self.state.name.lower()} {where}>"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info):
        await self.stop()

    async def start(self):
        if self.state is not _State.NEW:
            raise RuntimeError(f"{self!r} cannot be started twice")
        verifies = getattr(self.ssl, "verify_mode", None) == ssl.CERT_REQUIRED
        local = self.host in ("localhost", "::1") or self.host.startswith("127.")
        if not (self.authkey or verifies or self.insecure or local):
            raise ValueError(
                f"refusing to listen on {self.host} without a key: anyone who can "
                "reach the port could run code here. Set a key (--authkey-file, "
                "WOOL_AUTHKEY or authkey=), or TLS with client certificates "
                "(--tls-ca), or pass --insecure"
            )
        self.state, self._started = _State.STARTING, time.monotonic()
        _more_files()
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.ssl, backlog=LISTEN_BACKLOG,
            ssl_handshake_timeout=self.handshake_timeout if self.ssl else None,
        )  # fmt: skip
        port = self._server.sockets[0].getsockname()[1]
        # A worker on every interface (0.0.0.0) is listed as such: LAN discovery
        # announces each of the machine's addresses, and its callers learn the
        # one they reached it at.
        self.info = WorkerInfo(self.uid, self.advertise or self.host, port, os.getpid(),
                               __version__, self.tags, self.ssl is not None)  # fmt: skip
        try:
            if self.discovery is not None:
                await self.discovery.publish(DiscoveryEvent("worker-added", self.info))
        except BaseException:  # a discovery table of another user's, ...
            await self.stop()
            raise
        self.state, tags = _State.READY, ",".join(sorted(self.tags))
        log.info("worker %s listening (tags: %s)", self.info.address, tags)

    async def stop(self, grace: float | None = None):
        """Withdraw, stop listening, drain in-flight tasks, then cancel them."""
        if self.state in (_State.STOPPING, _State.STOPPED):
            return await self._stopped.wait()
        self.state = _State.STOPPING
        try:
            if self.discovery is not None and self.info is not None:
                dropped = DiscoveryEvent("worker-dropped", self.info)
                with contextlib.suppress(Exception):
                    await self.discovery.publish(dropped)
            if self._server is not None:
                self._server.close()
            await self._drain(self.grace if grace is None else grace)
            for pool, _ in list(self._nested.values()):
                await pool.stop()
            await asyncio.gather(*self._closing)
            if self._server is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), PATIENCE)
        finally:
            if (close := getattr(self.discovery, "close", None)) is not None:
                with contextlib.suppress(Exception):
                    await close()
            self._log.flush()
            self.state = _State.STOPPED
            self._stopped.set()

    async def _drain(self, grace: float):
        """Tell callers GOODBYE (they close once answered), give the tasks
        `grace` seconds, then close: gently, and at once PATIENCE later."""
        peers = list(self._peers)
        for peer in peers:
            peer.out.send(GOODBYE, 0)
        if tasks := [t for p in peers for t in p.tasks.values()]:
            await asyncio.wait(tasks, timeout=grace)
        for writer in self._shaking:
            writer.transport.abort()
        for abort in (False, True):
            if peers:
                await asyncio.wait([p.closed for p in peers], timeout=PATIENCE)
            peers = [p for p in peers if not p.closed.done()]
            for peer in peers:  # after grace, or a caller that does not read
                peer.close(abort)

    async def stopped(self):
        """Wait until the worker has stopped."""
        await self._stopped.wait()

    def tally(self, started: int, done: bool | None = None):
        """A _Peer's task started (1) or left (-1), `done` or not (None: neither)."""
        self.running += started
        if done is not None:
            self.done, self.failed = self.done + done, self.failed + (not done)

    def status(self) -> dict:
        """What this worker is doing, as plain data: uid, address, pid,
        version, tags, uptime (s), the tasks running now (function, age in
        s), tasks done and failed since start, connections, RSS (bytes), and
        the connections its nested pools hold to other workers (its mesh)."""
        now, info = time.monotonic(), cast(WorkerInfo, self.info)
        tasks = [task for peer in self._peers for task in peer.running.values()]
        running = [{"function": _name(f), "age": round(now - s, 3)} for f, s in tasks]
        rss = None  # not Linux
        with contextlib.suppress(OSError), open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {
            "uid": self.uid, "address": info.address, "pid": info.pid,
            "version": info.version, "tags": sorted(self.tags),
            "uptime": round(now - self._started, 3), "running": running,
            "done": self.done, "failed": self.failed,
            "connections": len(self._peers), "rss": rss,
            "nested": sum(len(p._roster.conns) for p, _ in self._nested.values()),
        }  # fmt: skip

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """Authenticate a new connection, then hand it to a _Peer."""
        peer = writer.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if (many := len(self._peers)) >= self.max_connections:
            refused = f"refused connection from {address}: {many} already open"
            self._log.warning(address, refused)
            return writer.transport.abort()
        if len(self._shaking) >= MAX_HANDSHAKES:  # the oldest is most likely idle
            oldest = next(iter(self._shaking))
            self._shaking[oldest] = f"the oldest of {MAX_HANDSHAKES} handshakes at once"
            oldest.transport.abort()
        self._shaking[writer] = ""
        try:
            async with asyncio.timeout(self.handshake_timeout):
                seals = await _authenticate_caller(reader, writer, self.authkey)
        except (TimeoutError, asyncio.IncompleteReadError, WoolError, OSError) as e:
            writer.close()  # after the "-" of a refused key, if any
            why = self._shaking.get(writer) or e
            if isinstance(e, TimeoutError):
                why = f"no handshake within {self.handshake_timeout:g} s"
            elif why is e and isinstance(e, (asyncio.IncompleteReadError, OSError)):
                got = getattr(e, "partial", None) or reader._buffer  # type: ignore
                if not got:  # a probe (a readiness check, a port scan): no harm
                    log.debug("connection from %s closed before the handshake", address)
                    return
                why = "it closed the connection during the handshake"
            self._log.warning(address, f"closed connection from {address}: {why}")
            return
        finally:
            self._shaking.pop(writer, None)
        if self.state in (_State.STOPPING, _State.STOPPED):
            return writer.transport.abort()
        peer = _Peer(self, (reader, writer), seals, address)  # in _peers now
        me = cast(WorkerInfo, self.info)
        peer.out.send(INFO, 0, me.to_json(machine=_machine(), verified=peer.verified))
        log.info("connection from %s opened", address)

    def _nested_pool(self, peer: _Peer) -> WorkerPool:
        """The pool for the nested calls of callers that sent `peer`'s HELLO.

        It is kept by the connections from callers' own pools that used it,
        or, while none did, by the one that opened it: never by another
        worker's nested pool alone, whose connection it may keep in turn (a
        cycle that would outlive the caller)."""
        if (entry := self._nested.get(peer.hello)) is None:
            pool = WorkerPool._nested(self, peer.services, peer.wait)
            entry = self._nested[peer.hello] = (pool, set())
        if not peer.nested or not entry[1]:
            entry[1].add(peer)
        entry[0]._roster.seed(peer.seeds)
        return entry[0]

    def _release_nested(self, peer: _Peer):
        """`peer` closed; the last that kept its nested pool stops it."""
        if (entry := self._nested.get(peer.hello)) is not None and peer in entry[1]:
            entry[1].discard(peer)
            if not entry[1]:
                del self._nested[peer.hello]
                _spawn(self._closing, entry[0].stop())


# -- _Peer: the worker's end of a connection -----------------------------------
class _Peer:
    """A worker's side of one authenticated caller's connection: the tasks it
    sent, run as asyncio tasks in the context HELLO set up.

    Rules: every TASK/STREAM is answered REFUSED before its code runs, or
    ACCEPTED after its first step (unless that step answered, see started),
    and gets exactly one RESULT, ERROR or STOP per step, whatever its code
    does (see run). A caller that does not read costs a bound: reading stops
    while the outbox is full, replies wait for room before they are pickled,
    a generator takes one step at a time, DEFINEs stop at MAX_DEFINED. Only
    _Peer changes the worker's task counts, through Worker.tally()."""

    # Python 3.12+ runs a task's first step as it is made: a quick task is done
    # without a trip through the event loop (current_task() and timeouts hold).
    EAGER: dict[str, Any] = {"eager_start": True} if sys.version_info >= (3, 12) else {}

    def __init__(self, worker: Worker, streams, seals, address: str):
        self.worker, self.writer, self.address = worker, streams[1], address
        self.loop = asyncio.get_running_loop()
        self.frames, self.out = _switch(
            self.writer, seals, worker.max_frame, self.on_lost,
            on_resume=self.release, on_flush=self.started,
        )  # fmt: skip
        self.verified = _verified(self.writer)  # the caller's TLS certificate
        self.hello, self.nested, self.wait = b"", False, WAIT  # from HELLO, with
        self.services: list = []  # the caller's discovery, and workers it lists
        self.seeds: list = []
        self.pool: WorkerPool | None = None  # for nested calls: see get()
        self.context = contextvars.Context()  # tasks run in copies: see on_hello
        self.tasks: dict[int, asyncio.Task] = {}
        self.running: dict[int, tuple] = {}  # rid -> (function, start): status
        self.debug = log.isEnabledFor(logging.DEBUG)  # a line per task
        self.streams: dict[int, asyncio.Queue] = {}  # generators' next step
        self.functions: dict[int, Any] = {}  # DEFINE'd bytes, then resolved
        self.defined = self.burst = 0  # bytes DEFINE'd; tasks accepted since breathe()
        self.first: list[tuple] = []  # (rid, bytes of replies ahead): see started()
        self.closed = self.loop.create_future()
        seconds = worker.handshake_timeout
        no_hello = ProtocolError(f"no HELLO within {seconds:g} s")
        self.deadline = self.loop.call_later(seconds, self.frames.fail, no_hello)
        unknown = "it did not start with HELLO"
        worker._peers.add(self)  # before any frame: a bad one removes it again
        self.frames.begin({HELLO: self.on_hello}, unknown, streams[0])

    def on_hello(self, kind: int, rid: int, body):
        self.deadline.cancel()
        try:
            self.hello, self.seeds, verified = pickle.loads(body)
            self.services, self.nested, self.wait = pickle.loads(self.hello)
        except Exception as e:
            raise ProtocolError(f"a HELLO that does not load: {e!r}") from None
        if rid and _machine() is not None:  # the caller shares this machine
            self.out.share_with(rid)
        _trust(self.frames, self.verified or verified is True)
        # Tasks run in copies of this context: nested calls go to the
        # caller's pool, and current_worker() answers.
        self.context = contextvars.copy_context()
        self.context.run(_current_pool.set, self)  # see get()
        info = cast(WorkerInfo, self.worker.info)
        if info.host in ("0.0.0.0", "::", ""):  # the address this caller reached
            host = self.writer.get_extra_info("sockname")[0]
            info = dataclasses.replace(info, host=host)
        self.context.run(_current_worker.set, info)
        self.frames.handlers = {
            TASK: self.accept, STREAM: self.accept, NEXT: self.step,
            THROW: self.step, CLOSE: self.step, CANCEL: self.cancel,
            STATUS: self.status, DEFINE: self.define, TAKEN: self.out.taken,
        }  # what a caller sends once it said HELLO  # fmt: skip
        self.frames.unknown = "unknown frame kind {} from a caller"

    def get(self) -> WorkerPool:
        """The pool its tasks' nested calls go to, opened at the first one, and
        shared by connections that sent the same HELLO (Worker._nested_pool)."""
        if self.pool is None:
            self.pool = self.worker._nested_pool(self)
        return self.pool

    def step(self, kind: int, rid: int, body):
        if rid not in self.tasks:
            return  # it ended, or was cancelled, while the step travelled
        if (steps := self.streams.get(rid)) is None:
            raise ProtocolError(f"a generator step for task {rid}, a coroutine")
        if steps.full():
            raise ProtocolError(f"two steps at once for generator {rid}")
        steps.put_nowait((kind, body))

    def cancel(self, kind: int, rid: int, body=None):
        if (task := self.tasks.get(rid)) is not None:
            task.cancel()
            if rid not in self.running:  # it never ran (3.11), so run() cannot end it
                self.end(rid)

    def status(self, kind: int, rid: int, body):
        self.out.send(RESULT, rid, _pickle((self.worker.status(), None)))

    def define(self, kind: int, rid: int, body):
        self.defined += len(body)
        if self.defined > MAX_DEFINED:
            raise ProtocolError(
                f"over {MAX_DEFINED / 2**20:.0f} MiB of functions defined on one "
                "connection"
            )
        self.functions[rid] = body  # unpickled by the first task that needs it

    def accept(self, kind: int, rid: int, body):
        generator = kind == STREAM
        if rid in self.tasks:
            raise ProtocolError(f"request id {rid} is already running")
        worker = self.worker
        stopping = worker.state in (_State.STOPPING, _State.STOPPED)
        if stopping or worker.running == worker.max_tasks:
            return self.out.send(REFUSED, rid)  # the caller tries another worker
        if generator:
            self.streams[rid] = asyncio.Queue(1)  # (not Queue[...](1): slow)
            self.streams[rid].put_nowait((NEXT, b""))
        worker.tally(1)  # (first: on 3.12+ it may run, and end, as it is made)
        run = self.run(rid, body, generator)
        context = self.context.copy()
        task = asyncio.Task(run, loop=self.loop, context=context, **self.EAGER)
        if not task.done():  # (else it has ended: see end())
            self.tasks[rid] = task
        # Let the tasks just accepted run now and then, so a burst of TASKs
        # does not starve them; stop taking more while replies pile up.
        self.burst += 1
        if (self.burst >= ACCEPT_BURST or self.out.full()) and not self.frames.held:
            self.frames.hold()
            self.loop.call_soon(self.breathe)

    def started(self):
        """As the outbox flushes after the first steps of the tasks in `first`
        (corked by their delivery, or by run()): ACCEPTED, ahead of replies;
        not for a task done, if its answer is not stuck behind others (a
        frame less per quick call), nor for one REFUSED (it never ran)."""
        out, first, self.first = self.out, self.first, []
        for rid, ahead in first:  # (a task done has left `tasks`)
            if rid in self.tasks or out.paused or out.large or ahead > LARGE:
                out.send(ACCEPTED, rid)

    def resolve(self, ref) -> tuple[Callable, bool]:
        if type(ref) is not int:
            return _resolve(ref)
        if (found := self.functions.get(ref)) is None:
            raise ProtocolError(f"function {ref} was never defined on this connection")
        if type(found) is not tuple:
            found = self.functions[ref] = _resolve(bytes(found))
        return found

    def end(self, rid: int, done: bool | None = None):
        """A task has left, `done` or failed (None: neither), as its run()
        ends (no done callback: a loop handle less per task), or cancel()."""
        self.tasks.pop(rid, None)
        self.streams.pop(rid, None)
        self.running.pop(rid, None)
        self.worker.tally(-1, done)

    def breathe(self):
        self.burst = 0
        self.release()

    def release(self):
        """Read again, unless a burst is still to run or replies pile up."""
        if self.frames.held and self.burst < ACCEPT_BURST and not self.out.full():
            self.frames.release()

    def on_lost(self, error: Exception | None):
        self.deadline.cancel()
        self.out.close()
        self.worker._peers.discard(self)
        if isinstance(error, WoolError):
            why = f"closed connection from {self.address}: {error}"
            self.worker._log.warning(self.address, why)
        else:
            why = f": {error!r}" if error else ""
            log.info("connection from %s closed%s", self.address, why)
        for rid in list(self.tasks):
            self.cancel(CANCEL, rid)
        self.worker._release_nested(self)
        self.closed.set_result(None)

    def close(self, abort: bool = False):
        """Stop now: cancel the tasks (their replies are dropped: the caller
        gets WorkerLost) and close the connection, or `abort` it."""
        self.out.flush()
        self.out.close()
        for rid in list(self.tasks):
            self.cancel(CANCEL, rid)
        self.writer.transport.abort() if abort else self.writer.close()

    async def reply(self, kind: int, rid: int, make: Callable[[], bytes]):
        """Send a reply once the outbox takes frames: it is pickled only then."""
        await self.out.drained()
        self.out.send(kind, rid, make())

    async def run(self, rid: int, body, generator: bool):
        # The rule: a task gets exactly one answer, whatever its code, its
        # arguments, value or exception do (SystemExit too): RESULT, or else
        # the ERROR that _dump_error builds without fail, cut to fit.
        worker, start, fn, outcome = self.worker, time.monotonic(), None, "done"
        max_frame = worker.max_frame
        try:
            whole = False  # what cannot run here: this call, or its function
            try:  # nothing of the task runs before it is found and loaded here
                ref, args, kwargs, context, seconds = _loads(body)
                whole = True
                fn, is_generator = self.resolve(ref)
                if is_generator != generator:
                    raise TypeError(
                        f"{fn.__qualname__} is {'not ' * generator}an async "
                        "generator function here"
                    )
            except Exception as e:  # so its caller may send it to another worker
                outcome = f"refused: {type(e).__name__}"
                if isinstance(e, ImportError) and "cannot import" not in str(e):
                    e = ModuleNotFoundError(  # (a module a sent function needs)
                        f"worker {worker.info and worker.info.address} cannot load "
                        f"the task: {e}. Install {e.name or 'it'} there, or send "
                        "it: WorkerPool(modules=)", name=e.name,
                    )  # fmt: skip
                why = pickle.dumps((whole, _dump_error(e, max_frame)))
                return self.out.send(REFUSED, rid, why)
            self.running[rid] = (fn, start)  # for status
            self.first.append((rid, self.out.queued))
            if not self.out.corked:  # (a flush that ran ahead of this first step)
                self.out.cork()
            changed = _enter_context(context)
            if generator:
                return await self.drive(rid, fn, fn(*args, **kwargs), changed)
            if seconds is None:
                value = await fn(*args, **kwargs)
            else:
                async with asyncio.timeout(seconds):
                    value = await fn(*args, **kwargs)
            if self.out.full():  # pickle the value only once there is room
                await self.out.drained()
            reply = _dump_value(value, _context_changes(changed), fn, max_frame)
            self.out.send(RESULT, rid, reply)
        except BaseException as e:  # CancelledError too: the caller may be waiting
            outcome = f"failed: {type(e).__name__}"
            await self.reply(ERROR, rid, functools.partial(_dump_error, e, max_frame))
        finally:  # (a refused task is neither done nor failed: it went elsewhere)
            self.end(rid, None if outcome[:7] == "refused" else outcome == "done")
            if self.debug:
                log.debug("task %d %s() from %s: %s in %.3f s", rid, _name(fn),
                          self.address, outcome, time.monotonic() - start)  # fmt: skip

    async def drive(self, rid: int, fn, agen, changed: set[str]):
        """Run a generator one step per NEXT/THROW, until it stops or CLOSE
        (or cancel) closes it; what it raises goes to run(), which answers."""
        steps, max_frame = self.streams[rid], self.worker.max_frame
        try:
            while (step := await steps.get())[0] != CLOSE:
                kind, body = step
                value = _loads(body) if len(body) else None
                try:
                    value = await (agen.asend if kind == NEXT else agen.athrow)(value)
                except StopAsyncIteration:
                    break
                changes = _context_changes(changed)
                make = functools.partial(_dump_value, value, changes, fn, max_frame)
                await self.reply(RESULT, rid, make)
            await agen.aclose()
            await self.reply(STOP, rid, bytes)
        finally:
            await agen.aclose()  # runs the generator's `finally` if it is open


class _LogLimit:
    """Warnings about peers, at most LOG_BURST per peer host per LOG_WINDOW
    seconds: a flood of bad connections must not flood the log. What it held
    back is counted, and the count logged when the window ends or at flush()."""

    def __init__(self):
        self.hosts: dict[str, list] = {}  # host -> [window start, warnings]

    def warning(self, address: str, message: str):
        host, now = address.rpartition(":")[0] or address, time.monotonic()
        if host in self.hosts and now - self.hosts[host][0] > LOG_WINDOW:
            self.flush(host)
        if len(self.hosts) >= LOG_HOSTS:  # bounded, whatever the addresses
            self.flush()
        entry = self.hosts.setdefault(host, [now, 0])
        entry[1] += 1
        if entry[1] <= LOG_BURST:
            log.warning("%s", message)
        if entry[1] == LOG_BURST:
            log.warning("more warnings about %s for %g s: counted", host, LOG_WINDOW)

    def flush(self, *hosts: str):
        """Log the counts held back (for `hosts`, or all) and forget them."""
        for host in hosts or list(self.hosts):
            if (held := self.hosts.pop(host)[1] - LOG_BURST) > 0:
                log.warning("%d more warnings about %s were not logged", held, host)


# -- Entry points: spawned worker, CLI, demo -----------------------------------
def _spawned():
    """Main of a worker spawned by a WorkerPool: config on stdin, whose EOF
    (the pool closed it, or the caller died) means stop."""
    (size,) = struct.unpack("!I", sys.stdin.buffer.read(4))
    sys.path[:], level, loop, *config = pickle.loads(sys.stdin.buffer.read(size))
    logging.basicConfig(level=level, format="wool worker %(process)d: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    factory = importlib.import_module(loop).new_event_loop  # the caller's kind
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_spawned(*config))


async def _serve_spawned(tags: list[str], namespace: str, options: dict):
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    discovery = LocalDiscoveryService(namespace, create=False)
    worker = Worker(*tags, discovery=discovery, **options)

    def lifeline():
        # A thread, not the event loop, watches stdin: a task that blocks the
        # loop must not keep an orphaned worker alive.
        while os.read(0, 1024):  # until EOF: the pool closed it, or died
            pass
        ended.append(True)
        with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting
            loop.call_soon_threadsafe(stop.set)
        time.sleep(worker.grace + 2 * PATIENCE)  # the loop's chance to stop well
        with contextlib.suppress(OSError):  # it did not: withdraw, and go
            discovery.withdraw(worker.uid)
            os.rmdir(discovery.path)  # the last one out
        os._exit(1)

    ended: list[bool] = []
    threading.Thread(target=lifeline, daemon=True).start()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with worker:
        await stop.wait()
    if ended:  # the last worker out removes a killed pool's empty namespace
        with contextlib.suppress(OSError):
            os.rmdir(discovery.path)


def main(argv: list[str] | None = None) -> int:
    """The `wool` command: `wool worker`, `wool ls`, `wool status`, `wool demo`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="wool: %(message)s")
    command = {"worker": _serve_cli, "ls": _ls, "status": _status, "demo": _demo}
    try:
        return asyncio.run(command[args.command](args))
    except (ValueError, OSError, WoolError) as e:
        print(f"wool {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C ends `wool status --watch`
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wool", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="serve tasks until SIGTERM or SIGINT")
    ls = commands.add_parser("ls", help="list the workers a discovery service sees")
    status = commands.add_parser("status", help="what each worker is doing")
    demo = commands.add_parser("demo", help="run the quick start on a local pool")
    add = worker.add_argument
    add("--host", default="127.0.0.1", help="default 127.0.0.1")
    add("--port", type=int, default=0, help="default: any free port")
    add("--advertise", help="address callers use (default: --host)")
    add("--tag", action="append", default=[], help="repeatable")
    add("--insecure", action="store_true", help="allow no key off loopback")
    add("--grace", type=float, default=GRACE, help="seconds to drain")
    add("--max-tasks", type=int, help="tasks run at once (default: no limit)")
    add("--max-frame", type=int, default=MAX_FRAME, help="bytes")
    add("--path", action="append", default=[], help="put DIR on sys.path")
    add("--preload", action="append", default=[], help="import MODULE at start")
    for command in (ls, status):
        command.add_argument("--wait", type=float, help="seconds to listen (lan 2)")
    status.add_argument("--watch", action="store_true", help="refresh every second")
    status.add_argument("--json", action="store_true", help="one JSON line per worker")
    for command in (worker, ls, status):
        add = command.add_argument
        add("--discovery", default="local", help=DISCOVERY_HELP)
        add("--interface", action="append", help="mDNS interface address")
        add("--authkey-file", help="the key (else WOOL_AUTHKEY)")
        add("--tls-ca", help="CA of the peers' certificates (mutual TLS)")
        add("--tls-cert", help="our certificate (PEM): needed by mutual TLS")
        add("--tls-key", help="its private key (PEM)")
    demo.add_argument("--size", type=int, default=2, help="worker processes")
    for command in (worker, ls, status, demo):
        level = "ERROR" if command in (ls, status) else "WARNING"  # they say why
        command.add_argument("--log-level", default=level, help=f"default {level}")
    return parser


DISCOVERY_HELP = "lan, local, local:NAME, dns:NAME[:PORT] (ls) or none (worker)"


def _discovery(spec: str, interfaces: list[str] | None, publish: bool):
    if spec == "lan":
        return LanDiscoveryService(interfaces=interfaces)
    if spec == "local" or spec.startswith("local:"):
        return LocalDiscoveryService(spec.partition(":")[2] or None)
    if spec.startswith("dns:") and not publish:
        return DnsDiscoveryService(spec[4:])
    if spec == "none" and publish:
        return None
    raise ValueError(f"--discovery {spec!r}: use {DISCOVERY_HELP}")


def _authkey_file(path: str | None) -> bytes | None:
    return None if path is None else pathlib.Path(path).read_bytes().rstrip(b"\r\n")


def _tls(cert, key, ca, purpose):
    """An SSLContext from PEM files, or None; verifies the peer when `ca`."""
    if not (cert or ca):
        return None
    try:
        context = ssl.create_default_context(purpose, cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:  # say which files, and why
        raise ValueError(
            f"cannot use --tls-cert {cert} --tls-key {key} --tls-ca {ca}: {e}"
        ) from None
    if ca and purpose is ssl.Purpose.CLIENT_AUTH:
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    return context


async def _serve_cli(args) -> int:
    # As `python -m` does: the working directory first, so the user's task
    # modules import; then --path.
    sys.path[:0] = [os.getcwd(), *map(os.path.abspath, args.path)]
    for module in args.preload:
        try:
            importlib.import_module(module)
        except Exception as e:
            print(f"wool worker: cannot preload {module!r}: {e!r}", file=sys.stderr)
            return 2
    tls = args.tls_cert, args.tls_key, args.tls_ca
    options = "host", "port", "advertise", "insecure", "grace", "max_frame", "max_tasks"
    worker = Worker(
        *args.tag, authkey=_authkey_file(args.authkey_file),
        ssl=_tls(*tls, ssl.Purpose.CLIENT_AUTH),
        client_ssl=_tls(*tls, ssl.Purpose.SERVER_AUTH),
        discovery=_discovery(args.discovery, args.interface, publish=True),
        **{option: getattr(args, option) for option in options},
    )  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGINT):
        stop = lambda: asyncio.ensure_future(worker.stop())
        asyncio.get_running_loop().add_signal_handler(sig, stop)
    await worker.start()
    info = cast(WorkerInfo, worker.info)
    where = f"{info.address} pid {info.pid}"
    print(f"wool worker {info.uid} listening on {where}", flush=True)
    await worker.stopped()
    print(f"wool worker {info.uid} stopped", flush=True)
    return 0


@contextlib.asynccontextmanager
async def _cli_pool(args, dial: bool = True):
    """A pool on the command's discovery, key and TLS, once the workers that
    discovery listed within --wait answered or failed (without `dial`, it
    only lists them)."""
    async with WorkerPool(
        discovery=_discovery(args.discovery, args.interface, publish=False),
        authkey=_authkey_file(args.authkey_file),
        ssl=_tls(args.tls_cert, args.tls_key, args.tls_ca, ssl.Purpose.SERVER_AUTH),
        lease=None if dial else 0,
    ) as pool:
        roster = pool._roster
        wait = 2.0 if args.discovery == "lan" else 0.1  # long enough for mDNS
        await asyncio.sleep(wait if args.wait is None else args.wait)
        with contextlib.suppress(TimeoutError):
            done = lambda: len(roster.conns) + len(roster.errors) >= len(roster.listed)
            await pool._until(lambda: not dial or done(), HANDSHAKE_TIMEOUT)
        yield pool


async def _ls(args) -> int:
    """`wool ls`: the workers discovery lists; given a key or TLS, each as it
    says who it is there, or why it does not answer."""
    key = _authkey_file(args.authkey_file) or _authkey(None)
    async with _cli_pool(args, dial=bool(key or args.tls_ca)) as pool:
        roster = pool._roster
        for uid, (w, _) in sorted(roster.listed.items(), key=lambda i: i[1][0].address):
            if (conn := roster.find(uid)) is not None:
                w = conn.info
            elif error := roster.errors.get(uid):
                print(f"{w.address}  does not answer: {error}")
                continue
            elif not w.pid:  # a DNS record: only an address
                print(f"{w.address}  listed; give the key to see who answers")
                continue
            tags, tls = ",".join(sorted(w.tags)) or "-", " tls" if w.secure else ""
            print(f"{w.uid}  {w.address}  pid {w.pid}  tags {tags}  v{w.version}{tls}")
    return 0


async def _status(args) -> int:
    """`wool status`: one line per worker (or JSON), once or every second."""
    async with _cli_pool(args) as pool:
        if not pool.workers:  # why: a refused key first, else what failed
            none = NoWorkersAvailable(f"no worker found on {pool.discovery!r}")
            other = lambda e: type(e) is not AuthenticationError
            raise min(pool._roster.errors.values(), key=other, default=none)
        while True:
            for s in sorted(await pool.status(), key=lambda s: s["address"]):
                print(json.dumps(s) if args.json else _status_line(s), flush=True)
            if not args.watch:
                return 0
            await asyncio.sleep(1.0)
            print(flush=True)


def _status_line(s: dict) -> str:
    running = ", ".join(f"{r['function']} {r['age']:.1f}s" for r in s["running"])
    rss = f"{s['rss'] / 2**20:.0f} MiB" if s["rss"] is not None else "?"
    return (
        f"{s['uid']}  {s['address']}  pid {s['pid']}  up {s['uptime']:.0f}s  "
        f"running {len(s['running'])}{f' ({running})' if running else ''}  "
        f"done {s['done']}  failed {s['failed']}  connections {s['connections']}  "
        f"rss {rss}  tags {','.join(s['tags']) or '-'}  v{s['version']}"
    )


@work
async def _demo_fibonacci(n: int) -> int:
    if n <= 1:
        return n
    return await _demo_fibonacci(n - 1) + await _demo_fibonacci(n - 2)


@work
async def _demo_countdown(n: int):
    for i in range(n, 0, -1):
        yield i, os.getpid()


@work
async def _demo_fail() -> None:
    raise ValueError("raised in a worker, caught in the caller")


async def _demo(args) -> int:
    start = time.perf_counter()
    async with WorkerPool(size=args.size) as pool:
        print(f"started {pool!r} in {time.perf_counter() - start:.2f} s")
        t = time.perf_counter()
        value = await _demo_fibonacci(12)
        took = time.perf_counter() - t
        print(f"  fibonacci(12) = {value}: 465 nested tasks in {took:.2f} s")
        async for i, pid in _demo_countdown(3):
            print(f"  countdown yielded {i} from worker pid {pid}")
        try:
            await _demo_fail()
        except ValueError as e:
            print(f"  caught ValueError({str(e)!r}), the worker's traceback its cause")
    print(f"stopped the pool; {time.perf_counter() - start:.2f} s in all")
    return 0


if __name__ == "__main__":
    # `python -m wool` runs this file as __main__; use the module by its real
    # name (`wool`, or a vendored `pkg._vendor.wool`), so tasks and the CLI
    # share one copy of the module's state.
    sys.exit(importlib.import_module(__spec__.name if __spec__ else "wool").main())
