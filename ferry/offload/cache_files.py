"""Shared rules for ferry's cache files: never silently wrong, never the reason a run fails.

Every cache (quantized layers, CATS thresholds, converted GGUF folders) is written the same way:
created under an exclusive temporary name `<target>.partial-<pid>-<random>` in the target's folder
(no predictable name, no symlink followed), fsynced, then renamed into place. Large caches
(quantized layers, GGUF folders) keep the first writer to finish, and a later one uses its result;
small ones (CATS thresholds) are replaced whole by the last writer, which wrote the same table.
Partial files of processes that are gone are swept at the next write. Each cache records a header (`header`) naming the format, ferry's
version, the source's identity and the settings that change the result; a header that does not
match is a stale cache: it is warned about and rebuilt, never used.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

_PARTIAL = re.compile(r"\.partial-(\d+)-")


def ferry_version() -> str:
    """ferry's version without importing the `ferry` package (its __init__ imports the engine)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ferry-llm")
    except PackageNotFoundError:
        return "0+unknown"


def file_identity(files) -> list[list]:
    """[name, size, mtime_ns] of each file: what says the source changed without hashing it."""
    out = []
    for file in sorted(Path(f) for f in files):
        st = file.stat()
        out.append([file.name, st.st_size, st.st_mtime_ns])
    return out


def header(fmt: int, source: list, settings: dict) -> dict:
    """The part of a cache's header that must equal the current run's for the cache to be used."""
    return {"format": fmt, "ferry": ferry_version(), "source": source, "settings": settings}


def warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return True
    return True


def sweep_partials(folder: Path) -> None:
    """Remove partial files and folders left in `folder` by processes that no longer exist."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _PARTIAL.search(entry.name)
        if m is not None and not _alive(int(m.group(1))):
            _remove(entry)


def _remove(entry: Path) -> None:
    """Delete a cache file or folder (never through a symlink); gone or read-only is harmless."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except OSError:
        pass  # another process got it first, or the folder is read-only


def partial_prefix(target: Path) -> str:
    return f"{target.name}.partial-{os.getpid()}-"


def create_partial(target: Path, mode: str = "wb"):
    """(open file, its path): created exclusively next to `target`, never through a symlink."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(target.parent)
    fd, name = tempfile.mkstemp(prefix=partial_prefix(target), dir=target.parent)
    return os.fdopen(fd, mode), Path(name)


def make_partial_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(target.parent)
    return Path(tempfile.mkdtemp(prefix=partial_prefix(target), dir=target.parent))


def fsync_file(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stat_key(path: Path):
    """What a later `commit` compares against, to notice another writer finishing first."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def commit_file(tmp: Path, target: Path, seen) -> bool:
    """Rename `tmp` onto `target` unless another writer replaced `target` since `seen` (it wins).

    True when ours is in place. `tmp` must already be fsynced and closed.
    """
    if stat_key(target) != seen:
        tmp.unlink(missing_ok=True)
        return False
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return True


def write_text_atomic(target: Path, text: str) -> None:
    """Write a small cache file atomically (exclusive temporary, fsync, rename); OSError propagates."""
    f, tmp = create_partial(target, "w")
    try:
        with f:
            f.write(text)
            fsync_file(f)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_or_warn(target: Path, text: str, what: str) -> bool:
    try:
        write_text_atomic(target, text)
        return True
    except OSError as err:
        warn(f"cannot write {what} to {target} ({err}); continuing without caching it")
        return False


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def superseded(stored: dict | None, current: dict) -> bool:
    """Whether a cache whose header is `stored` is dead weight next to one just made for
    `current`: made from a source (source[0], a path) that no longer exists, or from the same
    source by another ferry version or format (this ferry can never use it), or with the same
    settings from an older state of the source files. Caches of the same source with other
    settings (int8 beside int4) are kept; unreadable headers are left alone. Two ferry versions
    alternating on one model rebuild each other's caches: a cost chosen over unbounded disk use."""
    if not isinstance(stored, dict) or not isinstance(stored.get("source"), list) or not stored["source"]:
        return False
    source = stored["source"][0]
    if not isinstance(source, str):
        return False
    if not os.path.exists(source):
        return True
    if source != current["source"][0] or stored == current:
        return False
    other_code = stored.get("ferry") != current["ferry"] or stored.get("format") != current["format"]
    return other_code or stored.get("settings") == current["settings"]


def prune(entries, keep: Path, current: dict, read_header) -> None:
    """Remove the cache entries (files or folders) that `superseded` calls dead, except `keep`.
    read_header(entry) -> the entry's stored header, or None when it cannot be read."""
    for entry in entries:
        if entry == keep or _PARTIAL.search(entry.name):
            continue
        try:
            stored = read_header(entry)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if superseded(stored, current):
            _remove(entry)
