"""Interactive research: the explorer and the live view on real run folders (the committed runs/cpu-x0 and a real
tiny training run), training loss as a table, relative paths the same from nbs/ as from the root, runs that cannot
be compared refused, figures that display in a kernel, notebooks saved output-free by `make lab`'s hook."""
import copy
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import numpy as np
import papermill as pm
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import FAST, PYTHON, ROOT, python_env
from embxlib import analysis, explore, launch, lab, plots, runs, stats

CPU_X0 = ROOT / "runs" / "cpu-x0"
RUN = CPU_X0 / "extra_embeds1_s0"


@pytest.fixture(scope="module")
def x0():
    inputs = ["runs/cpu-x0"]
    return runs.load_runs(inputs), runs.load_train_loss(inputs), runs.load_lambdas(inputs)


# --- training loss as a table ------------------------------------------------------------------------------

def test_train_loss_is_a_tidy_table_of_every_logged_step(x0):
    val, train, _ = x0
    assert list(train.columns) == runs.TRAIN_COLUMNS
    assert train["run"].nunique() == 24 and set(train.groupby("run").size()) == {200}
    one = train[train["run"] == RUN.name]
    assert one["step"].tolist() == list(range(1, 201)) and set(one["variant"]) == {"x01-ve2"}
    first = re.search(r"^step:1/200 train_loss:(\S+) train_time:(\d+)ms", (RUN / "log.txt").read_text(), re.M)
    assert one["train_loss"].iloc[0] == float(first[1]) and one["train_time_s"].iloc[0] == int(first[2]) / 1000
    # the same runs, variants and sources as the validation points beside it
    assert set(zip(train["run"], train["variant"], train["source"])) == set(zip(val["run"], val["variant"], val["source"]))
    # upstream logs have no train_loss: no rows, no error
    upstream = sorted((ROOT / "published").rglob("*.txt"))[0]
    assert runs.load_train_loss([upstream]).empty


def test_train_log_keeps_whole_lines_and_the_last_of_a_step_logged_twice(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("step:1/3 train_loss:9.0000 train_time:10ms step_avg:10.00ms\n"
                   "step:2/3 train_loss:8.0000 train_time:20ms step_avg:10.00ms\n"
                   "# resumed from checkpoint.pt with world_size 1\n"
                   "step:2/3 train_loss:7.5000 train_time:21ms step_avg:10.50ms\n"
                   "step:3/3 train_loss:7.12")  # still being written
    table = runs.parse_train_log(log)
    assert table["step"].tolist() == [1, 2] and table["train_loss"].tolist() == [9.0, 7.5]


# --- paths from nbs/ -------------------------------------------------------------------------------------

def test_relative_paths_mean_the_same_from_nbs_as_from_the_root(monkeypatch, tmp_path):
    at_root = {"val": runs.load_runs(["runs/cpu-x0"]), "lam": runs.load_lambdas("runs/cpu-x0/extra_embeds1_s*"),
               "train": runs.load_train_loss(["runs/cpu-x0"]), "settings": runs.run_settings(["runs/cpu-x0"]),
               "folder": runs.parse_run_folder("runs/cpu-x0/extra_embeds1_s0")[0]}
    monkeypatch.chdir(ROOT / "nbs")
    from_nbs = {"val": runs.load_runs(["runs/cpu-x0"]), "lam": runs.load_lambdas("runs/cpu-x0/extra_embeds1_s*"),
                "train": runs.load_train_loss(["runs/cpu-x0"]), "settings": runs.run_settings(["runs/cpu-x0"]),
                "folder": runs.parse_run_folder("runs/cpu-x0/extra_embeds1_s0")[0]}
    for key, table in at_root.items():
        other = from_nbs[key]
        assert len(table) == len(other) > 0, key
        assert table.drop(columns="source").equals(other.drop(columns="source")), key
        assert [str(ROOT / s) for s in table["source"]] == list(other["source"]), key
    published = "published/snimu-experiments/00004-x0/predictions.md"
    assert "tokens" in runs.load_predictions(published)
    assert not runs.parse_log("published/snimu-experiments/00004-x0/results.md")[0].empty
    scratch = Path("runs") / "scratch" / f"test-explore-{id(tmp_path)}"
    try:
        saved = plots.save(plots.plot_val_loss(from_nbs["val"]), scratch / "loss")
        assert saved == ROOT / scratch / "loss.png" and saved.is_file() and not (ROOT / "nbs" / "runs").exists()
    finally:
        shutil.rmtree(ROOT / scratch, ignore_errors=True)
    from embxlib import lens
    with pytest.raises(FileNotFoundError, match=re.escape(str(RUN / "checkpoint.pt"))):
        lens.load_model("runs/cpu-x0/extra_embeds1_s0")  # looked for under the root (checkpoints are not committed)


# --- the explorer ------------------------------------------------------------------------------------------

def test_explorer_toggles_variants_zooms_switches_axes_smooths_and_reads_points(x0):
    val, train, lam = x0
    ex = explore.explore(val, train, lam)
    assert list(ex.variant_boxes) == ["x00-ve2", "x01-ve2"]
    assert len(ex.visible_lines()) == 48  # 24 runs: a validation and a training curve each
    assert ex.ax.get_xlim() == (1.0, 200.0) or ex.ax.get_xlim() == (0.0, 200.0)

    ex.variant_boxes["x01-ve2"].value = False
    assert len(ex.visible_lines()) == 24 and {l["variant"] for l in ex.visible_lines()} == {"x00-ve2"}
    assert "variants x00-ve2;" in ex.status.value

    full_y = ex.ax.get_ylim()
    ex.window.value = (150.0, 200.0)
    assert ex.ax.get_xlim() == (150.0, 200.0)
    lo, hi = ex.ax.get_ylim()
    shown = np.concatenate([l["shown_loss"][(l["step"] >= 150) & (l["step"] <= 200)] for l in ex.visible_lines()])
    assert lo < shown.min() and hi > shown.max() and hi - lo < (full_y[1] - full_y[0]) / 3  # y fits the window
    assert "x 150 to 200" in ex.status.value

    ex.show_train.value = False
    assert {l["kind"] for l in ex.visible_lines()} == {"val"}
    ex.show_train.value = True
    raw = train[train["run"] == "extra_embeds0_s0"]["train_loss"].to_numpy()
    line = next(l for l in ex.lines if l["run"] == "extra_embeds0_s0" and l["kind"] == "train")
    ex.smoothing.value = 0.0
    assert np.array_equal(line["line"].get_ydata(), raw)
    ex.smoothing.value = 0.9
    smoothed = line["line"].get_ydata()
    assert smoothed[0] == raw[0] and np.std(np.diff(smoothed)) < np.std(np.diff(raw)) / 2

    ex.x_axis.value = "time"
    assert ex.window.value == (ex.window.min, ex.window.max)  # the whole time axis
    assert ex.window.max == pytest.approx(max(val["train_time_s"].max(), train["train_time_s"].max()))
    assert "training time" in ex.ax.get_xlabel()

    ex.x_axis.value = "step"
    last = next(l for l in ex.visible_lines() if l["kind"] == "val")
    ex.fig.canvas.draw()
    x_px, y_px = ex.ax.transData.transform((last["step"][-1], last["shown_loss"][-1]))
    point = ex.nearest(x_px, y_px)
    assert point["step"] == 200 and point["loss"] == pytest.approx(last["loss"][-1])
    assert f"{point['loss']:.4f}" in ex.describe(point) and "step 200" in ex.describe(point)


def test_lambda_view_draws_every_run_and_names_the_layers_whose_signs_differ(x0):
    _, _, lam = x0
    view = explore.LambdaView(lam)
    assert view.variant.value == "x01-ve2" and view.step.value == 200
    assert len([l for l in view.ax.get_lines() if len(l.get_xdata()) == 6]) == 12 * 3  # x, x00, x01 per run
    final = stats.final_lambdas(lam[lam["variant"] == "x01-ve2"])
    x01 = final[final["stream"] == "x01"].groupby("layer")["value"]
    mixed = [layer for layer, v in x01 if (v > 0).any() and (v < 0).any()]
    assert mixed and f"x01 at layer(s) {','.join(map(str, mixed))}" in view.ax.get_title()
    view.step.value = 50
    assert "at step 50" in view.ax.get_title()


def test_analysis_lambda_figures_draw_every_run_and_the_mean_says_where_signs_differ(x0, tmp_path):
    _, _, lam = x0
    saved = analysis.lambda_figures(lam, "x01-ve2", tmp_path, norms="logged")
    assert [p.name for p in saved[:2]] == ["lambdas-layer-x01-ve2-runs12.png", "lambdas-layer-x01-ve2-mean12.png"]
    final = stats.final_lambdas(lam[lam["variant"] == "x01-ve2"])
    mixed = plots.mixed_sign_layers(final[final["stream"].isin(["x", "x00", "x01"])])
    assert mixed["x01"] == [0, 1, 2, 3, 4, 5]  # 5 of the 12 seeds end with negative x01 lambdas
    ax = plots.plot_layer_lambdas_runs(final).axes[0]
    assert len([l for l in ax.get_lines() if len(l.get_xdata()) == 6]) == 36
    assert "x01 at layer(s) 0,1,2,3,4,5" in ax.get_title()


def test_explorer_figure_saves_as_a_static_png(x0, tmp_path):
    ex = explore.explore(*x0)
    path = ex.save(tmp_path / "explore")
    assert path.read_bytes()[:4] == b"\x89PNG"


# --- runs that cannot be compared --------------------------------------------------------------------------

def demo_like(tmp_path) -> Path:
    """A copy of a committed x01 run with the demo's validation settings (16,384 tokens, no shuffling)."""
    copy = tmp_path / "demo" / "20261125-061500_tiny_x01"
    shutil.copytree(RUN, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "val_tokens": 16384, "shuffle_data": False}))
    return copy


def test_pooling_runs_that_differ_in_their_settings_names_the_fields(tmp_path):
    demo = demo_like(tmp_path)
    with pytest.raises(ValueError, match=r"variant 'x01-ve2' pools runs that differ in shuffle_data \(.*\); "
                                         r"val_tokens \(65536 in 12 run\(s\).*16384 in 1 run") as info:
        analysis.load(["runs/cpu-x0", str(demo)])
    assert "pool=True" in str(info.value)
    with pytest.raises(ValueError, match="val_tokens"):
        runs.load_runs(["runs/cpu-x0", str(demo)])
    with pytest.warns(runs.PoolWarning, match="val_tokens"):
        val, _ = analysis.load(["runs/cpu-x0", str(demo)], pool=True)
    assert val[val["variant"] == "x01-ve2"]["run"].nunique() == 13
    # runs of other variants are not pooled with it: no error
    val, _ = analysis.load([str(demo), "runs/cpu-x0/extra_embeds0_s*"])
    assert set(val["variant"]) == {"x01-ve2", "x00-ve2"}
    # the seed and the labels may differ: the committed sweep loads as before
    assert runs.pooling_conflicts(runs.load_runs(["runs/cpu-x0"])) == {}


def test_final_stats_say_their_ddof():
    val = runs.load_runs(["runs/cpu-x0"])
    sample, posts = stats.final_stats(val, threshold=6.0, ddof=1), stats.final_stats(val, threshold=6.0)
    assert set(sample["std_ddof"]) == {1} and set(posts["std_ddof"]) == {0}
    finals = stats.final_points(val)
    x00 = finals[finals["variant"] == "x00-ve2"]["val_loss"]
    assert sample.set_index("variant").loc["x00-ve2", "loss_std"] == pytest.approx(x00.std(ddof=1))
    assert posts.set_index("variant").loc["x00-ve2", "loss_std"] == pytest.approx(x00.std(ddof=0))


def test_zoom_y_range_fits_the_curves_not_a_far_target():
    val = runs.load_runs(["runs/cpu-x0"])
    ax = plots.plot_val_loss(val, xlim=(150, 200), average=True, target=6.0).axes[0]
    visible = val[(val["step"] >= 150)]["val_loss"]
    lo, hi = ax.get_ylim()
    assert hi < 6.0 and hi - lo < 2 * (visible.max() - visible.min())


# --- a notebook's kernel in nbs/ ---------------------------------------------------------------------------

@pytest.mark.slow
def test_in_a_kernel_in_nbs_paths_work_figures_display_and_the_explorer_is_a_widget(tmp_path):
    cells = ["from embxlib import plots, runs\nfrom embxlib.explore import explore\nval = runs.load_runs(['runs/cpu-x0'])\nprint(val['run'].nunique())",
             "plots.plot_val_loss(val)",
             "explore(val, runs.load_train_loss(['runs/cpu-x0']), runs.load_lambdas(['runs/cpu-x0']))"]
    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in cells],
                                metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}}), tmp_path / "probe.ipynb")
    done = pm.execute_notebook(str(tmp_path / "probe.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT / "nbs"),
                               kernel_name="python3", progress_bar=False)
    assert done.cells[0].outputs[0]["text"].strip() == "24"
    figure = done.cells[1].outputs[0]
    assert figure["output_type"] == "execute_result" and "image/png" in figure["data"]
    assert "application/vnd.jupyter.widget-view+json" in done.cells[2].outputs[0]["data"]


# --- the live view -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_run(corpus, tmp_path_factory):
    """A real tiny training run (the demo's variant, x01) followed by a live view while it trains."""
    run_dir = tmp_path_factory.mktemp("live") / "x01"
    # fp32: on a CPU without AVX-512 BF16 (some hosts of this VM) a bf16 head makes a step seconds long
    steps = [*FAST, "--num-iterations", "20", "--val-loss-every", "5", "--extra-embeds", "1", "--precision", "fp32",
             "--name", "x01-ve2",
             "--data-dir", str(corpus), "--run-dir", str(run_dir)]
    proc = subprocess.Popen([PYTHON, "-m", "embxlib.train", *steps], env=python_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    view = explore.watch(run_dir, every=0.2)
    seen = []  # (train points, val points) drawn, as the test saw them while the run trained
    try:
        while proc.poll() is None:
            seen.append((sum(len(l["step"]) for l in view.lines if l["kind"] == "train"),
                         sum(len(l["step"]) for l in view.lines if l["kind"] == "val")))
            time.sleep(0.1)
        out = proc.stdout.read()
        assert proc.returncode == 0, out[-3000:]
        ended = view.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        view.stop()
    return dict(run_dir=run_dir, view=view, seen=seen, ended=ended, output=out)


@pytest.mark.slow
def test_live_view_follows_a_running_run_and_stops_by_itself(live_run):
    view, seen = live_run["view"], live_run["seen"]
    assert live_run["ended"] and not view.thread.is_alive()
    partial = [s for s in seen if 0 < s[0] < 20]
    assert partial, f"never saw the run mid-way: {seen[:3]} ... {seen[-3:]}"
    assert view.updates >= 3
    assert view.image.value[:4] == b"\x89PNG"  # the page's copy, filled by the thread (an Image widget)
    train = [l for l in view.lines if l["kind"] == "train"]
    val = [l for l in view.lines if l["kind"] == "val"]
    assert len(train) == len(val) == 1 and train[0]["step"].tolist() == list(range(1, 21))
    assert val[0]["step"].tolist() == [0, 5, 10, 15, 20]
    assert view.state["status"] == {"x01": "finished"} and "1 finished; ended" in view.status.value
    assert view.ax.get_xlim()[1] == 20  # the window followed the run to its end
    # without compile there is no warmup: nothing said about compiling, no warmup step
    assert "Warmup step" not in live_run["output"] and "# compiling" not in live_run["output"]


@pytest.mark.slow
def test_a_demo_run_pooled_with_the_committed_runs_is_refused_naming_the_settings(live_run):
    with pytest.raises(ValueError, match=r"variant 'x01-ve2' pools runs that differ in") as info:
        analysis.load(["runs/cpu-x0", str(live_run["run_dir"])])
    for field in ("num_iterations", "precision", "shuffle_data", "train_batch_tokens", "val_tokens"):
        assert field in str(info.value)


def test_launcher_relays_what_the_trainer_says_while_it_compiles(tmp_path):
    said = []
    script = ("print('# compiling the model (torch.compile) and warming up: 2 untimed steps'); print('Warmup step 1/2');"
              "print('step:0/1 val_loss:10.0 train_time:0ms step_avg:0.00ms'); print('noise')")
    from embxlib.config import tiny
    launch._stream([PYTHON, "-c", script], python_env(), tmp_path, tiny(num_iterations=1), False, said.append)
    assert said[:2] == ["# compiling the model (torch.compile) and warming up: 2 untimed steps", "Warmup step 1/2"]
    assert not any("noise" in s for s in said)


@pytest.mark.slow
def test_sweep_notebook_watches_its_runs_and_the_terminal_gets_a_line_per_run(corpus, tmp_path):
    base = dict(train_seq_len=128, train_batch_tokens=256, val_seq_len=128, val_tokens=512, window_max=128,
                num_iterations=4, val_loss_every=2, muon_momentum_warmup_steps=10, warmup_steps=0, compile=False,
                precision="fp32", data_dir=str(corpus))  # conftest.FAST, in fp32 (see live_run)
    spec = {"grid": {"extra_embeds": [1]}, "seeds": [0], "base": base, "sweep_dir": str(tmp_path / "sweep")}
    r = subprocess.run([PYTHON, "-m", "papermill", str(ROOT / "nbs" / "sweep.ipynb"), str(tmp_path / "out.ipynb"),
                        "-y", json.dumps(spec), "--cwd", str(ROOT), "-k", "python3"], capture_output=True, text=True,
                       env=python_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert re.search(r"^\[1/1\] extra_embeds1_s0: training \(\d\d:\d\d:\d\d\)$", r.stdout, re.M), r.stdout[-2000:]
    assert re.search(r"^\[1/1\] extra_embeds1_s0: finished in \d+:\d\d, final val_loss \d+\.\d{4}$", r.stdout, re.M)
    assert (tmp_path / "sweep" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    done = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert not [o for c in done.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


# --- make lab's save hook ----------------------------------------------------------------------------------

def test_saving_a_notebook_under_nbs_in_the_lab_writes_it_output_free(tmp_path):
    from jupyter_server.services.contents.filemanager import FileContentsManager
    (tmp_path / "nbs").mkdir()
    (tmp_path / "runs").mkdir()
    committed = (ROOT / "nbs" / "analyze_runs.ipynb").read_bytes()
    (tmp_path / "nbs" / "analyze_runs.ipynb").write_bytes(committed)
    cm = FileContentsManager(root_dir=str(tmp_path), pre_save_hook="embxlib.lab.keep_output_free")
    model = cm.get("nbs/analyze_runs.ipynb")
    nb = model["content"]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", text="hello\n")]
            cell.execution_count = 3
            cell.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00Z"}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    kept = copy.deepcopy(nb)
    cm.save({"type": "notebook", "format": "json", "content": nb}, "nbs/analyze_runs.ipynb")
    assert (tmp_path / "nbs" / "analyze_runs.ipynb").read_bytes() == committed
    cm.save({"type": "notebook", "format": "json", "content": kept}, "runs/executed.ipynb")  # not a tracked one
    assert "hello" in (tmp_path / "runs" / "executed.ipynb").read_text()
    assert lab.is_tracked("nbs/sweep.ipynb") and not lab.is_tracked("runs/x/notebook.ipynb")
