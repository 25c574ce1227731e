"""CATS calibration: per-layer |SiLU(gate)| quantiles on the sample text shipped with ferry.

Computed once per model and dtype (with a progress bar) and cached as a small JSON file of 101
quantiles per layer, so any sparsity's thresholds are a lookup afterwards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from ferry.model.forward import forward
from ferry.offload.sources import cache_dir
from ferry.model.kv_cache import KVCache
from ferry.model.rope import rope_for
from ferry.sparse.cats import MAX_SAMPLES, sample_abs

CALIBRATION_TEXT = Path(__file__).resolve().parent / "calibration.txt"
CHUNK_TOKENS = 256
LEVELS = 100  # quantiles at 0%, 1%, ..., 100%


def thresholds_for(table: list[list[float]], sparsity: float) -> list[float]:
    """Per-layer thresholds dropping `sparsity` of activations, interpolated in the table."""
    pos = sparsity * LEVELS
    lo = int(pos)
    hi = min(lo + 1, LEVELS)
    frac = pos - lo
    return [row[lo] * (1 - frac) + row[hi] * frac for row in table]


def calibration_file(folder: Path, dtype: torch.dtype, variant: str = "none") -> Path:
    """variant: the weights' quantization (thresholds follow the weights that compute them)."""
    config = (folder / "config.json").read_bytes()
    extra = b"" if variant == "none" else variant.encode()
    key = hashlib.sha256(str(folder.resolve()).encode() + config + str(dtype).encode() + extra).hexdigest()[:16]
    return cache_dir() / "cats" / f"{key}.json"


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
    path = calibration_file(folder, dtype, variant)
    if path.is_file():
        try:
            return json.loads(path.read_text())["quantiles"]
        except (json.JSONDecodeError, KeyError):
            pass  # a damaged cache file is recomputed
    table = quantile_table(cfg, weights, tokenizer, dtype, device, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": str(folder), "dtype": str(dtype), "quantiles": table}))
    tmp.replace(path)
    return table
