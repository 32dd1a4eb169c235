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

