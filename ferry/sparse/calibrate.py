"""CATS calibration: per-layer |SiLU(gate)| quantiles on the sample text shipped with ferry.

Computed once per model and dtype (with a progress bar) and cached as a small JSON file of 101
quantiles per layer, so any sparsity's thresholds are a lookup afterwards. The file carries its
header (ferry's version, the weight files' names, sizes and mtimes, dtype, weight variant); one
that does not match is recomputed. A cache that cannot be written warns: the thresholds computed
are still used.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from ferry.model.forward import forward
from ferry.offload import cache_files
from ferry.offload.sources import cache_dir
from ferry.model.kv_cache import KVCache
from ferry.model.rope import rope_for
from ferry.sparse.cats import MAX_SAMPLES, sample_abs

CALIBRATION_TEXT = Path(__file__).resolve().parent / "calibration.txt"
CHUNK_TOKENS = 256
LEVELS = 100  # quantiles at 0%, 1%, ..., 100%
FORMAT = 2  # bump when the file's layout or the way quantiles are computed changes


def thresholds_for(table: list[list[float]], sparsity: float) -> list[float]:
    """Per-layer thresholds dropping `sparsity` of activations, interpolated in the table."""
    pos = sparsity * LEVELS
    lo = int(pos)
    hi = min(lo + 1, LEVELS)
    frac = pos - lo
    return [row[lo] * (1 - frac) + row[hi] * frac for row in table]


def calibration_header(folder: Path, dtype: torch.dtype, variant: str = "none") -> dict:
    """What the thresholds depend on: the weights (files, config), dtype and weight variant.

    variant: the weights' quantization, with its group size when known (thresholds follow the
    weights that compute them).
    """
    folder = folder.resolve()
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    shards = cache_files.file_identity(folder.glob("*.safetensors"))
    text = hashlib.sha256(CALIBRATION_TEXT.read_bytes()).hexdigest()[:16]
    settings = {"dtype": str(dtype), "variant": variant, "text": text, "chunk": CHUNK_TOKENS, "levels": LEVELS}
    return cache_files.header(FORMAT, [str(folder), config, shards], settings)


def calibration_file(folder: Path, dtype: torch.dtype, variant: str = "none") -> Path:
    head = json.dumps(calibration_header(folder, dtype, variant), sort_keys=True)
    return cache_dir() / "cats" / f"{hashlib.sha256(head.encode()).hexdigest()[:16]}.json"


def quantile_table(cfg, weights, tokenizer, dtype, device, progress: bool = True) -> list[list[float]]:
    """Run the full model over the calibration text and tabulate |SiLU(gate)| quantiles."""
    ids = tokenizer(CALIBRATION_TEXT.read_text(encoding="utf-8"))["input_ids"]
    chunks = [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]
    cache = KVCache(cfg, CHUNK_TOKENS, dtype, device)
    rope = rope_for(cfg, CHUNK_TOKENS, dtype, device)
    per_chunk = MAX_SAMPLES // max(1, len(chunks))
    samples: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]

    def observe(layer: int, a: torch.Tensor, z: torch.Tensor) -> None:
        samples[layer].append(sample_abs(a, per_chunk))

    for chunk in tqdm(chunks, desc="calibrating CATS thresholds", unit="chunk", disable=not progress):
        cache.reset()
        tokens = torch.tensor(chunk, dtype=torch.long, device=device)
        forward(cfg, weights, rope, cache, tokens, 0, all_logits=False, observe_mlp=observe)
    levels = torch.linspace(0, 1, LEVELS + 1)
    table = []
    for layer_samples in samples:
        values = torch.cat(layer_samples).sort().values
        index = (levels * (values.numel() - 1)).round().long()
        table.append(values[index].tolist())
    return table


def load_or_calibrate(folder: Path, cfg, weights, tokenizer, dtype, device, progress=True,
                      variant: str = "none") -> list[list[float]]:
    head = calibration_header(folder, dtype, variant)
    path = calibration_file(folder, dtype, variant)
    cache_files.sweep_partials(path.parent)
    table = _cached_table(path, head, cfg.num_layers)
    if table is not None:
        return table
    table = quantile_table(cfg, weights, tokenizer, dtype, device, progress)
    if cache_files.write_text_or_warn(path, json.dumps({**head, "quantiles": table}), "the CATS thresholds"):
        cache_files.prune(path.parent.iterdir(), path, head, _stored_header)  # what this replaces
    return table


def _stored_header(path: Path) -> dict:
    stored = json.loads(path.read_text())
    stored.pop("quantiles", None)
    return stored


def _cached_table(path: Path, head: dict, n_layers: int) -> list[list[float]] | None:
    """The cached quantiles when the file's header matches `head`; else None (warned)."""
    try:
        stored = json.loads(path.read_text())
        table = stored.pop("quantiles")
        if stored != head or len(table) != n_layers or any(len(row) != LEVELS + 1 for row in table):
            raise ValueError("written for other weights, settings or ferry version")
        return table
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"ignoring the CATS threshold cache {path} ({err}); recalibrating")
        return None
