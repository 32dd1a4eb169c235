"""Figures of the seed posts from the tidy tables of embxlib.runs.

Every plot function takes an optional `ax` and returns its Figure. Figures are built with
matplotlib.figure.Figure rather than pyplot, so nothing depends on the active backend and no figure is kept
alive by pyplot's registry; `save` writes PNG under a name the caller chooses (stable names, e.g. the seeds'
`val_loss-step-5500-6000.png`), a relative path meaning the same from nbs/ as from the root. In IPython (JupyterLab) a returned
figure displays as its PNG when it is a cell's last line, whatever the backend. The interactive views
(`explore`, `watch`) are in embxlib.explore.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from embxlib.runs import from_root
from embxlib.stats import average_runs, is_mixing_stream

AXIS_LABELS = {"step": "step", "train_time_s": "training time (s)"}


def _png_of_unmanaged(fig):
    # a Figure made without pyplot has no manager, so no backend shows it: IPython's own PNG printer does; a
    # pyplot figure (inline or widget backend) is left to its backend (None: this formatter passes)
    if getattr(fig.canvas, "manager", None) is not None:
        return None
    from IPython.core.pylabtools import print_figure
    return print_figure(fig, "png", bbox_inches="tight")


def _register_display() -> None:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["image/png"].for_type(Figure, _png_of_unmanaged)


_register_display()


def _figure(ax, size=(8, 5)):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def palette(names) -> dict:
    names = list(names)
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))


def _title(ax, text: str, **kwargs) -> None:
    # a title longer than the axes is cut off at the figure's edge: wrap it onto lines that fit the figure's width
    import textwrap
    fontsize = mpl.font_manager.FontProperties(size=kwargs.get("fontsize", mpl.rcParams["axes.titlesize"])).get_size_in_points()
    # about 0.6 em per character of the default font; 80% of the width, as the title centres on the axes, which a
    # legend beside them pushes left
    chars = int(0.8 * ax.figure.get_figwidth() * 72 / (0.6 * fontsize))
    ax.set_title("\n".join(textwrap.fill(line, chars) for line in text.split("\n")), **kwargs)


def _outside_legend(ax) -> None:
    # beside the axes, never over them: a legend inside covers whichever curves or bars sit in its corner. A figure
    # legend "outside" is placed by constrained layout, and so is the same at every save; in a figure of several
    # axes (drawn into a given ax) each keeps its own legend inside
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(ax.figure.axes) == 1 and ax.figure.get_layout_engine() is not None:
        # below the axes, so that the axes keep the figure's width and the (wrapped) title stays clear of it
        # as many columns as fit the width: ~0.6 em per character of the small font plus the handle and padding
        size = mpl.font_manager.FontProperties(size="small").get_size_in_points()
        column = 0.6 * size * max(len(label) for label in labels) + 40
        ncols = max(1, min(len(handles), int(0.95 * ax.figure.get_figwidth() * 72 // column)))
        ax.figure.legend(handles, labels, fontsize="small", loc="outside lower center", ncols=ncols, frameon=False)
    else:
        ax.legend(handles, labels, fontsize="small")


def fit_y(ax, ys, pad: float = 0.05) -> None:
    # matplotlib scales y to all the data, not to the zoom window: fit it to what is visible
    ys = np.concatenate([np.asarray(y, dtype=float) for y in ys]) if ys else np.array([])
    ys = ys[np.isfinite(ys)]
    if len(ys):
        lo, hi = ys.min(), ys.max()
        margin = (hi - lo) * pad or abs(hi) * 1e-3 or 1e-3
        ax.set_ylim(lo - margin, hi + margin)


def _near(value: float, ys, share: float = 0.5) -> bool:
    ys = np.concatenate([np.asarray(y, dtype=float) for y in ys]) if ys else np.array([])
    ys = ys[np.isfinite(ys)]
    if not len(ys):
        return True
    lo, hi = ys.min(), ys.max()
    return lo - share * (hi - lo) <= value <= hi + share * (hi - lo)


def _validation_points(df: pd.DataFrame, x: str, lo_x: float, hi_x: float, most: int = 30):
    # the validation steps every run of df logged, inside the zoom, when they are few enough to mark (a curve over
    # 5 validation points is 4 straight segments: the markers say so); None on a time axis (each run validates at
    # its own times) or where there are too many to mark
    if x != "step":
        return None
    per_run = df.groupby("run")["step"].apply(set)
    steps = sorted(set.intersection(*per_run)) if len(per_run) else []
    steps = [s for s in steps if lo_x <= s <= hi_x]
    return steps if 0 < len(steps) <= most else None


def plot_val_loss(df: pd.DataFrame, x: str = "step", xlim=None, average: bool = False, band: str = "std",
                  target: float | None = None, n_grid: int = 512, ax=None, title: str | None = None,
                  refs: dict | None = None, markers: bool | None = None) -> Figure:
    """Validation loss against "step" or "train_time_s", one colour per variant, in the table's order.

    average=False draws every run; average=True draws each variant's mean over its runs on a common grid with a
    band ("std" or "ci95", see stats.average_runs), labelled "<variant>, mean of <n> runs" (or ", 1 run"). xlim
    zooms in (the y range fits the curves in the zoom, and the target when it is near them); target draws a horizontal line at that loss; refs ({label: loss})
    draws dotted reference lines (e.g. n-gram losses) that the y range of a zoom does not follow. markers (default:
    where at most 30 validation steps are in view, x = "step") marks the validation points: between them a curve
    is a straight line, not data. The figure's `embxlib_runs` names the runs it draws (plots.save records them).
    """
    fig, ax = _figure(ax)
    variants = list(pd.unique(df["variant"]))
    colors = palette(variants)
    lo_x, hi_x = xlim if xlim is not None else (-np.inf, np.inf)
    visible = []
    if average:
        grid = np.linspace(*xlim, n_grid) if xlim is not None else None
        curves = average_runs(df, x=x, grid=grid, n_grid=n_grid, band=band)
        runs_per_variant = df.groupby("variant", sort=False)["run"].nunique()
        for variant, curve in curves.groupby("variant", sort=False):
            n = runs_per_variant[variant]
            ax.plot(curve[x], curve["mean"], color=colors[variant], label=f"{variant}, " + (f"mean of {n} runs" if n > 1
                    else "1 run"))
            points = _validation_points(df[df["variant"] == variant], x, lo_x, hi_x) if markers is not False else None
            if points:
                at = df[(df["variant"] == variant) & df["step"].isin(points)].groupby("step")["val_loss"].mean()
                ax.plot(at.index, at.to_numpy(), linestyle="none", marker="o", markersize=3.5, color=colors[variant])
            if n > 1:
                ax.fill_between(curve[x], curve["lo"], curve["hi"], color=colors[variant], alpha=0.2, linewidth=0)
            inside = curve[(curve[x] >= lo_x) & (curve[x] <= hi_x)]
            visible += [inside["lo"], inside["hi"], inside["mean"]]
    else:
        for variant, group in df.groupby("variant", sort=False):
            few = _validation_points(group, x, lo_x, hi_x) if markers is not False else None
            for i, (_, run) in enumerate(group.groupby("run", sort=False)):
                run = run.sort_values(x, kind="stable")
                ax.plot(run[x], run["val_loss"], color=colors[variant], linewidth=1, marker="o" if few else None,
                        markersize=3, label=str(variant) if i == 0 else None)
                visible.append(run.loc[(run[x] >= lo_x) & (run[x] <= hi_x), "val_loss"])
    if target is not None:
        ax.axhline(target, color="0.3", linestyle="--", linewidth=1, label=f"target {target}")
    for i, (label, loss) in enumerate((refs or {}).items()):
        ax.axhline(loss, color=str(0.2 + 0.25 * i), linestyle=":", linewidth=1.2, label=f"{label} ({loss:.3f})")
    if xlim is not None:
        ax.set_xlim(*xlim)
        # the target joins the y range only when it is near the curves (within half their span): a far one (the
        # tiny runs' 6.0 under curves at 5.2-5.4) would leave most of the zoom empty; it is still in the legend
        fit_y(ax, visible + ([[target]] if target is not None and _near(target, visible) else []))
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel("validation loss")
    _title(ax, title or f"validation loss vs {AXIS_LABELS.get(x, x)}")
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    fig.embxlib_runs = sorted(map(str, pd.unique(df["run"])))
    return fig


def paired_differences(df: pd.DataFrame, selection, x: str = "step", n_grid: int = 256) -> pd.DataFrame:
    """Per seed of a paired stats.Selection, the variant's loss minus the baseline's on a common grid of x: on
    "step", the validation steps both runs logged; on "train_time_s", n_grid times up to the end of the pair
    that ends first (each run interpolated on its own clock). Returns seed, x, diff."""
    data = selection.frame(df)
    by = data.groupby(["seed", "variant"], sort=False)
    rows = []
    for seed in selection.seeds:
        a = by.get_group((seed, selection.variant)).sort_values(x)
        b = by.get_group((seed, selection.baseline)).sort_values(x)
        if x == "step":
            grid = np.array(sorted(set(a["step"]) & set(b["step"])), dtype=float)
        else:
            end = min(a[x].max(), b[x].max())
            grid = np.linspace(0, end, n_grid)
        diff = np.interp(grid, a[x], a["val_loss"]) - np.interp(grid, b[x], b["val_loss"])
        rows.append(pd.DataFrame({"seed": seed, x: grid, "diff": diff}))
    return pd.concat(rows, ignore_index=True)


def plot_paired_differences(df: pd.DataFrame, selections, x: str = "step", xlim=None, level: float = 0.95,
                            ax=None, title: str | None = None) -> Figure:
    """The tested quantity itself: for each paired stats.Selection, the per-seed differences variant - baseline
    (thin lines) and their mean with its two-sided `level` t interval (band), against step (at the validation
    steps, marked) or training time (on a grid up to the end of the pair that ends first; the mean where every
    pair covers the time). A band clear of zero is a difference the paired test would see at that point."""
    fig, ax = _figure(ax)
    selections = [s for s in selections if s.design == "paired"]
    colors = palette([f"{s.variant} - {s.baseline}" for s in selections])  # one colour per compared pair
    lo_x, hi_x = xlim if xlim is not None else (-np.inf, np.inf)
    visible, drawn = [], []
    for sel in selections:
        d = paired_differences(df, sel, x)
        d = d[(d[x] >= lo_x) & (d[x] <= hi_x)]
        c = colors[f"{sel.variant} - {sel.baseline}"]
        for _, one in d.groupby("seed", sort=False):
            ax.plot(one[x], one["diff"], color=c, alpha=0.25, linewidth=0.8)
            visible.append(one["diff"])
        if x == "step":
            wide = d.pivot(index=x, columns="seed", values="diff").dropna()
        else:
            grid = np.linspace(max(d[x].min(), lo_x), min(d.groupby("seed")[x].max().min(), hi_x), 256)
            wide = pd.DataFrame({seed: np.interp(grid, one[x], one["diff"]) for seed, one in d.groupby("seed")},
                                index=grid)
        n = wide.shape[1]
        mean, sd = wide.mean(axis=1), wide.std(axis=1, ddof=1)
        half = stats_t_half(sd, n, level)
        ax.plot(wide.index, mean, color=c, linewidth=2, marker="o" if x == "step" else None, markersize=3.5,
                label=f"{sel.variant} - {sel.baseline}, mean of {n} seeds, {level:.0%} CI")
        ax.fill_between(wide.index, mean - half, mean + half, color=c, alpha=0.2, linewidth=0)
        visible += [mean - half, mean + half]
        drawn += list(sel.runs)
    ax.axhline(0, color="0.3", linewidth=0.8)
    if xlim is not None:
        ax.set_xlim(*xlim)
        fit_y(ax, visible + [[0.0]])
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel("validation loss difference (variant - baseline)")
    _title(ax, title or f"paired differences per seed vs {AXIS_LABELS.get(x, x)}")
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    fig.embxlib_runs = sorted(set(map(str, drawn)))
    return fig


def stats_t_half(sd, n: int, level: float):
    from scipy import stats as st
    return st.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n) if n > 1 else 0 * sd


def plot_layer_lambdas(final: pd.DataFrame, streams=None, ylabel: str = "lambda", ax=None,
                       title: str | None = None) -> Figure:
    """Per-layer values of each stream as grouped bars; with several runs, the mean and ±1 std over runs.

    Takes stats.final_lambdas (default streams: the input mixing x, x00, x01, ...) or stats.mixing_shares.
    """
    fig, ax = _figure(ax, size=(10, 5))
    if streams is None:
        streams = sorted((s for s in pd.unique(final["stream"]) if is_mixing_stream(s)), key=lambda s: (s != "x", s))
    data = final[final["stream"].isin(list(streams))]
    n_runs = data["run"].nunique()
    sns.barplot(data=data, x="layer", y="value", hue="stream", hue_order=list(streams),
                errorbar="sd" if n_runs > 1 else None, ax=ax)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_ylabel(ylabel)
    _title(ax, title or (f"{ylabel} per layer, mean of {n_runs} runs" if n_runs > 1 else f"{ylabel} per layer"))
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend() is not None:
        ax.get_legend().remove()
        _outside_legend(ax)
    return fig


def mixed_sign_layers(final: pd.DataFrame) -> dict[str, list[int]]:
    """{stream: layers} where the runs of `final` (stats.final_lambdas, one variant) disagree on the sign."""
    out = {}
    for stream, group in final.groupby("stream", sort=False):
        values = group.groupby("layer")["value"]
        layers = [int(layer) for layer, v in values if (v > 0).any() and (v < 0).any()]
        if layers:
            out[str(stream)] = layers
    return out


def plot_layer_lambdas_runs(final: pd.DataFrame, streams=None, ylabel: str = "lambda", ax=None,
                            title: str | None = None) -> Figure:
    """Per-layer values of each stream, one line per run (no mean: where seeds disagree on the sign, a mean near
    zero with wide bars says less than the lines). The title names the layers whose signs differ across runs."""
    fig, ax = _figure(ax, size=(10, 5))
    if streams is None:
        streams = sorted((s for s in pd.unique(final["stream"]) if is_mixing_stream(s)), key=lambda s: (s != "x", s))
    streams = list(streams)
    data = final[final["stream"].isin(streams)]
    colors = palette(streams)
    for stream in streams:
        for i, (_, run) in enumerate(data[data["stream"] == stream].groupby("run", sort=False)):
            run = run.sort_values("layer")
            ax.plot(run["layer"], run["value"], color=colors[stream], alpha=0.5, linewidth=1, marker=".",
                    label=stream if i == 0 else None)
    ax.axhline(0, color="0.3", linewidth=0.8)
    mixed = mixed_sign_layers(data)
    n_runs = data["run"].nunique()
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    signs = "; ".join(f"{s} at layer(s) {','.join(map(str, layers))}" for s, layers in mixed.items()) or "nowhere"
    _title(ax, (title or f"{ylabel} per layer, one line per run ({n_runs} runs)")
           + f"\nsigns differ across runs: {signs}", fontsize="medium")
    ax.grid(alpha=0.3)
    if len(data):
        _outside_legend(ax)
    return fig


def plot_lambda_trajectories(lam: pd.DataFrame, stream: str, ax=None, title: str | None = None) -> Figure:
    """One stream's lambda at every layer over training (mean over the table's runs), one line per layer."""
    fig, ax = _figure(ax)
    data = lam[lam["stream"] == stream]
    mean = data.groupby(["layer", "step"])["value"].mean().unstack("layer")
    layers = list(mean.columns)
    cmap = mpl.colormaps["viridis"]
    norm = mpl.colors.Normalize(vmin=min(layers, default=0), vmax=max(layers, default=1))
    for layer in layers:
        ax.plot(mean.index, mean[layer], color=cmap(norm(layer)), linewidth=1.2)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    n_runs = data["run"].nunique()
    ax.set_xlabel("step")
    ax.set_ylabel(f"{stream} lambda")
    _title(ax, title or f"{stream} lambdas over training" + (f", mean of {n_runs} runs" if n_runs > 1 else ""))
    ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------------------------
# writing


def save(fig: Figure, path) -> Path:
    """Write fig as PNG at path (relative: as runs.from_root, the same from nbs/ as from the root; folders
    created, `.png` added when there is no suffix); returns the path."""
    path = Path(from_root(path))
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    # no "Software" stamp: the same figure gives the same bytes across matplotlib versions' metadata; a figure that
    # names the runs it draws (embxlib_runs) records them in a text chunk "Runs" (figure_runs reads it back), so a
    # test can hold a post's figure to the runs of its test
    metadata = {"Software": None}
    if getattr(fig, "embxlib_runs", None) is not None:
        import json
        metadata["Runs"] = json.dumps(list(fig.embxlib_runs))
    fig.savefig(path, format="png", dpi=120, metadata=metadata)
    return path


def figure_runs(path) -> list[str] | None:
    """The runs a figure saved by `save` draws (its "Runs" text chunk), None for a figure that names none."""
    import json

    from PIL import Image
    with Image.open(from_root(path)) as image:
        text = image.text.get("Runs") if hasattr(image, "text") else None
    return json.loads(text) if text is not None else None


def save_table(table, path) -> Path:
    """Write a DataFrame as markdown at path (relative: as runs.from_root) and as CSV beside it, or a
    ready string as is; returns the path."""
    path = Path(from_root(path))
    if not path.suffix:
        path = path.with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, str):
        path.write_text(table if table.endswith("\n") else table + "\n", encoding="utf-8")
    else:
        path.write_text(table.to_markdown(index=False) + "\n", encoding="utf-8")
        table.to_csv(path.with_suffix(".csv"), index=False)
    return path
