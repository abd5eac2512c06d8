"""Large data: out-of-band buffers (pickle protocol 5) through real workers.

Correctness, not speed (bench/bench.py measures that): arrays of many kinds
round-trip equal and writable, in arguments, results, exceptions and
generator steps; a message over max_frame is refused before it is sent; a
frame whose buffer lengths lie is refused like any bad frame.
"""

from __future__ import annotations

import pickle

import pytest

import wool
from conftest import KEY, decode, frame

np = pytest.importorskip("numpy")


@wool.work
async def echo(x):
    return x


@wool.work
async def describe(x) -> tuple:
    """What the worker received: type, and for arrays, whether it is writable."""
    flags = getattr(x, "flags", None)
    return type(x).__name__, flags.writeable if flags is not None else None


class Carrier(Exception):
    def __init__(self, array):
        super().__init__("carries an array")
        self.array = array


@wool.work
async def fail_with(array):
    raise Carrier(array)


@wool.work
async def chunks(array, n: int):
    for part in np.array_split(array, n):
        reply = yield part
        if reply is not None:
            yield reply * 2


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    big = rng.random((512, 300))  # 1.2 MB, C order
    return {
        "float64 C": big,
        "float64 Fortran": np.asfortranarray(big),
        "non-contiguous slice": big[::3, ::2],
        "int8 3-d": rng.integers(-128, 127, (64, 64, 64), dtype=np.int8),
        "zero-length": np.empty((0, 7)),
        "structured": np.array(
            [(i, i * 0.5, b"x" * 8) for i in range(20_000)],
            dtype=[("id", "i4"), ("value", "f8"), ("tag", "S8")],
        ),
        "small": np.arange(10),
    }


@pytest.fixture
async def pool():
    async with wool.WorkerPool(size=1) as pool:
        yield pool


async def test_arrays_round_trip_equal_and_writable(pool, arrays):
    for name, array in arrays.items():
        back = await echo(array)
        assert back.dtype == array.dtype and back.shape == array.shape, name
        assert np.array_equal(back, array), name
        assert back.flags.writeable, name
        back[...] = back  # writable in place, no copy needed
        assert await describe(array) == ("ndarray", True), name


async def test_bytes_bytearray_and_memoryview_round_trip(pool):
    data = bytes(range(256)) * 4096  # 1 MiB
    assert await echo(data) == data and type(await echo(data)) is bytes
    assert await echo(bytearray(data)) == bytearray(data)
    view = await echo(memoryview(data))
    assert type(view) is memoryview and view == memoryview(data)
    assert await echo(b"small") == b"small"


async def test_containers_of_many_buffers(pool, arrays):
    nested = {"arrays": list(arrays.values()), "more": [np.ones(100_000)] * 5}
    back = await echo(nested)
    for mine, theirs in zip(nested["arrays"] + nested["more"], back["arrays"] + back["more"]):
        assert np.array_equal(mine, theirs)


async def test_an_exception_carrying_an_array_reaches_the_caller(pool, arrays):
    with pytest.raises(Carrier) as caught:
        await fail_with(arrays["float64 C"])
    assert np.array_equal(caught.value.array, arrays["float64 C"])


async def test_generator_steps_carry_buffers_both_ways(pool, arrays):
    big = arrays["float64 C"]
    steps = chunks(big, 3)
    first = await anext(steps)
    assert np.array_equal(first, np.array_split(big, 3)[0])
    doubled = await steps.asend(big)  # a buffer sent into the generator
    assert np.array_equal(doubled, big * 2) and doubled.flags.writeable
    rest = [part async for part in steps]
    assert np.array_equal(np.concatenate([first, *rest]), big)


async def test_a_message_over_max_frame_through_its_buffers_is_refused():
    async with wool.WorkerPool(size=1, max_frame=2**20):
        with pytest.raises(
            TypeError, match=r"echo\(\) and its arguments .* over max_frame \(1 MiB\)"
        ):
            await echo(np.zeros(2**20 // 8 + 1))  # its buffer alone is over


def sealed_buffers_frame(table: bytes, body: bytes) -> bytes:
    """A TASK frame flagged as carrying buffers, with the given table."""
    return frame(wool.TASK | wool.BUFFERS, 1, table + body, wool._Seal(KEY))


@pytest.mark.parametrize(
    "table, why",
    [
        (b"\x00\x00", "a frame's buffer table is cut short"),
        (b"\x00\x00\x00\x02" + (2**40).to_bytes(8, "big") + bytes(8), "2 buffers are longer"),
    ],
)
def test_a_frame_whose_buffer_lengths_lie_is_refused(table, why):
    body = pickle.dumps("x") + bytes(wool.LARGE)
    frames, error, transport = decode([sealed_buffers_frame(table, body)])
    assert why in str(error) and frames == [] and transport.aborted


def test_only_value_frames_may_carry_buffers():
    data = frame(wool.HELLO | wool.BUFFERS, 0, bytes(wool.LARGE + 8), wool._Seal(KEY))
    _, error, _ = decode([data])
    assert str(error) == "frame kind 1 cannot carry buffers"
