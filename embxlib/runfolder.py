"""Run-folder safety, shared by training, launching and sweeps: names that are one plain folder, files replaced
whole (write-then-rename), torn last lines repaired with a note, and a lock so that two processes never train
one folder."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import warnings
from datetime import datetime
from pathlib import Path

RUN_LOCK, SWEEP_LOCK = "run.lock", "sweep.lock"
SLURM_RECORD = "slurm.json"  # the SLURM job of a sweep run (embxlib/slurm.py), written before the trainer starts


# --- names -------------------------------------------------------------------------------------------

MAX_NAME_BYTES = 255  # a folder name on Linux and macOS file systems (NAME_MAX)


def check_folder_name(what: str, value, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A name that becomes a path must be one folder inside its parent: `a/../../x` would write elsewhere; a
    newline or control character would break every line that names it; the file system takes at most 255 bytes."""
    if (not isinstance(value, str) or not value or value.startswith(".") or any(c in value for c in "/\\\0")
            or not value.isprintable()):
        raise ValueError(f"{what}={value!r}: must be one plain folder name (not empty, no '/' or '\\', no newline "
                         f"or control character, not starting with '.')")
    if len(value.encode()) > max_bytes:
        raise ValueError(f"{what}={value[:40]!r}... ({len(value.encode())} bytes): at most {max_bytes} bytes")
    return value


# --- whole files --------------------------------------------------------------------------------------

def _os_error(exc: BaseException | None) -> OSError | None:
    # torch.save reports a failed write as "unexpected pos"; the disk's own error is in the exception's context
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_atomically(path: str | Path, write) -> None:
    """write(binary file) into path.tmp, then rename it over path: readers see the old file or the new one, never
    half of one. On failure the .tmp is removed and a full disk is reported as an OSError naming path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = _os_error(exc)
        if cause is not None and cause.filename is None:
            raise OSError(cause.errno, cause.strerror, str(path)) from exc
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode()))


def write_json_atomically(path: str | Path, obj) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2))


def read_json(path: str | Path) -> dict | None:
    """A JSON object file of ours, or None (with a warning naming the file) when it is missing or unreadable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(errors="replace"))
        if isinstance(data, dict):
            return data
    except (OSError, ValueError):
        pass
    warnings.warn(f"{path}: unreadable JSON, ignored", stacklevel=2)
    return None


def remove_stale_tmp(folder: Path) -> list[str]:
    """*.tmp files are half-written replacements from a process that was killed mid-write: never valid."""
    stale = sorted(p.name for p in folder.glob("*.tmp") if p.is_file())
    for name in stale:
        (folder / name).unlink(missing_ok=True)
    return stale


def end_torn_line(path: Path) -> bool:
    """An append-only log whose writer died mid-line ends without a newline; end it so the next line starts
    clean. Returns whether it had to."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        f.write(b"\n")
    return True


def parse_jsonl(text: str, path) -> tuple[list[dict], list[str]]:
    """The object records of a JSON-lines text, and a note naming the file and line of each line that is not one
    (a torn last line after a crash mid-write)."""
    lines = [line for line in text.split("\n") if line.strip()]
    try:  # one C-level parse of the whole file; a bad line sends us to the line-by-line path
        records = json.loads("[" + ",".join(lines) + "]")
        if all(isinstance(r, dict) for r in records):
            return records, []
    except ValueError:
        pass
    records, notes = [], []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            records.append(record)
        except ValueError as exc:
            notes.append(f"{path}:{lineno}: skipped malformed line ({exc!s:.60}): {line[:80]!r}")
    return records, notes


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    return parse_jsonl(path.read_text(errors="replace"), path) if path.exists() else ([], [])


# --- locks ----------------------------------------------------------------------------------------------

class FolderLocked(RuntimeError):
    """Another live process holds the folder."""


def _holder_text(info: dict) -> str:
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
            + (f" ({info['cmd']})" if info.get("cmd") else ""))


def process_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    try:  # a zombie is a process that has ended but not yet been reaped
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class FolderLock:
    """An exclusive lock on a folder: flock on <folder>/<name>, which also holds the holder's pid, host and start
    time for the message a second process gets. The kernel drops a flock when its process dies, so the lock of a
    killed process is taken over (with a note naming it); the file is removed on release."""

    def __init__(self, folder: str | Path, name: str = RUN_LOCK, note=None):
        self.path = Path(folder) / name
        self.note = note or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_lock(fd)
                os.close(fd)
                raise FolderLocked(f"{self.path.parent} is in use by {_holder_text(info)} ({self.path}); two "
                                   f"processes never train one folder: wait for it to end or stop it") from None
            try:  # released and removed by its holder between our open and our flock: lock the new file
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_lock(fd)
        if previous.get("pid"):
            self.note(f"{self.path}: took over the lock left by {_holder_text(previous)}"
                      + ("" if process_alive(previous.get("pid")) else ": that process is gone"))
        info = dict(pid=os.getpid(), host=socket.gethostname(), since=datetime.now().isoformat(timespec="seconds"),
                    cmd=" ".join(sys.argv)[:200])
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_lock(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def lock_info(folder: str | Path, name: str = RUN_LOCK) -> dict:
    """What the folder's lock file says about its holder ({} if there is none)."""
    try:
        data = json.loads((Path(folder) / name).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
