"""The steps of nbs/analyze_runs.ipynb: read the runs it is given, check that they are there, take the defaults
from the data, and write figures and tables under one output folder.

Inputs and out_dir are relative to the repository root. Without out_dir everything goes to a new folder
runs/analysis/<date>-<time>/ (ignored by git): committed folders such as images/ are written only when named.
"""
from __future__ import annotations

import math
import re
import warnings
from datetime import datetime
from pathlib import Path

import pandas as pd

from . import at_root, plots, runs, stats

ANALYSIS_ROOT = "runs/analysis"
MEDIUM_TARGET = 2.92  # the medium track's loss target: upstream logs and published results


def out_folder(out_dir=None) -> Path:
    """out_dir (created if needed), or with None a new folder runs/analysis/<date>-<time>[-n]."""
    if out_dir:
        out = at_root(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = at_root(ANALYSIS_ROOT) / f"{datetime.now():%Y%m%d-%H%M%S}"
    out, n = base, 1
    while True:
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            n += 1
            out = base.with_name(f"{base.name}-{n}")


def load(inputs, variants=None, pool: bool = False, **named) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validation points and lambdas of the runs in inputs (paths or globs from the repository root).

    variants: keep these, in this order (a dict also relabels them); None keeps every variant found: a run
    folder's variant is the `name` in its config.json, an upstream log's its folder, a results.md run's its number
    without the repeat index. named: parameters that name one (relabelled) variant, e.g. baseline="x00-ve2"; None
    is allowed. Raises ValueError naming the inputs when they hold no validation point (runs.load_runs), or
    naming a variant that is not among them. Run folders shown as one variant must share their comparison settings
    (runs.check_pooling): otherwise ValueError naming the fields that differ, unless pool=True."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths = [str(at_root(p)) for p in inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runs.PoolWarning)  # checked below, on the variants shown
        val = runs.load_runs(paths, pool=True)  # raises when no input gives a validation point
    if variants is not None:
        found = list(pd.unique(val["variant"]))
        missing = [v for v in variants if v not in found]
        if missing:
            raise ValueError(f"variants {missing} are not in the inputs; they hold {found}")
    val = runs.select(val, variants)
    runs.check_pooling(val, pool)  # after relabelling: runs kept apart by variants= are not pooled
    shown = list(pd.unique(val["variant"]))
    for key, value in named.items():
        if value is not None and value not in shown:
            raise ValueError(f"{key}={value!r} is not one of the variants shown: {shown}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runs.PoolWarning)  # checked above, on the variants shown
        lam = runs.load_lambdas(paths, pool=True)
    return val, runs.select(lam, variants)


def train_loss(inputs, variants=None) -> pd.DataFrame:
    """The per-step training loss (runs.load_train_loss) of the run folders among inputs (paths or globs from the
    repository root), the variants kept and relabelled as load does; empty for logs and published results."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return runs.select(runs.load_train_loss([str(at_root(p)) for p in inputs]), variants)


def run_target(val: pd.DataFrame) -> float:
    """The target_val_loss the runs were trained with (their config.json) when they all agree, else 2.92."""
    targets = set()
    for source in pd.unique(val["source"]):
        config = Path(source) / "config.json"
        if not config.is_file():
            return MEDIUM_TARGET
        targets.add(runs.read_json_file(config).get("target_val_loss"))  # a malformed one: a warning naming it
    return targets.pop() if len(targets) == 1 and None not in targets else MEDIUM_TARGET


def last_quarter(val: pd.DataFrame, x: str) -> list:
    """[start, end] of the last quarter of the shortest run in x ("step" or "train_time_s"): inside every run."""
    finite = val[x].astype(float).where(lambda v: v.abs() != float("inf"))  # a non-finite clock: left out
    end = float(finite.groupby(val["run"]).max().min())
    return [math.floor(0.75 * end), math.ceil(end)]


def loss_figures(val: pd.DataFrame, out: Path, step_zooms, time_zooms, band: str, target: float) -> list[Path]:
    """Each variant's mean curve with its band per step and per training time, the whole run and each zoom, saved
    as val_loss-{step,time}[-from-to].png, each with a -runs twin drawing every run. Returns the means' paths."""
    saved = []
    for x, zooms in (("step", step_zooms), ("train_time_s", time_zooms)):
        axis = "step" if x == "step" else "time"
        for xlim in [None, *zooms]:
            name = f"val_loss-{axis}" + (f"-{xlim[0]}-{xlim[1]}" if xlim else "")
            span = f", {axis} {xlim[0]}-{xlim[1]}" if xlim else ""
            fig = plots.plot_val_loss(val, x=x, xlim=xlim, average=True, band=band, target=target,
                                      title=f"validation loss per {axis}: mean of each variant's runs ({band}){span}")
            saved.append(plots.save(fig, out / name))
            plots.save(plots.plot_val_loss(val, x=x, xlim=xlim, target=target,
                                           title=f"validation loss per {axis}: every run{span}"), out / f"{name}-runs")
    return saved


def slug(text) -> str:
    return re.sub(r"[^\w.-]+", "_", str(text)).strip("_")


def lambda_figures(lam: pd.DataFrame, variant, out: Path, norms=None) -> list[Path]:
    """The variant's per-layer lambdas at the end of training (every run's own line, and the mean ± std over its
    runs, whose title says where the runs disagree on the sign), their shares (x scaled
    by the residual norm when norms is given, see stats.mixing_shares) and each stream's trajectory."""
    mine = lam[lam["variant"] == variant]
    if mine.empty:
        return []
    last = stats.final_lambdas(mine)
    n = last["run"].nunique()
    stem = f"lambdas-layer-{slug(variant)}-mean{n}"
    mixed = plots.mixed_sign_layers(last[last["stream"].map(stats.is_mixing_stream)])
    note = f" (signs differ across runs in {', '.join(mixed)}: see -runs{n})" if mixed else ""
    saved = [plots.save(plots.plot_layer_lambdas_runs(last, title=f"{variant}: lambdas at the end of training, one "
                                                                  f"line per run ({n} runs)"),
                        out / f"lambdas-layer-{slug(variant)}-runs{n}"),
             plots.save(plots.plot_layer_lambdas(last, title=f"{variant}: lambdas at the end of training, mean ± std"
                                                             + note), out / stem)]
    shares = stats.mixing_shares(last, norms=norms)
    title = f"{variant}: share of each input" + (" (x scaled by its norm)" if norms is not None else "")
    saved.append(plots.save(plots.plot_layer_lambdas(shares, ylabel="share", title=title),
                            out / (stem + ("-normalized-and-xnorm" if norms is not None else "-normalized"))))
    for stream in shares["stream"].unique():
        saved.append(plots.save(plots.plot_lambda_trajectories(mine, stream),
                                out / f"lambdas-trajectory-{slug(variant)}-{stream}"))
    return saved


def upstream_claims(val: pd.DataFrame, target: float, out: Path, baseline=None, seeds=None) -> pd.DataFrame:
    """Claims as upstream decides them, one row per variant, written to out/upstream-claims.md: the record rule
    (stats.record_ttest at upstream's alpha 0.01 on the final losses), the earliest validation step at which it
    holds (stats.earliest_record_step: raw, as upstream's rule 5 reads it, and Holm over the steps looked at),
    and, given a baseline, the earliest step at which the variant's difference from it is significant
    (stats.significance_by_step, paired by seed where `seeds` (runs.run_settings) pair the runs, Holm over the
    looks)."""
    rows = []
    for variant, g in val.groupby("variant", sort=False):
        finals = stats.final_points(g)["val_loss"]
        row = {"variant": variant, "n": len(finals)}
        if len(finals) > 1:
            test = stats.record_ttest(finals, target)
            steps = stats.earliest_record_step(g, target)
            row.update(p_record=test["p_value"], alpha=test["alpha"], record=test["p_value"] < test["alpha"],
                       earliest_record_step=steps.attrs["earliest"],
                       earliest_record_step_holm=steps.attrs["earliest_looks"])
        if baseline is not None and variant != baseline:
            by_step = stats.significance_by_step(val, variant, baseline, seeds)
            row.update(earliest_vs_baseline=by_step.attrs.get("earliest"),
                       earliest_vs_baseline_raw=by_step.attrs.get("earliest_raw"), looks=by_step.attrs.get("looks"))
        rows.append(row)
    table = pd.DataFrame(rows)
    plots.save_table(table, out / "upstream-claims.md")
    return table
