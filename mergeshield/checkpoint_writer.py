"""Writing checkpoints: safetensors files whose headers are planned up front from the tensors'
specs (shapes and dtypes are known before any data), then filled by a read → compute → write
pipeline.

A ``TensorStream`` (what ``TaskVector.apply_lazily`` returns) is computed by element ranges of
``CHUNK_ELEMENTS`` on ``WORKERS`` threads, each reading its inputs' ranges (``pread``) and
computing in float32 while the calling thread writes the chunks before it in order: no tensor
is read twice, halves are computed in float32 chunks and cast back, memory stays at a few chunks
per thread whatever the model's size, and each file is fsynced once, when it is complete. A
tensor that cannot be computed by ranges is computed whole, alone. Any other iterable is written
one tensor at a time as it yields them. Every tensor, whole or chunk, is checked for NaN and
infinity before its bytes are written, and every file is written atomically (``AtomicFile``).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch

from mergeshield import cancellation
from mergeshield.errors import ConfigError, InvalidWeightsError
from mergeshield.file_safety import read_regular
from mergeshield.safetensors_io import (
    INDEX_NAME,
    AtomicFile,
    TensorInfo,
    atomic_write_bytes,
    atomic_write_text,
    check_finite,
    header_bytes,
    write_tensor_bytes,
)
from mergeshield.tensor_stream import TensorStream, ranged

__all__ = ["CHUNK_ELEMENTS", "WORKERS", "save_checkpoint", "write_safetensors"]

# elements per chunk: 4 MiB of float32 per temporary, small enough for malloc to reuse its memory
# (a fresh 100 MiB tensor costs more in page faults than the arithmetic), large enough to spread
# Python's cost per operation (2**18 was slower; docs/decisions.md, "Arithmetic engine")
CHUNK_ELEMENTS = 2**20
WORKERS = 2  # chunks computed at once: one reads while the other computes
AHEAD_BYTES = 8 * 4 * CHUNK_ELEMENTS  # float32 bytes of the chunks in flight, written or not


@dataclass(frozen=True)
class _Job:
    """One tensor, or the element range [start, stop) of one, to compute and write."""

    name: str
    info: TensorInfo
    start: int
    stop: int
    compute: Callable[[], torch.Tensor]
    whole: Callable[[], torch.Tensor]  # the tensor whole: a refused chunk's error names it all

    @property
    def cost(self) -> int:
        return 4 * (self.stop - self.start)  # its float32 temporaries

    @property
    def is_whole(self) -> bool:
        return self.compute is self.whole


def _mismatch(got: str, shape: object, dtype: object, name: str,
              info: TensorInfo) -> ConfigError:
    return ConfigError(
        f"tensor {got!r} ({dtype}, {shape}) does not match the next spec {name!r} "
        f"({info.dtype}, {info.shape}): produce tensors in spec order with the declared dtype "
        "and shape", details={"tensor": got, "expected": name})


def _ended(name: str) -> ConfigError:
    return ConfigError(f"the tensors ended before {name!r}: specs list more tensors than were "
                       "produced", details={"tensor": name})


def _jobs(specs: list[tuple[str, TensorInfo]], stream: TensorStream) -> Iterator[_Job]:
    for name, info in specs:
        got = stream.next_name()
        if got is None:
            raise _ended(name)
        if got != name:
            raise _mismatch(got, "?", "?", name, info)
        whole = partial(stream.whole, name)
        n = math.prod(info.shape)
        part = stream.ranges(name)
        if part is None:
            yield _Job(name, info, 0, n, whole, whole)
            continue
        for start in range(0, n, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, n)
            yield _Job(name, info, start, stop, partial(part, start, stop), whole)


def _computed(job: _Job) -> torch.Tensor:
    """The job's tensor, checked against its spec and for NaN and infinity (on a worker)."""
    t = job.compute()
    shape = tuple(t.shape)
    if t.dtype != job.info.dtype or (shape != job.info.shape if job.is_whole
                                     else t.numel() != job.stop - job.start):
        raise _mismatch(job.name, shape, t.dtype, job.name, job.info)
    try:
        check_finite(job.name, t)  # never write NaN or infinity into an output
    except InvalidWeightsError:
        if not job.is_whole:
            check_finite(job.name, job.whole())  # the error counts the whole tensor
        raise
    return t


def _write_stream(f: IO[bytes], specs: list[tuple[str, TensorInfo]],
                  stream: TensorStream) -> None:
    """Workers compute chunks ahead (up to ``AHEAD_BYTES``) while this thread writes them in
    order. A tensor without ranges is computed here, alone, once everything before it is
    written: its mapping need not be thread-safe (open_clip's conversion caches a fused tensor),
    and memory holds one such tensor, as before the engine. Chunks only ever run ``ranged``
    readers and elementwise torch operations, both safe on several threads."""
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="mergeshield-chunk")
    pending: deque[tuple[_Job, Future[torch.Tensor]]] = deque()
    ahead = 0

    def write(job: _Job, tensor: torch.Tensor) -> None:
        nonlocal ahead
        write_tensor_bytes(f, tensor)
        ahead -= job.cost
        cancellation.check()  # a cancelled scan stops between two chunks

    try:
        for job in _jobs(specs, stream):
            while pending and (job.is_whole or ahead + job.cost > AHEAD_BYTES):
                write(*_result(pending.popleft()))
            ahead += job.cost
            if job.is_whole:
                write(job, _computed(job))
            else:
                pending.append((job, pool.submit(_computed, job)))
        while pending:
            write(*_result(pending.popleft()))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(done: tuple[_Job, Future[torch.Tensor]]) -> tuple[_Job, torch.Tensor]:
    return done[0], done[1].result()


def write_safetensors(path: Path, specs: list[tuple[str, TensorInfo]],
                      tensors: Iterator[tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str]) -> None:
    """Write one file: the header from ``specs``, then each tensor as ``tensors`` yields it (a
    ``TensorStream`` is computed by ranges, several at once)."""
    with AtomicFile(path) as f:
        f.write(header_bytes(specs, metadata))
        if isinstance(tensors, TensorStream):
            _write_stream(f, specs, tensors)
            return
        for name, info in specs:
            got = next(tensors, None)
            if got is None:
                raise _ended(name)
            got_name, tensor = got
            if got_name != name or tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
                raise _mismatch(got_name, tuple(tensor.shape), tensor.dtype, name, info)
            check_finite(got_name, tensor)  # never write NaN or infinity into an output
            write_tensor_bytes(f, tensor)
            del tensor, got  # peak memory: one tensor


SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"


def _plan_shards(specs: list[tuple[str, TensorInfo]],
                 max_shard_bytes: int) -> list[list[tuple[str, TensorInfo]]]:
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for name, info in specs:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
    return shards


def save_checkpoint(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    *,
    specs: Mapping[str, TensorInfo] | None = None,
    config: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Write a Hugging Face layout folder; with ``specs``, one tensor in memory at a time.

    ``specs`` (name → dtype/shape, in write order) lets the headers be computed up front, so each
    tensor the iterable yields goes straight to disk (a ``TensorStream`` or a mapping: by chunks,
    on several threads). Without it the tensors are collected first.
    Above ``max_shard_bytes`` the weights are sharded like transformers does, with an index.
    Every file is written atomically; the list of written files is returned.
    """
    out = Path(out_dir)
    items: Iterator[tuple[str, torch.Tensor]]
    if isinstance(tensors, Mapping):
        mapping: Mapping[str, torch.Tensor] = tensors
        info = getattr(mapping, "info", None)
        if specs is None:
            specs = {k: info(k) if callable(info) else TensorInfo.of(mapping[k]) for k in mapping}
        items = TensorStream(list(specs), mapping.__getitem__, partial(ranged, mapping))
    elif specs is None:
        listed = list(tensors)
        specs = {k: TensorInfo.of(t) for k, t in listed}
        items = iter(listed)
    else:
        items = iter(tensors)
    spec_list = [(k, TensorInfo(v.dtype, tuple(v.shape),
                                math.prod(v.shape) * torch.empty((), dtype=v.dtype).element_size()))
                 for k, v in specs.items()]
    meta = {"format": "pt", **dict(metadata or {})}
    shards = _plan_shards(spec_list, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [SHARD_NAME.format(i=i + 1, n=len(shards)) for i in range(len(shards))])
    written: list[Path] = []
    try:
        for name, shard in zip(names, shards, strict=True):
            write_safetensors(out / name, shard, items, meta)
            written.append(out / name)
    except BaseException:
        for path in written:  # a refused tensor in a later shard: no half checkpoint stays
            path.unlink(missing_ok=True)
        raise
    more = items.next_name() if isinstance(items, TensorStream) else next(items, None)
    if more is not None:
        raise ConfigError("more tensors were produced than specs list; pass a spec for each")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for _, i in spec_list)},
                 "weight_map": {k: n for n, shard in zip(names, shards, strict=True)
                                for k, _ in shard}}
        atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(out / INDEX_NAME)
    _remove_stale_weights(out, {p.name for p in written})
    if config is not None:
        text = json.dumps(dict(config), indent=2, allow_nan=False)  # strict JSON, no bare NaN
        atomic_write_text(out / "config.json", text + "\n")
        written.append(out / "config.json")
    for fname, src in (extra_files or {}).items():
        if Path(fname).name != fname or fname in {"config.json", INDEX_NAME}:
            raise ConfigError(f"extra file name {fname!r} must be a plain file name that does "
                              "not replace the weights or config", details={"file": fname})
        atomic_write_bytes(out / fname, read_regular(Path(src)))  # never a FIFO or device
        written.append(out / fname)
    return written


def _remove_stale_weights(out: Path, keep: set[str]) -> None:
    """Drop weight files of an earlier, differently sharded write so loaders see one layout."""
    for path in out.iterdir():
        stale = path.name == "model.safetensors" or path.name == INDEX_NAME or (
            path.name.startswith("model-") and path.name.endswith(".safetensors"))
        if stale and path.name not in keep:
            path.unlink()
