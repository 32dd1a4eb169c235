"""The analysis notebook: stored clean with a papermill parameters cell, and runs end to end on the published data."""

from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "nbs" / "analyze_runs.ipynb"
PARAMETERS = {"inputs", "variants", "baseline", "target", "step_zooms", "time_zooms", "rank_window", "band",
              "lambda_variant", "norms", "predictions", "out_dir"}


def test_stored_notebook_has_no_outputs_and_a_parameters_cell():
    nb = nbformat.read(NB, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert code[0].metadata.get("tags") == ["parameters"]
    assert set(pm.inspect_notebook(str(NB))) == PARAMETERS


def run_notebook(tmp_path, **parameters):
    out = tmp_path / "out"
    executed = pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"), cwd=str(ROOT), kernel_name="python3",
                                   parameters={**parameters, "out_dir": str(out)}, progress_bar=False)
    assert not [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    return out


@pytest.mark.slow
def test_notebook_on_the_published_x0_runs(tmp_path):
    out = run_notebook(tmp_path)  # the defaults: 00004-x0, x00..x04, the seeds' zooms, the logit lens
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
        baseline="0 (baseline)", step_zooms=[[5000, 6000]], time_zooms=[[1200, 1500]], lambda_variant=None,
        norms=None, predictions=None)
    assert (out / "val_loss-time-1200-1500.png").is_file()
    per_run = pd.read_csv(out / "crossings-2.92-runs.csv", dtype={"run": str}).set_index("run")
    assert per_run.loc["16", "time_to_target_s"] == pytest.approx(1410.55, abs=0.01)
    ranking = pd.read_csv(out / "rank-time-1200-1400.csv", dtype={"variant": str})
    assert ranking["variant"].tolist() == ["2", "1", "0 (baseline)", "3", "5", "4"]


def test_notebook_fails_when_no_input_has_a_point(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(pm.PapermillExecutionError, match=r"no validation points in any input \(1 file"):
        run_notebook(tmp_path, inputs=[str(tmp_path / "empty.txt"), "runs/no-such-folder/*"], predictions=None)
    assert not (tmp_path / "out").exists()
