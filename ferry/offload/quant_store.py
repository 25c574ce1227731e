"""The quantized host store: quantize once at load, cache the packed layers on disk, reuse them.

The first load packs each checkpoint layer into a scratch buffer (fp32, one layer), quantizes it
into its final uint8 buffer and appends those bytes to a file written under a temporary name,
renamed when complete (an interrupted run leaves nothing behind). Later loads read each layer's
bytes straight into its buffer. Either way one layer is handled at a time, so peak memory stays
near the size of the (quantized) store.

The cache file lives in ferry's cache folder (`$FERRY_CACHE_DIR`, else ~/.cache/ferry) under
`quant/`, keyed by the model's identity (folder, config, weight files' names, sizes and
modification times), the method and the group size.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from ferry.model.quant import QuantLayout, quantize_layer
from ferry.offload.checkpoint import Checkpoint, TensorReader
from ferry.offload.pack import pack_layer
from ferry.offload.sources import cache_dir
from ferry.offload.transfer import host_empty

FORMAT = 1  # bump when the byte layout changes


def cache_file(checkpoint: Checkpoint, q: QuantLayout) -> Path:
    folder = checkpoint.folder.resolve()
    h = hashlib.sha256(f"{FORMAT}|{folder}|{q.bits}|{q.group}".encode())
    h.update((folder / "config.json").read_bytes())
    for file in sorted(set(checkpoint.shard_of.values())):
        st = file.stat()
        h.update(f"|{file.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return cache_dir() / "quant" / f"{folder.name}-int{q.bits}-g{q.group}-{h.hexdigest()[:16]}.bin"


def load_quantized_layers(
    checkpoint: Checkpoint, q: QuantLayout, streamed: set[int], device: torch.device, pin: bool,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], int]:
    """(resident layers on the device, streamed layers in host memory, peak RSS), as uint8 buffers."""
    path = cache_file(checkpoint, q)
    n_layers = checkpoint.config.num_layers
    cached = path.is_file() and path.stat().st_size == n_layers * q.numel
    process = psutil.Process()
    peak = process.memory_info().rss
    resident: dict[int, torch.Tensor] = {}
    host: dict[int, torch.Tensor] = {}
    staging = None if device.type == "cpu" else torch.empty(q.numel, dtype=torch.uint8)
    writer = None if cached else _Writer.open(path)
    make = _layer_reader(path) if cached else _Quantizer(checkpoint, q)
    desc = f"loading int{q.bits} layers" if cached else f"quantizing layers to int{q.bits} (once, cached)"
    try:
        for i in tqdm(range(n_layers), desc=desc, unit="layer", disable=not progress):
            if i in streamed:
                buf = host[i] = host_empty(q.numel, torch.uint8, pin)
            else:
                buf = staging if staging is not None else torch.empty(q.numel, dtype=torch.uint8)
            make(i, buf)
            if writer is not None:
                writer.write(buf)
            if i not in streamed:
                resident[i] = buf.to(device, copy=staging is not None)
            peak = max(peak, process.memory_info().rss)
        if writer is not None:
            writer.commit()
    finally:
        if writer is not None:
            writer.discard()
        if hasattr(make, "close"):
            make.close()
    return resident, host, peak


class _Quantizer:
    """Checkpoint layer i -> its quantized bytes, through one reused scratch layer."""

    def __init__(self, checkpoint: Checkpoint, q: QuantLayout):
        self.checkpoint, self.q = checkpoint, q
        self.reader = TensorReader(checkpoint)
        self.scratch = torch.empty(q.base.numel, dtype=torch.float32)

    def __call__(self, i: int, out: torch.Tensor) -> None:
        pack_layer(self.checkpoint.config, self.q.base, self.reader.get, f"model.layers.{i}.", self.scratch)
        quantize_layer(self.q, self.scratch, out)
        self.reader.close()  # drop the file mappings so their pages leave our resident set

    def close(self) -> None:
        self.reader.close()


def _layer_reader(path: Path):
    f = open(path, "rb")

    def read(i: int, out: torch.Tensor) -> None:
        f.seek(i * out.numel())
        if f.readinto(out.numpy()) != out.numel():
            raise OSError(f"{path} is shorter than expected")

    read.close = f.close  # type: ignore[attr-defined]
    return read


class _Writer:
    """Appends layers to a temporary file; `commit` renames it into place."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(f"{path.name}.partial-{os.getpid()}")
        self.f = open(self.tmp, "wb")

    @classmethod
    def open(cls, path: Path) -> "_Writer | None":
        """None (and a warning) when the cache cannot be written: the load itself still works."""
        try:
            return cls(path)
        except OSError as err:
            warnings.warn(f"cannot write the quantized cache {path} ({err}); quantizing every load")
            return None

    def write(self, buf: torch.Tensor) -> None:
        self.f.write(memoryview(buf.numpy()))

    def commit(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)
