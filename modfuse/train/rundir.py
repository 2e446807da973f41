"""Run directories: what modfuse created (a marker), who is using one (a lock), and writes that never half-land.

A directory modfuse-train made holds `modfuse-run.json`, written only by modfuse:

    {"format": "modfuse-run-directory", "version": 1, "kind": "run" | "compare", "created": "<UTC ISO time>"}

--overwrite empties a directory only if it holds that marker, and then removes only the files modfuse writes
there (for a comparison also its per-row `<slug>/seed<N>/` run directories, each with its own marker); any other
entry makes it refuse, naming the entry, before anything is deleted.

A run holds an exclusive lock (flock) on `.modfuse.lock` in its directory for its whole lifetime, with its PID in
the file; a second run on the same directory is refused naming that PID. The lock goes with the process, so a
killed run never leaves a stale lock behind.

Every file is written to `<name>.tmp` opened with O_EXCL | O_NOFOLLOW (a planted symlink is refused, never
written through), synced, then renamed over `<name>`: a kill or a full disk leaves the previous file intact and
no temporary file behind.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
from pathlib import Path

MARKER = "modfuse-run.json"
MARKER_FORMAT = "modfuse-run-directory"
MARKER_VERSION = 1
LOCK = ".modfuse.lock"
RUN_FILES = {
    "config.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "pretrained.pt",
    "summary.json",
    "utilization.png",
    "noise.png",
}
COMPARE_FILES = {"compare.json", "compare.md", "compare.started", "utilization.png", "noise.png", "summary.png"}


class RunError(RuntimeError):
    """A run directory or checkpoint problem; the message names the path."""


def _why(err: OSError) -> str:
    return err.strerror or str(err)


# -- writing -----------------------------------------------------------------------------------------------------
def write_atomically(path: Path, write) -> None:
    """Call write(binary file) on `path`.tmp, then rename it over `path`; on any failure remove what it wrote."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_file()):
        raise RunError(
            f"{tmp} is a symbolic link or not a regular file; modfuse-train writes its temporary copy of "
            f"{path.name} there and will not write through it: remove it"
        )
    if path.is_symlink():
        raise RunError(f"{path} is a symbolic link; modfuse-train will not replace it: remove it")
    created = False
    try:
        tmp.unlink(missing_ok=True)  # a stale one from a killed run (a regular file, checked above)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        created = True
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        if created:
            tmp.unlink(missing_ok=True)
        reason = _why(err) if isinstance(err, OSError) else str(err).splitlines()[0][:200]
        raise RunError(f"cannot write {path} ({reason}); its previous version, if any, is intact") from None


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode()))


def append_line(path: Path, line: str) -> None:
    """Append one line (metrics.jsonl); a symlink is refused, a failed write is cut back off."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        what = "is a symbolic link; modfuse-train will not write through it" if err.errno == errno.ELOOP else _why(err)
        raise RunError(f"cannot write {path} ({what})") from None
    try:
        size = os.fstat(fd).st_size
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, size)  # nothing half-written
            raise RunError(f"cannot write {path} ({_why(err)})") from None
    finally:
        os.close(fd)


# -- the marker ----------------------------------------------------------------------------------------------------
def marker_kind(path: Path) -> str | None:
    """The kind in a valid modfuse marker in `path`, or None if there is none (or it is not modfuse's)."""
    marker = Path(path) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        d = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("format") != MARKER_FORMAT or d.get("version") != MARKER_VERSION:
        return None
    return d.get("kind") if d.get("kind") in ("run", "compare") else None


def write_marker(path: Path, kind: str) -> None:
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_text(
        Path(path) / MARKER,
        json.dumps({"format": MARKER_FORMAT, "version": MARKER_VERSION, "kind": kind, "created": created}) + "\n",
    )


def foreign_entries(path: Path, kind: str) -> list[Path]:
    """Entries of a marked directory that modfuse did not write there (an unmarked directory: itself)."""
    path = Path(path)
    if path.is_symlink() or marker_kind(path) != kind:
        return [path]
    known = {MARKER, LOCK} | (RUN_FILES if kind == "run" else COMPARE_FILES)
    known |= {name + ".tmp" for name in known}
    foreign = []
    for entry in sorted(path.iterdir()):
        if entry.name in known and (entry.is_symlink() or entry.is_file()):
            continue
        if kind == "compare" and entry.is_dir() and not entry.is_symlink() and _is_row_slug(entry.name):
            for seed_dir in sorted(entry.iterdir()):
                if re.fullmatch(r"seed\d+", seed_dir.name) and seed_dir.is_dir():
                    foreign += foreign_entries(seed_dir, "run")
                else:
                    foreign.append(seed_dir)
            continue
        foreign.append(entry)
    return foreign


def _is_row_slug(name: str) -> bool:
    from modfuse.train.compare import GRID, slug

    return name in {slug(label) for label, _ in GRID}


def _remove_contents(path: Path, keep: set[str]) -> None:
    """Remove what foreign_entries() found to be modfuse's (call it first); `keep` names stay."""
    for entry in path.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            _remove_contents(entry, set())
            entry.rmdir()
        else:
            entry.unlink()


# -- claiming a directory ------------------------------------------------------------------------------------------
class RunLock:
    """The exclusive lock on a run directory, held until release() or the process ends."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _lock(path: Path) -> RunLock:
    lock_path = path / LOCK
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise RunError(f"cannot create the lock file {lock_path} ({_why(err)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown (it is starting)"
        os.close(fd)
        raise RunError(
            f"{path} is in use by another modfuse-train run (PID {holder}); wait for it to end or stop "
            "it, or use another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(path, fd)


def claim(path: str | Path, kind: str, *, resume: bool, overwrite: bool) -> RunLock:
    """Check, lock and prepare `path` for a run (kind "run") or comparison ("compare"); returns the held lock.

    New: the directory must be absent or empty. --overwrite: it must be modfuse's (marker) and hold nothing
    else. --resume: it must hold that kind's run. Nothing is created or deleted before every check has passed.
    """
    path = Path(path)
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a directory")
    what = "run" if kind == "run" else "comparison"
    if resume:
        needed = ("config.json",) if kind == "run" else ("compare.started", "compare.json")
        if not any((path / n).is_file() for n in needed):
            raise RunError(f"--resume: {path} holds no modfuse {what} (no {' or '.join(needed)})")
    elif path.exists():
        entries = [e for e in path.iterdir() if e.name != LOCK]
        if entries and (path / LOCK).exists():
            _lock(path).release()  # a directory in use is refused naming its holder, before anything else
        if entries and not overwrite:
            raise RunError(
                f"{what} directory {path} already holds files; pass --overwrite to replace them or --resume to continue"
            )
        if entries:
            foreign = foreign_entries(path, kind)
            if foreign == [path]:
                raise RunError(
                    f"--overwrite refused: {path} is not a modfuse {what} directory (no valid {MARKER}); "
                    "modfuse deletes only what it created: delete it yourself if you mean it"
                )
            if foreign:
                raise RunError(
                    f"--overwrite refused: {path} holds {foreign[0]}, which modfuse did not write "
                    f"({len(foreign)} such entr{'y' if len(foreign) == 1 else 'ies'}); nothing was "
                    "deleted"
                )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot create the run directory {path} ({_why(err)})") from None
    lock = _lock(path)
    try:
        if not resume:
            if overwrite:
                if foreign_entries(path, kind) not in ([], [path]):  # changed since the check: refuse again
                    raise RunError(f"--overwrite refused: {path} changed while starting; nothing was deleted")
                if marker_kind(path) == kind:
                    _remove_contents(path, keep={LOCK})
            elif any(e.name != LOCK for e in path.iterdir()):
                raise RunError(f"{what} directory {path} was filled by another process while starting")
        if marker_kind(path) is None and not (path / MARKER).exists():
            write_marker(path, kind)
    except OSError as err:
        lock.release()
        raise RunError(f"cannot prepare the run directory {path} ({_why(err)})") from None
    except RunError:
        lock.release()
        raise
    return lock
