"""Property-based fuzzing of the safetensors header validation (``safetensors_io``).

The property, for any input: ``read_header`` / ``parse_header`` either return a header that is
consistent (tensors tile the data region in order, each tensor's bytes match its dtype and shape,
the safetensors library reads the same tensors) or raise ``CorruptCheckpointError``; never another
exception, and never memory in proportion to a size the input claims (a 1 TB claim costs
nothing). Three input sources: arbitrary bytes, arbitrary (mostly near-valid) JSON headers over a
claimed data region of up to 2**50 bytes, and mutations of a valid file.

At 150 examples each these reach every line of ``parse_header``, ``_entry`` and ``read_header``
except the metadata bomb (a 1 MiB seed; the corpus tests it) and the two I/O races. atheris
(libFuzzer, seeded with a valid file and a JSON dictionary, 1.3 M executions in 45 s) reached no
line these do not, so it is not a dependency.

``PROPERTIES`` is what ``tests/mergeshield/test_safetensors_io.py`` runs with a small budget and
``bench/reliability.py`` with a large one.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mergeshield.errors import CorruptCheckpointError
from mergeshield.safetensors_io import DTYPES, SafetensorsHeader, parse_header, read_header
from tests.support.hostile import corpus

PEAK_BYTES = 8 * 2**20  # what one parse may allocate, whatever the input claims
_DIR = Path(tempfile.mkdtemp(prefix="mergeshield-fuzz-"))
atexit.register(shutil.rmtree, _DIR, True)


def _consistent(header: SafetensorsHeader, data_size: int) -> None:
    end = 0
    for name, entry in header.tensors.items():  # in data-offset order, without holes
        assert name and entry.begin == end and entry.end >= entry.begin
        itemsize = torch.empty((), dtype=entry.info.dtype).element_size()
        assert entry.end - entry.begin == entry.info.nbytes == math.prod(entry.info.shape) \
            * itemsize
        end = entry.end
    assert end == data_size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())


def _bounded(parse: Callable[[], SafetensorsHeader | None]) -> SafetensorsHeader | None:
    """Run ``parse``; None for a CorruptCheckpointError; assert the peak allocation."""
    tracemalloc.start()
    try:
        return parse()
    except CorruptCheckpointError:
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"parsing allocated {peak} bytes"


def check_file(blob: bytes) -> bool:
    """The property on a whole file (True: accepted, then also read by the safetensors library)."""
    path = _DIR / "fuzz.safetensors"
    path.write_bytes(blob)
    header = _bounded(lambda: read_header(path))
    if header is None:
        return False
    _consistent(header, len(blob) - header.data_start)
    with safe_open(str(path), "pt") as f:  # differential: the reference reader agrees
        assert sorted(f.keys()) == sorted(header.tensors)
        for name, entry in header.tensors.items():
            t = f.get_tensor(name)
            assert (t.dtype, tuple(t.shape)) == (entry.info.dtype, entry.info.shape)
    return True


def check_header(raw: bytes, data_size: int) -> bool:
    """The property on header bytes over a claimed data region (nothing that large exists)."""
    header = _bounded(lambda: parse_header(_DIR / "claimed.safetensors", raw, data_size))
    if header is not None:
        _consistent(header, data_size)
    return header is not None


# -- strategies ----------------------------------------------------------------------------------
_ints = st.one_of(st.integers(-2, 64), st.integers(-2**70, 2**70),
                  st.sampled_from([0, 2**31, 2**32, 2**40, 2**63 - 1, 2**64]))
_json = st.recursive(st.none() | st.booleans() | st.floats() | _ints | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
_dtype = st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(["Q4", "f32", "", "F32 "]),
                   _json)


@st.composite
def _entries(draw: st.DrawFn) -> tuple[bytes, int]:
    """Header text of entries, most valid and tiling the data region, some shifted (overlaps,
    holes), some with a byte count that disagrees, some chaos; names may repeat (the text is
    written by hand, so duplicate keys reach the parser); rarely not an object at all."""
    if draw(st.integers(0, 19)) == 0:
        return json.dumps(draw(_json)).encode(), draw(_ints.filter(lambda n: n >= 0))
    parts: list[str] = []
    offset = 0
    for i in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["valid", "shifted", "valid", "resized", "valid", "chaos",
                                     "valid", "chaos", "valid", "valid"]))
        nudge = draw(st.integers(1, 8)) * draw(st.sampled_from([-1, 1]))  # never 0
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        size = DTYPES[dtype].itemsize * math.prod(shape)
        begin = offset + (nudge if kind == "shifted" else 0)
        end = begin + size + (nudge if kind == "resized" else 0)
        spec: Any = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        if kind == "chaos":
            spec = draw(st.one_of(
                st.fixed_dictionaries({"dtype": _dtype, "shape": st.one_of(
                    st.lists(_ints, max_size=3), _json), "data_offsets": st.one_of(
                    st.lists(_ints, max_size=3), _json)}), _json))
        offset += size
        pick = draw(st.integers(0, 9))  # mostly unique; sometimes a repeat or any text
        name = "t0" if pick == 9 else draw(st.text(max_size=4)) if pick == 8 else f"t{i}"
        parts.append(f"{json.dumps(name)}:{json.dumps(spec)}")
    if draw(st.booleans()):
        meta = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=8),
                                              max_size=3), _json))
        parts.insert(draw(st.integers(0, len(parts))), f'"__metadata__":{json.dumps(meta)}')
    data_size = draw(st.one_of(st.just(offset), _ints.filter(lambda n: n >= 0)))
    return ("{" + ",".join(parts) + "}").encode(), data_size


def _valid() -> bytes:
    entries = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 3],
                                                        "data_offsets": [0, 24]},
               "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
               "c": {"dtype": "I8", "shape": [0], "data_offsets": [32, 32]}}
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(32))


VALID = _valid()


def _seeds() -> list[bytes]:
    """A valid file and every malformed safetensors file of the hostile corpus (the small ones)."""
    out = [VALID]
    for case in corpus():
        if case.kind == "safetensors":
            path = case.make(_DIR / "seeds" / case.name, _DIR / "canary")
            if path.stat().st_size < 2**16:
                out.append(path.read_bytes())
    return out


SEEDS = _seeds()


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A seed (valid, or a corpus case) with byte flips, a cut, an insertion or a rewritten
    length field; sometimes the seed as it is."""
    blob = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(blob)))
        if op == 0 and blob:
            blob[pos % len(blob)] = draw(st.integers(0, 255))
        elif op == 1:
            del blob[pos:]
        elif op == 2:
            blob[pos:pos] = draw(st.binary(max_size=16))
        elif op == 3:
            blob[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
        else:
            blob[pos:pos] = draw(st.sampled_from([b'"', b"{", b"}", b",", b"\\u0000", b"1e999",
                                                  b'"a":', b"-", b"\xff"]))
    return bytes(blob)


@dataclass(frozen=True)
class Property:
    name: str
    describe: str
    run: Callable[[int], tuple[int, int]]  # max examples -> (examples, accepted); raises on a
    # failure (after shrinking it)


def _property(strategy: st.SearchStrategy[Any], check: Callable[..., bool],
              star: bool = False) -> Callable[[int], tuple[int, int]]:
    def run(max_examples: int) -> tuple[int, int]:
        count = [0, 0]

        @settings(max_examples=max_examples, derandomize=True, database=None, deadline=2000,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def prop(value: Any) -> None:
            count[0] += 1
            count[1] += check(*value) if star else check(value)

        prop()
        return count[0], count[1]
    return run


PROPERTIES = [
    Property("arbitrary-bytes", "arbitrary bytes as a whole .safetensors file",
             _property(st.one_of(st.binary(max_size=256), st.binary(min_size=8, max_size=8).map(
                 lambda b: b + b"{}")), check_file)),
    Property("arbitrary-json-header", "arbitrary near-valid JSON headers over a claimed data "
             "region of up to 2**70 bytes", _property(_entries(), check_header, star=True)),
    Property("mutated-file", "byte flips, cuts, insertions and length rewrites of a valid file "
             "and of the corpus's malformed ones (checked against the safetensors library when "
             "accepted)",
             _property(_mutated(), check_file)),
]
