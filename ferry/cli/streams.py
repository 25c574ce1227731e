"""The console's text streams: how undecodable or unencodable characters are handled."""

from __future__ import annotations


def set_errors(stream, errors: str) -> None:
    """Switch a text stream's error handler (stdin: surrogateescape, stdout: replace); a closed or
    unusual stream is left as it is."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors=errors)
        except (ValueError, OSError):
            pass
