"""Statistics over the tidy tables of embxlib.runs: record tests, averages over repeated runs, crossing times,
rankings, and the per-layer lambda summaries of the seed posts.

Every function takes the validation table (run, variant, step, train_time_s, val_loss) or the lambda table
(run, variant, step, stream, layer, value) and returns plain dicts or DataFrames.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from scipy import stats

from .streams import stream_kind

# ----------------------------------------------------------------------------------------------------------
# final losses: describe, one-sided record test, Welch against a baseline


def final_points(df: pd.DataFrame) -> pd.DataFrame:
    """The last validation point of each run, in the order runs first appear."""
    last = df.groupby("run", sort=False)["step"].idxmax()
    return df.loc[last.to_numpy()].reset_index(drop=True)


def describe(values, ddof: int = 0) -> dict:
    """mean, median, std, min, max. ddof=0 (numpy's default) is what the seed posts print as "Std"."""
    x = np.asarray(values, dtype=float)
    return {
        "mean": float(np.mean(x)),
        "median": float(np.median(x)),
        "std": float(np.std(x, ddof=ddof)) if len(x) > ddof else float("nan"),
        "min": float(np.min(x)),
        "max": float(np.max(x)),
    }


def record_ttest(losses, threshold: float = 2.92, alpha: float = 0.05) -> dict:
    """One-sided one-sample t-test of H0: mean >= threshold, as the medium-track record rule (seed 000).

    upper_conf_bound_mean is the one-sided (1 - alpha) upper bound x̄ + t_{1-alpha, n-1} s / sqrt(n).
    """
    x = np.asarray(losses, dtype=float)
    n = len(x)
    mean, std = float(np.mean(x)), float(np.std(x, ddof=1))
    result = stats.ttest_1samp(x, threshold, alternative="less")
    p_value = float(result.pvalue)
    return {
        "n": n,
        "sample_mean": mean,
        "sample_std": std,
        "t_stat": float(result.statistic),
        "p_value": p_value,
        "alpha": alpha,
        "decision": "REJECT H0 (mean < threshold)" if p_value < alpha else "FAIL TO REJECT H0",
        "upper_conf_bound_mean": float(mean + stats.t.ppf(1 - alpha, n - 1) * std / np.sqrt(n)),
        "threshold": threshold,
    }


def welch_test(variant, baseline, alternative: str = "less", level: float = 0.95) -> dict:
    """Welch's t-test of variant against baseline; alternative "less" asks whether the variant's mean is lower.
    ci_low/ci_high: the two-sided `level` confidence interval of the difference of means (Welch-Satterthwaite df)."""
    a, b = np.asarray(variant, dtype=float), np.asarray(baseline, dtype=float)
    result = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return {
        "n_variant": len(a),
        "n_baseline": len(b),
        "mean_variant": float(np.mean(a)),
        "mean_baseline": float(np.mean(b)),
        "diff": float(np.mean(a) - np.mean(b)),
        "t_stat": float(result.statistic),
        "df": float(result.df),
        "p_value": float(result.pvalue),
        "alternative": alternative,
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
    }


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Runs per arm for a two-sided two-sample t-test to detect a difference of means `effect` between arms whose
    runs scatter with standard deviation `sd`, at level alpha with the given power (statsmodels' TTestIndPower,
    the noncentral t)."""
    from statsmodels.stats.power import TTestIndPower
    if effect == 0 or not np.isfinite(effect / sd):
        return float("inf")
    test, d = TTestIndPower(), abs(effect) / sd
    n = test.solve_power(effect_size=d, alpha=alpha, power=power, ratio=1.0, alternative="two-sided")
    if not np.isfinite(n):  # the solver gives up below 2 runs per arm, where a huge effect is already seen
        return 2 if test.power(effect_size=d, nobs1=2, alpha=alpha, ratio=1.0) >= power else float("inf")
    return max(2, int(np.ceil(n)))


def pooled_sd(*groups) -> float:
    """The pooled standard deviation (ddof=1) of several groups of runs."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g) > 1]
    dof = sum(len(g) - 1 for g in groups)
    return float(np.sqrt(sum((len(g) - 1) * g.var(ddof=1) for g in groups) / dof))


def final_stats(df: pd.DataFrame, threshold: float = 2.92, alpha: float = 0.05, baseline: str | None = None,
                ddof: int = 0):
    """Per variant: final loss and time summaries, the record t-test and (given a baseline) Welch's p-value.

    The std columns use ddof (0: the seed posts' "Std"; 1: the sample standard deviation, as the t-tests, the
    bands of average_runs and compare_to_baseline); the column std_ddof says which.

    Runs whose final loss is not finite (diverged) are counted in n_nonfinite and left out of the statistics,
    which a single NaN would otherwise turn into NaN.
    """
    finals = final_points(df)
    finals = finals.assign(finite=np.isfinite(finals["val_loss"]))
    base = finals.loc[(finals["variant"] == baseline) & finals["finite"], "val_loss"].to_numpy()
    rows = []
    for variant, group in finals.groupby("variant", sort=False):
        good = group[group["finite"]]
        row = {"variant": variant, "n": len(good), "n_nonfinite": len(group) - len(good), "std_ddof": ddof}
        if len(good):
            row.update({f"loss_{k}": v for k, v in describe(good["val_loss"], ddof).items()})
            row.update({f"time_s_{k}": v for k, v in describe(good["train_time_s"], ddof).items()})
        if len(good) > 1:
            test = record_ttest(good["val_loss"], threshold, alpha)
            row.update(p_value=test["p_value"], upper_conf_bound_mean=test["upper_conf_bound_mean"],
                       decision=test["decision"])
            if variant != baseline and len(base) > 1:
                row["welch_p_vs_baseline"] = welch_test(good["val_loss"], base)["p_value"]
        rows.append(row)
    return pd.DataFrame(rows)


def compare_to_baseline(df: pd.DataFrame, baseline: str, variants=None) -> pd.DataFrame:
    """One row per variant (baseline first): runs, final loss mean/std (ddof=1), training ms per step, and a
    two-sided Welch test of the final losses against the baseline's (diff < 0: the variant ends lower) with the
    95% confidence interval of diff, and the runs per arm that would detect a diff that size at p < 0.05 with 80%
    power (seeds_needed, from the pooled standard deviation). Two-sided because an added table can hurt as well as
    help (removing value embeddings, token lambdas)."""
    finals = final_points(df)
    finals = finals[np.isfinite(finals["val_loss"])]
    order = [baseline] + [v for v in (variants if variants is not None else pd.unique(finals["variant"]))
                          if v != baseline]
    base = finals.loc[finals["variant"] == baseline, "val_loss"].to_numpy()
    rows = []
    for v in order:
        g = finals[finals["variant"] == v]
        if g.empty:
            continue
        loss = g["val_loss"].to_numpy()
        row = {"variant": v, "n": len(g), "loss_mean": float(loss.mean()),
               "loss_std": float(loss.std(ddof=1)) if len(g) > 1 else float("nan"),
               "ms_per_step": float((1000 * g["train_time_s"] / g["step"]).median())}
        if v != baseline and len(g) > 1 and len(base) > 1:
            w = welch_test(loss, base, alternative="two-sided")
            row.update(diff=w["diff"], ci_low=w["ci_low"], ci_high=w["ci_high"], t_stat=w["t_stat"],
                       p_two_sided=w["p_value"], seeds_needed=seeds_needed(w["diff"], pooled_sd(loss, base)),
                       step_time_ratio=row["ms_per_step"] / rows[0]["ms_per_step"])  # rows[0]: the baseline
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# averaging repeated runs: interpolate onto a common grid first, then mean and band


def _on_grid(run: pd.DataFrame, x: str, grid: np.ndarray) -> np.ndarray:
    run = run.sort_values(x, kind="stable")
    # NaN outside the run's own range: a run that ended early must not be extrapolated into the mean
    return np.interp(grid, run[x].to_numpy(), run["val_loss"].to_numpy(), left=np.nan, right=np.nan)


def average_runs(df: pd.DataFrame, x: str = "train_time_s", grid=None, n_grid: int = 512, band: str = "std",
                 min_runs: int | None = None) -> pd.DataFrame:
    """Mean loss of each variant's runs on a common grid of x ("step" or "train_time_s"), with a band.

    Each run is linearly interpolated onto the grid (default: n_grid points over the variant's range), so runs
    whose validation times differ are compared at the same time; averaging time and loss separately per step
    (the seed post's shortcut) is not the mean curve. The mean is given where at least min_runs runs
    (default: all of the variant's runs) cover the grid point. band: "std" (sample std) or "ci95" (Student t).
    Returns variant, x, mean, std, n, lo, hi.
    """
    if band not in ("std", "ci95"):
        raise ValueError(f"band must be 'std' or 'ci95', not {band!r}")
    frames = []
    for variant, group in df.groupby("variant", sort=False):
        runs = [run for _, run in group.groupby("run", sort=False)]
        points = np.asarray(grid, dtype=float) if grid is not None else np.linspace(
            group[x].min(), group[x].max(), n_grid)
        losses = np.vstack([_on_grid(run, x, points) for run in runs])
        covered = ~np.isnan(losses)
        n = covered.sum(axis=0)
        enough = n >= (len(runs) if min_runs is None else min_runs)
        filled = np.where(covered, losses, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = filled.sum(axis=0) / n
            std = np.sqrt(np.where(covered, (losses - mean) ** 2, 0.0).sum(axis=0) / (n - 1))
            half = std if band == "std" else stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)
        mean, std = np.where(enough, mean, np.nan), np.where(enough & (n > 1), std, np.nan)
        half = np.where(n > 1, half, 0.0)
        frames.append(pd.DataFrame({"variant": variant, x: points, "mean": mean, "std": std, "n": n,
                                    "lo": mean - half, "hi": mean + half}))
    columns = ["variant", x, "mean", "std", "n", "lo", "hi"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


# ----------------------------------------------------------------------------------------------------------
# when each run reaches the target, and orderings of variants


def crossings(df: pd.DataFrame, target: float = 2.92, method: str = "linear") -> pd.DataFrame:
    """Step and time at which each run first reaches val_loss <= target.

    method "linear" interpolates between the last validation point above the target and the first one at or
    below it (the value-embeddings post's times are reproduced this way); "next" takes that first point itself.
    Runs that never reach the target get NaN.
    """
    if method not in ("linear", "next"):
        raise ValueError(f"method must be 'linear' or 'next', not {method!r}")
    rows = []
    for run, group in df.groupby("run", sort=False):
        group = group.sort_values("step", kind="stable")
        loss, step, time = (group[c].to_numpy(dtype=float) for c in ("val_loss", "step", "train_time_s"))
        below = np.flatnonzero(loss <= target)
        at_step = at_time = np.nan
        if len(below):
            i = below[0]
            at_step, at_time = step[i], time[i]
            if method == "linear" and i > 0:
                f = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
                at_step = step[i - 1] + f * (step[i] - step[i - 1])
                at_time = time[i - 1] + f * (time[i] - time[i - 1])
        rows.append({"run": run, "variant": group["variant"].iloc[0], "step_to_target": at_step,
                     "time_to_target_s": at_time})
    return pd.DataFrame(rows, columns=["run", "variant", "step_to_target", "time_to_target_s"])


def crossing_order(df: pd.DataFrame, target: float = 2.92, method: str = "linear") -> pd.DataFrame:
    """Variants in the order they reach the target: mean crossing time and step over the runs that cross.

    Returns rank, variant, n_runs, n_crossed, time_to_target_s, step_to_target; variants that never cross last.
    """
    per_run = crossings(df, target, method)
    order = per_run.groupby("variant", sort=False).agg(
        n_runs=("run", "size"), n_crossed=("time_to_target_s", "count"),
        time_to_target_s=("time_to_target_s", "mean"), step_to_target=("step_to_target", "mean"),
    ).reset_index()
    order = order.sort_values("time_to_target_s", kind="stable", na_position="last").reset_index(drop=True)
    order.insert(0, "rank", np.arange(1, len(order) + 1))
    return order


def rank_by_window(df: pd.DataFrame, start: float, end: float, x: str = "train_time_s",
                   n_grid: int = 256) -> pd.DataFrame:
    """Variants from best to worst by mean loss over a window of x (seed 004's "in the time before that").

    Each run's loss is interpolated onto an even grid over [start, end] so that the mean weighs time (or steps)
    evenly, then averaged over the part the run covers, then over the variant's runs.
    """
    grid = np.linspace(start, end, n_grid)
    per_run = [
        (group["variant"].iloc[0], np.nanmean(curve) if (~np.isnan(curve)).any() else np.nan)
        for _, group in df.groupby("run", sort=False)
        for curve in [_on_grid(group, x, grid)]
    ]
    table = pd.DataFrame(per_run, columns=["variant", "mean_loss"]).groupby("variant", sort=False).agg(
        mean_loss=("mean_loss", "mean"), n_runs=("mean_loss", "count")).reset_index()
    table = table.sort_values("mean_loss", kind="stable", na_position="last").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


# ----------------------------------------------------------------------------------------------------------
# lambdas


def is_mixing_stream(stream: str) -> bool:
    """Whether a lambda stream is part of the weighted sum at each layer's input: x (the residual) and the input
    streams (x00, x01, ..., bigram: streams.stream_kind); v, ve, skip/unet and norm are not."""
    return stream_kind(stream) in ("residual", "input")


def final_lambdas(lam: pd.DataFrame, streams=None) -> pd.DataFrame:
    """Each run's per-layer values at its last logged step (all streams, or the given ones)."""
    if streams is not None:
        lam = lam[lam["stream"].isin(list(streams))]
    last = lam.groupby(["run", "stream"], sort=False)["step"].transform("max")
    return lam[lam["step"] == last].reset_index(drop=True)


def negative_layers(final: pd.DataFrame, stream: str) -> list[int]:
    """Layers where the stream's value, averaged over the runs of `final` (final_lambdas), is below zero."""
    mean = final[final["stream"] == stream].groupby("layer")["value"].mean()
    return [int(layer) for layer in mean.index[mean < 0]]


def mixing_shares(final: pd.DataFrame, norms=None) -> pd.DataFrame:
    """Share of each input-mixing lambda (x, x00, x01, ...) per layer, as in seed 003.

    The x lambda is first multiplied by the residual norm at that layer relative to the first layer (x00 and
    x01 are RMS-normed, x is not), then every lambda at a layer is divided by the sum of their absolute values.
    norms: None (no correction), "logged" (each run's own "norm" stream), or one per-layer sequence for all runs
    (the published data: predictions.md's x_norms["x"]). Returns run, variant, layer, stream, value.
    """
    mixing = final[final["stream"].map(is_mixing_stream)]
    wide = mixing.pivot_table(index=["run", "variant", "layer"], columns="stream", values="value", sort=False)
    if isinstance(norms, str) and norms == "logged":
        logged = final[final["stream"] == "norm"].set_index(["run", "variant", "layer"])["value"].sort_index()
        first = logged.groupby(level="run").transform("first")  # layer 0 after sorting
        wide["x"] = wide["x"] * (logged / first).reindex(wide.index)
    elif norms is not None:
        norms = np.asarray(norms, dtype=float)
        wide["x"] = wide["x"] * (norms / norms[0])[wide.index.get_level_values("layer")]
    shares = wide.div(wide.abs().sum(axis=1), axis=0)
    streams = sorted(shares.columns, key=lambda s: (s != "x", s))
    return shares[streams].stack().rename("value").reset_index()
