"""`ferry generate` end to end on tiny checkpoints, and a clear exit-2 error for each bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ferry.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_fields(tiny_model_dir, capsys):
    code, out, _ = run(capsys, "generate", "-m", str(tiny_model_dir()), "-p", "The capital",
                       "-n", "5", "--json", "--dtype", "fp32")
    assert code == 0
    result = json.loads(out)
    assert result["prompt"] == "The capital"
    assert len(result["token_ids"]) == result["stats"]["new_tokens"] <= 5
    assert set(result["stats"]) >= {"prompt_tokens", "new_tokens", "prefill_s", "decode_s", "tokens_per_s"}
    assert result["stats"]["prompt_tokens"] > 0


def test_streamed_text_equals_json_text(tiny_model_dir, capsys):
    folder = str(tiny_model_dir())
    _, streamed, _ = run(capsys, "generate", "-m", folder, "-p", "Count to ten", "-n", "12")
    _, out, _ = run(capsys, "generate", "-m", folder, "-p", "Count to ten", "-n", "12", "--json")
    assert streamed == json.loads(out)["text"] + "\n"


def test_prompt_file_plain_and_json_lines(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('A quick brown fox\n\n{"prompt": "def add(a, b):", "id": 7}\n')
    code, out, _ = run(capsys, "generate", "-m", str(tiny_model_dir()), "--prompt-file", str(prompts),
                       "-n", "3", "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in lines] == ["A quick brown fox", "def add(a, b):"]


def test_sampling_is_reproducible_with_seed(tiny_model_dir, capsys):
    args = ["generate", "-m", str(tiny_model_dir()), "-p", "The", "-n", "10", "--json",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "5"]
    first = json.loads(run(capsys, *args)[1])["token_ids"]
    assert json.loads(run(capsys, *args)[1])["token_ids"] == first


@pytest.mark.parametrize("flags, message", [
    (["-n", "-1"], "max-new-tokens"),
    (["--temperature", "-0.5"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--ctx", "0"], "ctx"),
    (["--dtype", "fp8"], "dtype"),
])
def test_invalid_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "-p", "hi", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def expect_error(capsys, argv, message: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_path(capsys, tmp_path):
    expect_error(capsys, ["generate", "-m", str(tmp_path / "nope"), "-p", "hi"], "no such model")


def test_folder_without_config(capsys, tmp_path):
    expect_error(capsys, ["generate", "-m", str(tmp_path), "-p", "hi"], "no config.json")


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run(capsys, "generate", "-m", str(tmp_path), "-p", "hi")
    assert code == 2
    assert "'gpt2'" in err and "llama, mistral, qwen2" in err


def test_missing_shard(capsys, tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama3", max_shard_size="200KB"), folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    expect_error(capsys, ["generate", "-m", str(folder), "-p", "hi"], f"shard {victim}")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(damage, capsys, tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07garbage" * 50)
    expect_error(capsys, ["generate", "-m", str(folder), "-p", "hi"], "truncated or corrupt")


def test_prompt_longer_than_context(capsys, tiny_model_dir):
    expect_error(capsys, ["generate", "-m", str(tiny_model_dir()), "--ctx", "4", "-p",
                          "A quick brown fox jumps over the lazy dog"], "more than the context")


def test_chat_without_template(capsys, tiny_model_dir):
    expect_error(capsys, ["generate", "-m", str(tiny_model_dir()), "--chat", "-p", "hi"], "no chat template")


def test_bad_prompt_file_line(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    expect_error(capsys, ["generate", "-m", str(tiny_model_dir()), "--prompt-file", str(bad)], "p.jsonl:1")


def test_missing_prompt_file(capsys, tmp_path):
    expect_error(capsys, ["generate", "--prompt-file", str(tmp_path / "none.txt")], "cannot read")


def test_context_limit_stops_generation(tiny_model_dir, capsys):
    code, out, _ = run(capsys, "generate", "-m", str(tiny_model_dir()), "--ctx", "12", "-p", "The capital",
                       "-n", "50", "--json")
    stats = json.loads(out)["stats"]
    assert code == 0 and stats["finish_reason"] == "context"
    assert stats["prompt_tokens"] + stats["new_tokens"] == 13  # the last token needs no cache slot


def test_python_dash_m_reads_stdin(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "ferry", "generate", "-m", str(tiny_model_dir()), "-n", "3", "--json"],
        input="The capital\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt"] == "The capital"


LLAMA_70B = str(__import__("pathlib").Path(__file__).parent / "data" / "llama-3.1-70b-config.json")
KEYS = {"dense", "sparse", "sirius_published", "ferry"}


def plan_json(capsys, *flags: str) -> dict:
    code, out, _ = run(capsys, "plan", "-m", LLAMA_70B, "--host-memory", "256GiB", "--json", *flags)
    assert code == 0
    return json.loads(out)


def test_plan_gpu_json_predictions(capsys):
    out = plan_json(capsys, "--gpu", "rtx4090", "--sparsity", "0.5")
    assert set(out["s_per_token"]) == set(out["bytes_per_token"]) == set(out["bound"]) == KEYS
    assert out["device"] == "cuda" and out["budget_bytes"] == 23 * (1 << 30)  # 24 GiB card less 1 GiB
    assert out["gpu"] == {"name": "rtx4090", "memory_gbps": 1008, "link_gbps": 25.0, "memory_bytes": 24 << 30}
    assert out["link_bytes"]["full_pass"] == out["bytes_per_token"]["dense"] > 100 << 30
    assert out["period"] == 16 and out["aal"] == 16.0 and out["schedule"] == "pipelined"
    s = out["s_per_token"]
    assert s["ferry"] < s["sirius_published"] < s["dense"] and set(out["bound"].values()) == {"link"}


def test_plan_gpu_overrides(capsys):
    base = plan_json(capsys, "--gpu", "h100", "--sparsity", "0.5")
    out = plan_json(capsys, "--gpu", "h100", "--sparsity", "0.5", "--gpu-memory", "40GiB", "--pcie-gbps", "10",
                    "--gpu-mem-gbps", "2000", "--period", "8", "--aal", "6", "--schedule", "serial")
    assert out["gpu"] == {"name": "h100", "memory_gbps": 2000, "link_gbps": 10, "memory_bytes": 40 << 30}
    assert out["budget_bytes"] == 40 << 30 and base["budget_bytes"] == 79 << 30
    assert (out["period"], out["aal"], out["schedule"]) == (8, 6.0, "serial")
    assert out["s_per_token"]["dense"] > 4 * base["s_per_token"]["dense"]  # 10 GB/s instead of 50
    assert out["bytes_per_token"]["ferry"] == pytest.approx(
        (7 * out["link_bytes"]["sparse_step"] + out["link_bytes"]["full_pass"]) / 6)


def test_plan_prints_predictions(capsys):
    code, out, _ = run(capsys, "plan", "-m", LLAMA_70B, "--host-memory", "256GiB", "--gpu", "rtx4090",
                       "--sparsity", "0.5")
    assert code == 0
    for label in ("predicted    rtx4090", "dense streaming", "sparse only", "Sirius as published", "ferry (Sirius)"):
        assert label in out


def test_plan_unknown_gpu_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "-m", LLAMA_70B, "--gpu", "gtx480"])
    assert info.value.code == 2 and "unknown GPU 'gtx480'; presets: rtx3090" in capsys.readouterr().err


def test_plan_aal_above_period_exits_2(capsys):
    expect_error(capsys, ["plan", "-m", LLAMA_70B, "--host-memory", "256GiB", "--gpu-memory", "24GiB",
                          "--period", "8", "--aal", "9"], "AAL")


# --- flags: one registry, settings reported under their flags, renamed flags ----------------------
def test_setting_error_names_the_flag(capsys):
    """argparse accepts 0.5; the configuration rejects it without --period auto, and the message
    names both settings by their flags."""
    code, _, err = run(capsys, "generate", "-p", "hi", "--draft-confidence", "0.5")
    assert code == 2 and err.strip() == "ferry: error: --draft-confidence needs --period auto"


def test_config_value_error_names_the_flag(capsys):
    expect_error(capsys, ["plan", "-m", LLAMA_70B, "--quant", "int4", "--quant-group", "20"],
                 "ferry: error: --quant-group must be a multiple of 8")


def test_flag_for_maps_settings_to_flags():
    from ferry.cli.flags import FLAGS, flag_for

    assert flag_for("period") == "--period"
    assert flag_for("emulate_link_gbps") == "--emulate-link"
    assert flag_for("quant_group") == "--quant-group" and flag_for("model") == "--model"
    assert all(flag_for(name).startswith("--") for name in FLAGS)


def help_text(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_flag_defaults_come_from_the_config(capsys):
    """Config options parse to None when not given (FerryConfig.from_options decides the
    defaults); the help shows the dataclasses' defaults."""
    from ferry.cli import build_parser
    from ferry.cli.flags import config_options
    from ferry.engine.config import FerryConfig

    args = build_parser().parse_args(["generate", "-p", "hi"])
    options = config_options(args)
    assert options["period"] is None and options["speculate"] is None and options["emulate_link_gbps"] is None
    assert FerryConfig.from_options(**options) == FerryConfig()
    text = help_text(capsys, "generate")
    assert "(default 16)" in text and "(default 0.1)" in text and "(default 2)" in text


@pytest.mark.parametrize("command", ["generate", "profile", "plan"])
def test_link_gbps_was_renamed(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--link-gbps", "10"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--link-gbps was renamed: --emulate-link (generate, profile) or --pcie-gbps (plan)" in err
    assert "link-gbps" not in help_text(capsys, command)  # hidden


def test_emulated_link_flag(tiny_model_dir, capsys):
    code, out, err = run(capsys, "generate", "-m", str(tiny_model_dir()), "-p", "The capital", "-n", "3",
                         "--json", "--emulate-link", "20", "--gpu-memory", "17MB", "--prefetch-depth", "1")
    assert code == 0, err
    assert "layers stream from host memory" in err and json.loads(out)["stats"]["h2d_bytes"] > 0


def test_plan_period_auto_uses_max_period(capsys):
    auto = plan_json(capsys, "--gpu", "rtx4090", "--sparsity", "0.5", "--period", "auto", "--max-period", "8")
    fixed = plan_json(capsys, "--gpu", "rtx4090", "--sparsity", "0.5", "--period", "8")
    assert auto["period"] == 8 and auto["s_per_token"] == fixed["s_per_token"]


def test_plan_show_schedule_prints_the_chunk(capsys):
    flags = ["plan", "-m", LLAMA_70B, "--device", "cuda", "--gpu-memory", "100GiB", "--host-memory", "1TB",
             "--sparsity", "0.5", "--period", "auto", "--max-period", "4", "--show-schedule"]
    code, out, _ = run(capsys, *flags)
    assert code == 0 and "one chunk:" in out and "full pass:" in out and "speculative step 0:" in out
    # K = max period = 4: drafts 0..3 (the last during the full pass), 3 speculative steps
    assert "sparse step 3" in out and "speculative step 2:" in out and "speculative step 3" not in out
    code, out, _ = run(capsys, *flags, "--schedule", "serial", "--no-speculate", "--json")
    plan = json.loads(out)
    steps = plan["steps"]
    assert code == 0 and not any(s["speculative"] for s in steps)
    assert sum(s["track"] == "copy" for s in steps) == len(plan["streamed_layers"]) > 0
    assert plan["period"] == 4 and plan["schedule"] == "serial"


def test_plan_show_schedule_needs_sparsity(capsys):
    expect_error(capsys, ["plan", "-m", LLAMA_70B, "--host-memory", "256GiB", "--gpu-memory", "24GiB",
                          "--show-schedule"], "--show-schedule shows a correction chunk")
