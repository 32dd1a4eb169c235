"""The run folder, shared by training, launching, sweeps, the live view and the readers: its name (one format),
whether it is new, moving one aside, the run's record (log.txt, metrics.jsonl, summary.json, provenance; a death
recorded by the launcher), and its safety: names that are one plain folder, files replaced whole
(write-then-rename), torn last lines repaired with a note, and a lock so that two processes never train one
folder."""
from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import traceback
import warnings
from datetime import datetime
from pathlib import Path

from . import ROOT

RUN_LOCK, SWEEP_LOCK = "run.lock", "sweep.lock"
SLURM_RECORD = "slurm.json"  # the SLURM job of a sweep run (embxlib/slurm.py), written before the trainer starts


# --- names -------------------------------------------------------------------------------------------

MAX_NAME_BYTES = 255  # a folder name on Linux and macOS file systems (NAME_MAX)


def default_run_name(name: str, seed: int, when: datetime | None = None) -> str:
    """A run folder's default name: <date>-<time>_<variant name>_s<seed>."""
    return f"{when or datetime.now():%Y%m%d-%H%M%S}_{name}_s{seed}"


def is_new_run_dir(d: Path) -> bool:
    """Nothing there yet but what the launcher writes first: the validated config.json it hands the trainer, the
    executed notebook, console.log, its lock, and a SLURM sweep's record of the run's job."""
    return not d.exists() or all(p.suffix == ".ipynb" or p.name in ("config.json", "console.log", RUN_LOCK,
                                                                     SLURM_RECORD) for p in d.iterdir())


def new_run_dir(run_dir: str | None, runs_root: str, name: str, seed: int) -> Path:
    d = Path(run_dir) if run_dir else Path(runs_root) / default_run_name(name, seed)
    if not is_new_run_dir(d):
        raise FileExistsError(f"run folder {d} already exists and is not empty; runs are never overwritten: "
                              f"choose another --run-dir, or continue it with --resume {d}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def move_aside(run_dir: Path, echo) -> Path:
    """A run that crashed before its first checkpoint cannot resume: its folder (logs and all) is kept under a new
    name, so that the run starts again in an empty one."""
    aside = run_dir.with_name(f"{run_dir.name}.failed-{datetime.now():%Y%m%d-%H%M%S}")
    with FolderLock(run_dir, RUN_LOCK, note=echo):  # not while a launcher outside the sweep trains it
        run_dir.rename(aside)
    (aside / RUN_LOCK).unlink(missing_ok=True)
    return aside


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


# --- the run's record ---------------------------------------------------------------------------------

class RunLog:
    """Rank 0 writes log.txt (upstream line format) and metrics.jsonl as it goes, flushing every line, so a crash
    keeps everything written so far. Other ranks write nothing."""

    def __init__(self, run_dir: Path, active: bool, echo_every: int = 1):
        self.dir, self.active, self.echo_every = run_dir, active, echo_every
        self.log = open(run_dir / "log.txt", "a", buffering=1) if active else None
        self.replace_from: int | None = None  # resumed: the first new record replaces the old ones from this step
        self.finished: dict | None = None  # resumed after finishing: the summary that stays until it finishes again
        self.summary: dict = {}  # the summary record() writes at the end

    def line(self, s: str, console: bool = True) -> None:
        if not self.active:
            return
        try:
            self.log.write(s + "\n")
        except OSError as e:  # a full disk: say which file it refused
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(self.dir / "log.txt")) from e
            raise
        if console:
            print(s, flush=True)

    def metrics(self, rec: dict) -> None:
        if not self.active:
            return
        path = self.dir / "metrics.jsonl"
        if self.replace_from is None:
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:  # a full disk: say which file it refused
                if e.filename is None:
                    raise OSError(e.errno, e.strerror, str(path)) from e
                raise
            return
        # replaced now that a new record exists, not at the resume: a resume that dies first loses nothing
        old, notes = read_jsonl(path)
        for note in notes:
            self.line(f"# {note}")
        keep = [r for r in old if isinstance(r.get("step"), int) and r["step"] < self.replace_from]
        write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in keep + [rec]))
        self.replace_from = None

    def write_json(self, name: str, obj: dict) -> None:
        if self.active:
            write_json_atomically(self.dir / name, obj)

    def resume(self) -> None:
        """Continue a run folder: clear what the interrupted process left half-written, keep what it finished."""
        if not self.active:
            return
        if end_torn_line(self.dir / "log.txt"):  # before our first line, which would be glued to it
            self.line(f"# {self.dir / 'log.txt'}: ended its torn last line (the run was stopped mid-write)")
        for name in remove_stale_tmp(self.dir):
            self.line(f"# removed {name}: a half-written file of the interrupted run")
        previous = read_json(self.dir / "summary.json")
        self.finished = previous if previous and previous.get("status") == "finished" else None

    def write_summary(self, summary: dict, in_place: bool = False) -> None:
        """summary.json holds the newest complete results: while a resumed finished run runs or fails, its finished
        summary stays (status, numbers) and the resume's own status and error are under "resume". in_place: over
        the old file's bytes instead of write-then-rename (a full disk has no block for the .tmp)."""
        if self.finished is not None and summary.get("status") != "finished":
            summary = {**self.finished, "resume": {k: summary[k] for k in ("status", "error") if k in summary}}
        if not in_place:
            self.write_json("summary.json", summary)
        elif self.active:
            path = self.dir / "summary.json"
            data = json.dumps(summary, indent=2).encode()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.pwrite(fd, data, 0)
                    os.ftruncate(fd, len(data))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(path)) from e

    def write_summary_or_say_so(self, summary: dict) -> None:
        """The summary, whole; when even that fails (a full disk: its .tmp needs a new block), rewrite summary.json
        in place (its own blocks are enough) and say so on stderr and in log.txt, naming the file."""
        try:
            self.write_summary(summary)
            return
        except OSError as e:
            problem = e
        path = self.dir / "summary.json"
        text = f"could not write {path} whole ({problem})"
        try:
            self.write_summary(summary, in_place=True)
            text += f"; rewrote it in place: status {summary.get('status')}"
        except OSError as e2:
            text += f", nor in place ({e2}); it is out of date: the run's status is {summary.get('status')}" + (
                f" ({summary['error']})" if summary.get("error") else "")
        print(f"error: {text}", file=sys.stderr, flush=True)
        try:
            self.line(f"# {text}", console=False)
        except OSError:
            pass

    def fatal_errors_to_log(self):
        """A fatal signal no Python code can handle (SIGBUS, SIGSEGV, SIGFPE, SIGABRT, SIGILL) ends log.txt with
        faulthandler's report and the Python traceback, instead of leaving it without a word. Returns the undo."""
        if not self.active:
            return lambda: None
        was = faulthandler.is_enabled()
        self.log.flush()
        faulthandler.enable(file=self.log, all_threads=False)

        def undo():
            faulthandler.disable()
            if was:  # as it was: to stderr
                try:
                    faulthandler.enable(file=sys.__stderr__)
                except (AttributeError, ValueError, OSError):
                    pass
        return undo

    def close(self):
        if self.log:
            try:
                self.log.close()
            except OSError:  # its last lines could not be written (a full disk): the error said so already
                pass


@contextlib.contextmanager
def record(run_dir: Path, rank: int, stops, resume: bool, resumable=lambda: True, **summary):
    """The run's record while it trains, yielding its RunLog (log.summary: the summary, filled in by the trainer):
    the folder's lock (rank 0), fatal signals into log.txt, summary.json `running` from the start (a run killed from
    outside still says it never finished), and at the end, whatever happened, the summary written whole: `stopped`
    with the signal (stops: the process's Stops; resumable(): whether the run has a checkpoint to continue from, so
    the stop line names --resume), `failed` with the error and a log line saying so, or what the trainer filled in."""
    lock = hold_run_dir(run_dir) if rank == 0 else None
    log = RunLog(run_dir, rank == 0)
    crash_to_log = log.fatal_errors_to_log()  # SIGBUS (a shard truncated under its memmap), SIGSEGV: in log.txt
    if resume:
        log.resume()
    log.summary = dict(status="running", run_dir=str(run_dir), **summary)
    log.write_summary(log.summary)
    try:
        stops.raise_if_stopped()  # a signal that came while the folder was being set up
        yield log
    except BaseException as e:  # keep what we have, say what happened, then fail loudly
        stops.armed = False  # from here on a signal is noted, not raised: the record below is written whole
        if stops.by_signal():
            log.summary.update(status="stopped", error=stops.reason)
            message = f"# STOPPED on rank {rank}: {stops.reason}" + (
                f"; --resume {run_dir} continues from its last checkpoint" if resumable() else "")
        else:
            error = stops.reason if isinstance(e, KeyboardInterrupt) and stops.reasons else f"{type(e).__name__}: {e}"
            log.summary.update(status="failed", error=error)
            message = f"# FAILED on rank {rank}: {error}"
        try:
            log.line(message)
        except OSError as le:  # the disk that failed the run may refuse this line too; the summary below says it
            print(f"error: could not write {run_dir / 'log.txt'}: {le}; {message[2:]}", file=sys.stderr, flush=True)
        if rank != 0:
            print(f"[rank {rank}] {message[2:]}", file=sys.stderr, flush=True)
        if log.summary["status"] == "failed":
            traceback.print_exc()
        raise
    finally:
        stops.armed = False
        try:
            log.write_summary_or_say_so(log.summary)
        finally:
            crash_to_log()
            log.close()
            if lock is not None:
                lock.release()


def hold_run_dir(run_dir: Path) -> FolderLock | None:
    """Rank 0 holds the run folder's lock while it trains; a launcher holds it for the trainers it starts."""
    holder = lock_info(run_dir)
    launcher = os.environ.get("EMBXLIB_LAUNCHER_PID")
    if launcher and str(holder.get("pid")) == launcher and holder.get("host") == socket.gethostname():
        return None
    return FolderLock(run_dir, RUN_LOCK).acquire()


def git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def provenance(run_dir: Path) -> str:
    """The commit the run was made from; uncommitted changes to tracked files go to <run>/git.diff, so that the
    commit plus that diff (`git apply`) is the code that ran."""
    commit = (git("rev-parse", "HEAD") or "").strip()
    if not commit:
        return "unknown (not a git checkout)"
    diff = git("diff", "HEAD", "--binary") or ""
    if not diff:
        return f"{commit} (clean)"
    (run_dir / "git.diff").write_text(diff)
    files = len((git("diff", "HEAD", "--name-only") or "").split())
    return f"{commit} + uncommitted changes to {files} tracked file(s), saved in git.diff"


def record_death(run_dir: Path, cause: str, rank_died: bool = False) -> None:
    """A trainer killed by a signal no code can handle (SIGKILL from the OOM killer, SIGBUS) leaves its summary at
    running; the launcher, which holds the folder's lock, records what torchrun saw. rank_died: torchrun's report
    names a rank that died by itself (rank_death), which is the cause whatever rank 0 recorded: `stopped` by the
    SIGTERM torchrun sends the survivors, or `failed` with its lost connection to the dead peer (kept after it)."""
    s = read_json(run_dir / "summary.json")
    if not s:
        return
    ended = ("running", "stopped", "failed") if rank_died else ("running",)
    part = s if s.get("status") in ended else s.get("resume") if (s.get("resume") or {}).get("status") in \
        ended else None
    if part is None:
        return
    earlier = f"; rank 0 recorded: {part['error']}" if rank_died and part.get("error") else ""
    part.update(status="failed", error=f"{cause} (recorded by the launcher: the trainer could not){earlier}")
    try:
        write_json_atomically(run_dir / "summary.json", s)
    except OSError as e:
        print(f"error: could not record the failure in {run_dir / 'summary.json'}: {e}", file=sys.stderr, flush=True)


# the lines of a console log that say why a run failed: our trainer's own reports, argparse's and main()'s
# "error:", the last line of a Python traceback, and the signal that killed a rank (torchrun's report, e.g. the
# kernel's OOM killer)
FAILURE_CAUSE = re.compile(r"\[rank \d+\] \w|# FAILED on rank|(?:[\w. -]+: )?error: |(?:\w+\.)*(?!ChildFailedError)"
                           r"\w*(?:Error|Exception)\b:? |(?:traceback : )?Signal \d+ \(SIG(?!TERM)\w+\) received")


# one process of torchrun's failure report: its rank, then (a few lines on) its exit code and traceback line
TORCHRUN_FAILURE = re.compile(r"^\s*rank\s*:\s*(\d+).*?^\s*exitcode\s*:\s*(-?\d+).*?^\s*traceback\s*:\s*(.*?)$",
                              re.M | re.S)
# how a run is stopped from outside (resumable, not failed): Ctrl-C; kill, timeout, Slurm, docker stop, torchrun;
# a closed terminal
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def rank_death(report: str) -> str | None:
    """The first rank in torchrun's failure report that died by itself, not stopped: killed by a signal other than
    a stop signal (SIGKILL from the OOM killer, SIGSEGV), or exiting with an error code that is not a stop's
    128 + n. E.g. 'rank 1 killed by SIGKILL'; None when every rank listed was stopped (or there is no report)."""
    for m in TORCHRUN_FAILURE.finditer(report):
        rank, code, trace = int(m[1]), int(m[2]), m[3]
        sig = re.match(r"Signal (\d+) \((SIG\w+)\)", trace)
        if sig and sig[2] not in STOP_SIGNALS:
            return f"rank {rank} killed by {sig[2]}"
        if not sig and code > 0 and code - 128 not in [signal.Signals[s].value for s in STOP_SIGNALS]:
            return f"rank {rank} exited with code {code}"
    return None


def first_line(e: BaseException) -> str:
    """An error's type and the first line of its message (a notebook's error: its ename and evalue)."""
    text = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def clock(seconds: float) -> str:
    """A duration as m:ss or h:mm:ss."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


# --- log.txt's step lines -----------------------------------------------------------------------------

# `step:N/M [val_loss:V |train_loss:L ]train_time:Tms step_avg:Sms`, upstream's format (runs.py reads the
# published logs' variants of it)
STEP_LINE = re.compile(r"step:(\d+)/(\d+)(?: val_loss:(\S+))?(?: train_loss:(\S+))?(?: train_time:(\d+)ms"
                       r" step_avg:([\d.]+)ms)?")


def step_line(step: int, total: int, train_ms: float, val_loss: float | None = None,
              train_loss: float | None = None) -> str:
    """One step line: with val_loss at a validation, with train_loss after a training step, or neither."""
    loss = (f" val_loss:{val_loss:.6f}" if val_loss is not None else "") + (
        f" train_loss:{train_loss:.4f}" if train_loss is not None else "")
    return f"step:{step}/{total}{loss} train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms"


def parse_step_line(line: str, anywhere: bool = False) -> dict | None:
    """A step line's fields (step, total, val_loss, train_loss, train_time_ms, step_avg_ms; None where absent),
    or None for any other line. anywhere: `step:` may come after a prefix (console output, torchrun's `[rank0]:`)."""
    i = line.find("step:") if anywhere else 0
    m = STEP_LINE.match(line, i) if i >= 0 else None
    if m is None:
        return None
    num = lambda s: None if s is None else float(s)  # noqa: E731
    return dict(step=int(m[1]), total=int(m[2]), val_loss=num(m[3]), train_loss=num(m[4]),
                train_time_ms=num(m[5]), step_avg_ms=num(m[6]))
