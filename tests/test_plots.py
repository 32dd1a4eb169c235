"""Figures: what is drawn is the data (hand-made tables), zooms fit the visible data, files are stable PNGs."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from embxlib.plots import plot_lambda_trajectories, plot_layer_lambdas, plot_val_loss, save, save_table
from embxlib.runs import load_runs, select

ROOT = Path(__file__).resolve().parents[1]
X0 = ROOT / "published" / "snimu-experiments" / "00004-x0"


@pytest.fixture
def runs():
    # variant v: two runs validated at different times; variant w: one run
    return pd.DataFrame({
        "run": ["a", "a", "b", "b", "c", "c"], "variant": ["v", "v", "v", "v", "w", "w"],
        "step": [0, 100, 0, 100, 0, 100], "train_time_s": [0.0, 10.0, 0.0, 20.0, 0.0, 10.0],
        "val_loss": [10.0, 0.0, 20.0, 0.0, 6.0, 4.0],
    })


def legend_texts(ax):
    # a figure of one axes gets its legend beside the axes (a figure legend), others keep it on the axes
    legend = ax.get_legend() or ax.figure.legends[0]
    return [t.get_text() for t in legend.get_texts()]


def test_long_titles_wrap_and_legends_sit_beside_the_data(runs, tmp_path):
    title = "x00 (baseline) to x04: validation loss over steps 5500-5960, mean of each variant's runs, long"
    fig = plot_val_loss(runs, x="step", average=True, title=title)
    save(fig, tmp_path / "f.png")  # draws the figure: the extents below are the saved ones
    ax, renderer = fig.axes[0], fig._get_renderer()
    text = ax.title.get_window_extent(renderer)
    page = fig.bbox
    assert "\n" in ax.get_title() and ax.get_title().replace("\n", " ") == title
    assert page.x0 <= text.x0 and text.x1 <= page.x1  # the whole title is on the figure
    legend = fig.legends[0].get_window_extent(renderer)
    assert legend.y1 <= ax.get_tightbbox(renderer).y0  # below the axes and their labels, over none of the data
    assert page.x0 <= legend.x0 and legend.x1 <= page.x1 and legend.y0 >= page.y0
    # long labels (the value-embedding post's) take fewer columns, never more than the width
    names = {v: f"no value embedding at layer {v}, a long label" for v in "abc"}
    fig = plot_val_loss(runs.assign(variant=runs["run"].map(names)), x="step", average=True, target=3.0)
    save(fig, tmp_path / "g.png")
    legend = fig.legends[0].get_window_extent(fig._get_renderer())
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1


def test_every_run_is_drawn(runs):
    fig = plot_val_loss(runs, x="train_time_s", target=3.0)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3 + 1  # three runs and the target line
    assert lines[1].get_ydata().tolist() == [20.0, 0.0] and lines[1].get_xdata().tolist() == [0.0, 20.0]
    assert legend_texts(ax) == ["v", "w", "target 3.0"]
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()


def test_average_draws_the_mean_on_a_common_grid(runs):
    fig = plot_val_loss(runs, x="train_time_s", xlim=(0, 10), average=True, n_grid=3)
    ax = fig.axes[0]
    mean_v, mean_w = ax.get_lines()
    # grid 0, 5, 10 s: a = 10, 5, 0 and b = 20, 15, 10 -> 15, 10, 5
    assert mean_v.get_xdata().tolist() == [0.0, 5.0, 10.0]
    assert mean_v.get_ydata().tolist() == [15.0, 10.0, 5.0]
    assert mean_w.get_ydata().tolist() == [6.0, 5.0, 4.0]
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 1  # a band only where n > 1
    assert legend_texts(ax) == ["v, mean of 2 runs", "w, 1 run"]


def test_zoom_fits_y_to_the_window():
    df = select(load_runs(X0 / "results.md"), {"999": "x00", "0": "x01", "3": "x04"})
    fig = plot_val_loss(df, x="step", xlim=(5500, 6000))
    ax = fig.axes[0]
    assert ax.get_xlim() == (5500, 6000)
    visible = df[(df["step"] >= 5500) & (df["step"] <= 6000)]["val_loss"]
    lo, hi = ax.get_ylim()
    assert lo < visible.min() and hi > visible.max()
    assert hi - lo < 2 * (visible.max() - visible.min())  # not the full 2.9..10.8 range
    avg = plot_val_loss(df, x="train_time_s", xlim=(1400, 1550), average=True, band="ci95").axes[0]
    assert avg.get_xlim() == (1400, 1550) and 2.9 < avg.get_ylim()[0] < avg.get_ylim()[1] < 2.94


def test_plots_draw_into_a_given_ax(runs):
    fig = Figure()
    left, right = fig.subplots(1, 2)
    assert plot_val_loss(runs, ax=right) is fig
    assert len(right.get_lines()) == 3 and len(left.get_lines()) == 0


@pytest.fixture
def final():
    # two runs, two layers: x (1, 3) and (3, 5) -> means 2, 4; x00 (0, -1) twice; v is not an input mix
    rows = []
    for run, xs in [("r1", (1.0, 3.0)), ("r2", (3.0, 5.0))]:
        for layer in (0, 1):
            rows += [(run, "v", 10, "x", layer, xs[layer]), (run, "v", 10, "x00", layer, (0.0, -1.0)[layer]),
                     (run, "v", 10, "v", layer, 9.0)]
    return pd.DataFrame(rows, columns=["run", "variant", "step", "stream", "layer", "value"])


def test_layer_lambdas_are_bars_of_the_mean(final):
    ax = plot_layer_lambdas(final).axes[0]
    # one bar container per stream (v is left out: it is no input mix), one bar per layer
    heights = [[bar.get_height() for bar in container] for container in ax.containers]
    assert heights == [[2.0, 4.0], [0.0, -1.0]]
    assert legend_texts(ax) == ["x", "x00"]
    assert "mean of 2 runs" in ax.get_title()


def test_lambda_trajectories(final):
    early = final.assign(step=0, value=0.0)
    fig = plot_lambda_trajectories(pd.concat([early, final]), "x")
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2  # one per layer
    assert lines[1].get_xdata().tolist() == [0, 10] and lines[1].get_ydata().tolist() == [0.0, 4.0]


def test_save_writes_stable_png(tmp_path, runs):
    fig = plot_val_loss(runs)
    path = save(fig, tmp_path / "images" / "val_loss-step")
    assert path == tmp_path / "images" / "val_loss-step.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert save(fig, tmp_path / "again.png").read_bytes() == data
    assert b"matplotlib version" not in data


def test_save_table(tmp_path):
    table = pd.DataFrame({"variant": ["16", "15"], "time_to_target_s": [1410.55, 1422.37]})
    path = save_table(table, tmp_path / "tables" / "crossing")
    assert path.read_text().splitlines()[0].split("|")[1].strip() == "variant"
    assert pd.read_csv(path.with_suffix(".csv"), dtype={"variant": str}).equals(table)
    assert save_table("| a |\n", tmp_path / "lens.md").read_text() == "| a |\n"
    assert np.isclose(pd.read_csv(path.with_suffix(".csv"))["time_to_target_s"].iloc[0], 1410.55)


def test_bench_analysis_loads_every_format(tmp_path):
    from embxlib.bench import bench_analysis

    result = bench_analysis(n_runs=7, n_points=40, tmpdir=tmp_path)
    assert result["runs"] == 7 and result["points"] == 7 * 40 and result["curves"] == 4
    assert 0 < result["load_s"] <= result["total_s"]
    assert list(tmp_path.iterdir()) == []  # the synthetic files are cleaned up
