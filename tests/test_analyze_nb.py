"""The analysis notebook: stored clean with a papermill parameters cell; runs end to end on the published data and on
our run folders (grouped by their own config names); writes only where it is told or into a new runs/analysis/
folder; stops with a message naming the inputs when they hold no runs."""

import shutil
import subprocess
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

from embxlib import analysis

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "nbs" / "analyze_runs.ipynb"
PARAMETERS = {"inputs", "variants", "baseline", "target", "step_zooms", "time_zooms", "rank_window", "band",
              "lambda_variant", "norms", "predictions", "out_dir", "pool"}
X0 = dict(inputs=["published/snimu-experiments/00004-x0/results.md"],
          variants={"999": "x00 (baseline)", "0": "x01", "1": "x02", "2": "x03", "3": "x04"},
          baseline="x00 (baseline)", target=2.92, step_zooms=[[5500, 6000]], time_zooms=[[1400, 1550]],
          rank_window=[1200, 1400], lambda_variant="x01", norms="predictions",
          predictions="published/snimu-experiments/00004-x0/predictions.md")


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def test_stored_notebook_has_no_outputs_and_a_parameters_cell():
    nb = nbformat.read(NB, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert code[0].metadata.get("tags") == ["parameters"]
    assert set(pm.inspect_notebook(str(NB))) == PARAMETERS


def execute(tmp_path, **parameters):
    return pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"), cwd=str(ROOT), kernel_name="python3",
                               parameters=parameters, progress_bar=False)


def run_notebook(tmp_path, **parameters):
    out = tmp_path / "out"
    executed = execute(tmp_path, **parameters, out_dir=str(out))
    assert not [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    return out


@pytest.mark.slow
def test_notebook_on_the_published_x0_runs(tmp_path):
    out = run_notebook(tmp_path, **X0)
    written = {p.name for p in out.iterdir()}
    assert {"val_loss-step.png", "val_loss-step-5500-6000.png", "val_loss-time-1400-1550.png",
            "lambdas-layer-x01-mean5.png", "lambdas-layer-x01-mean5-normalized-and-xnorm.png",
            "lambdas-trajectory-x01-x01.png", "crossing-order-2.92.md", "rank-time-1200-1400.md",
            "final-stats.md", "logit-lens-top1.md"} <= written
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in written if name.endswith(".png"))
    order = pd.read_csv(out / "crossing-order-2.92.csv")
    assert sorted(order["variant"]) == ["x00 (baseline)", "x01", "x02", "x03", "x04"]
    assert order.set_index("variant").loc["x01", "n_runs"] == 5
    assert len((out / "logit-lens-top1.md").read_text().splitlines()) == 2 + 32


@pytest.mark.slow
def test_notebook_on_the_published_value_embedding_runs(tmp_path):
    labels = {"13": "0 (baseline)", "15": "1", "16": "2", "17": "3", "18": "4", "19": "5"}  # additional value embeds
    out = run_notebook(
        tmp_path, inputs=["published/snimu-experiments/00003-value-embeddings/results.md"], variants=labels,
        baseline="0 (baseline)", target=2.92, step_zooms=[[5000, 6000]], time_zooms=[[1200, 1500]],
        rank_window=[1200, 1400], norms=None)
    assert (out / "val_loss-time-1200-1500.png").is_file()
    per_run = pd.read_csv(out / "crossings-2.92-runs.csv", dtype={"run": str}).set_index("run")
    assert per_run.loc["16", "time_to_target_s"] == pytest.approx(1410.55, abs=0.01)
    ranking = pd.read_csv(out / "rank-time-1200-1400.csv", dtype={"variant": str})
    assert ranking["variant"].tolist() == ["2", "1", "0 (baseline)", "3", "5", "4"]


# the medium records' logs (published/modded-nanogpt-logs) by record number, the x01 record for reference
MEDIUM_RECORDS = {"2025-09-11_GPT2MediumX01": "x01 (PR #124)", "2025-09-16_Snoo": "12 Snoo",
                  "2025-09-17_UpdateSmoothing": "13 update smoothing", "2025-09-30_SmoothedSnooMedium": "14 smoothed Snoo",
                  "2025-10-04_GPT2MediumLayerReuse": "15 backout", "2025-11-02-Smear-MTP": "16 smear"}


@pytest.mark.slow
def test_notebook_on_the_medium_records(tmp_path):
    """Records 12-16 (embxlib presets medium_r12..medium_r16) against time, labelled by record number, x01 beside."""
    out = run_notebook(tmp_path, inputs=["published/modded-nanogpt-logs"], variants=MEDIUM_RECORDS,
                       baseline="x01 (PR #124)", target=2.92, step_zooms=[[5000, 5700]], time_zooms=[[1250, 1410]],
                       rank_window=[1250, 1400], lambda_variant=None, norms=None, predictions=None)
    assert (out / "val_loss-time-1250-1410.png").read_bytes()[:4] == b"\x89PNG"
    order = pd.read_csv(out / "crossing-order-2.92.csv")
    assert sorted(order["variant"]) == sorted(MEDIUM_RECORDS.values())  # every record crosses 2.92


def test_notebook_fails_when_no_input_has_a_point(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(pm.PapermillExecutionError, match=r"no validation points in any input \(1 file"):
        run_notebook(tmp_path, inputs=[str(tmp_path / "empty.txt"), "runs/no-such-folder/*"], predictions=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_our_run_folders_grouped_by_their_config_names_into_a_new_folder(tmp_path):
    """No mapping, no out_dir: variants are the runs' own names, everything lands in a new runs/analysis/ folder."""
    before_status, before = git_status(), set(analysis.at_root(analysis.ANALYSIS_ROOT).glob("*"))
    executed = execute(tmp_path, inputs=["runs/cpu-x0"], baseline="x00-ve2", lambda_variant="x01-ve2")
    new = set(analysis.at_root(analysis.ANALYSIS_ROOT).glob("*")) - before
    try:
        assert len(new) == 1
        out = next(iter(new))
        assert git_status() == before_status  # images/ and everything committed untouched
        order = pd.read_csv(out / "crossing-order-6.0.csv")  # the runs' own target_val_loss
        assert sorted(order["variant"]) == ["x00-ve2", "x01-ve2"]
        assert set(order["n_runs"]) == {12}
        assert {"val_loss-step-150-200.png", "lambdas-layer-x01-ve2-mean12.png"} <= {p.name for p in out.iterdir()}
        final = pd.read_csv(out / "final-stats.csv").set_index("variant")
        assert final.loc["x01-ve2", "welch_p_vs_baseline"] > 0
        assert "24 runs of 2 variants" in "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    finally:
        for p in new:
            shutil.rmtree(p)


def test_inputs_matching_no_runs_stop_the_notebook_naming_them(tmp_path):
    before = set(analysis.at_root(analysis.ANALYSIS_ROOT).glob("*"))
    with pytest.raises(pm.PapermillExecutionError, match=r"no validation points in any input \(0 file\(s\) or run "
                                                         r"folder\(s\) found for \['[^']*/runs/no-such-runs/\*'\]"):
        execute(tmp_path, inputs=["runs/no-such-runs/*"])
    assert set(analysis.at_root(analysis.ANALYSIS_ROOT).glob("*")) == before  # nothing written


@pytest.mark.parametrize("kwargs, message", [
    (dict(variants=["x00-ve2", "x09-ve2"]), r"variants \['x09-ve2'\] are not in the inputs; they hold \['x00-ve2'"),
    (dict(baseline="x00"), r"baseline='x00' is not one of the variants shown: \['x00-ve2', 'x01-ve2'"),
    (dict(variants={"x01-ve2": "one"}, lambda_variant="x01-ve2"), r"lambda_variant='x01-ve2' is not one of the "
                                                                  r"variants shown: \['one'\]")])
def test_a_variant_that_is_not_there_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        analysis.load(["runs/cpu-x0"], **kwargs)
