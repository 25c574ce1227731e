"""One configuration for a ferry run: nested frozen dataclasses, validated once, defaults resolved once.

Each floor owns the settings of its concern (`QuantConfig` in model/, `OffloadConfig` in
offload/, `SparsityConfig` in sparse/, `CorrectionConfig` and `SamplingConfig` in scheduler/);
`FerryConfig` nests them with `RuntimeConfig` (which model, where, in what precision).

Users rarely build the nesting by hand: `FerryConfig.from_options(**options)` takes the flat
option names that `ferry.load` takes and the CLI's flags set (`OPTIONS` maps each name to its
section and field). A bad value raises `SettingError` naming the option; the CLI maps it to its
flag. The defaults that depend on other settings are decided here and nowhere else:
- correction mode: sirius when sparsity > 0, else dense;
- period "auto": the adaptive period, with at most max_period tokens per chunk;
- the context a plan reserves when none is given: `planned_ctx`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ferry.errors import FerryError, SettingError
from ferry.model.quant import QuantConfig
from ferry.offload.planner import OffloadConfig, parse_size
from ferry.scheduler.correction import CorrectionConfig
from ferry.scheduler.sampling import SamplingConfig
from ferry.sparse.config import SparsityConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CTX = 4096  # context a plan reserves when neither the settings nor a request size it


@dataclass(frozen=True)
class RuntimeConfig:
    """Which model runs, where, and in what precision."""

    model: str | None = None  # folder, .gguf file, hub id; None: the embedded default model
    dtype: str = "auto"  # auto (bf16 on CPU, the checkpoint's half precision on GPU), bf16, fp16, fp32
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    ctx: int | None = None  # KV cache length; None: what each request needs, up to planned_ctx
    progress: bool = True  # progress bars while loading, quantizing, calibrating
    reuse_prefix: bool = True  # a prompt that begins with the previous sequence prefills only the rest
    batch_size: int = 1  # sequences decoded together (a prompt file); the plan holds their KV caches
    # CPU threads of torch's team: auto, torch's count fitted at each generation to the cores
    # other processes leave free (a team larger than that waits at every parallel region for the
    # member the scheduler parked); N: exactly N (set when the model loads)
    threads: int | str = "auto"
    # resident decode steps (every layer, or the sparse set, on the device) replayed from CUDA
    # graphs: one launch a token instead of ~15 a layer (CUDA only)
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise SettingError("dtype", f"must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise SettingError("device", f"must be auto, cpu or cuda; got {self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise SettingError("device", f"{self.device}: CUDA is not available on this machine")
        if self.ctx is not None and (not isinstance(self.ctx, int) or self.ctx < 1):
            raise SettingError("ctx", f"must be at least 1, got {self.ctx!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SettingError("batch_size", f"must be an integer >= 1, got {self.batch_size!r}")
        if self.threads != "auto" and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                       or self.threads < 1):
            raise SettingError("threads", f"must be auto or an integer >= 1, got {self.threads!r}")


def planned_ctx(ctx: int | None, max_positions: int) -> int:
    """The context a plan reserves: the setting, else min(4096, the model's maximum)."""
    return ctx or min(max_positions, DEFAULT_CTX)


@dataclass(frozen=True)
class FerryConfig:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # request defaults

    def __post_init__(self) -> None:
        if self.correction.mode is None:  # the one place the mode's default is decided
            mode = "sirius" if self.sparsity.sparsity > 0 else "dense"
            object.__setattr__(self, "correction", replace(self.correction, mode=mode))

    @property
    def sparse(self) -> bool:
        """Whether sparse steps run (and so the plan and the prefill choose a sparse set)."""
        return self.correction.mode != "dense"

    @property
    def plan_sparsity(self) -> float:
        return self.sparsity.sparsity if self.sparse else 0.0

    @classmethod
    def from_options(cls, **options: Any) -> "FerryConfig":
        """The configuration `ferry.load(**options)` and the CLI describe (see OPTIONS)."""
        unknown = sorted(set(options) - set(OPTIONS) - {"period", "max_period"})
        if unknown:
            raise SettingError(unknown[0], f"is not a ferry option (options: {', '.join(option_names())})")
        given = {k: v for k, v in options.items() if v is not None}
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in given.items():
            if name in OPTIONS:
                section, attr = OPTIONS[name]
                sections[section][attr] = _convert(name, value)
        sections["correction"].update(_period(given))
        for name in ("quant_group", "quant_fit"):
            if name in given and given.get("quant", "auto") in ("none", "auto"):
                raise SettingError(name, "needs quant int8 or int4")
        return cls(**{name: SECTIONS[name](**kw) for name, kw in sections.items()})


SECTIONS = {"runtime": RuntimeConfig, "offload": OffloadConfig, "quant": QuantConfig,
            "sparsity": SparsityConfig, "correction": CorrectionConfig, "sampling": SamplingConfig}

# Flat option name -> (section, field). period and max_period are read by _period.
OPTIONS: dict[str, tuple[str, str]] = {
    "model": ("runtime", "model"), "dtype": ("runtime", "dtype"), "device": ("runtime", "device"),
    "ctx": ("runtime", "ctx"), "progress": ("runtime", "progress"),
    "reuse_prefix": ("runtime", "reuse_prefix"), "batch_size": ("runtime", "batch_size"),
    "threads": ("runtime", "threads"), "cuda_graphs": ("runtime", "cuda_graphs"),
    "gpu_memory": ("offload", "gpu_memory"), "host_memory": ("offload", "host_memory"),
    "prefetch_depth": ("offload", "prefetch_depth"), "emulate_link_gbps": ("offload", "emulate_link_gbps"),
    "schedule": ("offload", "schedule"), "resident_sparse": ("offload", "resident_sparse"),
    "quant": ("quant", "method"), "quant_group": ("quant", "group_size"),
    "quant_fit": ("quant", "fit"), "quant_lm_head": ("quant", "lm_head"),
    "sparsity": ("sparsity", "sparsity"), "sparse_method": ("sparsity", "method"),
    "mode": ("correction", "mode"), "threshold": ("correction", "threshold"),
    "accept": ("correction", "accept"), "draft_confidence": ("correction", "draft_confidence"),
    "speculate": ("correction", "speculate"),
    "temperature": ("sampling", "temperature"), "top_p": ("sampling", "top_p"), "seed": ("sampling", "seed"),
}


def option_names() -> list[str]:
    return sorted([*OPTIONS, "period", "max_period"])


def option_default(name: str) -> Any:
    """An option's default, read from its dataclass (for help texts)."""
    if name in ("period", "max_period"):
        return _field_default(CorrectionConfig, "period")
    section, attr = OPTIONS[name]
    return _field_default(SECTIONS[section], attr)


def _field_default(cls: type, attr: str) -> Any:
    f = next(f for f in fields(cls) if f.name == attr)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _convert(name: str, value: Any) -> Any:
    if name in ("gpu_memory", "host_memory") and isinstance(value, str):
        try:
            return parse_size(value)
        except FerryError:
            raise SettingError(name, f"must be a positive memory size such as 20GiB, 512MB or 1.5GB; "
                                     f"got {value!r}") from None
    if name == "model" and value is not None:
        return str(value)
    return value


def _period(given: dict[str, Any]) -> dict[str, Any]:
    """period K (a fixed chunk) or "auto" (the adaptive period, chunks of at most max_period)."""
    period = given.get("period", _field_default(CorrectionConfig, "period"))
    if period == "auto":
        return {"adaptive": True, "period": given.get("max_period", _field_default(CorrectionConfig, "period"))}
    if isinstance(period, str):
        if not period.isdigit():
            raise SettingError("period", f"must be a positive integer or auto, got {period!r}")
        period = int(period)
    return {"period": period}
