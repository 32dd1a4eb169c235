"""The H100 step-time model (embxlib.stepmodel) against the published 8xH100 runs it was not calibrated on."""
import numpy as np

from embxlib import bench, stepmodel


def test_step_model_predicts_the_published_runs():
    rows = stepmodel.report()
    assert rows[0]["run"].startswith("Record 8") and abs(rows[0]["error_pct"]) < 1e-6  # its calibration
    assert 0.3 < rows[0]["mfu"] < 0.6
    for r in rows[1:]:  # the other upstream logs and snimu's x00..x04 runs, on other machines
        assert abs(r["error_pct"]) < 3, r
    snimu = [(int(r["run"].split("x0")[1][0]), r["logged_ms"]) for r in rows if r["run"].startswith("snimu")]
    slope = np.polyfit(*zip(*snimu), 1)[0]  # their measured cost of one more input embedding: ~2.5 ms
    assert abs(rows[0]["per_input_table_ms"] / slope - 1) < 0.25, (slope, rows[0]["per_input_table_ms"])


def test_gpu_model_command_prints_a_config_at_its_world_size(capsys):
    bench.main(["--gpu-model", "--preset", "medium_x01", "--extra-embeds", "2", "--world-size", "4"])
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if "medium_x01 x02-ve5" in s)
    assert line.split("|")[2].strip() == "4" and "x01 record (upstream log)" in out


def test_step_model_costs_the_records_mechanisms():
    """Records 12-16 are in the published runs the model predicts (within 3%, above); each mechanism has its cost."""
    rows = {r["run"].split(" (")[0]: r for r in stepmodel.report()}
    assert set(rows["record 16 smear"]["mechanisms_ms"]) == {"snoo", "smoothing", "backout", "smear"}
    assert set(rows["record 13 update smoothing"]["mechanisms_ms"]) == {"smoothing"}
    assert rows["x01 record"]["mechanisms_ms"] == {}
    for r in rows.values():
        assert all(0 < v < 1 for v in r["mechanisms_ms"].values()), r  # memory-bound passes: fractions of a ms
