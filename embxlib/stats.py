"""Statistics over the tidy tables of embxlib.runs: record tests, averages over repeated runs, crossing times,
rankings, and the per-layer lambda summaries of the seed posts.

Every function takes the validation table (run, variant, step, train_time_s, val_loss) or the lambda table
(run, variant, step, stream, layer, value) and returns plain dicts or DataFrames.
"""

from __future__ import annotations

from dataclasses import dataclass

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


RECORD_ALPHA = 0.01  # upstream's README: a record must show p < 0.01 that its mean val loss is below the target


def record_ttest(losses, threshold: float = 2.92, alpha: float = RECORD_ALPHA) -> dict:
    """One-sided one-sample t-test of H0: mean >= threshold: upstream's record rule (the README's "p<0.01 that
    their mean val loss is <= target", scipy's ttest_1samp(..., alternative="less") as the records compute it).
    At the defaults it reproduces record 18's p = 0.0046 (two runs) and the x01 record's p = 3.59e-4 (19 runs).

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


def _smallest_n(power_at, power: float, guess) -> float:
    """The smallest n >= 2 with power_at(n) >= power, searched from the solver's guess (which may be its lower
    bracket rather than a root: statsmodels' solve_power returns 2 when power at 2 is below the target but the
    bracket fails). Verified by computing the power of the n returned and of n - 1; inf where no n up to 10^6
    reaches it."""
    n = max(2, int(np.ceil(guess))) if guess is not None and np.isfinite(guess) else 2
    while n > 2 and power_at(n - 1) >= power:  # the solver's n is not the smallest
        n -= 1
    if power_at(n) >= power:
        return n
    lo, hi = n, n + 1  # power rises with n: double until it reaches the target, then bisect
    while power_at(hi) < power:
        lo, hi = hi, 2 * hi
        if hi > 10**6:
            return float("inf")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if power_at(mid) < power else (lo, mid)
    return hi


def _power_t(nc: float, df: float, alpha: float) -> float:
    # two-sided power of a t-test with noncentrality nc (the noncentral t, as statsmodels), the far tail taken as 0
    # where scipy's nct gives NaN for it (large effects at 1-2 degrees of freedom, where statsmodels returns NaN)
    crit = stats.t.ppf(1 - alpha / 2, df)
    upper, lower = stats.nct.sf(crit, df, nc), stats.nct.cdf(-crit, df, nc)
    return float(np.nan_to_num(upper) + np.nan_to_num(lower))


def power_paired(d_z: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test over n pairs at standardized effect d_z = mean / SD of differences."""
    return _power_t(abs(d_z) * np.sqrt(n), n - 1, alpha)


def power_two_sample(d: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided two-sample t-test (equal variances, n runs per arm) at effect d = diff / SD."""
    return _power_t(abs(d) * np.sqrt(n / 2), 2 * n - 2, alpha)


def _solve(test, **kwargs):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return test.solve_power(**kwargs)
        except Exception:  # noqa: BLE001 - the search below does not need the solver
            return None


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Runs per arm for a two-sided two-sample t-test to detect a difference of means `effect` between arms whose
    runs scatter with standard deviation `sd`, at level alpha with the given power (statsmodels' TTestIndPower,
    the noncentral t): the smallest n whose computed power reaches `power` (the solver's answer is only a start,
    see _smallest_n)."""
    from statsmodels.stats.power import TTestIndPower
    if effect == 0 or not np.isfinite(effect / sd):
        return float("inf")
    test, d = TTestIndPower(), abs(effect) / sd
    guess = _solve(test, effect_size=d, alpha=alpha, power=power, ratio=1.0, alternative="two-sided")
    return _smallest_n(lambda n: power_two_sample(d, n, alpha), power, guess)


def pooled_sd(*groups) -> float:
    """The pooled standard deviation (ddof=1) of several groups of runs."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g) > 1]
    dof = sum(len(g) - 1 for g in groups)
    return float(np.sqrt(sum((len(g) - 1) * g.var(ddof=1) for g in groups) / dof))


def final_stats(df: pd.DataFrame, threshold: float = 2.92, alpha: float = RECORD_ALPHA, baseline: str | None = None,
                ddof: int = 0):
    """Per variant: final loss and time summaries, the record t-test (one-sided, at alpha: upstream's 0.01 by
    default) and (given a baseline) Welch's one-sided p-value (variant lower).

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
            sd = pooled_sd(loss, base)
            row.update(diff=w["diff"], ci_low=w["ci_low"], ci_high=w["ci_high"], t_stat=w["t_stat"],
                       p_two_sided=w["p_value"], seeds_needed=seeds_needed(w["diff"], sd),
                       plan=bool(not (w["ci_low"] <= 0 <= w["ci_high"])),  # else post-hoc power on noise
                       detectable=detectable_effect(sd, len(loss), len(base)),
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
    evenly, then averaged over the part the run covers, then over the variant's runs. A run that covers less of
    the window is averaged over a different span (one that ends later gets an extra low-loss tail): the column
    covered is the smallest share of the window a run of the variant covers, and rank_common_window ranks over
    the part every run covers.
    """
    grid = np.linspace(start, end, n_grid)
    per_run = [
        (group["variant"].iloc[0], np.nanmean(curve) if (~np.isnan(curve)).any() else np.nan,
         float((~np.isnan(curve)).mean()))
        for _, group in df.groupby("run", sort=False)
        for curve in [_on_grid(group, x, grid)]
    ]
    table = pd.DataFrame(per_run, columns=["variant", "mean_loss", "covered"]).groupby("variant", sort=False).agg(
        mean_loss=("mean_loss", "mean"), n_runs=("mean_loss", "count"), covered=("covered", "min")).reset_index()
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


# ----------------------------------------------------------------------------------------------------------
# comparisons a reviewer would sign: paired where runs share seeds, Holm over a post's family, effect with CI,
# power for the design used, time-matched losses from the runs' own clocks, windows every run covers.
# One SD convention throughout this section: the sample SD (ddof=1), the one the t-tests use.

SD_LABEL = "SD (sample, ddof = 1)"
MIN_PAIRS = 3  # below 3 pairs the paired t has 1 degree of freedom: its interval is too wide to be worth the design


def seeds_needed_paired(effect: float, sd_diff: float, alpha: float = 0.05, power: float = 0.8):
    """Pairs (seeds, each run in both arms) for a two-sided paired t-test to detect a mean difference `effect`
    when the per-seed differences scatter with SD sd_diff (statsmodels' TTestPower on d_z = effect / sd_diff):
    the smallest n whose computed power reaches `power`, never the solver's lower bracket (at d_z 6.34 the solver
    says 2, where 2 pairs have 52% power and 3 have 99.7%). Where the arms' runs are correlated, sd_diff is below
    the two arms' SD and fewer seeds are needed than seeds_needed (the unpaired design) says."""
    from statsmodels.stats.power import TTestPower
    if effect == 0 or not np.isfinite(effect / sd_diff):
        return float("inf")
    test, d = TTestPower(), abs(effect) / sd_diff
    guess = _solve(test, effect_size=d, alpha=alpha, power=power, alternative="two-sided")
    return _smallest_n(lambda n: power_paired(d, n, alpha), power, guess)


def detectable_effect_paired(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean difference a two-sided paired t-test over n pairs whose differences scatter with SD
    sd_diff detects at level alpha with the given power: what a comparison could have shown. It is the number to
    give where an estimate lies inside its own noise (its CI holds zero): the seeds "needed" for such an estimate
    are post-hoc power on noise, not a plan."""
    from statsmodels.stats.power import TTestPower
    if n < 2 or not np.isfinite(sd_diff):
        return float("nan")
    return float(TTestPower().solve_power(nobs=n, alpha=alpha, power=power, alternative="two-sided")) * sd_diff


def detectable_effect(sd: float, n1: int, n2: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """detectable_effect_paired's twin for Welch's design: the smallest difference of means two arms of n1 and n2
    runs with pooled SD sd detect (two-sided, TTestIndPower)."""
    from statsmodels.stats.power import TTestIndPower
    if min(n1, n2) < 2 or not np.isfinite(sd):
        return float("nan")
    return float(TTestIndPower().solve_power(nobs1=n1, ratio=n2 / n1, alpha=alpha, power=power,
                                             alternative="two-sided")) * sd


def compare(variant, baseline, variant_keys=None, baseline_keys=None, level: float = 0.95, alpha: float = 0.05,
            power: float = 0.8, min_pairs: int = MIN_PAIRS) -> dict:
    """Two-sided comparison of the variant's values with the baseline's (diff = variant - baseline).

    Paired (scipy's ttest_rel on the runs of the keys both arms have) when keys are given, unique within each arm,
    and at least min_pairs keys are shared: runs of one seed share what the seed sets (for embxlib runs the
    initialisation and the batch order), so their difference cancels that part of the run-to-run scatter.
    Whether to pair is decided by the design (the keys), never by which test gives the smaller p. Otherwise
    Welch's test (unequal variances). `design` says which and `why` says why in words; runs of one arm whose seed
    the other lacks are left out of a paired test and counted in n_unpaired.

    Returns diff with its two-sided `level` CI, t, df, p (two-sided), the SD the power uses (of the per-seed
    differences when paired, pooled otherwise; ddof=1), the correlation of the pairs, and seeds_needed: runs per
    arm (pairs when paired) for a difference the size of diff at `alpha` with `power`; plan: whether that number
    is one to plan with (the CI excludes zero; otherwise the estimate is inside its own noise and seeds_needed is
    post-hoc power on it); detectable: the smallest difference this design and these runs detect with `power`.
    """
    a, b = np.asarray(variant, dtype=float), np.asarray(baseline, dtype=float)
    out = {"n_variant": len(a), "n_baseline": len(b), "mean_variant": float(a.mean()),
           "mean_baseline": float(b.mean())}
    why = "no seeds given: Welch"
    paired = False
    if variant_keys is not None and baseline_keys is not None:
        ka, kb = pd.Index(variant_keys), pd.Index(baseline_keys)
        if not (ka.is_unique and kb.is_unique):
            why = "a seed repeats within an arm: Welch"
        else:
            common = ka.intersection(kb, sort=False)
            if len(common) < min_pairs:
                why = f"{len(common)} shared seed{'s' if len(common) != 1 else ''} (fewer than {min_pairs}): Welch"
            else:
                paired = True
                sa, sb = pd.Series(a, index=ka), pd.Series(b, index=kb)
                a_p, b_p = sa[common].to_numpy(), sb[common].to_numpy()
                left = len(a) + len(b) - 2 * len(common)
                why = (f"paired by seed over the {len(common)} seeds both arms ran"
                       + (f" ({left} run{'s' if left != 1 else ''} without a partner left out)" if left else ""))
    if paired:
        result = stats.ttest_rel(a_p, b_p)
        d = a_p - b_p
        sd = float(np.std(d, ddof=1))
        out.update(design="paired", n_pairs=len(d), n_unpaired=len(a) + len(b) - 2 * len(d),
                   diff=float(d.mean()), corr=float(np.corrcoef(a_p, b_p)[0, 1]),
                   seeds_needed=seeds_needed_paired(float(d.mean()), sd, alpha, power),
                   detectable=detectable_effect_paired(sd, len(d), alpha, power))
    else:
        result = stats.ttest_ind(a, b, equal_var=False)
        sd = pooled_sd(a, b) if len(a) > 1 and len(b) > 1 else float("nan")
        out.update(design="Welch", n_pairs=0, n_unpaired=0, diff=float(a.mean() - b.mean()), corr=float("nan"),
                   seeds_needed=seeds_needed(float(a.mean() - b.mean()), sd, alpha, power),
                   detectable=detectable_effect(sd, len(a), len(b), alpha, power))
    ci = result.confidence_interval(level)
    out.update(why=why, t_stat=float(result.statistic), df=float(result.df), p_value=float(result.pvalue),
               ci_low=float(ci.low), ci_high=float(ci.high), level=level, sd=sd, sd_ddof=1)
    # an estimate whose CI holds zero is inside its own noise: seeds_needed for it is post-hoc power on noise,
    # not a plan (a post gives `detectable`, what these seeds could show, instead)
    out["plan"] = bool(not (out["ci_low"] <= 0 <= out["ci_high"]) and np.isfinite(out["seeds_needed"]))
    return out


@dataclass(frozen=True)
class Selection:
    """The runs one comparison uses, shared by its test and its figure (select_runs builds it): the two arms'
    runs (`runs`), the seeds they pair on (`seeds`, empty when unpaired), the design ("paired" or "Welch") and
    every run of either arm left out with the reason (`left_out`: run -> reason). A figure drawn from
    `frame(df)` averages exactly the runs the test compares."""
    variant: str
    baseline: str
    runs: tuple
    seeds: tuple
    design: str
    left_out: tuple = ()  # (run, reason) pairs
    run_seeds: tuple = ()  # (run, seed) pairs of the runs, when paired

    def frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """The rows of df (a validation table) of this selection's runs, with their seed when paired."""
        out = df[df["run"].isin(self.runs)]
        if self.run_seeds:
            out = out.assign(seed=out["run"].map(dict(self.run_seeds)))
        return out

    def caption(self, span=None) -> str:
        """Which runs the comparison (and its figure) uses, and which it leaves out and why, in words."""
        span = span or (lambda xs: ", ".join(map(str, xs)))
        text = (f"{self.variant} vs {self.baseline}: " + (f"both arms over seeds {span(self.seeds)}" if self.design ==
                "paired" else f"all runs of both arms ({len(self.runs)})"))
        if self.left_out:
            reasons: dict = {}
            for run, why in self.left_out:
                reasons.setdefault(why, []).append(run)
            text += "; left out: " + "; ".join(
                f"{len(rs)} run{'s' if len(rs) != 1 else ''} ({why})" for why, rs in reasons.items())
        return text


def select_runs(df: pd.DataFrame, variant: str, baseline: str, seeds: pd.DataFrame | None = None,
                exclude: dict | None = None, min_pairs: int = MIN_PAIRS) -> Selection:
    """The runs a comparison of variant with baseline uses, as compare pairs them: where seeds (a table with
    source and seed, runs.run_settings) give at least min_pairs seeds both arms ran, the runs of those seeds
    (a run whose seed the other arm lacks is left out); otherwise every run (Welch). exclude ({run: reason}, e.g.
    the stalled clocks of clock_stalls) leaves runs out first, and with them, when paired, their partner of the
    same seed. Feed selection.frame(df) to the test (final_values, time_matched) and to the figure."""
    exclude = exclude or {}
    sub = df[df["variant"].isin([variant, baseline])]
    info = sub.groupby("run", sort=False).agg(variant=("variant", "first"),
                                              **({"source": ("source", "first")} if "source" in sub else {}))
    info = info.reset_index()
    if seeds is not None and "source" in info:
        info = info.merge(seeds[["source", "seed"]], on="source", how="left")
    left = [(r, exclude[r]) for r in info["run"] if r in exclude]
    kept = info[~info["run"].isin(exclude)]
    if "seed" in kept and kept["seed"].notna().all() and kept.groupby("variant")["seed"].apply(
            lambda x: x.is_unique).all():
        arms = kept.groupby("variant")["seed"].apply(set)
        shared = sorted(arms.get(variant, set()) & arms.get(baseline, set()))
        if len(shared) >= min_pairs:
            dropped = info[info["run"].isin(exclude)]
            for r in kept.itertuples():
                if r.seed not in shared:
                    partner = dropped[(dropped["seed"] == r.seed)]
                    why = ("the other arm's run of its seed is left out" if len(partner)
                           else "no run of the other arm at its seed")
                    left.append((r.run, why))
            chosen = kept[kept["seed"].isin(shared)]
            as_int = (lambda x: int(x) if float(x).is_integer() else x)
            return Selection(variant, baseline, tuple(chosen["run"]), tuple(as_int(x) for x in shared), "paired",
                             tuple(left), tuple((r, as_int(x)) for r, x in zip(chosen["run"], chosen["seed"])))
    return Selection(variant, baseline, tuple(kept["run"]), (), "Welch", tuple(left))


def selection_family(df: pd.DataFrame, selections, seeds: pd.DataFrame | None = None, time: bool = False,
                     alpha: float = 0.05, level: float = 0.95) -> pd.DataFrame:
    """family() over the runs of each stats.Selection (the same object the post's figure draws): the final losses
    (time=False) or the losses at equal training time (time_matched) of selection.frame(df), one row per
    selection, Holm over these rows. Rows carry n_runs_left_out."""
    rows = []
    for sel in selections:
        part = sel.frame(df).drop(columns=["seed"], errors="ignore")
        table = (time_matched(part, sel.variant, sel.baseline, seeds) if time else final_values(part, seeds))
        rows.append(family(table, [(sel.variant, sel.baseline)], alpha=alpha, level=level).assign(
            n_runs_left_out=len(sel.left_out)))
    return combine_family(*rows, alpha=alpha)


def holm(p_values, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction (statsmodels' multipletests): adjusted p-values and which reject at alpha.
    It holds the family-wise error rate (the chance of any false claim in the family) at alpha."""
    from statsmodels.stats.multitest import multipletests
    p = np.asarray(p_values, dtype=float)
    if not len(p):
        return p, np.zeros(0, dtype=bool)
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="holm")
    return adjusted, reject


def final_values(df: pd.DataFrame, seeds: pd.DataFrame | None = None) -> pd.DataFrame:
    """The final point of every run (final_points) with finite loss, and its seed when `seeds` (a table with
    source and seed, e.g. runs.run_settings) is given; runs without a known seed get none."""
    finals = final_points(df)
    finals = finals[np.isfinite(finals["val_loss"])].reset_index(drop=True)
    if seeds is not None and "source" in finals:
        finals = finals.merge(seeds[["source", "seed"]], on="source", how="left")
    return finals


def _arm(table: pd.DataFrame, variant: str, value: str):
    arm = table[table["variant"] == variant]
    keys = arm["seed"].to_numpy() if "seed" in arm and arm["seed"].notna().all() else None
    return arm[value].to_numpy(dtype=float), keys


def family(table: pd.DataFrame, comparisons, value: str = "val_loss", alpha: float = 0.05,
           level: float = 0.95) -> pd.DataFrame:
    """Every comparison of a post's family at once: one row per (variant, baseline) pair of `comparisons`, from
    a table with run, variant, the value column and optionally seed (final_values, time_matched). Each row is
    compare(...) (paired where seeds allow) plus p_holm, the Holm-adjusted p over the whole family, and
    reject_holm at alpha. A claim of the family is made only where reject_holm holds."""
    rows = []
    for variant, baseline in comparisons:
        a, ka = _arm(table, variant, value)
        b, kb = _arm(table, baseline, value)
        if len(a) < 2 or len(b) < 2:
            continue
        rows.append({"variant": variant, "baseline": baseline,
                     **compare(a, b, ka, kb, level=level, alpha=alpha)})
    out = pd.DataFrame(rows)
    if len(out):
        out["p_holm"], out["reject_holm"] = holm(out["p_value"], alpha)
        out["m"] = len(out)
    return out


def combine_family(*tables, alpha: float = 0.05) -> pd.DataFrame:
    """Several family tables (e.g. final losses and time-matched losses) as one family: Holm again over all rows,
    since a post that asks both questions can be wrong in either."""
    out = pd.concat([t for t in tables if len(t)], ignore_index=True)
    if len(out):
        out["p_holm"], out["reject_holm"] = holm(out["p_value"], alpha)
        out["m"] = len(out)
    return out


def time_matched(df: pd.DataFrame, variant: str, baseline: str, seeds: pd.DataFrame | None = None) -> pd.DataFrame:
    """The loss of both arms at the same training time, read off the runs' own clocks: where the runs of one seed
    pair up (both arms, seed given), at the time the faster of the two ends; otherwise at the earliest end of any
    run of either arm, so that every run covers it. Each run's loss is interpolated linearly between its
    validation points; on a falling, convex curve the chord lies above it, so the interpolated loss of the run
    still training is if anything too high (a bias against the slower arm). The faster run's loss there is its
    final, fully cooled-down loss, a second bias against the slower arm, whose schedule has not finished.

    Returns run, variant, seed (when known), at_s (the matched time), val_loss (at at_s), step (at at_s),
    end_s (the run's own end), one row per run: feed it to family(..., value="val_loss").
    """
    runs = [g.sort_values("train_time_s") for _, g in df[df["variant"].isin([variant, baseline])].groupby(
        "run", sort=False)]
    info = pd.DataFrame({"run": [g["run"].iloc[0] for g in runs], "variant": [g["variant"].iloc[0] for g in runs],
                         "source": [g["source"].iloc[0] if "source" in g else None for g in runs],
                         "end_s": [float(g["train_time_s"].max()) for g in runs]})
    if seeds is not None:
        info = info.merge(seeds[["source", "seed"]], on="source", how="left")
    pair_time = None
    if "seed" in info and info["seed"].notna().all():
        per_seed = info.groupby("seed")["variant"].nunique()
        both = per_seed.index[per_seed == 2]
        if len(both) >= MIN_PAIRS:
            info = info[info["seed"].isin(both)]
            pair_time = info.groupby("seed")["end_s"].min()
    common = float(info["end_s"].min())
    rows = []
    by_run = {g["run"].iloc[0]: g for g in runs}
    for r in info.itertuples():
        g = by_run[r.run]
        at = float(pair_time[r.seed]) if pair_time is not None else common
        t = g["train_time_s"].to_numpy(dtype=float)
        rows.append({**r._asdict(), "at_s": at,
                     "val_loss": float(np.interp(at, t, g["val_loss"].to_numpy(dtype=float))),
                     "step": float(np.interp(at, t, g["step"].to_numpy(dtype=float)))})
    return pd.DataFrame(rows).drop(columns=["Index"])


def clock_stalls(df: pd.DataFrame, factor: float = 1.5) -> pd.DataFrame:
    """Runs whose own clock stalled: per run, the time per step of every stretch between two validation points,
    and the slowest stretch against the run's median stretch. A stretch at more than `factor` times the median
    is a stall (another job on the machine, a swap storm): the steps are the same work, so their time should not
    change, and a run's train_time there measures the machine, not the variant. Time-matched comparisons should
    leave out seeds with a stalled run (their final losses are unaffected). Runs with fewer than three stretches
    cannot be judged and are never flagged.

    Returns run, variant, source (when present), median_ms_per_step, worst_ms_per_step, worst_from_step,
    worst_to_step, ratio (worst / median) and stalled, one row per run."""
    rows = []
    for run, g in df.sort_values("step").groupby("run", sort=False):
        g = g[np.isfinite(g["train_time_s"].to_numpy(dtype=float))]
        steps, t = g["step"].to_numpy(dtype=float), g["train_time_s"].to_numpy(dtype=float)
        rate = 1000 * np.diff(t) / np.diff(steps)
        row = {"run": run, "variant": g["variant"].iloc[0], **({"source": g["source"].iloc[0]} if "source" in g else {}),
               "median_ms_per_step": float("nan"), "worst_ms_per_step": float("nan"), "worst_from_step": None,
               "worst_to_step": None, "ratio": float("nan"), "stalled": False}
        if len(rate):
            worst, median = int(np.argmax(rate)), float(np.median(rate))
            ratio = float(rate[worst] / median) if median > 0 else float("nan")
            row.update(median_ms_per_step=median, worst_ms_per_step=float(rate[worst]),
                       worst_from_step=int(steps[worst]), worst_to_step=int(steps[worst + 1]), ratio=ratio,
                       stalled=bool(len(rate) >= 3 and ratio > factor))
        rows.append(row)
    return pd.DataFrame(rows)


def repair_clock(df: pd.DataFrame, factor: float = 1.5) -> pd.DataFrame:
    """The validation table with every stalled stretch (clock_stalls at `factor`: slower than factor x the run's
    median time per step) re-timed at the run's median time per step, and the run's later times moved up by the
    time it saves: the run as it would have timed without the stall. Runs without a stall are unchanged. A test
    that keeps a stalled run at equal training time can use it on the repaired clock instead of leaving it out."""
    out = []
    for _, g in df.sort_values("step", kind="stable").groupby("run", sort=False):
        steps, t = g["step"].to_numpy(dtype=float), g["train_time_s"].to_numpy(dtype=float)
        dt = np.diff(t)
        if len(dt) >= 3:
            rate = dt / np.diff(steps)
            median = float(np.median(rate))
            slow = rate > factor * median
            if median > 0 and slow.any():
                dt = np.where(slow, median * np.diff(steps), dt)
                t = np.concatenate([[t[0]], t[0] + np.cumsum(dt)])
        out.append(g.assign(train_time_s=t))
    return pd.concat(out).loc[df.index] if out else df


def past_reference(finals: pd.DataFrame, reference: float, level: float = 0.95) -> pd.DataFrame:
    """How far each variant's final losses end below a reference loss (e.g. the bigram model's): per variant, runs,
    the mean of reference - loss with its two-sided `level` t interval, and how many runs end below it. Models
    that sit near an n-gram reference have learned little more than it; this says how much more."""
    rows = []
    for variant, g in finals.groupby("variant", sort=False):
        gap = reference - g["val_loss"].to_numpy(dtype=float)
        half = (stats.t.ppf(0.5 + level / 2, len(gap) - 1) * gap.std(ddof=1) / np.sqrt(len(gap))
                if len(gap) > 1 else float("nan"))
        rows.append({"variant": variant, "n": len(gap), "gap_mean": float(gap.mean()),
                     "ci_low": float(gap.mean() - half), "ci_high": float(gap.mean() + half),
                     "n_below": int((gap > 0).sum())})
    return pd.DataFrame(rows)


def common_window(df: pd.DataFrame, start: float | None = None, end: float | None = None,
                  x: str = "train_time_s") -> tuple[float, float]:
    """The part of [start, end] (default: everything) that every run of df covers: from the latest first point
    to the earliest last point. A window beyond it would compare runs over different spans."""
    spans = df.groupby("run")[x].agg(["min", "max"])
    lo, hi = float(spans["min"].max()), float(spans["max"].min())
    lo = lo if start is None else max(lo, float(start))
    hi = hi if end is None else min(hi, float(end))
    if hi <= lo:
        raise ValueError(f"no {x} window common to all runs within [{start}, {end}] (runs cover "
                         f"{spans['min'].max():g}-{spans['max'].min():g} together)")
    return lo, hi


def rank_common_window(df: pd.DataFrame, start: float | None = None, end: float | None = None,
                       x: str = "train_time_s", n_grid: int = 256) -> tuple[pd.DataFrame, tuple[float, float]]:
    """rank_by_window over common_window(df, start, end): every run is averaged over the same span, so a run that
    ends later gets no extra low-loss tail. Returns the ranking and the window used."""
    window = common_window(df, start, end, x)
    return rank_by_window(df, *window, x=x, n_grid=n_grid), window


def window_spread(df: pd.DataFrame, start: float, end: float, x: str = "train_time_s",
                  n_grid: int = 256) -> pd.DataFrame:
    """Each run's mean loss over [start, end] (every run must cover it: see common_window) and, for variants with
    repeats, the range between their runs: what a difference between variants has to exceed to mean anything."""
    lo, hi = common_window(df, start, end, x)
    if (lo, hi) != (float(start), float(end)):
        raise ValueError(f"runs do not all cover {start}-{end}: common part {lo:g}-{hi:g}")
    grid = np.linspace(start, end, n_grid)
    rows = [{"run": run, "variant": g["variant"].iloc[0], "mean_loss": float(np.mean(_on_grid(g, x, grid))),
             "final_loss": float(g.sort_values("step")["val_loss"].iloc[-1])}
            for run, g in df.groupby("run", sort=False)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# sign-aware lambda summaries


def orient_runs(final: pd.DataFrame, stream: str) -> pd.DataFrame:
    """Flip the sign of `stream`'s lambdas run by run so that every run agrees at the reference layer (the layer
    with the largest mean |lambda| over the runs), adding column `flipped`.

    For an extra input embedding (x01, ...) that enters the model only through `lambda * norm(table[token])`, the
    sign is not identified: negating the table and every one of its lambdas gives the same model (RMS norm, Adam
    and weight decay are all odd in it), so the initialisation decides it per seed. A mean over runs of different
    sign averages mirror images towards zero; the oriented values are the same models, made comparable. Other
    streams' rows are returned unchanged (flipped False). Do not orient a stream whose sign matters (x, x00)."""
    sel = final["stream"] == stream
    data = final[sel]
    if data.empty:
        return final.assign(flipped=False)
    ref = int(data.assign(a=data["value"].abs()).groupby("layer")["a"].mean().idxmax())
    at_ref = data[data["layer"] == ref].set_index("run")["value"]
    majority = 1.0 if (at_ref >= 0).sum() >= (at_ref < 0).sum() else -1.0
    flip = (np.sign(at_ref) != majority) & (at_ref != 0)
    out = final.copy()
    out["flipped"] = False
    rows = sel & out["run"].map(flip).fillna(False).astype(bool)
    out.loc[rows, "value"] = -out.loc[rows, "value"]
    out.loc[rows, "flipped"] = True
    out.attrs["reference_layer"] = ref
    return out


def lambda_signs(final: pd.DataFrame, streams=None) -> pd.DataFrame:
    """Per stream and layer over the runs of `final` (final_lambdas): runs, how many are negative, mean, SD
    (ddof=1), mean |lambda| and min/max: the summary to read before trusting a mean whose bars cross zero."""
    if streams is not None:
        final = final[final["stream"].isin(list(streams))]
    g = final.groupby(["stream", "layer"], sort=False)["value"]
    out = pd.DataFrame({"n_runs": g.size(), "n_negative": g.apply(lambda v: int((v < 0).sum())), "mean": g.mean(),
                        "sd": g.std(ddof=1), "mean_abs": g.apply(lambda v: float(v.abs().mean())),
                        "min": g.min(), "max": g.max()})
    return out.reset_index()


def run_signs(final: pd.DataFrame, stream: str) -> pd.Series:
    """For each run, +1 or -1: the sign its `stream` lambdas take at orient_runs' reference layer (the run's
    orientation), so a post can say how many runs came out mirrored."""
    oriented = orient_runs(final, stream)
    flipped = oriented[oriented["stream"] == stream].groupby("run", sort=False)["flipped"].first()
    ref = oriented.attrs.get("reference_layer")
    at_ref = final[(final["stream"] == stream) & (final["layer"] == ref)].set_index("run")["value"]
    return np.sign(at_ref).astype(int).rename("sign").reindex(flipped.index)


# ----------------------------------------------------------------------------------------------------------
# claims as upstream decides them: the record rule above (record_ttest), the optimization track's z-rule and
# pairwise rule (records/track_3_optimization/README.md, "Rules"), the step-to-loss conversion they need, and the
# earliest validation step at which a difference is significant

Z_SIGMA = 0.0013  # the optimization track's fixed run-to-run SD of the final val loss
Z_MARGIN = 0.004  # its threshold: a one-sided z-test at p < .001 with sigma 0.0013 (3.09 sigma, rounded to 0.004)


def z_rule(losses, target: float = 3.28, margin: float = Z_MARGIN) -> dict:
    """The optimization track's validity rule: (target - mean) * sqrt(n) >= margin over n non-cherry-picked runs
    (a one-sided z-test with the fixed sigma 0.0013 at p < .001; one run passes below 3.276, four whose mean is
    below 3.278). Returns n, mean, statistic (the left side), margin, z (statistic / sigma), p (one-sided normal)
    and passes."""
    x = np.asarray(losses, dtype=float)
    stat = float((target - x.mean()) * np.sqrt(len(x)))
    return {"n": len(x), "mean": float(x.mean()), "statistic": stat, "margin": margin, "z": stat / Z_SIGMA,
            "p_value": float(stats.norm.sf(stat / Z_SIGMA)), "passes": bool(stat >= margin - 1e-12)}


def loss_per_step(short_losses, short_steps: int, long_losses, long_steps: int) -> float:
    """The loss one step of schedule is worth, from two sets of runs of one setup at two step counts (each run's
    whole schedule at its own length): (mean short - mean long) / (long_steps - short_steps). Upstream's: record
    #12 at 3325 steps, 3.2790 (n=20), and 200 steps fewer, 3.2881 (n=8): 0.0091 over 200 steps, 0.0045 per 100."""
    return float((np.mean(short_losses) - np.mean(long_losses)) / (long_steps - short_steps))


def curve_slope(df: pd.DataFrame, last: int = 2) -> pd.DataFrame:
    """The runs' own slopes: per variant, the loss per step between each run's last `last` validation points
    (a least-squares line through them), median over the runs. It is the slope of a run on its own schedule, at
    its end; shortening the schedule moves the cooldown too, so it is a stand-in for loss_per_step (two step
    counts) where only one step count ran. Returns variant, n_runs, loss_per_step (positive: the loss falls),
    from_step, to_step."""
    rows = []
    for variant, g in df.groupby("variant", sort=False):
        slopes, spans = [], []
        for _, run in g.groupby("run", sort=False):
            run = run.sort_values("step").tail(last)
            if len(run) >= 2:
                slopes.append(-np.polyfit(run["step"].to_numpy(float), run["val_loss"].to_numpy(float), 1)[0])
                spans.append((int(run["step"].iloc[0]), int(run["step"].iloc[-1])))
        rows.append({"variant": variant, "n_runs": len(slopes),
                     "loss_per_step": float(np.median(slopes)) if slopes else float("nan"),
                     "from_step": min((a for a, _ in spans), default=None),
                     "to_step": max((b for _, b in spans), default=None)})
    return pd.DataFrame(rows)


def steps_worth(loss_diff: float, per_step: float) -> float:
    """Steps a loss difference is worth at per_step loss per step (upstream: 0.0014 at 0.0045 per 100 steps is
    about 31 steps)."""
    return float(loss_diff / per_step)


def pairwise_rule(new_loss: float, new_n: int, new_steps: int, old_loss: float, old_n: int, old_steps: int,
                  per_step: float, margin: float = Z_MARGIN) -> dict:
    """The optimization track's pairwise rule: is a new result better than an old one, when its step count
    differs? (final_loss_diff + exp_stepbased_loss_diff) / sqrt(1/n1 + 1/n2) >= margin, with final_loss_diff =
    old mean - new mean and exp_stepbased_loss_diff = (old_steps - new_steps) * per_step (the loss the new
    result's saved steps are worth: loss_per_step or curve_slope). Upstream's examples: #13 vs #8 gives 0.0027,
    #13 vs #11 0.00167, #12 vs #6 0.00648 (the only one that passes). Returns the parts, statistic and passes."""
    loss_diff, step_diff = old_loss - new_loss, (old_steps - new_steps) * per_step
    stat = float((loss_diff + step_diff) / np.sqrt(1 / new_n + 1 / old_n))
    return {"final_loss_diff": float(loss_diff), "exp_stepbased_loss_diff": float(step_diff), "statistic": stat,
            "margin": margin, "passes": bool(stat >= margin - 1e-12)}


def significance_by_step(df: pd.DataFrame, variant: str, baseline: str, seeds: pd.DataFrame | None = None,
                         alpha: float = 0.05, min_step: int = 1) -> pd.DataFrame:
    """At every validation step both arms logged (from min_step on), the comparison of the two arms' losses
    there (compare: paired by seed where seeds pair up, else Welch), and the earliest step at which it is
    significant. Looking at every step is many looks: the chance that some step reads as significant when no step
    differs is above alpha. So besides the raw p each row has p_looks, Holm-adjusted over all the steps looked at,
    and `significant` uses it; `significant_raw` is the single-look reading, valid only for a step fixed before
    looking (as upstream's rule 5 asks: one stopping step for all runs, chosen the same way for every trial).
    Returns one row per step: step, n_pairs, design, diff, ci_low, ci_high, p_value, p_looks, significant,
    significant_raw; attrs["earliest"] is the first step where `significant` holds (None if none)."""
    sub = df[df["variant"].isin([variant, baseline])]
    if seeds is not None and "source" in sub:
        sub = sub.merge(seeds[["source", "seed"]], on="source", how="left")
    steps_a = set(sub.loc[sub["variant"] == variant, "step"])
    steps = sorted(s for s in steps_a & set(sub.loc[sub["variant"] == baseline, "step"]) if s >= min_step)
    rows = []
    for step in steps:
        at = sub[sub["step"] == step]
        a, ka = _arm(at, variant, "val_loss")
        b, kb = _arm(at, baseline, "val_loss")
        if len(a) < 2 or len(b) < 2:
            continue
        c = compare(a, b, ka, kb, alpha=alpha)
        rows.append({"step": int(step), "n_pairs": c["n_pairs"], "design": c["design"], "diff": c["diff"],
                     "ci_low": c["ci_low"], "ci_high": c["ci_high"], "p_value": c["p_value"]})
    out = pd.DataFrame(rows, columns=["step", "n_pairs", "design", "diff", "ci_low", "ci_high", "p_value"])
    out["p_looks"], out["significant"] = holm(out["p_value"], alpha)
    out["significant_raw"] = out["p_value"] < alpha
    hits = out.loc[out["significant"], "step"]
    out.attrs["earliest"] = int(hits.iloc[0]) if len(hits) else None
    hits_raw = out.loc[out["significant_raw"], "step"]
    out.attrs["earliest_raw"] = int(hits_raw.iloc[0]) if len(hits_raw) else None
    out.attrs["looks"] = len(out)
    return out


def earliest_record_step(df: pd.DataFrame, threshold: float = 2.92, alpha: float = RECORD_ALPHA,
                         min_step: int = 1) -> pd.DataFrame:
    """Upstream's rule 5 for the record test: at every validation step all runs of df logged, the record rule
    (record_ttest) over the runs' losses there; the earliest step at which it holds is the step a record may
    claim, provided that step is then used for every run (one stopping point for all trials, never per run).
    p_looks is Holm over the steps looked at (the multiple-looks caveat; upstream takes the raw p at the chosen
    step). Returns step, n, mean, p_value, p_looks, passes_raw, passes; attrs["earliest"] (raw, as upstream) and
    attrs["earliest_looks"] (Holm)."""
    n_runs = df["run"].nunique()
    rows = []
    for step, g in df[df["step"] >= min_step].groupby("step"):
        if g["run"].nunique() != n_runs or n_runs < 2:
            continue
        t = record_ttest(g["val_loss"], threshold, alpha)
        rows.append({"step": int(step), "n": t["n"], "mean": t["sample_mean"], "p_value": t["p_value"]})
    out = pd.DataFrame(rows, columns=["step", "n", "mean", "p_value"])
    out["p_looks"], out["passes"] = holm(out["p_value"], alpha)
    out["passes_raw"] = out["p_value"] < alpha
    raw, looks = out.loc[out["passes_raw"], "step"], out.loc[out["passes"], "step"]
    out.attrs["earliest"] = int(raw.iloc[0]) if len(raw) else None
    out.attrs["earliest_looks"] = int(looks.iloc[0]) if len(looks) else None
    return out
