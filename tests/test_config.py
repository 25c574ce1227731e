"""The one configuration: flat options to nested sections, defaults decided once, errors naming the setting."""

from __future__ import annotations

import pytest

from ferry.engine.config import OPTIONS, FerryConfig, option_default, option_names, planned_ctx
from ferry.errors import SettingError

# A value other than the default for every option, and where it must land.
NON_DEFAULTS = {
    "model": "some/folder", "dtype": "fp32", "device": "cpu", "ctx": 77, "progress": False, "reuse_prefix": False,
    "batch_size": 4,
    "gpu_memory": 1 << 30, "host_memory": 2 << 30, "prefetch_depth": 3, "emulate_link_gbps": 4.0,
    "schedule": "serial", "resident_sparse": False, "quant": "int4", "quant_group": 64, "quant_fit": False,
    "quant_lm_head": "none", "threads": 3, "cuda_graphs": False,
    "sparsity": 0.4, "sparse_method": "cats", "mode": "sparse", "threshold": 0.3, "accept": "strict",
    "draft_confidence": None, "speculate": False, "temperature": 0.7, "top_p": 0.9, "seed": 5,
}


def test_every_option_lands_in_its_section():
    assert set(NON_DEFAULTS) == set(OPTIONS)
    config = FerryConfig.from_options(**NON_DEFAULTS)
    for name, value in NON_DEFAULTS.items():
        if value is None:
            continue
        section, attr = OPTIONS[name]
        assert getattr(getattr(config, section), attr) == value, name
    assert option_default("prefetch_depth") == 2 and option_default("period") == 16
    assert option_names() == sorted([*OPTIONS, "period", "max_period"])


@pytest.mark.parametrize("options, mode", [
    ({}, "dense"), ({"sparsity": 0.5}, "sirius"), ({"sparsity": 0.5, "mode": "sparse"}, "sparse"),
    ({"sparsity": 0.5, "mode": "dense"}, "dense"),
])
def test_mode_default_is_decided_once(options, mode):
    config = FerryConfig.from_options(**options)
    assert config.correction.mode == mode
    assert config.sparse == (mode != "dense")
    assert config.plan_sparsity == (options.get("sparsity", 0.0) if mode != "dense" else 0.0)


def test_nested_construction_resolves_the_mode_too():
    from ferry.sparse.config import SparsityConfig

    assert FerryConfig(sparsity=SparsityConfig(sparsity=0.3)).correction.mode == "sirius"


def test_period_auto_is_the_adaptive_period():
    config = FerryConfig.from_options(sparsity=0.5, period="auto", max_period=8, draft_confidence=0.4)
    c = config.correction
    assert c.adaptive and c.period == 8 and c.draft_confidence == 0.4
    fixed = FerryConfig.from_options(sparsity=0.5, period="12").correction
    assert not fixed.adaptive and fixed.period == 12


def test_sizes_are_read():
    assert FerryConfig.from_options(gpu_memory="2GiB").offload.gpu_memory == 2 << 30


@pytest.mark.parametrize("options, setting, words", [
    ({"period": 0}, "period", "must be at least 1"),
    ({"period": "often"}, "period", "positive integer or auto"),
    ({"period": "auto", "max_period": 0}, "max_period", "must be at least 1"),
    ({"sparsity": 1.0}, "sparsity", "[0, 1)"),
    ({"gpu_memory": "lots"}, "gpu_memory", "memory size"),
    ({"draft_confidence": 0.5}, "draft_confidence", "needs period auto"),
    ({"quant_group": 64}, "quant_group", "needs quant"),
    ({"quant": "auto", "quant_fit": False}, "quant_fit", "needs quant int8 or int4"),
    ({"quant": "int3"}, "quant", "must be one of"),
    ({"dtype": "fp8"}, "dtype", "must be one of"),
    ({"ctx": 0}, "ctx", "at least 1"),
    ({"temperature": -1.0}, "temperature", ">= 0"),
    ({"emulate_link_gbps": 0.0}, "emulate_link_gbps", "positive"),
    ({"link_gbps": 5.0}, "link_gbps", "not a ferry option"),
])
def test_errors_name_the_setting(options, setting, words):
    with pytest.raises(SettingError) as info:
        FerryConfig.from_options(**options)
    assert info.value.setting == setting
    assert str(info.value).startswith(setting + " ") and words in str(info.value)
    assert "--" not in str(info.value)  # library errors speak of settings, not flags


def test_planned_context_is_decided_once():
    assert planned_ctx(None, 8192) == 4096
    assert planned_ctx(None, 2048) == 2048
    assert planned_ctx(100, 2048) == 100
