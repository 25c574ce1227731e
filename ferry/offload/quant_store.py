"""The quantized host store: quantize once at load, cache the packed layers on disk, reuse them.

The first load packs each checkpoint layer straight into its final uint8 buffer (weights the
checkpoint already stores in matching groups are copied, the rest quantized matrix by matrix)
and appends those bytes to a cache file written under an exclusive temporary name (see
`cache_files`), renamed when complete. Later loads read each layer's bytes
straight into its buffer. Either way one layer is handled at a time, so peak memory stays near the
size of the (quantized) store.

The cache file lives in ferry's cache folder (`$FERRY_CACHE_DIR`, else ~/.cache/ferry) under
`quant/`. Its name is keyed by its header: ferry's version, the model's identity (folder, config,
weight files' names, sizes and modification times), the bits, the group size and fitting. The header is
also stored in the file, after the layers, with a CRC32 of each layer: a file whose header differs
or whose bytes do not match their checksums is warned about and rebuilt, never used. A cache that
cannot be written (full disk, read-only folder) costs a warning, not the run.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from ferry.model.quant import QuantLayout
from ferry.offload import cache_files
from ferry.offload.checkpoint import Checkpoint, TensorReader
from ferry.offload.pack import pack_quant_layer
from ferry.offload.sources import cache_dir
from ferry.offload.pinned import host_empty

FORMAT = 5  # bump when the byte layout changes (5: records padded to 16 bytes)
MAGIC = b"FERRYQ04"
_TAIL = struct.Struct("<Q8s")  # trailer length, magic: the file's last 16 bytes


class _Damaged(Exception):
    """A cached layer's bytes do not match its checksum."""


def cache_header(checkpoint: Checkpoint, q: QuantLayout, fit: bool) -> dict:
    folder = checkpoint.folder.resolve()
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    shards = cache_files.file_identity(set(checkpoint.shard_of.values()))
    settings = {"bits": q.bits, "group": q.group, "fit": fit, "layer_bytes": q.numel,
                "layers": checkpoint.config.num_layers}
    return cache_files.header(FORMAT, [str(folder), config, shards], settings)


def cache_file(checkpoint: Checkpoint, q: QuantLayout, fit: bool) -> Path:
    key = hashlib.sha256(json.dumps(cache_header(checkpoint, q, fit), sort_keys=True).encode()).hexdigest()
    name = checkpoint.folder.resolve().name
    return cache_dir() / "quant" / f"{name}-int{q.bits}-g{q.group}-{key[:16]}.bin"


def _checksum(buf: torch.Tensor) -> int:
    return zlib.crc32(memoryview(buf.numpy()))


def load_quantized_layers(
    checkpoint: Checkpoint, q: QuantLayout, streamed: set[int], device: torch.device, pin: bool,
    progress: bool = True, fit: bool = True,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], int]:
    """(resident layers on the device, streamed layers in host memory, peak RSS), as uint8 buffers."""
    path = cache_file(checkpoint, q, fit)
    cache_files.sweep_partials(path.parent)  # what killed runs left behind
    head = cache_header(checkpoint, q, fit)
    sums = _cached_checksums(path, head)
    if sums is not None:
        try:
            return _load(checkpoint, q, streamed, device, pin, progress, path, head, sums, fit)
        except _Damaged as err:
            cache_files.warn(f"the quantized cache {path} is damaged ({err}); rebuilding it")
    return _load(checkpoint, q, streamed, device, pin, progress, path, head, None, fit)


def _cached_checksums(path: Path, head: dict) -> list[int] | None:
    """The layer checksums of a cache file matching `head`; None (warned) for a stale one."""
    try:
        stored, body, magic = read_trailer(path)
        if magic != MAGIC or body != head["settings"]["layers"] * head["settings"]["layer_bytes"]:
            raise ValueError("wrong size or not a ferry cache of this format")
        sums = stored.pop("checksums")
        if stored != head or len(sums) != head["settings"]["layers"]:
            raise ValueError("written for other settings or another ferry version")
        return sums
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        cache_files.warn(f"ignoring the quantized cache {path} ({err}); rebuilding it")
        return None


def read_trailer(path: Path) -> tuple[dict, int, bytes]:
    """(the header stored after the layers, with their checksums; the layers' byte count; the
    magic, which names the format). Every format so far ends this way."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < _TAIL.size:
            raise ValueError("too short for a ferry cache")
        f.seek(size - _TAIL.size)
        length, magic = _TAIL.unpack(f.read(_TAIL.size))
        if not magic.startswith(MAGIC[:6]) or length > size - _TAIL.size:
            raise ValueError("not a ferry cache")
        f.seek(size - _TAIL.size - length)
        return json.loads(f.read(length)), size - _TAIL.size - length, magic


def _stored_header(path: Path) -> dict:
    stored = read_trailer(path)[0]
    stored.pop("checksums", None)
    return stored


def _load(checkpoint, q, streamed, device, pin, progress, path, head, sums, fit):
    n_layers = checkpoint.config.num_layers
    process = psutil.Process()
    peak = process.memory_info().rss
    resident: dict[int, torch.Tensor] = {}
    host: dict[int, torch.Tensor] = {}
    staging = None if device.type == "cpu" else torch.empty(q.numel, dtype=torch.uint8)
    writer = None if sums is not None else _Writer.open(path, head)
    make = _LayerReader(path, sums) if sums is not None else _Quantizer(checkpoint, q, fit)
    desc = f"loading int{q.bits} layers" if sums is not None else f"packing layers as int{q.bits} (once, cached)"
    try:
        for i in tqdm(range(n_layers), desc=desc, unit="layer", disable=not progress):
            if i in streamed:
                buf = host[i] = host_empty(q.numel, torch.uint8, pin)
            else:
                buf = staging if staging is not None else torch.empty(q.numel, dtype=torch.uint8)
            make(i, buf)
            if writer is not None and not writer.write(buf):
                writer = None
            if i not in streamed:
                resident[i] = buf.to(device, copy=staging is not None)
            peak = max(peak, process.memory_info().rss)
        if writer is not None and writer.commit():  # caches this one replaces, or of deleted models
            cache_files.prune(path.parent.iterdir(), path, head, _stored_header)
    finally:
        if writer is not None:
            writer.discard()
        make.close()
    return resident, host, peak


class _Quantizer:
    """Checkpoint layer i -> its quantized bytes (a source's matching groups are kept as stored)."""

    def __init__(self, checkpoint: Checkpoint, q: QuantLayout, fit: bool):
        self.checkpoint, self.q, self.fit = checkpoint, q, fit
        self.reader = TensorReader(checkpoint)
        self.redone: set[str] = set()

    def __call__(self, i: int, out: torch.Tensor) -> None:
        self.redone |= pack_quant_layer(self.checkpoint.config, self.q, self.reader, f"model.layers.{i}.",
                                        out, self.fit)
        self.reader.close()  # drop the file mappings so their pages leave our resident set

    def close(self) -> None:
        self.reader.close()
        if self.redone:
            cache_files.warn(f"{', '.join(sorted(self.redone))}: the checkpoint's groups are not "
                             f"int{self.q.bits} groups of {self.q.group}; quantized again from their values")


class _LayerReader:
    """Cached layer i -> its buffer, checked against the layer's checksum."""

    def __init__(self, path: Path, sums: list[int]):
        self.path, self.sums, self.f = path, sums, open(path, "rb")

    def __call__(self, i: int, out: torch.Tensor) -> None:
        self.f.seek(i * out.numel())
        if self.f.readinto(out.numpy()) != out.numel():
            raise _Damaged(f"layer {i} is short")
        if _checksum(out) != self.sums[i]:
            raise _Damaged(f"layer {i} does not match its checksum")

    def close(self) -> None:
        self.f.close()


class _Writer:
    """Appends layers to an exclusive temporary file; `commit` adds the header and renames it.

    Any OSError (full disk, read-only folder) warns and drops the cache: the load goes on.
    """

    def __init__(self, path: Path, head: dict):
        self.path, self.head, self.sums = path, head, []
        self.seen = cache_files.stat_key(path)
        self.f, self.tmp = cache_files.create_partial(path)

    @classmethod
    def open(cls, path: Path, head: dict) -> "_Writer | None":
        try:
            return cls(path, head)
        except OSError as err:
            cache_files.warn(f"cannot write the quantized cache {path} ({err}); quantizing every load")
            return None

    def write(self, buf: torch.Tensor) -> bool:
        try:
            self.f.write(memoryview(buf.numpy()))
            self.sums.append(_checksum(buf))
            return True
        except OSError as err:
            self._give_up(err)
            return False

    def commit(self) -> bool:
        """True when this file is now the cache (False: it could not be written, or another
        writer finished first and its file stays)."""
        try:
            trailer = json.dumps({**self.head, "checksums": self.sums}).encode()
            self.f.write(trailer + _TAIL.pack(len(trailer), MAGIC))
            cache_files.fsync_file(self.f)
            self.f.close()
            return cache_files.commit_file(self.tmp, self.path, self.seen)
        except OSError as err:
            self._give_up(err)
            return False

    def _give_up(self, err: OSError) -> None:
        cache_files.warn(f"cannot write the quantized cache {self.path} ({err}); continuing uncached")
        self.discard()

    def discard(self) -> None:
        if not self.f.closed:
            try:
                self.f.close()
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)
