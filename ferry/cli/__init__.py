"""Command line: `ferry generate`, `ferry chat`, `ferry serve`, `ferry profile`, `ferry plan`
(and `python -m ferry ...`).

`flags.py` declares every flag once; `generate.py`, `chat.py`, `serve.py`, `profile.py` and
`plan.py` are the subcommands; `main.py` parses, dispatches and turns user mistakes into exit code 2.
"""

from ferry.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
