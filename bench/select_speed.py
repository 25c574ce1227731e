"""Griffin's neuron selection per prompt: what a new prompt and a follow-up turn cost.

After the prefill, Griffin reorders every layer's neurons so the kept ones form a prefix
(`select_s` in a generation's stats). Two parts:

1. The default model, sparse mode at `--sparsity`, loaded four ways (bf16 and int4, every layer
   resident or every layer streamed with its selected prefix on the device): the median
   `select_s` of a new prompt (no prefix reuse) and of a follow-up turn that extends the last
   prompt and answer (Griffin adds the new tokens' scores to the old).
2. One Llama-3.1-70B int4 (groups of 128) layer's neuron records, 28672 records of 12,816 bytes
   (the layout's own size, from the config in tests/data) in host memory: a reorder that gathers every row and copies the layer back (the baseline), against
   gathering and scattering only the rows an order moves, for the moved fractions measured in
   part 1 (interleaved, medians).

    python bench/select_speed.py [--runs 5] [--sparsity 0.5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import ferry
from ferry.kernels.gather import gather_rows, moved_rows, scatter_rows
from ferry.model.config import ModelConfig
from ferry.model.quant import QuantConfig, QuantLayout
from ferry.offload.layer_store import LayerStore

PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Name three rivers in Europe and say which sea each one flows into."]
CONFIGS = {"bf16 resident": dict(quant="none"), "int4 resident (packed)": dict(quant="auto"),
           "bf16 prefixes on device": dict(quant="none", gpu_memory="400MiB"),
           "int4 prefixes on device": dict(quant="auto", gpu_memory="200MiB")}
LLAMA_70B = Path(__file__).resolve().parents[1] / "tests" / "data" / "llama-3.1-70b-config.json"


def layer_records() -> tuple[int, int]:
    """Records a Llama-3.1-70B int4 G128 layer holds, and the bytes of one."""
    from transformers import LlamaConfig

    cfg = ModelConfig.from_hf(LlamaConfig(**json.loads(LLAMA_70B.read_text())))
    layout = QuantLayout.for_config(cfg, QuantConfig("int4", group_size=128))
    return cfg.intermediate_size, layout.row_numel


def engine_selection(args, moved: dict) -> dict:
    """Median select_s of new prompts and follow-ups per configuration; `moved` collects the
    fraction of rows each selection moves."""
    reorder = LayerStore.reorder_neurons

    def counting(self, orders, rows):
        moved.setdefault(counting.turn, []).extend(moved_rows(o).numel() / o.numel() for o in orders)
        return reorder(self, orders, rows)
    LayerStore.reorder_neurons = counting
    rows = {}
    try:
        for name, options in CONFIGS.items():
            engine = ferry.load(device="cpu", progress=False, mode="sparse", sparsity=args.sparsity, **options)
            if name.endswith("device"):
                assert engine.plan.prefix_layers, f"{name}: no selected prefix stays on the device"
            new, follow = [], []
            for run in range(args.runs + 1):  # the first warms up
                prompt = PROMPTS[run % 2]
                engine.reset()
                counting.turn = "new prompt"
                one = engine.generate(prompt, max_new_tokens=8, ignore_eos=True, chat=False)
                counting.turn = "follow-up"
                two = engine.generate(prompt + one.text + " Then", max_new_tokens=2, ignore_eos=True, chat=False)
                if run:
                    new.append(one.stats.select_s)
                    follow.append(two.stats.select_s)
            rows[name] = dict(new_prompt_s=statistics.median(new), follow_up_s=statistics.median(follow))
            engine.close()
    finally:
        LayerStore.reorder_neurons = reorder
    return rows


def record_reorder(args, fractions: dict) -> dict:
    """ms to reorder one 70B layer's records: every row (baseline) against the moved rows only."""
    rows, record = layer_records()
    records = torch.randint(0, 255, (rows, record), dtype=torch.uint8)
    staging = torch.zeros_like(records)
    orders = {}
    for turn, fraction in fractions.items():
        order, pairs = torch.arange(rows), torch.randperm(rows)[:int(fraction * rows) // 2 * 2].view(2, -1)
        order[pairs[0]], order[pairs[1]] = pairs[1], pairs[0]
        orders[turn] = (order, moved_rows(order))
    times = {"every row": []} | {turn: [] for turn in orders}
    for _ in range(args.runs):
        start = time.perf_counter()
        gather_rows(records, orders["new prompt"][0], staging)
        records.copy_(staging)
        times["every row"].append(time.perf_counter() - start)
        for turn, (order, places) in orders.items():
            start = time.perf_counter()
            held = staging[:places.numel()]
            gather_rows(records, order[places], held)
            scatter_rows(held, places, records)
            times[turn].append(time.perf_counter() - start)
    return {turn: statistics.median(t) for turn, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    moved = {}
    engines = engine_selection(args, moved)
    fractions = {turn: statistics.mean(f) for turn, f in moved.items()}
    layer = record_reorder(args, fractions)
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, {args.runs} runs")
    print(f"default model, sparsity {args.sparsity}: select ms (median)")
    print(f"{'engine':<26}{'new prompt':>12}{'follow-up':>12}")
    for name, row in engines.items():
        print(f"{name:<26}{row['new_prompt_s'] * 1e3:12.1f}{row['follow_up_s'] * 1e3:12.1f}")
    print("rows a selection moves: " + ", ".join(f"{turn} {f:.0%}" for turn, f in fractions.items()))
    rows, record = layer_records()
    print(f"one 70B int4 layer's records ({rows} of {record} bytes, {rows * record / 1e6:.0f} MB): reorder ms (median)")
    print(f"  gather every row and copy back: {layer['every row'] * 1e3:.1f}")
    for turn, fraction in fractions.items():
        print(f"  moved rows only, {turn} ({fraction:.0%} moved): {layer[turn] * 1e3:.1f}"
              f" ({layer['every row'] / layer[turn]:.1f}x less)")
    print(json.dumps(dict(bench="select_speed", engines=engines, moved_fraction=fractions, layer_70b_ms=
                          {k: v * 1e3 for k, v in layer.items()}, runs=args.runs, threads=torch.get_num_threads())))


if __name__ == "__main__":
    main()
