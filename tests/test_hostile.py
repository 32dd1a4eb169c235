"""Hostile inputs (issue 33): what a run folder, a log or a sweep file holds reaches a widget, an HTML table or a
post as text, never as markup; the readers read only regular files inside the tree they are given and never echo
a line's content; YAML is loaded without alias expansion, duplicate keys refused and every error names its file;
the live view ends a run whose trainer is gone; the lab's pre-save hook copes with a malformed file on disk."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT
from embxlib import blog, explore, runs

RUN = ROOT / "runs" / "cpu-x0" / "extra_embeds1_s0"
XSS = '<img src=x onerror="document.body.setAttribute(\'data-xss\',1)">'
STATUS_XSS = '<svg onload="document.body.setAttribute(\'data-xss\',2)">'


def hostile_run(tmp_path, name=XSS, status=STATUS_XSS, folder="hostile") -> Path:
    run = tmp_path / folder
    shutil.copytree(RUN, run, ignore=shutil.ignore_patterns("notebook.ipynb", "loss.png", "console.log"))
    config = json.loads((run / "config.json").read_text())
    config["name"] = name
    (run / "config.json").write_text(json.dumps(config))
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = status
    (run / "summary.json").write_text(json.dumps(summary))
    return run


# --- H-a: escaped ------------------------------------------------------------------------------------------

def test_explorer_status_shows_a_hostile_variant_name_as_text(tmp_path):
    run = hostile_run(tmp_path)
    ex = explore.explore(runs.load_runs([run]), train=runs.load_train_loss([run]))
    assert "<img" not in ex.status.value and "&lt;img src=x onerror=" in ex.status.value
    assert ex.status.value.count("<span") == 1  # only our own markup
    point = dict(variant=XSS, run=XSS, kind="val", step=1, train_time_s=1.0, loss=1.0)
    assert "<img" not in ex.describe(point)


def test_live_view_status_shows_a_hostile_status_as_text(tmp_path):
    run = hostile_run(tmp_path)
    view = explore.watch(run, every=0.1, timeout=1)
    try:
        assert view.join(timeout=30)
    finally:
        view.stop()
    assert "<svg" not in view.status.value and "<img" not in view.status.value
    assert "&lt;svg onload=" in view.status.value


def test_a_status_that_is_not_a_string_does_not_break_the_live_view(tmp_path):
    run = hostile_run(tmp_path, status={"a": [1]})
    view = explore.watch(run, every=0.1, timeout=2)
    try:
        assert view.join(timeout=30)
    finally:
        view.stop()
    assert "{&#x27;a&#x27;: [1]}" in view.status.value or "{'a': [1]}" in view.status.value


def test_post_tables_and_sentences_escape_names():
    val = pd.DataFrame({"run": ["a", "b"], "variant": [XSS, "x|y"], "step": [1, 1], "train_time_s": [1.0, 1.0],
                        "val_loss": [1.0, 2.0], "source": ["s", "s"]})
    text = blog.runs_per_variant(val)
    assert "<img" not in text and "&lt;img" in text
    final = pd.DataFrame({"variant": [XSS, "x|y"], "n": [1, 1], "loss_mean": [1.0, 2.0], "loss_std": [0.0, 0.0],
                          "time_s_mean": [1.0, 1.0], "p_value": [0.5, 0.5], "std_ddof": [1, 1]})
    table = blog.final_table(final)
    assert "<img" not in table and "x\\|y" in table
    assert all(line.count("|") - line.count("\\|") == 8 for line in table.splitlines())
    assert blog.md_text("x01-ve2") == "x01-ve2" and blog.md_text("a_b") == "a_b"  # the posts' names are unchanged


# --- readers: regular files inside the folder, lines named by number, never echoed ----------------------------

def _load_in_thread(paths, timeout=60):
    import threading
    import warnings
    out = {}

    def load():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["val"] = runs.load_runs(paths, require=False)
        out["warnings"] = [str(w.message) for w in caught]
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout)
    return out, thread


def test_a_fifo_among_the_logs_is_named_and_not_read(tmp_path):
    import os
    top = tmp_path / "runs"
    shutil.copytree(RUN, top / "a_run", ignore=shutil.ignore_patterns("notebook.ipynb", "loss.png", "console.log"))
    (top / "notes").mkdir()
    fifo = top / "notes" / "x.txt"
    os.mkfifo(fifo)
    try:
        out, thread = _load_in_thread([top])
        assert not thread.is_alive(), "load_runs hangs on a FIFO"
    finally:  # free a reader blocked in open() (today's code), then the FIFO
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(10)
    assert out["val"]["run"].unique().tolist() == ["a_run"]
    assert any("x.txt: not a regular file, not read" in w for w in out["warnings"]), out["warnings"]


def test_a_metrics_file_symlinked_out_of_its_folder_is_not_read_nor_echoed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-TOKEN-1234\n")
    run = tmp_path / "runs" / "a_run"
    shutil.copytree(RUN, run, ignore=shutil.ignore_patterns("notebook.ipynb", "loss.png", "console.log"))
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(secret)
    (run / "log.txt").unlink()
    (run / "log.txt").symlink_to(secret)
    out, _ = _load_in_thread([tmp_path / "runs"])
    assert not any("SECRET" in w for w in out["warnings"]), out["warnings"]
    assert any("metrics.jsonl: a symlink out of its folder, not read" in w for w in out["warnings"]), out["warnings"]
    assert out["val"].empty
    # a log given by name, symlinked out of its folder: the same
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "up.txt").symlink_to(secret)
    out, _ = _load_in_thread([tmp_path / "logs" / "up.txt"])
    assert out["val"].empty and any("up.txt: a symlink out of its folder" in w for w in out["warnings"])
    assert not any("SECRET" in w for w in out["warnings"])
    # a symlink inside its folder is followed
    (run / "metrics.jsonl").unlink()
    (run / "real.jsonl").write_text((RUN / "metrics.jsonl").read_text())
    (run / "metrics.jsonl").symlink_to("real.jsonl")
    out, _ = _load_in_thread([run])
    assert len(out["val"]) == len(runs.load_runs([RUN]))


def test_malformed_lines_are_named_by_file_and_line_never_by_content(tmp_path):
    log = tmp_path / "up" / "log1.txt"
    log.parent.mkdir()
    log.write_text("step:0/10 val_loss:5.0000 train_time:0ms step_avg:0.00ms\n"
                   "step:5/10 val_loss:SECRET1 train_time:10ms step_avg:2.00ms\n"
                   "step:6/10 val_loss:4.0 train_time:SECRET2 step_avg:2.00ms\n"
                   "step:10/10 val_loss:3.0000 train_time:20ms step_avg:2.00ms\n")
    run = tmp_path / "a_run"
    shutil.copytree(RUN, run, ignore=shutil.ignore_patterns("notebook.ipynb", "loss.png", "console.log"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = '{"step": 1, "val_loss": "SECRET3", "train_time_ms": 1}'
    lines[2] = "SECRET4 not json"
    lines[3] = '{"step": 1.5, "val_loss": 1, "train_time_ms": 1, "SECRET5": 1}'
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out, _ = _load_in_thread([log, run])
    text = "\n".join(out["warnings"])
    assert "SECRET" not in text, text
    for where in (f"{log}:2:", f"{log}:3:", f"{run / 'metrics.jsonl'}:2:", f"{run / 'metrics.jsonl'}:3:",
                  f"{run / 'metrics.jsonl'}:4:"):
        assert where in text, (where, text)


def test_a_non_finite_training_time_is_warned_about_and_left_out_of_the_time_axis(tmp_path):
    import warnings
    run = tmp_path / "a_run"
    shutil.copytree(RUN, run, ignore=shutil.ignore_patterns("notebook.ipynb", "loss.png", "console.log"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    lines[2] = lines[2].replace(f'"train_time_ms": {json.dumps(record["train_time_ms"])}', '"train_time_ms": Infinity')
    assert "Infinity" in lines[2]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        val = runs.load_runs([run])
    assert any("non-finite train_time" in str(w.message) for w in caught), [str(w.message) for w in caught]
    ex = explore.explore(val, x="train_time_s")  # raised "Axis limits cannot be NaN or Inf"
    lo, hi = ex.window.min, ex.window.max
    assert 0 <= lo < hi < float("inf") and ex.ax.get_xlim() == (lo, hi)


# --- YAML: no aliases, no key twice, every error names its file --------------------------------------------------

BOMB = "".join(f"{k}: &{k} [" + ",".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, k in zip([None, *"abcdefgh"], "abcdefghi"))  # 9**9 strings once expanded, in ~340 bytes


def test_a_yaml_alias_bomb_is_refused_naming_the_file_as_config_and_as_sweep(tmp_path):
    from embxlib import config, launch
    assert len(BOMB) < 400
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(ValueError, match=rf"^config file {path}: not valid YAML: an alias \(\*a\): aliases are not "
                                         r"allowed here \(line 2, column \d+\)"):
        config.load_config_file(path)
    with pytest.raises(ValueError, match=rf"^sweep file {path}: not valid YAML: an alias"):
        launch.sweep_file_and_yaml(str(path), None, None)
    with pytest.raises(ValueError, match=r"^sweep YAML \(-y\): not valid YAML: an alias"):
        launch.sweep_file_and_yaml(None, BOMB, None)
    with pytest.raises(ValueError, match=r"larger than"):
        config.load_yaml("a: 1\n" * (config.YAML_MAX_BYTES // 4), "x")


def test_a_key_given_twice_is_refused_naming_the_file_and_line(tmp_path):
    from embxlib import config, launch
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nseed: 1\nseed: 2\n")
    with pytest.raises(ValueError, match=rf"^config file {path}: not valid YAML: the key 'seed' twice \(line 3, "):
        config.load_config_file(path)
    path = tmp_path / "c.json"
    path.write_text('{"preset": "tiny", "seed": 1, "seed": 2}')
    with pytest.raises(ValueError, match=rf"^config file {path}: not valid JSON: the key 'seed' twice"):
        config.load_config_file(path)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("grid: {extra_embeds: [0, 1]}\nseeds: [0]\ngrid: {extra_embeds: [2]}\n")
    with pytest.raises(ValueError, match=rf"^sweep file {sweep}: not valid YAML: the key 'grid' twice \(line 3, "):
        launch.sweep_file_and_yaml(str(sweep), None, None)
    with pytest.raises(ValueError, match=r"^sweep YAML \(-y\): not valid YAML: the key 'seeds' twice"):
        launch.sweep_file_and_yaml(None, "{seeds: [0], seeds: [1]}", None)


def test_every_yaml_error_names_its_file(tmp_path):
    from embxlib import config, launch
    sweep = tmp_path / "s.yaml"
    sweep.write_text("grid: {extra_embeds: [0, 1]\nseeds: [0]\n")
    with pytest.raises(ValueError, match=rf"^sweep file {sweep}: not valid YAML: .*\(line \d+, column \d+\)"):
        launch.sweep_file_and_yaml(str(sweep), None, None)
    with pytest.raises(ValueError, match=r"^sweep YAML \(-y\): not valid YAML: "):
        launch.sweep_file_and_yaml(None, "{grid: [", None)
    path = tmp_path / "c.yml"
    path.write_text("seed: [1\n")
    with pytest.raises(ValueError, match=rf"^config file {path}: not valid YAML: .*\(line \d+, column \d+\)"):
        config.load_config_file(path)
    # what stays allowed: the files we write, and anchors without aliases
    assert config.load_yaml("grid: &g {extra_embeds: [0, 1]}\nseeds: [0, 1]\n", "x") == {
        "grid": {"extra_embeds": [0, 1]}, "seeds": [0, 1]}


# --- the live view ends a run whose trainer is gone ---------------------------------------------------------------

def _lock(run: Path, pid: int) -> None:
    import socket
    (run / "run.lock").write_text(json.dumps(dict(pid=pid, host=socket.gethostname(), since="2026-12-08T00:00:00",
                                                  cmd="python -m embxlib.train")))


def test_the_live_view_ends_a_run_whose_lock_holder_is_gone(tmp_path):
    import subprocess
    import sys
    run = hostile_run(tmp_path, name="x01", status="running")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # ended and reaped: its pid names no process
    _lock(run, dead.pid)
    view = explore.watch(run, every=0.1)
    try:
        assert view.join(timeout=15), "the live view kept watching a run whose trainer is gone"
    finally:
        view.stop()
    assert view.state["status"] == {"hostile": "running, its process is gone"}
    assert "1 running, its process is gone; ended" in view.status.value


def test_the_live_view_keeps_watching_a_run_whose_lock_holder_runs(tmp_path):
    import os
    run = hostile_run(tmp_path, name="x01", status="running")
    _lock(run, os.getpid())
    view = explore.watch(run, every=0.1)
    try:
        assert not view.join(timeout=1)
        assert view.state["status"] == {"hostile": "running"}
    finally:
        view.stop()


def test_the_live_view_reads_no_fifo(tmp_path):
    import os
    import threading
    run = hostile_run(tmp_path, name="x01", status="finished")
    (run / "summary.json").unlink()
    os.mkfifo(run / "summary.json")
    views = []
    thread = threading.Thread(target=lambda: views.append(explore.watch(run, every=0.1, timeout=1)), daemon=True)
    thread.start()
    try:
        thread.join(15)
        assert views and views[0].join(timeout=15), "the live view blocks on a FIFO"
    finally:
        for view in views:
            view.stop()
        for _ in range(3):  # free a reader blocked in open() (today's code)
            try:
                os.close(os.open(run / "summary.json", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            thread.join(2)


# --- the lab's pre-save hook ------------------------------------------------------------------------------------

@pytest.mark.parametrize("on_disk", ["[]", '{"cells": [], "metadata": "not a dict", "nbformat": 4}', '{"cells": [',
                                     '"a string"', '{"metadata": [1, 2]}'])
def test_the_save_hook_strips_outputs_whatever_the_file_on_disk_holds(tmp_path, on_disk):
    import nbformat
    from jupyter_server.services.contents.filemanager import FileContentsManager
    (tmp_path / "nbs").mkdir()
    nb = nbformat.read(ROOT / "nbs" / "analyze_runs.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", text="SECRET-OUTPUT\n")]
            cell.execution_count = 3
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    (tmp_path / "nbs" / "analyze_runs.ipynb").write_text(on_disk)
    cm = FileContentsManager(root_dir=str(tmp_path), pre_save_hook="embxlib.lab.keep_output_free")
    cm.save({"type": "notebook", "format": "json", "content": nb}, "nbs/analyze_runs.ipynb")
    saved = (tmp_path / "nbs" / "analyze_runs.ipynb").read_text()
    assert "SECRET-OUTPUT" not in saved and '"widgets"' not in saved
    again = nbformat.reads(saved, as_version=4)
    assert again.metadata["kernelspec"] == nb.metadata["kernelspec"]
    cm.save({"type": "notebook", "format": "json", "content": again}, "nbs/analyze_runs.ipynb")  # the next save too


def test_logit_lens_markdown_shows_a_token_s_html_as_text():
    preds = {"tokens": {0: XSS, 1: "a|b"}, "predictions": {"x00": {0: {0.9: "<b>", 0.1: "c"}, 1: {0.5: "`x`"}}}}
    md = runs.logit_lens_markdown(runs.logit_lens_table(preds, components=["x00"]))
    assert "<img" not in md and "<b>" not in md and "&lt;img" in md and "&lt;b&gt;" in md
    assert "a\\|b" in md and "\\`x\\`" in md


def test_a_name_with_dollar_signs_is_drawn_as_text_not_mathtext(tmp_path):
    run = hostile_run(tmp_path, name=r"$\undefinedcmd$ costs $5", status="finished")
    ex = explore.explore(runs.load_runs([run]))  # raised ParseFatalException: Unknown symbol
    ex.fig.canvas.draw()
    assert ex.ax.get_legend().get_texts()[0].get_text().startswith(r"\$\undefinedcmd\$")


def test_a_non_finite_training_time_is_left_out_of_the_post_and_analysis_ranges():
    from embxlib import analysis
    val = pd.DataFrame({"run": ["a", "a", "a", "b", "b"], "variant": "v", "step": [0, 5, 10, 0, 10],
                        "train_time_s": [0.0, float("inf"), 21.0, 0.0, float("nan")],
                        "val_loss": [3.0, 2.0, 1.0, 3.0, 1.0], "source": "s"})
    assert blog.data_end(val) == 30  # int(inf) raised OverflowError
    assert analysis.last_quarter(val, "train_time_s") == [0, 0]
    assert analysis.last_quarter(val[val["run"] == "a"], "train_time_s") == [15, 21]
