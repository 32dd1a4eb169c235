"""Load validation losses and per-layer lambdas from every kind of run record into tidy tables.

Three sources, one parser for the text ones:
- embxlib run folders: `runs/<name>/` with config.json, metrics.jsonl (log.txt as a fallback);
- upstream modded-nanogpt logs (`*.txt`): the variant is the folder name, the run the file stem;
- published results markdown (snimu/modded-nanogpt-experiments): one `## <run name>` section per run.

Log lines are `step:N/M key:value key:value ...`. We anchor on `^step:` because the upstream logs embed the
training script, whose source contains `val_loss` on indented lines, and we read the fields with one regex.
A malformed line is skipped with one ParseWarning naming the file and line number (never its content: a log may
hold anything); nothing raises. Only regular files are read, and only where they really are inside the folder that
holds them: a FIFO (which would block the read forever), a device or a symlink out of its folder is warned about by
name and not read.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import stat
import threading
import warnings
from itertools import compress
from pathlib import Path

import numpy as np
import pandas as pd

from . import ROOT

VAL_COLUMNS = ["run", "variant", "step", "train_time_s", "val_loss", "source"]
TRAIN_COLUMNS = ["run", "variant", "step", "train_time_s", "train_loss", "source"]
# config.json fields that may differ between runs pooled under one variant: the seed, labels, and what does not
# change the losses (checkpoint cadence, untimed warm-up steps whose state is restored)
POOLABLE_FIELDS = frozenset({"seed", "name", "preset", "save_every", "warmup_steps"})
LAMBDA_COLUMNS = ["run", "variant", "step", "stream", "layer", "value", "source"]


class ParseWarning(UserWarning):
    """A line or file that could not be read and was skipped."""


class PoolWarning(UserWarning):
    """Runs pooled under one variant differ in settings that change what their losses mean (pool=True)."""


_FIELD = re.compile(r"(\w+):(\[[^\]]*\]|\S+)")  # key:value, where a value may be a [list, of, floats]
# The lines of a text log that matter, found in one pass over "\n" + text + "\n" (the literal "\n" lets the regex
# engine jump from line start to line start). Groups 1-4: a well-formed validation line, read whole (most lines
# of a large log). Group 5: any other `step:` line carrying val_loss or lambdas (and, in markdown, a heading),
# read field by field with _FIELD. Training-step lines match neither.
_CANONICAL = r"step:(\d{1,18})/(\d{1,18}) val_loss:(\d+\.\d+|nan) train_time:(\d+(?:\.\d+)?)ms step_avg:\S+(?=\n)"
# (the lookahead turns the upstream training-step line away before the line is scanned for val_loss: 2x faster)
_OTHER = r"step:(?!\d+/\d+ train_time:\d+ms step_avg:\S+\n)[^\n]*?(?:val_loss|_lambdas)[^\n]*"
_LOG_EVENTS = re.compile(rf"\n(?:{_CANONICAL}|({_OTHER}))", re.ASCII)
_MD_EVENTS = re.compile(rf"\n(?:{_CANONICAL}|({_OTHER}|##[^\n]*))", re.ASCII)
_METRICS_HEAD = re.compile(  # the start of a metrics.jsonl line as train.py writes it (see _metrics_points)
    r'\n\{"step": (\d{1,18}), "val_loss": (-?\d+(?:\.\d+)?(?:e[+-]?\d+)?|NaN|-?Infinity), '
    r'"train_time_ms": (\d+(?:\.\d+)?(?:e[+-]?\d+)?)[,}]', re.ASCII)
_HEADING = re.compile(r"^#{2,}\s*(.*?)\s*$")  # `##`/`###` start a run; `# Results` is the document title
_STEP_IN_HEADING = re.compile(r"step:\d+/\d+")  # the published 00004 file has `## 61 3step:0/5820 ...`
_REPEAT_SUFFIX = re.compile(r"[\s-]+\d+$")  # `0-3`, `61 3`, `999-record-2`: the trailing repeat index


_QUIET = threading.local()  # a thread that reads runs while they are written (explore.LiveView) sets .on


def _warn(message: str) -> None:
    if getattr(_QUIET, "on", False):  # a missing file or a torn line of a run being written is expected there
        return
    warnings.warn(message, ParseWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------
# text logs: upstream *.txt and published *.md


class _Malformed(ValueError):
    """What is wrong with a line, in words that do not repeat its content."""


def _seconds(value: str) -> float:
    # upstream writes ms; track-3 logs write seconds (`train_time:989.965s`)
    if value.endswith("ms"):
        return float(value[:-2]) / 1000.0
    if value.endswith("s"):
        return float(value[:-1])
    raise _Malformed("train_time without a unit")


def _floats(value: str) -> list[float]:
    if not (value.startswith("[") and value.endswith("]")):
        raise _Malformed("truncated list")
    return [float(v) for v in value[1:-1].split(",")]


def repeat_variant(name: str) -> str:
    """The variant of a published run name: strip the repeat index (`0-3` -> `0`, `61 3` -> `61`, `13` -> `13`)."""
    stripped = _REPEAT_SUFFIX.sub("", name)
    return stripped or name


class _Run:
    __slots__ = ("base", "steps", "times", "losses", "lambdas")

    def __init__(self, base: str, steps=None, times=None, losses=None):
        self.base = base
        # validation points: numpy slices from _parse_text, lists that parse_run_folder appends to
        self.steps = [] if steps is None else steps
        self.times = [] if times is None else times
        self.losses = [] if losses is None else losses
        self.lambdas: list[tuple[int, str, list[float]]] = []  # (step, stream, per-layer values)


def _read_step_line(line: str):
    """(step, total, (train_time_s, val_loss) or None, [(stream, per-layer values)]) of one `step:` line,
    read field by field. Raises KeyError or ValueError for a malformed line."""
    fields = dict(_FIELD.findall(line))
    step_text, total_text = fields["step"].split("/")
    if len(step_text) > 18 or len(total_text) > 18:
        raise _Malformed("step out of range")
    point = (_seconds(fields["train_time"]), float(fields["val_loss"])) if "val_loss" in fields else None
    lambdas = [(k[: -len("_lambdas")], _floats(v)) for k, v in fields.items() if k.endswith("_lambdas")]
    return int(step_text), int(total_text), point, lambdas


def _parse_text(text: str, source: str, sections: bool, default_name: str) -> list[_Run]:
    """The runs in one text file, in document order.

    One regex pass finds every line that matters; well-formed validation lines (most of a large log) come out
    already split into numbers, so no Python code runs per line. The few other lines (headings, lambdas,
    trailing fields, damage) are read field by field, and numpy cuts the validation points into runs.
    """
    padded = "\n" + text.replace("\r\n", "\n") + "\n"
    events = (_MD_EVENTS if sections else _LOG_EVENTS).findall(padded)

    headings: list[tuple[int, str]] = []  # (event index, run name)
    points: list[tuple[int, int, int, float, float]] = []  # (event index, step, total, train_time_s, val_loss)
    lambda_rows: list[tuple[int, int, str, list[float]]] = []  # (event index, step, stream, values)
    at = 0  # where the previous such line starts in padded: its line number costs one count, not a file scan
    lineno = 0
    for k in [k for k, event in enumerate(events) if event[4]]:  # the lines read field by field
        line = events[k][4]
        found = padded.find("\n" + line + "\n", at)
        lineno, at = lineno + padded.count("\n", at, found + 1), found + 1
        if line.startswith("##"):
            title = _HEADING.match(line).group(1)
            fused = _STEP_IN_HEADING.search(title)
            headings.append((k, (title[: fused.start()].strip() if fused else title) or default_name))
            if not fused:
                continue
            line = title[fused.start():]
        try:
            step, total, point, lambdas = _read_step_line(line)
        except KeyError as exc:
            _warn(f"{source}:{lineno}: skipped malformed line (no {exc.args[0]} field)")
            continue
        except _Malformed as exc:
            _warn(f"{source}:{lineno}: skipped malformed line ({exc})")
            continue
        except ValueError:
            _warn(f"{source}:{lineno}: skipped malformed line (a value that is not a number)")
            continue
        if point is not None:
            points.append((k, step, total, *point))
        lambda_rows.extend((k, step, stream, values) for stream, values in lambdas)

    # every validation point in document order: the regex's strings and the numbers read field by field
    columns = list(zip(*events)) or [()] * 5
    is_canonical = [not other for other in columns[4]]
    canonical = list(compress(range(len(events)), is_canonical))
    groups = [tuple(compress(column, is_canonical)) for column in columns[:4]]
    rows = list(zip(*points)) or [()] * 5
    index = np.array(canonical + list(rows[0]), dtype=np.int64)
    order = np.argsort(index, kind="stable")
    index = index[order]
    step = np.array(groups[0] + rows[1], dtype=np.int64)[order]
    total = np.array(groups[1] + rows[2], dtype=np.int64)[order]
    time_s = np.concatenate([np.array(groups[3], dtype=np.float64) / 1000.0,
                             np.array(rows[3], dtype=np.float64)])[order]
    loss = np.array(groups[2] + rows[4], dtype=np.float64)[order]

    # a heading starts a run; so does a step that does not advance or a new step count (concatenated runs)
    heading_at = np.array([h[0] for h in headings], dtype=np.int64)
    titles = [default_name] + [h[1] for h in headings]
    section = np.searchsorted(heading_at, index, side="right")
    new_run = np.ones(len(index), dtype=bool)
    new_run[1:] = (np.diff(section) != 0) | (np.diff(step) <= 0) | (np.diff(total) != 0)
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(index)]
    runs = {int(index[a]): _Run(titles[section[a]], step[a:b], time_s[a:b], loss[a:b]) for a, b in zip(starts, ends)}

    # lambda lines belong to the run of the last validation point at or above them in their section
    lambda_only: dict[int, int] = {}  # section -> first event of its run made of lambdas only
    for k, step_k, stream, values in lambda_rows:
        sec = int(np.searchsorted(heading_at, k, side="right"))
        last = int(np.searchsorted(index, k, side="right")) - 1
        if last >= 0 and section[last] == sec:
            key = int(index[starts[np.searchsorted(starts, last, side="right") - 1]])
        else:  # lambdas before any validation point of their section
            key = lambda_only.setdefault(sec, k)
            runs.setdefault(key, _Run(titles[sec]))
        runs[key].lambdas.append((step_k, stream, values))
    return [runs[key] for key in sorted(runs)]  # keyed by first event: document order


def _run_names(runs: list[_Run]) -> list[str]:
    # a name used by several runs (concatenated logs, repeated headings) gets #1, #2, ...
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.base] = counts.get(run.base, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for run in runs:
        if counts[run.base] == 1:
            names.append(run.base)
        else:
            seen[run.base] = seen.get(run.base, 0) + 1
            names.append(f"{run.base}#{seen[run.base]}")
    return names


def _frames(runs: list[_Run], names: list[str], variants: list[str], source: str, with_lambdas: bool):
    sizes = [len(r.steps) for r in runs]
    vals = pd.DataFrame(
        {
            "run": _strings(names, sizes),
            "variant": _strings(variants, sizes),
            "step": _column([r.steps for r in runs], np.int64),
            "train_time_s": _column([r.times for r in runs], np.float64),
            "val_loss": _column([r.losses for r in runs], np.float64),
            "source": _strings([source], [sum(sizes)]),
        },
        columns=VAL_COLUMNS,
    )
    if not with_lambdas:
        return vals, None
    records = [(name, variant, *rec) for run, name, variant in zip(runs, names, variants) for rec in run.lambdas]
    return vals, _lambda_frame(records, source)


def _strings(values: list[str], sizes: list[int]):
    return pd.array(np.repeat(np.array(values, dtype=object), sizes), dtype="str")


def _column(parts, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(part, dtype=dtype) for part in parts]) if parts else np.array([], dtype=dtype)


def _lambda_frame(records: list[tuple[str, str, int, str, list[float]]], source: str) -> pd.DataFrame:
    # one record per (run, step, stream) holding a per-layer list: expand to one row per layer
    sizes = [len(rec[4]) for rec in records]
    return pd.DataFrame(
        {
            "run": _strings([r[0] for r in records], sizes),
            "variant": _strings([r[1] for r in records], sizes),
            "step": np.repeat(np.array([r[2] for r in records], dtype=np.int64), sizes),
            "stream": _strings([r[3] for r in records], sizes),
            "layer": np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if records else [],
            "value": np.array([v for r in records for v in r[4]], dtype=np.float64),
            "source": _strings([source], [sum(sizes)]),
        },
        columns=LAMBDA_COLUMNS,
    ).astype({"layer": "int64"})


class NotRead(OSError):
    """A file the analysis does not read: not a regular file, or a symlink out of the folder that holds it."""


def _read_text(path: Path) -> str:
    """The text of a regular file whose real location is inside the real location of the folder that holds it;
    NotRead (an OSError naming the file, never its content) for anything else: a FIFO or a device (opened without
    blocking, checked on the open file, never read) or a symlink out of its folder (whose target may be a secret
    the warnings would echo). Logs are written by crashing jobs: a broken byte never fails."""
    path = Path(path)
    real, folder = os.path.realpath(path), os.path.realpath(path.parent)
    if os.path.dirname(real) != folder and not real.startswith(folder.rstrip(os.sep) + os.sep):
        raise NotRead(f"{path}: a symlink out of its folder, not read")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotRead(f"{path}: not a regular file, not read")
        return f.read().decode("utf-8", errors="replace")


def _read_member(path: Path) -> str | None:
    """_read_text of a file of a run folder, or None with a warning naming it when it is not read."""
    try:
        return _read_text(path)
    except OSError as exc:
        _warn(str(exc) if isinstance(exc, NotRead) else f"{path}: unreadable, skipped ({exc.strerror or exc})")
        return None


def parse_log(path, with_lambdas: bool = True) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Validation points and per-layer lambdas of every run in one text file.

    `*.md` files are read as published results (each `##` heading starts a run, its variant is the name
    without the repeat index); any other file as an upstream log (run = file stem, variant = folder name).
    """
    path = Path(from_root(path))
    markdown = path.suffix.lower() == ".md"
    runs = _parse_text(_read_text(path), str(path), sections=markdown, default_name=path.stem)
    names = _run_names(runs)
    variants = [repeat_variant(r.base) if markdown else path.parent.name for r in runs]
    return _frames(runs, names, variants, str(path), with_lambdas)


# ----------------------------------------------------------------------------------------------------------
# embxlib run folders


def _is_run_folder(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "config.json").is_file()


def read_json_file(path: Path) -> dict:
    """The one tolerant JSON reader of the analysis: a JSON object file, or {} with a ParseWarning naming the file
    when it is missing, unreadable, malformed or not an object."""
    try:
        data = json.loads(_read_text(Path(path)))
    except NotRead as exc:
        _warn(f"{exc}; ignored")
        return {}
    except OSError as exc:
        _warn(f"{path}: unreadable JSON, ignored ({exc.strerror or type(exc).__name__})")
        return {}
    except ValueError as exc:  # json's message names a line and column, never the content
        _warn(f"{path}: unreadable JSON, ignored ({exc!s:.80})")
        return {}
    if not isinstance(data, dict):
        _warn(f"{path}: not a JSON object, ignored")
        return {}
    return data


_read_json_file = read_json_file


def _metrics_records(text: str, path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every JSON object line; any other line is warned about by file and line number,
    never by its content."""
    numbered = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    try:  # one C-level parse of the whole file; a bad line sends us to the line-by-line path
        records = json.loads("[" + ",".join(line for _, line in numbered) + "]")
        if all(isinstance(r, dict) for r in records):
            return [(n, r) for (n, _), r in zip(numbered, records)]
    except ValueError:
        pass
    out = []
    for lineno, line in numbered:
        try:
            record = json.loads(line)
        except ValueError as exc:
            _warn(f"{path}:{lineno}: skipped malformed line ({exc.msg if hasattr(exc, 'msg') else 'not JSON'})")
            continue
        if not isinstance(record, dict):
            _warn(f"{path}:{lineno}: skipped malformed line (not a JSON object)")
            continue
        out.append((lineno, record))
    return out


def _metrics_points(text: str):
    """(steps, train_time_s, val_loss) arrays read off the start of every record, or None to decode the JSON.

    The training core writes json.dumps(dict(step=, val_loss=, train_time_ms=, lambdas=, norms=)); decoding a
    record's per-layer lists costs 10-50 us, which dominated loading, so when every line starts as written we read
    the three numbers with one regex and never decode the rest. Anything else takes the JSON path.
    """
    heads = _METRICS_HEAD.findall("\n" + text)
    if not heads or len(heads) != sum(1 for line in text.split("\n") if line.strip()):
        return None
    steps, losses, ms = zip(*heads)
    steps = np.array(steps, dtype=np.int64)
    if np.any(np.diff(steps) <= 0):  # a step twice: the JSON path keeps the last and says so
        return None
    return steps, np.array(ms, dtype=np.float64) / 1000.0, np.array(losses, dtype=np.float64)


def _step(value) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise _Malformed("step is not a whole number")
    step = int(value)
    if not 0 <= step < 10**18:
        raise _Malformed("step out of range")
    return step


def _per_layer(values) -> list[float]:
    # the "ve" stream holds null where a layer has no value embedding
    return [np.nan if v is None else float(v) for v in values]


def parse_run_folder(folder, with_lambdas: bool = True) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Validation points and per-layer lambdas (plus the residual norms as stream "norm") of one embxlib run."""
    folder = Path(from_root(folder))
    config = _read_json_file(folder / "config.json") if (folder / "config.json").exists() else {}
    variant = str(config.get("name") or folder.name)
    run = _Run(folder.name)
    metrics = folder / "metrics.jsonl"
    text = (_read_member(metrics) or "") if metrics.exists() else ""
    points = None if with_lambdas else _metrics_points(text)
    if points is not None:
        run.steps, run.times, run.losses = points
    else:
        by_step: dict[int, tuple] = {}  # a step recorded twice (a resume that did not replace it): the last counts
        for lineno, record in _metrics_records(text, metrics):
            try:
                step = _step(record["step"])
                point = (float(record["train_time_ms"]) / 1000.0, float(record["val_loss"]))
                streams = [(str(k), _per_layer(v)) for k, v in (record.get("lambdas") or {}).items()]
                if record.get("norms") is not None:
                    streams.append(("norm", _per_layer(record["norms"])))
            except KeyError as exc:
                _warn(f"{metrics}:{lineno}: skipped record (no {str(exc.args[0])[:40]!r} field)")
                continue
            except _Malformed as exc:
                _warn(f"{metrics}:{lineno}: skipped record ({exc})")
                continue
            except (TypeError, ValueError, AttributeError):
                _warn(f"{metrics}:{lineno}: skipped record (a value of the wrong type)")
                continue
            if step in by_step:
                _warn(f"{metrics}:{lineno}: step {step} again; kept this record, dropped the earlier one")
            by_step[step] = (point, streams)
        for step, (point, streams) in sorted(by_step.items()):
            run.steps.append(step)
            run.times.append(point[0])
            run.losses.append(point[1])
            if with_lambdas:
                run.lambdas.extend((step, stream, values) for stream, values in streams)
    log_text = (_read_member(folder / "log.txt") if not len(run.steps) and (folder / "log.txt").exists()
                else None)
    if log_text is not None:
        # a run that died before writing metrics may still have its log
        logged = _parse_text(log_text, str(folder / "log.txt"), False, folder.name)
        run.steps, run.times, run.losses = ([x for r in logged for x in getattr(r, name)]
                                            for name in ("steps", "times", "losses"))
    return _frames([run], [folder.name], [variant], str(folder), with_lambdas)


# ----------------------------------------------------------------------------------------------------------
# many inputs


LOG_SUFFIXES = (".txt", ".md")  # upstream logs and published results; what a `**` glob adds besides run folders


def _walk(top: Path) -> tuple[list[Path], list[Path]]:
    """The run folders under top and the text logs not inside one, without following symlinked folders (a link
    back up would never end); a folder that cannot be read is warned about and skipped."""
    def unreadable(exc: OSError) -> None:
        _warn(f"{exc.filename}: unreadable folder, skipped ({exc.strerror})")
    folders, texts = [], []
    for dirpath, _, filenames in os.walk(top, onerror=unreadable):
        d = Path(dirpath)
        if "metrics.jsonl" in filenames or "config.json" in filenames:
            folders.append(d)
        texts.extend(d / f for f in filenames if f.endswith(".txt"))
    folders.sort()
    logs = [p for p in sorted(texts) if not any(f in p.parents for f in folders)]
    return folders, logs


def _glob(pattern: str) -> list[Path]:
    """glob.glob, except that `**` follows no symlinked folder (glob's does, forever round a loop) and gives only
    run folders and log files: not every file and folder inside the runs (log.txt, console.log, checkpoints)."""
    if "**" not in pattern:
        return [Path(m) for m in sorted(glob.glob(pattern))]
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:first]) if first else Path(".")
    if not base.is_dir():
        return []
    folders, logs = _walk(base)  # (warns about unreadable folders, which pathlib's glob skips silently)
    rest = Path(*parts[first:])
    found = set(base.glob(str(rest)))  # pathlib's ** does not follow symlinked folders
    if parts[-1] == "**":  # glob's trailing ** also matches files; pathlib's only folders
        found.update(base.glob(str(rest / "*")))
    runs = set(folders)
    keep = []
    for p in sorted(found):
        if p in runs:
            keep.append(p)
        elif p.name in ("metrics.jsonl", "config.json") and p.parent in runs:
            keep.append(p.parent)  # `runs/**/metrics.jsonl`: its run
        elif p.suffix.lower() in LOG_SUFFIXES and p.is_file() and not any(f in p.parents for f in runs):
            keep.append(p)
    return keep


def from_root(path) -> str:
    """A relative path (or glob) means the same from a notebook in nbs/ (where JupyterLab runs its kernel) as from
    the repository root: there it is taken from the root. Anywhere else it is relative to the working folder, as
    usual (the root itself, or the root blog.render runs a post in); an absolute path is kept as it is."""
    text = str(path)
    if not os.path.isabs(text) and Path.cwd().resolve() == (ROOT / "nbs").resolve():
        return str(ROOT / text)
    return text


def _expand(paths) -> list[Path]:
    """Files and run folders named by paths, globs and directories, each once, in the order given. A folder that
    cannot be read is warned about and skipped, never fatal."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for pattern in paths:
        matches = _glob(from_root(pattern))
        if not matches:
            _warn(f"{pattern}: no such file, folder or match")
        for match in matches:
            try:
                if match.is_dir() and not _is_run_folder(match):
                    if not os.access(match, os.R_OK | os.X_OK):
                        raise PermissionError(13, "Permission denied", str(match))
                    # a folder of runs: its run folders, and the text logs that are not inside one
                    folders, logs = _walk(match)
                    found.extend(folders + logs)
                else:
                    found.append(match)
            except OSError as exc:
                _warn(f"{match}: unreadable, skipped ({exc.strerror or exc})")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _load(paths, with_lambdas: bool, require: bool = False, pool: bool = False):
    vals, lambdas, found = [], [], _expand(paths)
    for path in found:
        parse = parse_run_folder if path.is_dir() else parse_log
        try:
            v, lam = parse(path, with_lambdas=with_lambdas)
        except NotRead as exc:
            _warn(str(exc))
            continue
        except OSError as exc:
            _warn(f"{path}: unreadable ({exc.strerror or exc})")
            continue
        if v.empty:
            _warn(f"{path}: no validation points")
        else:
            _warn_non_finite(v, path)
            vals.append(v)
        if lam is not None and not lam.empty:
            lambdas.append(lam)
    if require and not vals:
        given = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
        raise ValueError(f"no validation points in any input ({len(found)} file(s) or run folder(s) found for "
                         f"{given}); the warnings above say what each input lacks")
    val_table = _disambiguate(pd.concat(vals, ignore_index=True) if vals else _frames([], [], [], "", False)[0])
    check_pooling(val_table, pool)
    if not with_lambdas:
        return val_table, None
    lam_table = pd.concat(lambdas, ignore_index=True) if lambdas else _lambda_frame([], "")
    return val_table, _disambiguate(lam_table)


def pooling_conflicts(table: pd.DataFrame) -> dict[str, dict[str, dict]]:
    """{variant: {field: {value: [sources]}}} for the config.json fields (all but POOLABLE_FIELDS) in which run
    folders loaded under one variant differ. Logs and published results carry no config and are not compared."""
    out: dict[str, dict[str, dict]] = {}
    for variant, sources in table.groupby("variant", sort=False)["source"]:
        configs = {src: _read_json_file(Path(src) / "config.json") for src in pd.unique(sources)
                   if (Path(src) / "config.json").is_file()}
        if len(configs) < 2:
            continue
        fields = sorted(set().union(*configs.values()) - POOLABLE_FIELDS)
        for field in fields:
            values: dict = {}
            for src, cfg in configs.items():
                values.setdefault(json.dumps(cfg.get(field), sort_keys=True), []).append(src)
            if len(values) > 1:
                out.setdefault(str(variant), {})[field] = values
    return out


def _describe_conflicts(conflicts: dict) -> str:
    parts = []
    for variant, fields in conflicts.items():
        shown = []
        for field, values in fields.items():
            shown.append(f"{field} (" + ", ".join(f"{v} in {len(srcs)} run(s), e.g. {srcs[0]}"
                                                 for v, srcs in values.items()) + ")")
        parts.append(f"variant {variant!r} pools runs that differ in " + "; ".join(shown))
    return "; ".join(parts)


def check_pooling(table: pd.DataFrame, pool: bool = False) -> None:
    """Runs averaged as one variant must share their comparison settings (validation tokens, shuffling, steps,
    batch, learning rates, data...): raise ValueError naming the fields that differ, or with pool=True warn."""
    conflicts = pooling_conflicts(table)
    if not conflicts:
        return
    message = _describe_conflicts(conflicts)
    if pool:
        warnings.warn(message + " (pooled anyway: pool=True)", PoolWarning, stacklevel=4)
        return
    raise ValueError(message + ". Load them apart, relabel one set (analysis.load's variants, or runs.select), "
                     "or pass pool=True to pool them anyway")


def _warn_non_finite(vals: pd.DataFrame, path: Path) -> None:
    # kept (a diverged run is a result), but a mean or a crossing over them is not a number
    bad = vals[~np.isfinite(vals["val_loss"].to_numpy())]
    if len(bad):
        first = bad.iloc[0]
        _warn(f"{path}: {len(bad)} non-finite val_loss value(s), kept (first: {first['val_loss']} at step "
              f"{first['step']} of run {first['run']!r})")
    # a clock that is not a number: the point stays on the step axis, and is left out of time axes and ranges
    bad = vals[~np.isfinite(vals["train_time_s"].to_numpy())]
    if len(bad):
        first = bad.iloc[0]
        _warn(f"{path}: {len(bad)} non-finite train_time value(s), kept per step, left out of time axes (first: "
              f"{first['train_time_s']} at step {first['step']} of run {first['run']!r})")


def _disambiguate(table: pd.DataFrame) -> pd.DataFrame:
    # `## 0` in two experiments' results.md are different runs: prefix such names with where they came from
    sources_per_run = table.groupby("run")["source"].nunique()
    clashing = sources_per_run.index[sources_per_run > 1]
    if len(clashing) == 0:
        return table
    table = table.copy()
    mask = table["run"].isin(clashing)
    prefix = table.loc[mask, "source"].map(lambda s: "/".join(Path(s).parts[-2:]))
    table.loc[mask, "run"] = prefix + ":" + table.loc[mask, "run"]
    return table


def load_runs(paths, require: bool = True, pool: bool = False) -> pd.DataFrame:
    """One tidy table of validation points (run, variant, step, train_time_s, val_loss, source).

    paths: run folders, upstream logs, published results markdown, folders of them, and globs of any of these;
    relative ones from the repository root (also from a notebook in nbs/).
    Run names are unique in the result: a name found in several sources is prefixed with `<folder>/<stem>:`.
    When no input gives a single point it raises ValueError (a figure of nothing is a wrong path, not a result);
    require=False returns the empty table instead. Run folders of one variant whose config.json differ in more
    than the seed and labels (POOLABLE_FIELDS) raise ValueError naming the fields; pool=True pools them with a
    PoolWarning.
    """
    return _load(paths, with_lambdas=False, require=require, pool=pool)[0]


_TRAIN_LINE = re.compile(r"^step:(\d{1,18})/(\d{1,18}) train_loss:(\S+) train_time:(\d+(?:\.\d+)?)ms step_avg:\S+ms\n",
                         re.M | re.ASCII)


def parse_train_log(path) -> pd.DataFrame:
    """(step, train_time_s, train_loss) of every complete training-step line of one log.txt, in step order.

    Only whole lines count (a line still being written, or torn by a crash, is left out); a step logged twice (a
    resume repeats the steps after its checkpoint) keeps its last line. Upstream's step lines carry no
    train_loss: an upstream log gives an empty table."""
    text = _read_text(Path(from_root(path))).replace("\r\n", "\n")
    rows = _TRAIN_LINE.findall(text)
    table = pd.DataFrame({"step": np.array([r[0] for r in rows], dtype=np.int64),
                          "train_time_s": np.array([r[3] for r in rows], dtype=np.float64) / 1000.0,
                          "train_loss": pd.to_numeric(pd.Series([r[2] for r in rows], dtype=object), errors="coerce")
                          .astype(np.float64).to_numpy()})
    return table.drop_duplicates("step", keep="last").sort_values("step", kind="stable").reset_index(drop=True)


def load_train_loss(paths) -> pd.DataFrame:
    """Training loss at every step, beside load_runs' validation points: one tidy table (run, variant, step,
    train_time_s, train_loss, source) from the log.txt of the run folders among paths (as load_runs expands and
    names them). Upstream logs and published results have no per-step train loss and add no rows."""
    frames = []
    for path in _expand(paths):
        log = path / "log.txt" if path.is_dir() else path
        if not (path.is_dir() and log.is_file()):
            continue
        config = _read_json_file(path / "config.json") if (path / "config.json").is_file() else {}
        try:
            table = parse_train_log(log)
        except OSError as exc:
            _warn(str(exc) if isinstance(exc, NotRead) else f"{log}: unreadable, skipped ({exc.strerror or exc})")
            continue
        if table.empty:
            continue
        table.insert(0, "run", path.name)
        table.insert(1, "variant", str(config.get("name") or path.name))
        table["source"] = str(path)
        frames.append(table)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "step" else "float64" if c in (
            "train_time_s", "train_loss") else "str") for c in TRAIN_COLUMNS})
    return _disambiguate(pd.concat(frames, ignore_index=True)[TRAIN_COLUMNS])


def load_lambdas(paths, pool: bool = False) -> pd.DataFrame:
    """Per-layer lambdas (run, variant, step, stream, layer, value, source) from the same inputs as load_runs
    (pool as there).

    Streams are named as logged: x, x00, x01, ... (input mixing), v, ve (value mixing), skip/unet; our runs also
    give "norm", the RMS norm of the residual entering each layer.
    """
    return _load(paths, with_lambdas=True, pool=pool)[1]


def run_settings(paths) -> pd.DataFrame:
    """One row per embxlib run folder among paths (as load_runs expands them): source, the config.json fields,
    and the code it ran: commit (from log.txt's header) and dirty (the checkout had uncommitted changes, kept in
    the folder's git.diff); and where: platform (Python's platform string, whose kernel build tells two machines
    of this workplace apart) and cpu (the CPU model, for runs whose header names it, else None). What a post
    states about how its runs were made comes from here."""
    rows = []
    for path in _expand(paths):
        if not (path.is_dir() and (path / "config.json").is_file()):
            continue
        header = ((_read_member(path / "log.txt") or "") if (path / "log.txt").exists() else "")[:4096]
        found = re.search(r"^git commit: (\S+)(.*)$", header, re.M)
        machine = re.search(r"^Running Python \S+ on (\S+)", header, re.M)
        cpu = re.search(r"^cpu: (.+?), \d+ logical CPUs", header, re.M)  # (runs before 2026-12-02 lack this line)
        rows.append({"source": str(path), **_read_json_file(path / "config.json"),
                     "commit": found[1] if found else None, "dirty": bool(found and "uncommitted" in found[2]),
                     "platform": machine[1] if machine else None, "cpu": cpu[1] if cpu else None})
    return pd.DataFrame(rows)


RERUN_LABELS = frozenset({"name", "preset"})  # config.json fields a rerun may change: labels only (the seed must match)


def rerun_match(run, rerun) -> pd.DataFrame:
    """Whether a rerun of a run folder reproduced it: one row per validation step either logged, with both losses
    as metrics.jsonl holds them (every digit of the float), their difference and `equal` (the same float), and
    both clocks. A rerun matches to the last digit where `equal` holds on every row.

    Raises ValueError naming the fields when the two configs differ in more than their labels; a field one
    config.json lacks (added to Config after that run was made) counts as its Config default, which is how the
    run trained."""
    from .config import differing_fields
    a, b = (Path(from_root(p)) for p in (run, rerun))
    differ = sorted(d for d in differing_fields(*(_read_json_file(p / "config.json") for p in (a, b)))
                    if d[0] not in RERUN_LABELS)
    if differ:
        raise ValueError(f"{b} is not a rerun of {a}: their configs differ in "
                         + ", ".join(f"{k} ({va!r} vs {vb!r})" for k, va, vb in differ))
    va, vb = (parse_run_folder(p, with_lambdas=False)[0][["step", "val_loss", "train_time_s"]] for p in (a, b))
    out = va.merge(vb, on="step", how="outer", suffixes=("_run", "_rerun")).sort_values("step", ignore_index=True)
    out["diff"] = out["val_loss_rerun"] - out["val_loss_run"]
    out["equal"] = out["val_loss_rerun"] == out["val_loss_run"]
    return out[["step", "val_loss_run", "val_loss_rerun", "diff", "equal", "train_time_s_run", "train_time_s_rerun"]]


def select(table: pd.DataFrame, variants) -> pd.DataFrame:
    """Keep the given variants in the given order (plots and tables follow it); a dict also renames them."""
    if variants is None:
        return table
    order = list(variants)
    kept = table[table["variant"].isin(order)].copy()
    kept["_order"] = kept["variant"].map({v: i for i, v in enumerate(order)})
    kept = kept.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    if isinstance(variants, dict):
        kept["variant"] = kept["variant"].map(lambda v: str(variants[v]))
    return kept


# ----------------------------------------------------------------------------------------------------------
# logit lens (published predictions.md)


def load_predictions(path) -> dict:
    """The logit-lens file: {"tokens": {pos: token}, "predictions": {component: {pos: {prob: token}}},
    "x_norms": {"x": [per-layer Frobenius norms], "x00": ..., ...}}.

    The file is Python literals (`name={...}` per line); read with ast.literal_eval, never eval.
    """
    found = {}
    for line in _read_text(Path(from_root(path))).split("\n"):
        name, sep, literal = line.partition("=")
        if sep and name.strip() in ("tokens", "predictions", "x_norms"):
            found[name.strip()] = ast.literal_eval(literal.strip())
    missing = {"tokens", "predictions"} - set(found)
    if missing:
        raise ValueError(f"{path}: no {', '.join(sorted(missing))} line")
    return found


def logit_lens_table(preds: dict, components=None, n_positions: int = 32) -> pd.DataFrame:
    """Top-1 next-token prediction per position (rows) and component (columns), with the input token first.

    components default to the seed post's choice: x at the input of the last layer, x00, x01 and the value
    embeddings (x-15, x00, x01, ve0, ve1, ve2 in the published file).
    """
    predictions, tokens = preds["predictions"], preds["tokens"]
    if components is None:
        last_x = max((c for c in predictions if re.fullmatch(r"x-\d+", c)), key=lambda c: int(c[2:]), default=None)
        components = [c for c in [last_x, "x00", "x01", "ve0", "ve1", "ve2"] if c in predictions]
    positions = sorted(tokens)[:n_positions]
    columns = {"token": [tokens[p] for p in positions]}
    for component in components:
        # each position maps probability -> token; the top-1 is the largest probability
        columns[component] = [predictions[component][p][max(predictions[component][p])] for p in positions]
    return pd.DataFrame(columns, index=pd.Index(positions, name="position"))


def top_predictions(preds: dict, component: str, position: int) -> list[str]:
    """A component's predicted next tokens at one position, most likely first (as many as the file keeps)."""
    at = preds["predictions"][component][position]
    return [at[prob] for prob in sorted(at, reverse=True)]


def logit_lens_markdown(table: pd.DataFrame) -> str:
    """The table as GitHub markdown, tokens shown as Python literals so that newlines and spaces stay visible, and as
    text: a token's HTML is escaped (markdown passes raw HTML through), as is what would end a cell or start code."""
    import html
    shown = table.map(lambda t: html.escape(repr(t), quote=False).replace("|", "\\|").replace("`", "\\`"))
    return shown.to_markdown()
