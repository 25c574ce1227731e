"""The model's shape and numerics as a frozen dataclass, read once from a transformers config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ferry.errors import FerryError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# config.json's size fields, each a positive integer (None allowed where a default derives it).
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings")
OPTIONAL_SIZE_FIELDS = ("num_key_value_heads", "head_dim")


def check_sizes(raw: dict, source: str) -> None:
    """Refuse a config.json whose sizes are zero, negative or not integers, before
    transformers divides by them (zero heads raised ZeroDivisionError) or a buffer is sized
    from them. The message names the file and the field."""
    for name in SIZE_FIELDS + OPTIONAL_SIZE_FIELDS:
        value = raw.get(name)
        if name not in raw or (value is None and name in OPTIONAL_SIZE_FIELDS):
            continue  # transformers' default, or derived from the others
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FerryError(f"{source}: {name} must be a positive integer, got {value!r}")
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise FerryError(f"{source}: rms_norm_eps must be a number in (0, 1), got {eps!r}")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position: int = 8192  # llama3 only

    def __post_init__(self) -> None:
        if self.kind not in SUPPORTED_ROPE_TYPES:
            raise FerryError(
                f"rope scaling type {self.kind!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise FerryError(f"invalid rope parameters: theta={self.theta}, factor={self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (Qwen2 always, some Llama checkpoints)
    sliding_window: int | None = None  # Mistral v0.1; None means full attention

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise FerryError(_unsupported(self.architecture))
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FerryError(f"the model's {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise FerryError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Build from a transformers PretrainedConfig (read-only: nothing is attached to it)."""
        arch = getattr(hf, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise FerryError(_unsupported(arch))
        if getattr(hf, "mlp_bias", False):
            raise FerryError("checkpoints with MLP biases (mlp_bias=true) are not supported")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise FerryError(f"activation {act!r} is not supported (only silu)")
        heads = hf.num_attention_heads
        window = getattr(hf, "sliding_window", None)
        if arch == "qwen2" and not getattr(hf, "use_sliding_window", False):
            window = None
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope=_rope_from_hf(hf),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            sliding_window=window,
        )


def _unsupported(arch: object) -> str:
    return (
        f"unsupported architecture {arch!r}; ferry runs {', '.join(SUPPORTED_ARCHITECTURES)} "
        "(Llama 2/3, Mistral, Qwen2 families)"
    )


def _rope_from_hf(hf: Any) -> RopeConfig:
    # transformers 5 keeps everything in `rope_parameters`; older configs split theta and scaling.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    params.update(getattr(hf, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )
