"""GPU suite: the link's pinned peak, then ferry's schedules (bf16, and int4 dense and Sirius) and
the transformers + accelerate offload baseline on a randomly initialised Llama-3-8B-shaped model,
each measured beside the cost model's prediction for the same plan and the measured card; then
every layer resident, each step kind (dense and sparse, bf16 and int4) against the bytes it
reads divided by the measured read bandwidth, with its kernel launches per step; then the
in-place int4/int8 kernels against their reference and a device copy (`gemv_check.py`). Nothing
is downloaded.

    python bench/gpu_suite.py [--report gpu_suite.json] [--folder /tmp/ferry-random-8b]
    python bench/gpu_suite.py --tiny     # CPU: a small shape over an emulated link (a check, not a benchmark)

The 8B model takes 15 GiB in bf16, so a 24 GiB budget would hold all of it and nothing would
stream; the default budget, 4 GiB, leaves about the share of layers streaming that a 70B model
has on a 24 GiB card. Prints the ceilings first, then a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling gemv_check.py, however loaded

import ferry  # noqa: E402
from gemv_check import check as check_kernels, report as report_kernels, seconds  # noqa: E402
from ferry.kernels import decode_gpu, gemv  # noqa: E402
from ferry.scheduler import step_graphs  # noqa: E402
from ferry.offload.costmodel import GPUS, Gpu, predict_for_plan  # noqa: E402
from ferry.offload.planner import parse_size  # noqa: E402

SHAPES = {  # Llama-3-8B's shape, its widths with few layers (CPU step timings), and a small one for CPU checks
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b-layers": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=2048),
}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def word_tokenizer(vocab: int):
    """One word per id ("w000000" ...: fixed width, so no word contains the end-of-sequence
    word), so every id the random model emits decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i:06d}": i for i in range(vocab)}, unk_token="w000000"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w000000", eos_token="w000001")


def write_random_llama(folder: Path, shape: str, device: str, seed: int = 0) -> Path:
    """A safetensors folder (one shard per layer, with an index) of random weights; reused when it
    already holds the same shape.

    Random weights mean nothing, but whether the sparse model's drafts survive the full pass
    decides what a correction schedule costs. So the residual stream is made to dominate: unit
    embeddings, lm_head equal to them, and the projections back into the stream (o, down) 10x
    smaller than the others (std 0.002 against 0.02). Both models then predict the same peaked
    token and keep nearly every draft, the regime of the published 70B runs (AAL near K); the
    suite reports the AAL it measured and predicts with it."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    marker = folder / "ferry-random.json"
    identity = {"shape": shape, "seed": seed, "scheme": "residual-dominated", "words": 6}
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    cfg = LlamaConfig(**s, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    cfg.save_pretrained(folder)
    word_tokenizer(s["vocab_size"]).save_pretrained(folder)
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i, kv = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"] * s["num_key_value_heads"]

    def rand(rows: int, cols: int, std: float = 0.02) -> torch.Tensor:  # made on the device (fast for 8B)
        return (torch.randn(rows, cols, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, folder / name)
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    ones = torch.ones(h, dtype=torch.bfloat16)
    embed = rand(s["vocab_size"], h, 1.0)
    shard("embed.safetensors", {"model.embed_tokens.weight": embed})
    for n in range(s["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shard(f"layer-{n:03d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h, 0.002),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i, 0.002), p + "input_layernorm.weight": ones.clone(),
            p + "post_attention_layernorm.weight": ones.clone()})
        log(f"wrote layer {n + 1}/{s['num_hidden_layers']}")
    shard("head.safetensors", {"model.norm.weight": ones.clone(), "lm_head.weight": embed.clone()})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    marker.write_text(json.dumps(identity))
    return folder


def _timer(device: str):
    """seconds(fn): one fn()'s time, with CUDA events on the GPU."""
    return partial(seconds, device)


def link_peak_gbps(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Host->device GB/s of one large copy from pinned memory (median of reps)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    timer = _timer("cuda")
    dst.copy_(src, non_blocking=True)  # warm up
    return nbytes / statistics.median(timer(lambda: dst.copy_(src, non_blocking=True)) for _ in range(reps)) / 1e9


def device_read_gbps(device: str, nbytes: int, reps: int = 10) -> float:
    """GB/s a bf16 GEMV reads its weight at: the memory bandwidth the decode step sees."""
    w = torch.randn(nbytes // 2 // 4096, 4096, device=device).to(torch.bfloat16)
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    timer = _timer(device)

    def gemv():
        torch.nn.functional.linear(x, w)
    gemv()
    t = statistics.median(timer(gemv) for _ in range(reps))
    return w.numel() * 2 / t / 1e9


LAUNCH_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch"}


def launches_per_step(engine, prompt: str, device: str) -> float:
    """Launches per decode step, from the profiler: on CUDA the host's launch calls (a replayed
    graph is one), on the CPU the operators run. One generation of 9 tokens less one of 1, over
    the 8 steps between them (run after others, so the steps' graphs are already captured)."""
    from torch.profiler import ProfilerActivity, profile

    def count(n: int) -> int:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            engine.generate(prompt, max_new_tokens=n, ignore_eos=True, chat=False)
        if device == "cuda":
            return sum(1 for e in prof.events() if e.name in LAUNCH_CALLS)
        return sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return (count(9) - count(1)) / 8


def resident_steps(folder: Path, common: dict, prompt: str, args, read_gbps: float, save=None) -> dict:
    """Every layer resident (the device's whole budget): each step kind's time against the bytes
    it reads divided by the measured read bandwidth, and its launches per step. save(rows)
    after each (a partial report)."""
    rows = {}
    for name, options in (("resident dense bf16", dict(mode="dense")),
                          ("resident sparse bf16", dict(sparsity=args.sparsity, mode="sparse")),
                          ("resident dense int4", dict(mode="dense", quant="int4", quant_fit=False)),
                          ("resident sparse int4", dict(sparsity=args.sparsity, mode="sparse", quant="int4",
                                                        quant_fit=False))):
        engine = ferry.load(folder, **{**common, "gpu_memory": None, "emulate_link_gbps": None}, **options)
        assert not engine.plan.streamed_layers, "a resident row needs every layer on the device"
        measured = time_engine(engine, prompt, args.new_tokens, args.runs)
        c = engine.plan.step_bytes
        read = c.sparse_read if options["mode"] == "sparse" else c.full_read
        floor = read / (read_gbps * 1e9)
        rows[name] = {"measured_s": measured["s"], "bytes_read": read, "floor_s": floor,
                      "vs_floor": measured["s"] / floor, "launches": launches_per_step(engine, prompt, common["device"]),
                      "prefill_s": measured["prefill_s"], "select_s": measured["select_s"]}
        step_graphs.ENABLED = False  # the same engine without graphs: what they save
        try:
            rows[name]["no_graphs_s"] = time_engine(engine, prompt, args.new_tokens, args.runs)["s"]
            rows[name]["no_graphs_launches"] = launches_per_step(engine, prompt, common["device"])
        finally:
            step_graphs.ENABLED = None
        log(f"{name}: {measured['s'] * 1e3:.2f} ms/step ({rows[name]['no_graphs_s'] * 1e3:.2f} without graphs), "
            f"{read / 1e6:.0f} MB read, {rows[name]['vs_floor']:.2f}x bytes/bandwidth, "
            f"{rows[name]['launches']:.0f} launches/step ({rows[name]['no_graphs_launches']:.0f} without graphs)")
        engine.close()
        del engine
        gc.collect()
        if common["device"] == "cuda":
            torch.cuda.empty_cache()
        if save is not None:
            save(rows)
    return rows


def time_engine(engine, prompt: str, new_tokens: int, runs: int) -> dict:
    """Median decode s/token, decode bytes/token (all copies less the prefill's, which include
    the selected rows' first upload), AAL, and the median prefill and neuron selection seconds.
    Runs alternate the prompt and its words reversed, so each selection is a new prompt's."""
    secs, moved, aals, prefills, selects = [], [], [], [], []
    engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, chat=False)  # warm up every path
    for run in range(runs):
        text = " ".join(reversed(prompt.split())) if run % 2 == 0 else prompt
        st = engine.generate(text, max_new_tokens=new_tokens, ignore_eos=True, chat=False).stats
        secs.append(st.decode_s / max(1, st.new_tokens - 1))
        moved.append((st.h2d_bytes - st.prefill_h2d_bytes) / max(1, st.new_tokens - 1))
        prefills.append(st.prefill_s)
        selects.append(st.select_s)
        if st.aal is not None:
            aals.append(st.aal)
    return {"s": statistics.median(secs), "bytes": statistics.median(moved),
            "aal": statistics.mean(aals) if aals else None,
            "prefill_s": statistics.median(prefills), "select_s": statistics.median(selects)}


def time_transformers(folder: Path, device: str, budget: int, ids: list[int], new_tokens: int, runs: int) -> dict:
    """transformers' generate; on CUDA with accelerate's device_map offload capped at the budget.
    Per token: (n tokens - 1 token) / (n - 1), so the prefill drops out."""
    from transformers import AutoModelForCausalLM

    if device == "cuda":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="auto",
                                                     max_memory={0: budget, "cpu": 1 << 40})
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    inputs = torch.tensor([ids], device=device)
    timer = _timer(device)

    def gen(n: int) -> float:
        with torch.no_grad():
            return timer(lambda: model.generate(inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                pad_token_id=0))
    gen(2)  # warm up
    per = [(gen(new_tokens) - gen(1)) / (new_tokens - 1) for _ in range(runs)]
    placement = sorted({str(d) for d in getattr(model, "hf_device_map", {"": device}).values()})
    return {"s": statistics.median(per), "placement": placement}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check: small shape, emulated link")
    parser.add_argument("--folder", type=Path, help="where the random checkpoint is written (reused)")
    parser.add_argument("--report", type=Path, default=Path("gpu_suite.json"), help="JSON report path")
    parser.add_argument("--gpu-memory", help="device budget (default 4GiB; --tiny: 25MiB)")
    parser.add_argument("--link-gbps", type=float, default=2.0, help="--tiny: the emulated link's GB/s")
    parser.add_argument("--preset", default="h100", choices=sorted(GPUS),
                        help="card whose memory bandwidth the predictions use beside the measured link (default h100)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--period", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=33, help="per generation (sirius: two periods)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel check (gemv_check.py run alone)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny for the CPU check")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = not args.tiny
    device, shape = ("cuda", "8b") if cuda else ("cpu", "tiny")
    budget = parse_size(args.gpu_memory or ("4GiB" if cuda else "25MiB"))
    folder = write_random_llama(args.folder or Path(f"/tmp/ferry-random-{shape}"), shape, device)
    log(f"checkpoint ready: {folder}")

    if cuda:
        peak, card = link_peak_gbps(), torch.cuda.get_device_name()
        read = device_read_gbps("cuda", 1 << 30)
        gpu = Gpu(f"{args.preset} preset, measured link", memory_gbps=GPUS[args.preset].memory_gbps, link_gbps=peak)
    else:
        peak, card = args.link_gbps, f"CPU, {torch.get_num_threads()} threads, emulated link"
        read = device_read_gbps("cpu", 64 << 20)
        gpu = Gpu("cpu (measured reads, emulated link)", memory_gbps=read, link_gbps=peak)
    log(f"{card}: link {peak:.1f} GB/s ({'pinned peak' if cuda else 'emulated'}), device reads {read:.0f} GB/s (bf16 GEMV); "
        f"predictions: link {gpu.link_gbps:.1f}, memory {gpu.memory_gbps:.0f} GB/s ({gpu.name})")

    prompt = " ".join(f"w{7 * n % SHAPES[shape]['vocab_size']:06d}" for n in range(2, 18))  # 16 tokens
    common = dict(dtype="bf16", device=device, ctx=64, gpu_memory=budget, progress=False, reuse_prefix=False,
                  emulate_link_gbps=None if cuda else args.link_gbps, period=args.period)
    rows: dict[str, dict] = {}

    def record(name: str, engine, measured: dict, key: str, schedule: str = "pipelined") -> None:
        aal = min(measured["aal"] or args.period, args.period)
        pred = predict_for_plan(engine.plan, gpu, period=args.period, aal=aal, schedule=schedule)
        rows[name] = {"measured_s": measured["s"], "predicted_s": pred[key].s_per_token,
                      "measured_bytes": measured["bytes"], "predicted_bytes": pred[key].bytes_per_token,
                      "bound": pred[key].bound, "aal": measured["aal"],
                      "prefill_s": measured["prefill_s"], "select_s": measured["select_s"]}
        if key == "ferry":
            rows["sirius as published"] = {"predicted_s": pred["sirius_published"].s_per_token,
                                           "predicted_bytes": pred["sirius_published"].bytes_per_token,
                                           "bound": pred["sirius_published"].bound, "aal": measured["aal"]}
        log(f"{name}: {measured['s'] * 1e3:.1f} ms/token measured, {pred[key].s_per_token * 1e3:.1f} predicted; "
            f"prefill {measured['prefill_s'] * 1e3:.0f} ms, selection {measured['select_s'] * 1e3:.0f} ms")

    def measure(schedule: str, modes: list[tuple[str, str, str]], **kwargs) -> None:
        """One load; modes: (row name, correction mode, prediction key). The engine (and its
        host store) is gone before the next load."""
        engine = ferry.load(folder, **common, schedule=schedule, **kwargs)
        plan = engine.plan
        log(f"plan: {len(plan.resident_layers)} layers resident, {len(plan.streamed_layers)} stream, "
            f"{len(plan.prefix_layers)} keep their selected rows; {schedule}")
        for name, mode, key in modes:  # sparse and sirius share a plan: one load of the weights, not two
            rt = engine.runtime  # same plan and weights, another decode loop
            rt.config = replace(rt.config, correction=replace(rt.config.correction, mode=mode))
            record(name, engine, time_engine(engine, prompt, args.new_tokens, args.runs), key, schedule)
        engine.close()
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # Most wanted first, and the report rewritten after each part, so a run cut short by a time
    # limit keeps what it measured: resident steps, int4 streaming, bf16 streaming, kernels, baseline.
    steps: dict[str, dict] = {}
    kernels = None

    def save(resident: dict | None = None) -> None:
        steps.update(resident or {})
        args.report.write_text(json.dumps({"bench": "gpu_suite", "partial": True, "device": card, "rows": rows,
                                           "resident_steps": steps, "kernels": kernels}, indent=1))

    steps.update(resident_steps(folder, common, prompt, args, read, save))
    # int4 (ferry's own groups of 32, plain ranges: quantizing random weights, fitting buys nothing)
    int4 = dict(quant="int4", quant_fit=False)
    for schedule, modes, options in (
            ("pipelined", [("int4 sirius pipelined", "sirius", "ferry")], dict(sparsity=args.sparsity, **int4)),
            ("pipelined", [("int4 dense streaming", "dense", "dense")], int4),
            ("pipelined", [("dense streaming", "dense", "dense")], {}),
            ("pipelined", [("sparse only", "sparse", "sparse"), ("sirius pipelined", "sirius", "ferry")],
             dict(sparsity=args.sparsity)),
            ("serial", [("sirius serial", "sirius", "ferry")], dict(sparsity=args.sparsity))):
        measure(schedule, modes, **options)
        save()
    if args.no_kernels:
        log("kernel check skipped (--no-kernels)")
    elif cuda and gemv.available("cuda"):
        kernels = check_kernels("cuda", SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"], torch.bfloat16)
    elif os.environ.get("TRITON_INTERPRET") == "1":  # the CPU check: Triton's interpreter, small shapes
        gemv.ENABLED = decode_gpu.ENABLED = True
        kernels = check_kernels("cpu", 64, 256, torch.float32, reps=1)
        gemv.ENABLED = decode_gpu.ENABLED = None
    save()
    ids = word_tokenizer(SHAPES[shape]["vocab_size"])(prompt)["input_ids"]
    name = "transformers + accelerate" if cuda else "transformers (CPU)"
    try:  # the baseline runs on the machine's own transformers and accelerate, whatever they are
        base = time_transformers(folder, device, budget, ids, min(args.new_tokens, 9), args.runs)
        rows[name] = {"measured_s": base["s"], "placement": base["placement"]}
        log(f"{name}: {base['s'] * 1e3:.1f} ms/token, weights on {base['placement']}")
    except Exception as err:  # noqa: BLE001 (report it and keep ferry's rows)
        rows[name] = {"error": f"{type(err).__name__}: {err}"}
        log(f"{name} failed: {rows[name]['error']}")
    return report(args, rows, steps, kernels, card, shape, budget, peak, read, gpu)


def report(args, rows: dict, steps: dict, kernels: dict | None, card: str, shape: str, budget: int, peak: float,
           read: float, gpu: Gpu) -> dict:
    print(f"{card}; random Llama-3-{shape}-shaped model, bf16, budget {budget / (1 << 30):.3g} GiB, "
          f"sparsity {args.sparsity}, K={args.period}, {args.new_tokens} new tokens x {args.runs} runs (median)")
    link = "emulated" if "emulated" in card else "pinned peak"
    print(f"measured: link {peak:.1f} GB/s ({link}), device reads {read:.0f} GB/s (bf16 GEMV); "
          f"predictions use link {gpu.link_gbps:.1f}, memory {gpu.memory_gbps:.0f} GB/s ({gpu.name})")
    print(f"{'':26}{'measured ms':>12}{'predicted ms':>13}{'meas/pred':>10}{'MB/token':>10}{'pred MB':>9}"
          f"  bound   AAL")
    for name, r in rows.items():
        m, p = r.get("measured_s"), r.get("predicted_s")
        cells = [f"{m * 1e3:12.1f}" if m else f"{'-':>12}", f"{p * 1e3:13.1f}" if p else f"{'-':>13}",
                 f"{m / p:10.2f}" if m and p else f"{'-':>10}",
                 f"{r['measured_bytes'] / 1e6:10.1f}" if "measured_bytes" in r else f"{'-':>10}",
                 f"{r['predicted_bytes'] / 1e6:9.1f}" if "predicted_bytes" in r else f"{'-':>9}"]
        aal = f"{r['aal']:.2f}" if r.get("aal") else "-"
        print(f"{name:26}{''.join(cells)}  {r.get('bound', '-'):6}  {aal}")
    unit = "launches" if "emulated" not in card else "aten ops"
    print(f"{'resident steps':26}{'ms/step':>12}{'MB read':>13}{'vs floor':>10}{unit + '/step':>16}"
          f"{'no graphs: ms':>15}{unit:>10}")
    for name, r in steps.items():
        print(f"{name:26}{r['measured_s'] * 1e3:12.2f}{r['bytes_read'] / 1e6:13.1f}{r['vs_floor']:10.2f}"
              f"{r['launches']:16.0f}{r['no_graphs_s'] * 1e3:15.2f}{r['no_graphs_launches']:10.0f}")
    if kernels:
        report_kernels(kernels)
    out = {"bench": "gpu_suite", "device": card, "shape": shape, "budget_bytes": budget, "resident_steps": steps,
           "kernels": kernels,
           "link_peak_gbps": peak, "device_read_gbps": read,
           "prediction_gpu": {"name": gpu.name, "link_gbps": gpu.link_gbps, "memory_gbps": gpu.memory_gbps}, "sparsity": args.sparsity, "period": args.period,
           "new_tokens": args.new_tokens, "runs": args.runs, "rows": rows,
           "elapsed_s": time.perf_counter() - T0}
    args.report.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
