"""Helpers shared by the test files: processes, /dev/shm, raw wool sessions."""

from __future__ import annotations

import asyncio
import os
import pickle
import select
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import wool

HERE = Path(__file__).parent


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # reaped, or being reaped
        return False
    return status != "Z"


def wait_exit(pid: int, timeout: float = 30):
    """Wait for any process (not only a child) to exit: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], timeout)[0], f"pid {pid} still runs"
    finally:
        os.close(fd)


def run_script(code: str, *args, timeout=30, cwd=HERE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )  # fmt: skip


def segment(pool: wool.WorkerPool) -> Path:
    """The /dev/shm file of a pool's spawned workers' private namespace: the
    only segment a pool makes, so tests check just that one (other wool
    users share /dev/shm)."""
    return Path(pool._spawner.service.path)


async def until(condition, timeout: float = 10):
    """Poll `condition()` (state that has no event to wait on) until it holds;
    fails after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def in_flight(pool: wool.WorkerPool, n: int = 1):
    """Until `n` of the pool's calls are in flight: their TASKs sent."""
    await pool._until(lambda: sum(pool.load.values()) >= n, 10)


def frame(kind: int, rid: int, body: bytes = b"", seal=None) -> bytes:
    """One frame's bytes, sealed with `seal` (default: a key nobody holds)."""
    return b"".join(wool.encode(kind, rid, body, seal or wool._Seal(b"nobody")))


class Session:
    """A raw connection that passed the handshake, speaking frames by hand."""

    def __init__(self, reader, writer, seals):
        self.reader, self.writer = reader, writer
        self.inbound, self.outbound = seals

    @classmethod
    async def open(cls, info: wool.WorkerInfo, key: bytes) -> Session:
        reader, writer = await asyncio.open_connection(info.host, info.port)
        seals = await wool._authenticate_worker(reader, writer, key, info.address)
        session = cls(reader, writer, seals)
        kind, _, record = await session.read()
        assert kind == wool.INFO, f"a first frame of kind {kind}"
        session.info = wool.WorkerInfo.from_json(record)
        return session

    def send(self, kind: int, rid: int, body: bytes = b""):
        self.writer.write(frame(kind, rid, body, self.outbound))

    async def read(self) -> tuple[int, int, bytes]:
        header = await self.reader.readexactly(wool.HEADER.size)
        size, kind, rid = wool.HEADER.unpack(header)
        body = await self.reader.readexactly(size)
        tag = await self.reader.readexactly(wool.TAG)
        assert tag == self.inbound.tag(header, body), "a frame with a bad MAC"
        return kind, rid, body


class Transport:
    """What _Frames needs of a transport; records what it was told."""

    paused = aborted = False

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def abort(self):
        self.aborted = True


KEY = b"frames"
HELLO = pickle.dumps((pickle.dumps(([], False, 30.0)), [], False))  # a plain caller's


class EveryKind(dict):
    """A handler table that hands every kind of frame to one handler."""

    def __init__(self, handler):
        self.handler = handler

    def get(self, kind, default=None):
        return self.handler


def frames_taking_every_kind(transport, max_frame, take, on_lost) -> wool._Frames:
    """A _Frames (session key KEY) that gives `take` each frame as a tuple."""
    protocol = wool._Frames(
        transport, max_frame, wool._Seal(KEY),
        types.SimpleNamespace(peer=None, corked=True), on_lost,
    )  # fmt: skip
    protocol.handlers = EveryKind(lambda *frame: take(frame))
    return protocol


def decode(chunks, max_frame=wool.MAX_FRAME, frames=None):
    """Feed byte chunks to a _Frames (session key KEY), then EOF: (frames,
    error, transport)."""
    frames = frames if frames is not None else []
    lost, transport = [], Transport()
    protocol = frames_taking_every_kind(
        transport, max_frame, frames.append, lost.append
    )
    for chunk in chunks:
        while chunk and not lost:
            buffer = protocol.get_buffer(-1)
            n = min(len(buffer), len(chunk))
            buffer[:n], chunk = chunk[:n], chunk[n:]
            protocol.buffer_updated(n)
    if not lost:
        protocol.eof_received()
        protocol.connection_lost(None)
    return frames, lost[0], transport
