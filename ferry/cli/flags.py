"""Every flag of the command line, declared once.

`FLAGS` maps a flag's argparse dest to its declaration. For a configuration option the dest is
the flat option name `ferry.load` takes (`ferry.engine.config.OPTIONS`, plus period and
max_period): its argparse default is None and the default its help shows is read from the
configuration dataclasses, so `FerryConfig.from_options(**config_options(args))` is where every
default is decided. Subcommands pick flags from the registry by name (`add_flags`), so a flag
means the same thing in every subcommand; `flag_for` maps a setting named by a `SettingError`
back to its flag for the error message.

The parsers here check only what a flag's text can be (a number, a size, a range); whether the
settings go together is the configuration's business.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

from ferry.engine.config import DTYPES, option_default, option_names
from ferry.errors import FerryError, SettingError


# --- parsers of a flag's text ----------------------------------------------------------------------

def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if (not math.isfinite(value) or value < low or value > high or (low_open and value == low)
                or (high_open and value == high)):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


POSITIVE = float_in(0, math.inf, low_open=True)


def size(text: str) -> int:
    from ferry.offload.planner import parse_size

    try:
        return parse_size(text)
    except FerryError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def period(text: str) -> int | str:
    return "auto" if text == "auto" else int_at_least(1)(text)


def threads(text: str) -> int | str:
    return "auto" if text == "auto" else int_at_least(1)(text)


def port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0 to 65535, got {value}")
    return value


def gpu_name(text: str) -> str:
    from ferry.offload.costmodel import GPUS

    if text not in GPUS:
        raise argparse.ArgumentTypeError(f"unknown GPU {text!r}; presets: {', '.join(GPUS)}")
    return text


class Renamed(argparse.Action):
    """A flag that no longer exists: using it is an error that names its successors."""

    MESSAGES = {"--link-gbps": "--link-gbps was renamed: --emulate-link (generate, profile) or --pcie-gbps (plan)"}

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.MESSAGES[option_string])


# --- the registry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]  # the long name last (the one error messages use)
    help: str  # "{default}" is replaced by the default (config options: the dataclass's)
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    action: Any = None  # store_true, BooleanOptionalAction, Renamed
    default: Any = None  # flags that are not config options (config options: always None)


ON_OFF = argparse.BooleanOptionalAction
FLAGS: dict[str, Flag] = {
    # the model and where it runs
    "model": Flag(("-m", "--model"), "model folder, .gguf file or hub id (default: the embedded "
                  "SmolLM2-135M-Instruct)"),
    "dtype": Flag(("--dtype",), "compute dtype (default {default}: bf16 on CPU, the checkpoint's half "
                  "precision on GPU)", choices=("auto", *DTYPES)),
    "device": Flag(("--device",), "where the model runs (default {default})", choices=("auto", "cpu", "cuda")),
    "ctx": Flag(("--ctx",), "KV cache length in tokens (default: generate and profile reserve what their "
                "prompts need, plan, chat and serve reserve min(4096, the model's maximum))", type=int_at_least(1),
                metavar="N"),
    "gpu_memory": Flag(("--gpu-memory",), "device budget, e.g. 20GiB; layers beyond it stream from host "
                       "memory (default: free device memory minus 1 GiB; on a CPU-only machine, the CPU "
                       "tier's budget; plan --gpu NAME: that card's memory minus 1 GiB)", type=size, metavar="SIZE"),
    "host_memory": Flag(("--host-memory",), "host budget (default: this machine's available memory)",
                        type=size, metavar="SIZE"),
    "prefetch_depth": Flag(("--prefetch-depth",), "streaming slots: layers in flight ahead of compute "
                           "(default {default})", type=int_at_least(1), metavar="N"),
    "quant": Flag(("--quant",), "the layers' weights: auto keeps a quantized checkpoint's bits (GGUF Q4_0/"
                  "Q4_1/Q4_K/Q8_0, AWQ, GPTQ) and leaves float weights as they are; int4 (groups with an "
                  "fp16 scale and min) or int8 (fp16 scale) quantizes once at load, cached on disk; "
                  "none dequantizes (default {default})", choices=("auto", "none", "int8", "int4")),
    "quant_group": Flag(("--quant-group",), "largest group of values sharing one scale, a multiple of 8 "
                        ">= 32 (default {default}; needs --quant int8 or int4)", type=int, metavar="G"),
    "quant_fit": Flag(("--quant-fit",), "search each group's range for the least weight error instead of "
                      "taking its min and max (default {default}; needs --quant int8 or int4)", action=ON_OFF),
    "quant_lm_head": Flag(("--quant-lm-head",), "lm_head's weights: int8 groups (fp16 scales, read by the "
                          "int8 kernel) or none (the compute dtype); auto is int8 when the layers are "
                          "quantized (default {default})", choices=("auto", "none", "int8")),
    "batch_size": Flag(("--batch-size",), "prompts of a --prompt-file decoded together, sharing every "
                       "weight read; the plan holds their KV caches (default: as many as the memory plan "
                       "holds, up to 8)", type=int_at_least(1), metavar="B"),
    "threads": Flag(("--threads",), "CPU threads for the model math: auto fits torch's thread count, at each "
                    "generation, to the cores other processes leave free; N uses exactly N (default {default})",
                    type=threads, metavar="N|auto"),
    "cuda_graphs": Flag(("--cuda-graphs",), "replay resident decode steps (every layer, or the sparse set, on "
                        "the device) from CUDA graphs: one launch a token (default {default}; CUDA only)",
                        action=ON_OFF),
    "reuse_prefix": Flag(("--reuse-prefix",), "a prompt that begins with the previous sequence (a chat's "
                         "next turn, a prompt file's shared preamble) prefills only the rest (default {default})",
                         action=ON_OFF),
    # streaming
    "emulate_link_gbps": Flag(("--emulate-link",), "CPU device only: emulate a host-to-device link of "
                              "GBPS GB/s (tests, benchmarks; default: plain in-order copies)",
                              type=POSITIVE, metavar="GBPS"),
    "schedule": Flag(("--schedule",), "pipelined prefetch or serial fetch-then-compute (the oracle); "
                     "default {default}", choices=("pipelined", "serial")),
    "resident_sparse": Flag(("--resident-sparse",), "keep the selected neurons of streamed layers on the "
                            "device when they fit (default {default}; off streams them every sparse step, "
                            "as published offloading does)", action=ON_OFF),
    "link_gbps": Flag(("--link-gbps",), argparse.SUPPRESS, action=Renamed),
    # sparsity and correction
    "sparsity": Flag(("--sparsity",), "fraction of MLP neurons dropped in sparse steps, 0 <= S < 1 "
                     "(default {default}: dense)", type=float_in(0, 1, high_open=True), metavar="S"),
    "sparse_method": Flag(("--sparse-method",), "griffin: prompt-fixed neurons; cats: per-token threshold "
                          "(default {default})", choices=("griffin", "cats")),
    "mode": Flag(("--mode",), "sparse steps only, or with periodic correction (default: sirius when "
                 "--sparsity > 0, else dense)", choices=("dense", "sparse", "sirius")),
    "period": Flag(("--period",), "one full-weight correction pass per at most K tokens (default {default}); "
                   "auto: whenever the sparse model is unsure, at most --max-period tokens", type=period,
                   metavar="K|auto"),
    "max_period": Flag(("--max-period",), "with --period auto: the longest chunk (default {default})",
                       type=int_at_least(1), metavar="K"),
    "draft_confidence": Flag(("--draft-confidence",), "with --period auto: end the chunk after a draft the "
                             "sparse model gives probability < P (default: chosen to minimise cost per "
                             "token)", type=float_in(0, 1), metavar="P"),
    "threshold": Flag(("--threshold",), "probability a draft needs under the full model at temperature 0.6 "
                      "(default {default})", type=float_in(0, 1), metavar="T"),
    "accept": Flag(("--accept",), "strict: a draft must equal the full model's argmax (output equals dense "
                   "greedy); default {default}", choices=("threshold", "strict")),
    "speculate": Flag(("--speculate",), "while a full pass streams, the resident sparse model drafts the next "
                      "chunk (kept when the pass accepts the whole chunk; default {default})", action=ON_OFF),
    # sampling and the request
    "max_new_tokens": Flag(("-n", "--max-new-tokens"), "tokens to generate at most (default {default}; profile: 64)",
                           type=int_at_least(0), metavar="N", default=256),
    "chat": Flag(("--chat",), "wrap the prompt in the chat template (default: on when the tokenizer has one)",
                 action=ON_OFF),
    "temperature": Flag(("--temperature",), "0 is greedy (default {default})", type=float_in(0, math.inf),
                        metavar="TEMP"),
    "top_p": Flag(("--top-p",), "nucleus sampling mass (default {default})", type=float_in(0, 1, low_open=True),
                  metavar="P"),
    "seed": Flag(("--seed",), "random seed for sampling", type=int, metavar="N"),
    "ignore_eos": Flag(("--ignore-eos",), "keep generating past end-of-sequence tokens", action="store_true",
                       default=False),
    "prompt": Flag(("-p", "--prompt"), "the prompt (default: read from stdin)", metavar="TEXT"),
    "prompt_file": Flag(("--prompt-file",), "one prompt a line, or JSON lines with a \"prompt\" field",
                        metavar="FILE"),
    "system": Flag(("--system",), "chat: a system message that begins the conversation", metavar="TEXT"),
    "json": Flag(("--json",), "print one JSON object (generate: one per prompt)", action="store_true",
                 default=False),
    # profile
    "warmup": Flag(("--warmup",), "unprofiled generations of the same prompt first (default {default})",
                   type=int_at_least(0), metavar="N", default=0),
    "trace": Flag(("--trace",), "write a Chrome/Perfetto trace (JSON) of the run", metavar="FILE"),
    # predictions (plan, profile)
    "gpu": Flag(("--gpu",), "card whose figures the predictions use: rtx3090, rtx4090, rtx5090, a100-40g, "
                "a100-80g, l40, h100, h100-pcie, h200 (plan: default rtx4090, and naming one also plans for its memory; "
                "profile: default recognised from the device name, else measured)", type=gpu_name, metavar="NAME"),
    "gpu_mem_gbps": Flag(("--gpu-mem-gbps",), "device memory bandwidth in GB/s (default: the card's)",
                         type=POSITIVE, metavar="GBPS"),
    "pcie_gbps": Flag(("--pcie-gbps",), "the card's host-to-device link in GB/s (default: its PCIe "
                      "generation's, 25 for 4.0, 50 for 5.0)", type=POSITIVE, metavar="GBPS"),
    "aal": Flag(("--aal",), "tokens committed per full pass, at most K (default: K, every draft kept)",
                type=POSITIVE, metavar="A"),
    "show_schedule": Flag(("--show-schedule",), "also print one correction chunk's steps: every fetch and "
                          "compute in order (--period sets the chunk, --speculate/--no-speculate)",
                          action="store_true", default=False),
    # serve
    "host": Flag(("--host",), "address to listen on (default {default}; a non-loopback address without "
                 "an API key prints a warning)", metavar="ADDR", default="127.0.0.1"),
    "port": Flag(("--port",), "TCP port (default {default}; 0 picks a free one)", type=port, metavar="N",
                 default=8000),
    "max_queue": Flag(("--max-queue",), "requests waiting for the engine at most; more are answered 503 "
                      "(default {default})", type=int_at_least(1), metavar="N", default=64),
    "api_key": Flag(("--api-key",), "require the header 'Authorization: Bearer KEY' on /v1 routes "
                    "(default: $FERRY_API_KEY, else no key)", metavar="KEY"),
    "model_name": Flag(("--model-name",), "the model id that /v1/models reports and replies carry "
                       "(default: the model folder's or file's name)", metavar="NAME"),
}
CONFIG_OPTIONS = frozenset(option_names())


def add_flags(parser: Any, *names: str) -> None:
    """Add the named flags (a parser or an argument group)."""
    for name in names:
        flag = FLAGS[name]
        option = name in CONFIG_OPTIONS
        shown = option_default(name) if option else flag.default
        kwargs: dict[str, Any] = dict(dest=name, default=None if option else flag.default,
                                      help=flag.help.replace("{default}", _shown(shown)))
        if flag.action is not None:
            kwargs["action"] = flag.action
        else:
            kwargs.update(type=flag.type, choices=flag.choices, metavar=flag.metavar)
        parser.add_argument(*flag.names, **kwargs)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_options(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration options these flags set (None where not given), by option name."""
    return {name: value for name, value in vars(args).items() if name in CONFIG_OPTIONS}


def flag_for(setting: str) -> str:
    """The flag that sets a setting: flag_for("period") == "--period"."""
    flag = FLAGS.get(setting)
    return flag.names[-1] if flag is not None else setting


def setting_message(err: SettingError) -> str:
    """A SettingError as the command line says it: "--period must be at least 1, got 0". A problem
    of the form "needs <option> ..." names that option by its flag too."""
    words = err.problem.split(" ")
    if len(words) > 1 and words[0] == "needs" and words[1] in FLAGS:
        words[1] = flag_for(words[1])
    return f"{flag_for(err.setting)} {' '.join(words)}"
