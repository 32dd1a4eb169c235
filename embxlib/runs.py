"""Load validation losses and per-layer lambdas from every kind of run record into tidy tables.

Three sources, one parser for the text ones:
- embxlib run folders: `runs/<name>/` with config.json, metrics.jsonl (log.txt as a fallback);
- upstream modded-nanogpt logs (`*.txt`): the variant is the folder name, the run the file stem;
- published results markdown (snimu/modded-nanogpt-experiments): one `## <run name>` section per run.

Log lines are `step:N/M key:value key:value ...`. We anchor on `^step:` because the upstream logs embed the
training script, whose source contains `val_loss` on indented lines, and we read the fields with one regex.
A malformed line is skipped with one ParseWarning naming the file and line number; nothing raises.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

VAL_COLUMNS = ["run", "variant", "step", "train_time_s", "val_loss", "source"]
LAMBDA_COLUMNS = ["run", "variant", "step", "stream", "layer", "value", "source"]


class ParseWarning(UserWarning):
    """A line or file that could not be read and was skipped."""


_FIELD = re.compile(r"(\w+):(\[[^\]]*\]|\S+)")  # key:value, where a value may be a [list, of, floats]
_HEADING = re.compile(r"^#{2,}\s*(.*?)\s*$")  # `##`/`###` start a run; `# Results` is the document title
_STEP_IN_HEADING = re.compile(r"step:\d+/\d+")  # the published 00004 file has `## 61 3step:0/5820 ...`
_REPEAT_SUFFIX = re.compile(r"[\s-]+\d+$")  # `0-3`, `61 3`, `999-record-2`: the trailing repeat index


def _warn(message: str) -> None:
    warnings.warn(message, ParseWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------
# text logs: upstream *.txt and published *.md


def _seconds(value: str) -> float:
    # upstream writes ms; track-3 logs write seconds (`train_time:989.965s`)
    if value.endswith("ms"):
        return float(value[:-2]) / 1000.0
    if value.endswith("s"):
        return float(value[:-1])
    raise ValueError(f"train_time without a unit: {value!r}")


def _floats(value: str) -> list[float]:
    if not (value.startswith("[") and value.endswith("]")):
        raise ValueError("truncated list")
    return [float(v) for v in value[1:-1].split(",")]


def repeat_variant(name: str) -> str:
    """The variant of a published run name: strip the repeat index (`0-3` -> `0`, `61 3` -> `61`, `13` -> `13`)."""
    stripped = _REPEAT_SUFFIX.sub("", name)
    return stripped or name


class _Run:
    __slots__ = ("base", "vals", "lambdas", "last_step", "total")

    def __init__(self, base: str):
        self.base = base
        self.vals: list[tuple[int, float, float]] = []  # (step, train_time_s, val_loss)
        self.lambdas: list[tuple[int, str, list[float]]] = []  # (step, stream, per-layer values)
        self.last_step = -1
        self.total: int | None = None


def _parse_text(text: str, source: str, sections: bool, default_name: str) -> list[_Run]:
    runs: list[_Run] = []
    base = default_name
    current: _Run | None = None
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if sections and line.startswith("##"):
            title = _HEADING.match(line).group(1)
            fused = _STEP_IN_HEADING.search(title)
            base, current = (title[: fused.start()].strip() if fused else title) or default_name, None
            if not fused:
                continue
            line = title[fused.start():]
        if not line.startswith("step:"):
            continue
        # training-step lines (`step:126/5960 train_time:...`) carry nothing we keep: skip them cheaply
        if "val_loss" not in line and "_lambdas" not in line:
            continue
        try:
            fields = dict(_FIELD.findall(line))
            step_text, total_text = fields["step"].split("/")
            step, total = int(step_text), int(total_text)
            if "val_loss" in fields:
                point = (step, _seconds(fields["train_time"]), float(fields["val_loss"]))
                # a step that does not advance, or a new step count, starts the next of several concatenated runs
                if current is None or step <= current.last_step or total != current.total:
                    current = _Run(base)
                    runs.append(current)
                current.vals.append(point)
                current.last_step, current.total = step, total
            lambdas = [(step, k[: -len("_lambdas")], _floats(v)) for k, v in fields.items() if k.endswith("_lambdas")]
            if lambdas:
                if current is None:
                    current = _Run(base)
                    runs.append(current)
                current.lambdas.extend(lambdas)
        except KeyError as exc:
            _warn(f"{source}:{lineno}: skipped malformed line (no {exc.args[0]} field): {line[:80]!r}")
        except ValueError as exc:
            _warn(f"{source}:{lineno}: skipped malformed line ({exc!s:.60}): {line[:80]!r}")
    return runs


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
    vals = pd.DataFrame(
        {
            "run": np.repeat(names, [len(r.vals) for r in runs]),
            "variant": np.repeat(variants, [len(r.vals) for r in runs]),
            **dict(zip(["step", "train_time_s", "val_loss"], _columns([p for r in runs for p in r.vals], 3))),
            "source": source,
        },
        columns=VAL_COLUMNS,
    ).astype({"run": "str", "variant": "str", "step": "int64", "train_time_s": "float64", "val_loss": "float64",
              "source": "str"})
    if not with_lambdas:
        return vals, None
    records = [(name, variant, *rec) for run, name, variant in zip(runs, names, variants) for rec in run.lambdas]
    return vals, _lambda_frame(records, source)


def _columns(rows: list[tuple], width: int) -> list[list]:
    return [list(col) for col in zip(*rows)] if rows else [[] for _ in range(width)]


def _lambda_frame(records: list[tuple[str, str, int, str, list[float]]], source: str) -> pd.DataFrame:
    # one record per (run, step, stream) holding a per-layer list: expand to one row per layer
    sizes = [len(rec[4]) for rec in records]
    frame = pd.DataFrame(
        {
            "run": np.repeat([r[0] for r in records], sizes),
            "variant": np.repeat([r[1] for r in records], sizes),
            "step": np.repeat(np.array([r[2] for r in records], dtype="int64"), sizes),
            "stream": np.repeat([r[3] for r in records], sizes),
            "layer": np.concatenate([np.arange(n) for n in sizes]) if records else [],
            "value": np.array([v for r in records for v in r[4]], dtype="float64"),
            "source": source,
        },
        columns=LAMBDA_COLUMNS,
    )
    return frame.astype({"run": "str", "variant": "str", "step": "int64", "stream": "str", "layer": "int64",
                         "value": "float64", "source": "str"})


def _read_text(path: Path) -> str:
    # logs are written by crashing jobs: never fail on a broken byte
    return path.read_bytes().decode("utf-8", errors="replace")


def parse_log(path, with_lambdas: bool = True) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Validation points and per-layer lambdas of every run in one text file.

    `*.md` files are read as published results (each `##` heading starts a run, its variant is the name
    without the repeat index); any other file as an upstream log (run = file stem, variant = folder name).
    """
    path = Path(path)
    markdown = path.suffix.lower() == ".md"
    runs = _parse_text(_read_text(path), str(path), sections=markdown, default_name=path.stem)
    names = _run_names(runs)
    variants = [repeat_variant(r.base) if markdown else path.parent.name for r in runs]
    return _frames(runs, names, variants, str(path), with_lambdas)


# ----------------------------------------------------------------------------------------------------------
# embxlib run folders


def _is_run_folder(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "config.json").is_file()


def _read_json_file(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        _warn(f"{path}: unreadable JSON, ignored")
        return {}


def _metrics_records(path: Path) -> list[dict]:
    lines = [line for line in _read_text(path).split("\n") if line.strip()]
    try:  # one C-level parse of the whole file; a bad line sends us to the line-by-line path
        records = json.loads("[" + ",".join(lines) + "]")
        if all(isinstance(r, dict) for r in records):
            return records
    except ValueError:
        pass
    records = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            records.append(record)
        except ValueError as exc:
            _warn(f"{path}:{lineno}: skipped malformed line ({exc!s:.60}): {line[:80]!r}")
    return records


def _per_layer(values) -> list[float]:
    # the "ve" stream holds null where a layer has no value embedding
    return [np.nan if v is None else float(v) for v in values]


def parse_run_folder(folder, with_lambdas: bool = True) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Validation points and per-layer lambdas (plus the residual norms as stream "norm") of one embxlib run."""
    folder = Path(folder)
    config = _read_json_file(folder / "config.json") if (folder / "config.json").is_file() else {}
    variant = str(config.get("name") or folder.name)
    run = _Run(folder.name)
    metrics = folder / "metrics.jsonl"
    for index, record in enumerate(_metrics_records(metrics) if metrics.is_file() else [], 1):
        try:
            step = int(record["step"])
            run.vals.append((step, float(record["train_time_ms"]) / 1000.0, float(record["val_loss"])))
            if with_lambdas:
                for stream, values in (record.get("lambdas") or {}).items():
                    run.lambdas.append((step, str(stream), _per_layer(values)))
                if record.get("norms") is not None:
                    run.lambdas.append((step, "norm", _per_layer(record["norms"])))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            _warn(f"{metrics}: record {index}: skipped ({exc!s:.60})")
    if not run.vals and (folder / "log.txt").is_file():
        # a run that died before writing metrics may still have its log
        runs = _parse_text(_read_text(folder / "log.txt"), str(folder / "log.txt"), False, folder.name)
        run.vals = [p for r in runs for p in r.vals]
    return _frames([run], [folder.name], [variant], str(folder), with_lambdas)


# ----------------------------------------------------------------------------------------------------------
# many inputs


def _expand(paths) -> list[Path]:
    """Files and run folders named by paths, globs and directories, each once, in the order given."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(str(pattern), recursive=True))
        if not matches:
            _warn(f"{pattern}: no such file, folder or match")
        for match in map(Path, matches):
            if match.is_dir() and not _is_run_folder(match):
                # a folder of runs: its run folders, and the text logs that are not inside one
                folders = sorted({p.parent for name in ("metrics.jsonl", "config.json") for p in match.rglob(name)})
                logs = [p for p in sorted(match.rglob("*.txt")) if not any(f in p.parents for f in folders)]
                found.extend(folders + logs)
            else:
                found.append(match)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _load(paths, with_lambdas: bool):
    vals, lambdas = [], []
    for path in _expand(paths):
        parse = parse_run_folder if path.is_dir() else parse_log
        try:
            v, lam = parse(path, with_lambdas=with_lambdas)
        except OSError as exc:
            _warn(f"{path}: unreadable ({exc})")
            continue
        if v.empty:
            _warn(f"{path}: no validation points")
        else:
            vals.append(v)
        if lam is not None and not lam.empty:
            lambdas.append(lam)
    val_table = _disambiguate(pd.concat(vals, ignore_index=True) if vals else _frames([], [], [], "", False)[0])
    if not with_lambdas:
        return val_table, None
    lam_table = pd.concat(lambdas, ignore_index=True) if lambdas else _lambda_frame([], "")
    return val_table, _disambiguate(lam_table)


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


def load_runs(paths) -> pd.DataFrame:
    """One tidy table of validation points (run, variant, step, train_time_s, val_loss, source).

    paths: run folders, upstream logs, published results markdown, folders of them, and globs of any of these.
    Run names are unique in the result: a name found in several sources is prefixed with `<folder>/<stem>:`.
    """
    return _load(paths, with_lambdas=False)[0]


def load_lambdas(paths) -> pd.DataFrame:
    """Per-layer lambdas (run, variant, step, stream, layer, value, source) from the same inputs as load_runs.

    Streams are named as logged: x, x00, x01, ... (input mixing), v, ve (value mixing), skip/unet; our runs also
    give "norm", the RMS norm of the residual entering each layer.
    """
    return _load(paths, with_lambdas=True)[1]


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
    for line in _read_text(Path(path)).split("\n"):
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


def logit_lens_markdown(table: pd.DataFrame) -> str:
    """The table as GitHub markdown, tokens shown as Python literals so that newlines and spaces stay visible."""
    shown = table.map(lambda t: repr(t).replace("|", "\\|"))
    return shown.to_markdown()
