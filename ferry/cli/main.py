"""The `ferry` command: the parser, the dispatch to a subcommand, and how errors end.

Mistakes a user can fix end with one line on stderr and exit code 2, never a traceback: flag
values argparse can check are rejected while parsing; a setting the configuration rejects is
reported under its flag (`ferry: error: --period must be at least 1, got 0`).
"""

from __future__ import annotations

import argparse
import sys

from ferry.cli.streams import set_errors
from ferry.errors import FerryError, SettingError


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: the subcommands import torch, which takes seconds, and a
    # Ctrl-C during that import must land inside main's handler (exit 130, no traceback).
    from ferry.cli import chat, generate, plan, profile, serve

    parser = argparse.ArgumentParser(prog="ferry", description="Run large language models on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    profile.add_parser(sub)
    plan.add_parser(sub)
    serve.add_parser(sub)
    chat.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; the exit code: 0, 2 for a user's mistake (one line on stderr), 130 for
    Ctrl-C wherever it lands (loading, generating), without a traceback."""
    try:
        args = build_parser().parse_args(argv)
        _replace_unencodable_output()
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        args.run(args)
    except SettingError as err:
        from ferry.cli.flags import setting_message

        print(f"ferry: error: {setting_message(err)}", file=sys.stderr)
        return 2
    except FerryError as err:
        print(f"ferry: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (ferry ... | head); nothing left to say
        return 0
    return 0


def _replace_unencodable_output() -> None:
    """A model's text may hold characters stdout's encoding lacks (LANG=C, a Windows console):
    print a replacement character rather than die with UnicodeEncodeError mid-answer."""
    set_errors(sys.stdout, "replace")


if __name__ == "__main__":
    sys.exit(main())
