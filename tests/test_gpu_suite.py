"""The GPU suite's CPU path (`--tiny`): it runs end to end, and the bytes ferry moved per token
agree with the cost model's prediction for the same plan."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"


@pytest.mark.slow
def test_tiny_suite_report(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    report = tmp_path / "report.json"
    out = suite.main(["--tiny", "--folder", str(tmp_path / "model"), "--report", str(report),
                      "--runs", "1", "--new-tokens", "9", "--period", "4"])
    assert json.loads(report.read_text())["rows"] == out["rows"]
    steps = out["resident_steps"]
    assert set(steps) == {"resident dense bf16", "resident sparse bf16", "resident dense int4", "resident sparse int4"}
    for name, r in steps.items():
        assert r["measured_s"] > 0 and r["bytes_read"] > 0 and r["vs_floor"] > 0 and r["launches"] > 0, name
    assert steps["resident sparse bf16"]["bytes_read"] < steps["resident dense bf16"]["bytes_read"]
    assert steps["resident dense int4"]["bytes_read"] < 0.5 * steps["resident dense bf16"]["bytes_read"]
    kernels = out["kernels"]["rows"]  # the in-place kernels, in Triton's interpreter here
    assert len(kernels) == 6 and all(r["max_rel_error"] < 1e-5 and r["read_gbps"] > 0 for r in kernels)
    small = out["kernels"]["small_ops"]  # the fused norm and rope against torch's ops, fp32
    assert [r["op"] for r in small] == ["rms_norm + residual", "rope + cache writes"]
    assert all(r["max_abs_diff"] < 1e-5 and r["fused_us"] > 0 and r["torch_us"] > 0 for r in small)
    rows = out["rows"]
    assert set(rows) == {"dense streaming", "sparse only", "sirius pipelined", "sirius serial",
                         "sirius as published", "transformers (CPU)", "int4 dense streaming",
                         "int4 sirius pipelined"}
    for name in ("int4 dense streaming", "int4 sirius pipelined"):  # at this budget every int4 layer fits
        r = rows[name]
        assert r["measured_s"] > 0 and r["predicted_s"] > 0
        assert r["measured_bytes"] == pytest.approx(r["predicted_bytes"], rel=0.15, abs=1e4), name
    for name in ("dense streaming", "sparse only", "sirius pipelined", "sirius serial"):
        r = rows[name]
        assert r["measured_s"] > 0 and r["predicted_s"] > 0 and r["bound"] == "link"
        assert r["measured_bytes"] == pytest.approx(r["predicted_bytes"], rel=0.15), name
    timed = [r for name, r in rows.items() if "measured_s" in r and not name.startswith("transformers")]
    assert all(r["prefill_s"] > 0 and r["select_s"] >= 0 for r in timed + list(steps.values()))
    for name in ("sparse only", "sirius pipelined", "int4 sirius pipelined"):  # Griffin selects per prompt
        assert rows[name]["select_s"] > 0, name
    assert rows["dense streaming"]["select_s"] == 0 and steps["resident dense int4"]["select_s"] == 0
    assert rows["sparse only"]["predicted_bytes"] < 0.7 * rows["dense streaming"]["predicted_bytes"]
    assert 1 <= rows["sirius pipelined"]["aal"] <= 4
    assert rows["sirius serial"]["predicted_s"] >= rows["sirius pipelined"]["predicted_s"]
