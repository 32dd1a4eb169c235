"""Loading: real upstream logs, the published results files, our run folders, and every quirk real logs have.

Expected numbers are read off the files by hand (grep), not computed by the code under test.
"""

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embxlib.runs import (
    top_predictions,
    LAMBDA_COLUMNS,
    VAL_COLUMNS,
    ParseWarning,
    load_lambdas,
    load_predictions,
    load_runs,
    logit_lens_markdown,
    logit_lens_table,
    repeat_variant,
    select,
)

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "published" / "modded-nanogpt-logs"
X0 = ROOT / "published" / "snimu-experiments" / "00004-x0"
VALEMB = ROOT / "published" / "snimu-experiments" / "00003-value-embeddings"


def parse_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, ParseWarning)]


# ----------------------------------------------------------------------------------------------------------
# real upstream logs


@pytest.mark.parametrize(
    "folder, n_points, total, first_loss, final_loss, final_time_s",
    [
        ("2025-04-22_Record8", 49, 5960, 10.825837, 2.919750, 1468.898),
        ("2025-08-28_Medium_NewValemb", 48, 5820, 10.825840, 2.919093, 1424.449),
        ("2025-09-11_GPT2MediumX01", 47, 5690, 10.825840, 2.919956, 1407.511),
    ],
)
def test_upstream_log(folder, n_points, total, first_loss, final_loss, final_time_s):
    (path,) = (LOGS / folder).glob("*.txt")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        df = load_runs(path)
    assert parse_warnings(record) == []
    assert len(df) == n_points
    assert df["run"].unique().tolist() == [path.stem]
    assert df["variant"].unique().tolist() == [folder]
    assert df["step"].iloc[0] == 0 and df["step"].iloc[-1] == total
    assert df["step"].is_monotonic_increasing and df["step"].is_unique
    assert df["val_loss"].iloc[0] == first_loss
    assert df["val_loss"].iloc[-1] == final_loss
    assert df["train_time_s"].iloc[-1] == pytest.approx(final_time_s)


def test_record8_log_has_the_lines_the_parser_must_skip():
    # the test above is only meaningful if the real log really contains them
    text = next((LOGS / "2025-04-22_Record8").glob("*.txt")).read_text()
    assert "inductor_output_code:" in text
    assert "[training script source omitted" in text
    assert "step:126/5960 train_time:" in text


def test_a_folder_of_logs_loads_each_log_once():
    df = load_runs([LOGS, str(LOGS / "*" / "*.txt")])
    runs = {"2025-04-22_Record8": 1, "2025-08-28_Medium_NewValemb": 1, "2025-09-11_GPT2MediumX01": 1,
            "2025-09-16_Snoo": 1, "2025-09-17_UpdateSmoothing": 1, "2025-09-30_SmoothedSnooMedium": 1,
            "2025-10-04_GPT2MediumLayerReuse": 1, "2025-11-02-Smear-MTP": 1, "2025-12-31_BulkSmallTrackTransfer": 2}
    assert df.groupby("variant")["run"].nunique().to_dict() == runs
    # a validation every 125 steps (record 18: every 250) from step 0, and the last step when it is not one of them
    points = {5960: 49, 5820: 48, 5690: 47, 5640: 47, 5610: 46, 5590: 46, 5550: 46, 5535: 46}
    assert all(n == len(range(0, s, 125)) + 1 for s, n in points.items())
    assert len(range(0, 4740, 250)) + 1 == 20
    assert len(df) == sum(points.values()) + 2 * 20


# ----------------------------------------------------------------------------------------------------------
# published results markdown


def test_published_x0_results():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        df = load_runs(X0 / "results.md")
    assert parse_warnings(record) == []
    assert df["run"].nunique() == 52  # 52 `## ` headings, each with a run
    # the corrupted heading `## 61 3step:0/5820 val_loss:10.825840 ...` is split into name and first point
    run = df[df["run"] == "61 3"]
    assert len(run) == 48
    assert run[["step", "val_loss"]].iloc[0].tolist() == [0, 10.825840]
    assert run[["step", "val_loss"]].iloc[-1].tolist() == [5820, 2.917527]
    assert run["variant"].iloc[0] == "61"
    # run `0` (x01): last of its --- VAL LOSS --- lines, and nothing from its lambda sections
    zero = df[df["run"] == "0"]
    assert len(zero) == 49
    assert zero.iloc[-1][["step", "train_time_s", "val_loss"]].tolist() == [5960, 1459.991, 2.918328]
    counts = df.groupby("variant", sort=False)["run"].nunique()
    assert counts[["999", "0", "1", "2", "3", "999-record", "0-record"]].tolist() == [2, 5, 3, 1, 5, 5, 5]


def test_published_x0_lambdas():
    lam = load_lambdas(X0 / "results.md")
    assert list(lam.columns) == LAMBDA_COLUMNS
    final = lam[(lam["run"] == "0") & (lam["step"] == 5960)]
    x01 = final[final["stream"] == "x01"].sort_values("layer")["value"].tolist()
    assert len(x01) == 16
    assert x01[:3] == [1.0115183591842651, 1.1944687366485596, -0.3681192696094513]
    x00 = final[final["stream"] == "x00"].sort_values("layer")["value"].tolist()
    assert x00[:2] == [4.706265449523926, 4.206393241882324]
    streams = set(lam.loc[lam["run"] == "3", "stream"])
    assert streams == {"x", "x00", "x01", "x02", "x03", "x04", "v", "ve", "unet"}
    # 49 validation steps x 16 layers per stream
    assert (lam[lam["run"] == "3"].groupby("stream").size() == 49 * 16).all()


def test_duplicate_headings_in_one_file_stay_separate_runs():
    # 00003 t-test-results.md keeps old 5800-step runs `### 26 0`.. and later `## 26 0`..
    df = load_runs(VALEMB / "t-test-results.md")
    old, new = df[df["run"] == "26 0#1"], df[df["run"] == "26 0#2"]
    assert old["step"].iloc[-1] == 5800 and len(old) == 48
    assert new["step"].iloc[0] == 0 and len(new) == 48
    assert "Old results for 26" not in set(df["run"])  # a heading without data is no run


def test_same_run_name_in_two_experiments_is_prefixed():
    df = load_runs([X0 / "results.md", VALEMB / "results.md"])
    assert "00004-x0/results.md:0" in set(df["run"])
    assert "00003-value-embeddings/results.md:0" in set(df["run"])
    assert "61 3" in set(df["run"])  # names found in one file only are kept
    assert df.groupby("run")["source"].nunique().max() == 1


@pytest.mark.parametrize(
    "name, variant",
    [("0-3", "0"), ("999-record-2", "999-record"), ("61 3", "61"), ("13", "13"), ("999-0", "999"),
     ("68 (old) 12", "68 (old)"), ("22-0", "22"), ("27 1", "27")],
)
def test_repeat_variant(name, variant):
    assert repeat_variant(name) == variant


def test_select_keeps_order_and_renames():
    df = load_runs(X0 / "results.md")
    sub = select(df, {"3": "x04", "999": "x00"})
    assert list(pd.unique(sub["variant"])) == ["x04", "x00"]
    assert sub["run"].nunique() == 5 + 2
    assert select(df, None) is df


# ----------------------------------------------------------------------------------------------------------
# quirks of real logs, on small hand-written files


QUIRKS = """\
import os
        print0(f"step:{step}/{train_steps} val_loss:{val_loss:.6f} train_time:{ms:.0f}ms", console=True)
====================================================================================================
inductor_output_code: /tmp/torchinductor_root/zc/czcuopmsxgzk.py
step:0/500 val_loss:10.8258 train_time:0ms step_avg:nanms
step:1/500 train_time:120ms step_avg:120.00ms
step:1/500 train_loss:10.8256 train_time:120ms step_avg:120.00ms
step:250/500 val_loss:4.125000 train_time:30.5s step_avg:122.00ms lx:1.000 ls:0.000
step:300/500 val_loss:4.1x train_time:36000ms step_avg:120.00ms
step:500/500 val_loss:3.5 train_time:61234ms step_avg:122.47ms
peak memory allocated: 50380 MiB reserved: 55354 MiB
step:500/500 val_loss:3.4"""


def test_quirks(tmp_path):
    path = tmp_path / "quirks" / "run.txt"
    path.parent.mkdir()
    path.write_text(QUIRKS)
    with pytest.warns(ParseWarning) as record:
        df = load_runs(path)
    assert df[["step", "train_time_s", "val_loss"]].values.tolist() == [
        [0, 0.0, 10.8258], [250, 30.5, 4.125], [500, 61.234, 3.5]]
    assert df["variant"].unique().tolist() == ["quirks"]
    messages = parse_warnings(record)
    # one warning per bad line, naming file and line number: the corrupted loss and the truncated last line
    assert len(messages) == 2
    assert messages[0].startswith(f"{path}:9:") and messages[1].startswith(f"{path}:12:")
    assert "no train_time field" in messages[1]


def test_concatenated_runs_in_one_file(tmp_path):
    path = tmp_path / "track3.txt"
    runs = []
    for k, loss in enumerate([3.30, 3.28, 3.27]):
        runs.append(f"step:0/100 val_loss:10.8 train_time:0.000s\nstep:100/100 val_loss:{loss} train_time:98{k}.5s")
    path.write_text("\n".join(runs) + "\n")
    df = load_runs(path)
    assert df["run"].unique().tolist() == ["track3#1", "track3#2", "track3#3"]
    assert df.groupby("run", sort=False)["val_loss"].last().tolist() == [3.30, 3.28, 3.27]
    assert df["train_time_s"].tolist() == [0.0, 980.5, 0.0, 981.5, 0.0, 982.5]


def test_empty_and_missing_inputs_warn_and_give_empty_tables(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.md").write_text("")
    with pytest.warns(ParseWarning) as record:
        df = load_runs([tmp_path / "empty.txt", tmp_path / "empty.md", tmp_path / "nope.txt"], require=False)
        lam = load_lambdas(tmp_path / "empty.md")
    assert df.empty and list(df.columns) == VAL_COLUMNS
    assert lam.empty and list(lam.columns) == LAMBDA_COLUMNS
    messages = parse_warnings(record)
    assert any("empty.txt: no validation points" in m for m in messages)
    assert any("nope.txt: no such file" in m for m in messages)


def test_every_input_bad_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    write_run(tmp_path / "runs" / "dead", points=((0, 10.8, 0.0),), metrics=False)
    (tmp_path / "runs" / "dead" / "log.txt").write_text("# killed before its first validation\n")
    with pytest.warns(ParseWarning), pytest.raises(ValueError, match=r"no validation points in any input \(2 file"):
        load_runs([tmp_path / "empty.txt", tmp_path / "runs", tmp_path / "nope*"])


def test_markdown_sections_with_lambdas(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(
        "# Results\n\n## 5 0\n\n--- VAL LOSS ---\n\n"
        "step:0/10 val_loss:10.0 train_time:0ms step_avg:0.1ms\n"
        "step:10/10 val_loss:5.0 train_time:2000ms step_avg:200.00ms\n\n"
        "--- X ---\n\nstep:0/10 x_lambdas:[1.0, 1.0]\nstep:10/10 x_lambdas:[0.5, 2.0]\n\n"
        "--- X00 ---\n\nstep:0/10 x00_lambdas:[0.0, 0.0]\nstep:10/10 x00_lambdas:[0.25, -1.5]\n"
        "step:10/10 x01_lambdas:[0.25, -1.\n"  # truncated list: skipped
        "## 5 1step:0/10 val_loss:10.0 train_time:0ms step_avg:0.1ms\n"
    )
    with pytest.warns(ParseWarning, match=r"results\.md:19:"):
        df, lam = load_runs(path), load_lambdas(path)
    assert df[["run", "variant", "step", "val_loss"]].values.tolist() == [
        ["5 0", "5", 0, 10.0], ["5 0", "5", 10, 5.0], ["5 1", "5", 0, 10.0]]
    last = lam[lam["step"] == 10].pivot(index="layer", columns="stream", values="value")
    assert last.to_dict("list") == {"x": [0.5, 2.0], "x00": [0.25, -1.5]}


# ----------------------------------------------------------------------------------------------------------
# embxlib run folders


def write_run(folder: Path, name="x01", seed=0, points=((0, 10.8256, 0.0), (25, 7.25, 15000.0), (50, 6.5, 30500.0)),
              layers=4, metrics=True):
    """A run folder as the training core writes it: config.json, log.txt, metrics.jsonl, summary.json."""
    folder.mkdir(parents=True)
    config = {"name": name, "seed": seed, "preset": "tiny", "num_layers": layers, "extra_embeds": 1,
              "value_embeds": 1, "num_iterations": points[-1][0], "target_val_loss": 7.0}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    total = points[-1][0]
    log = ["# embxlib run", json.dumps(config)]
    records = []
    for step, loss, ms in points:
        avg = f"train_time:{ms:.0f}ms step_avg:{ms / max(step, 1):.2f}ms"
        if step:
            log.append(f"step:{step}/{total} train_loss:{loss + 0.1:.4f} {avg}")
        log.append(f"step:{step}/{total} val_loss:{loss:.6f} {avg}")
        records.append({
            "step": step, "val_loss": loss, "train_time_ms": ms,
            "lambdas": {"x": [1.0 + step / 100] * layers, "x00": [0.5] * layers, "x01": [step / 50] * layers,
                        "ve": [0.5] + [None] * (layers - 2) + [0.25]},
            "norms": [1.0 + layer for layer in range(layers)],
        })
    (folder / "log.txt").write_text("\n".join(log) + "\n")
    if metrics:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": points[-1][1]}))
    return folder


def test_run_folder(tmp_path):
    write_run(tmp_path / "runs" / "x01-s0")
    write_run(tmp_path / "runs" / "base-s0", name="baseline", points=((0, 10.8, 0.0), (50, 6.75, 29000.0)))
    df = load_runs(tmp_path / "runs")  # a folder of run folders
    assert df.sort_values(["run", "step"])[["run", "variant", "step", "train_time_s", "val_loss"]].values.tolist() == [
        ["base-s0", "baseline", 0, 0.0, 10.8], ["base-s0", "baseline", 50, 29.0, 6.75],
        ["x01-s0", "x01", 0, 0.0, 10.8256], ["x01-s0", "x01", 25, 15.0, 7.25], ["x01-s0", "x01", 50, 30.5, 6.5]]
    lam = load_lambdas(tmp_path / "runs" / "x01-s0")
    at25 = lam[lam["step"] == 25].pivot(index="layer", columns="stream", values="value")
    assert at25["x"].tolist() == [1.25] * 4 and at25["x01"].tolist() == [0.5] * 4
    assert at25["norm"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert at25["ve"].isna().tolist() == [False, True, True, False]


def test_run_folder_without_metrics_falls_back_to_its_log(tmp_path):
    write_run(tmp_path / "a", metrics=False)
    df = load_runs(tmp_path / "a")
    expected = [[0, 0.0, 10.8256], [25, 15.0, 7.25], [50, 30.5, 6.5]]
    assert df[["step", "train_time_s", "val_loss"]].values.tolist() == expected
    assert df["variant"].iloc[0] == "x01"


def test_run_folder_with_broken_files(tmp_path):
    folder = write_run(tmp_path / "b")
    (folder / "config.json").write_text('{"name": "x0')
    metrics = (folder / "metrics.jsonl").read_text().split("\n")
    metrics[1] = metrics[1][:40]  # a crash mid-write
    (folder / "metrics.jsonl").write_text("\n".join(metrics))
    with pytest.warns(ParseWarning) as record:
        df = load_runs(str(tmp_path / "*"))
    assert df["step"].tolist() == [0, 50]
    assert df["variant"].iloc[0] == "b"  # unreadable config: the folder name
    messages = parse_warnings(record)
    assert any("config.json: unreadable JSON" in m for m in messages)
    assert any("metrics.jsonl:2:" in m for m in messages)


def test_suspicious_points_warn(tmp_path):
    """NaN and inf losses are kept (a diverged run is a result) but said; a step twice keeps its last record (a
    resume that did not replace it); a fractional step is no step."""
    folder = write_run(tmp_path / "r", points=((0, 10.8, 0.0), (2, 7.0, 10.0), (4, 6.0, 20.0)))
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    again = json.loads(lines[1])
    again.update(val_loss=6.5, train_time_ms=12.0)
    fractional = dict(json.loads(lines[2]), step=2.5)
    diverged = dict(json.loads(lines[2]), step=6, val_loss=float("nan"))
    exploded = dict(json.loads(lines[2]), step=8, val_loss=float("inf"))
    records = [lines[0], lines[1], json.dumps(again), json.dumps(fractional), lines[2], json.dumps(diverged),
               json.dumps(exploded)]
    (folder / "metrics.jsonl").write_text("\n".join(records) + "\n")
    for load in (lambda: load_runs(folder), lambda: load_lambdas(folder)):
        with pytest.warns(ParseWarning) as record:
            table = load()
        messages = parse_warnings(record)
        assert any("metrics.jsonl:3: step 2 again; kept this record" in m for m in messages), messages
        assert any("metrics.jsonl:4: skipped record (step is not a whole number)" in m for m in messages), messages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ParseWarning)
        vals = load_runs(folder)
    assert vals["step"].tolist() == [0, 2, 4, 6, 8]
    assert vals.loc[vals["step"] == 2, ["val_loss", "train_time_s"]].values.tolist() == [[6.5, 0.012]]
    with pytest.warns(ParseWarning) as record:
        load_runs(folder)
    assert any(m.endswith("r: 2 non-finite val_loss value(s), kept (first: nan at step 6 of run 'r')")
               for m in parse_warnings(record))
    text = tmp_path / "diverged" / "run.txt"
    text.parent.mkdir()
    text.write_text("step:0/10 val_loss:10.8 train_time:0ms step_avg:0ms\nstep:10/10 val_loss:nan train_time:9ms\n")
    with pytest.warns(ParseWarning, match=r"run.txt: 1 non-finite val_loss value\(s\), kept \(first: nan at step 10"):
        assert len(load_runs(text)) == 2


# ----------------------------------------------------------------------------------------------------------
# fuzz: truncated and corrupted files never raise


def _fuzz_inputs(tmp_path) -> dict[str, bytes]:
    log = next((LOGS / "2025-04-22_Record8").glob("*.txt")).read_bytes().split(b"\n")
    md = (X0 / "results.md").read_bytes().split(b"\n")
    folder = write_run(tmp_path / "template")
    return {
        # header, inductor and validation lines, and the last training lines
        "log": b"\n".join(log[:8] + [line for line in log[8:-60] if b"val_loss" in line or b"inductor" in line]
                          + log[-60:]),
        "md": b"\n".join(md[:420]) + b"\n" + b"\n".join(md[7760:7800]),  # includes the fused `## 61 3step:` heading
        "metrics": (folder / "metrics.jsonl").read_bytes(),
    }


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\n")
    for _ in range(rng.randint(1, 12)):
        if len(lines) < 2:
            break
        i = rng.randrange(len(lines))
        line = lines[i]
        k = rng.randrange(len(line) + 1)
        action = rng.choice(["bytes", "cut", "dup", "join", "swap", "digit", "drop"])
        if action == "bytes":
            lines[i] = line[:k] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 6))) + line[k:]
        elif action == "cut":
            lines[i] = line[:k] + line[k + rng.randint(1, 20):]
        elif action == "dup":
            lines.insert(i, line)
        elif action == "join" and i + 1 < len(lines):
            lines[i: i + 2] = [line + lines[i + 1]]
        elif action == "swap":
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], line
        elif action == "digit":
            old = rng.choice(b"0123456789.:/[]ms").to_bytes(1, "big")
            lines[i] = line.replace(old, rng.choice([b"", b"x", b"-", b" "]), 1)
        elif action == "drop":
            del lines[i]
    return b"\n".join(lines)


def _load_strictly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning but ours (pandas, numpy) is a bug
        warnings.simplefilter("ignore", ParseWarning)
        return load_runs(path, require=False), load_lambdas(path)


def _write(tmp_path, kind: str, data: bytes, tag: str) -> Path:
    if kind == "metrics":
        folder = tmp_path / f"run-{tag}"
        folder.mkdir()
        (folder / "config.json").write_text('{"name": "x01"}')
        (folder / "metrics.jsonl").write_bytes(data)
        return folder
    path = tmp_path / f"{tag}.{'md' if kind == 'md' else 'txt'}"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_never_raises(tmp_path, seed):
    rng = random.Random(seed)
    for kind, data in _fuzz_inputs(tmp_path).items():
        original, _ = _load_strictly(_write(tmp_path, kind, data, f"{kind}-orig-{seed}"))
        assert len(original) > 0

        # truncation at a random byte keeps a prefix of the validation points, each exactly as before
        cut = rng.randrange(len(data) + 1)
        truncated, _ = _load_strictly(_write(tmp_path, kind, data[:cut], f"{kind}-cut-{seed}"))
        n = len(truncated)
        assert n <= len(original)
        cols = ["step", "train_time_s", "val_loss"]
        np.testing.assert_array_equal(truncated[cols].to_numpy(), original[cols].to_numpy()[:n])

        corrupted = _corrupt(data, rng)
        vals, lam = _load_strictly(_write(tmp_path, kind, corrupted, f"{kind}-bad-{seed}"))
        assert list(vals.columns) == VAL_COLUMNS and list(lam.columns) == LAMBDA_COLUMNS
        assert vals["step"].dtype == np.int64 and vals["val_loss"].dtype == np.float64


# ----------------------------------------------------------------------------------------------------------
# logit lens (predictions.md)


@pytest.fixture(scope="module")
def preds():
    return load_predictions(X0 / "predictions.md")


def test_load_predictions(preds):
    assert len(preds["tokens"]) == 128
    assert preds["tokens"][0] == "mail" and preds["tokens"][10] == " Emails"
    assert len(preds["predictions"]) == 28
    components = [f"x-{i}" for i in range(16)] + ["x-out", "x00", "x01", "ve0", "ve1", "ve2"]
    assert list(preds["predictions"])[:22] == components
    assert preds["x_norms"]["x"][:3] == [8192.0, 327680.0, 618496.0] and len(preds["x_norms"]["x"]) == 16
    assert preds["predictions"]["x-0"][0][0.2581206262111664] == " address"


def test_logit_lens_table(preds):
    table = logit_lens_table(preds)
    assert list(table.columns) == ["token", "x-15", "x00", "x01", "ve0", "ve1", "ve2"]
    assert len(table) == 32
    # read off predictions.md: top-1 of x00 at positions 0, 3, 4 (the seed post shows the same three)
    assert table.loc[[0, 3, 4], "x00"].tolist() == [" address", " address", "#$"]
    assert table.loc[4, "x-15"] == "example" and table.loc[8, "x01"] == "\n"
    md = logit_lens_markdown(table)
    assert md.splitlines()[0].split("|")[2].strip() == "token"
    assert "'\\n'" in md and len(md.splitlines()) == 34


def test_load_predictions_never_evaluates_code(tmp_path):
    path = tmp_path / "predictions.md"
    path.write_text("tokens=__import__('os').getcwd()\npredictions={}\n")
    with pytest.raises(ValueError):
        load_predictions(path)


def test_top_predictions_most_likely_first():
    preds = {"predictions": {"x01": {1: {0.001: " accounts", 0.005: " account", 0.002: "ban"}}}}
    assert top_predictions(preds, "x01", 1) == [" account", "ban", " accounts"]


def test_run_settings_name_the_commit_each_run_was_made_from(tmp_path):
    """The commit line as train.header_lines writes it for a clean and for a dirty checkout."""
    import torch
    from embxlib.config import tiny
    from embxlib.runs import run_settings
    from embxlib.train import header_lines
    sha = "55de1000ea170243fe20772d5e6d47b49791d9dc"
    for seed, commit in enumerate([f"{sha} (clean)", f"{sha} + uncommitted changes to 2 tracked file(s), saved in git.diff"]):
        write_run(tmp_path / "sweep" / f"s{seed}", seed=seed)
        cfg = tiny(seed=seed)
        (tmp_path / "sweep" / f"s{seed}" / "log.txt").write_text(
            "\n".join(header_lines(cfg, ["--seed", str(seed)], 1, 4, torch.device("cpu"), commit)) + "\n")
    table = run_settings([tmp_path / "sweep"])
    assert list(table["commit"]) == [sha, sha] and list(table["dirty"]) == [False, True]
    assert list(table["seed"]) == [0, 1] and list(table["source"]) == [str(tmp_path / "sweep" / f"s{i}") for i in (0, 1)]
    # and the machine: Python's platform string, and the CPU model as /proc/cpuinfo names it
    import platform
    import re
    assert set(table["platform"]) == {platform.platform()}
    cpuinfo = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    assert set(table["cpu"]) == {cpuinfo[0].strip() if cpuinfo else platform.processor() or "unknown"}
    committed = run_settings([ROOT / "runs" / "cpu-x0" / "extra_embeds0_s0"])  # made before the cpu line existed
    assert committed["cpu"].isna().all() and committed["platform"].str.startswith("Linux-").all()


def test_rerun_match_compares_every_digit_and_refuses_a_different_config(tmp_path):
    """A copy of a committed run matches itself on every step; one ulp off at one step is caught there; a config
    that differs (here the seed) is refused by name; a field the older config.json lacks counts as its default."""
    import shutil
    from embxlib.runs import rerun_match
    src = ROOT / "runs" / "cpu-x0" / "extra_embeds0_s0"
    run, rerun = tmp_path / "run", tmp_path / "rerun"
    for d in (run, rerun):
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.pt"))
    same = rerun_match(run, rerun)
    assert list(same["step"]) == [0, 50, 100, 150, 200] and same["equal"].all() and (same["diff"] == 0).all()
    records = [json.loads(line) for line in (rerun / "metrics.jsonl").read_text().splitlines()]
    records[3]["val_loss"] = float(np.nextafter(records[3]["val_loss"], np.inf))
    (rerun / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    off = rerun_match(run, rerun).set_index("step")
    assert list(off.index[~off["equal"]]) == [150] and 0 < off.loc[150, "diff"] < 1e-12
    cfg = json.loads((run / "config.json").read_text())
    assert "bigram_embeds" not in cfg  # made before the field existed; the new field's default is how it trained
    (rerun / "config.json").write_text(json.dumps({**cfg, "bigram_embeds": 0, "name": "relabelled"}))
    assert rerun_match(run, rerun)["step"].tolist() == [0, 50, 100, 150, 200]
    (rerun / "config.json").write_text(json.dumps({**cfg, "seed": 1, "bigram_embeds": 1}))
    with pytest.raises(ValueError, match=r"differ in bigram_embeds \(0 vs 1\), seed \(0 vs 1\)"):
        rerun_match(run, rerun)


# ----------------------------------------------------------------------------------------------------------
# globs, links and folders that cannot be read


def test_a_double_star_glob_follows_no_link_loop_and_adds_only_runs_and_logs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a")
    write_run(runs / "deep" / "b", name="x02")
    (runs / "a" / "console.log").write_text("step:50/50 val_loss:6.5 train_time:1ms step_avg:1ms\n")
    for i in range(3):  # links back up: glob's ** would walk them round and round
        (runs / "deep" / f"loop{i}").symlink_to(runs)
    (runs / "upstream.txt").write_text("step:10/10 val_loss:5.0 train_time:100ms step_avg:10ms\n")
    import time
    t = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParseWarning)
        df = load_runs([str(runs / "**")])
    assert time.time() - t < 10
    assert sorted(df["source"].unique()) == sorted(str(p) for p in (runs / "a", runs / "deep" / "b",
                                                                     runs / "upstream.txt"))
    assert sorted(df["run"].unique()) == ["a", "b", "upstream"]  # no "log", no "console" run
    df = load_runs([str(runs / "**" / "metrics.jsonl")])  # a file of a run: that run
    assert sorted(df["run"].unique()) == ["a", "b"]


def test_a_malformed_config_json_warns_in_run_target_naming_it(tmp_path):
    from embxlib import analysis
    folder = write_run(tmp_path / "r")
    (folder / "config.json").write_text('{"name": "x0')
    with pytest.warns(ParseWarning, match=rf"{folder / 'config.json'}: unreadable JSON, ignored"):
        val = load_runs([folder])
    with pytest.warns(ParseWarning, match=rf"{folder / 'config.json'}: unreadable JSON, ignored"):
        assert analysis.run_target(val) == analysis.MEDIUM_TARGET


def without_root_privileges(code: str, cwd: Path):
    """Python as root without the capabilities that bypass file permissions (or as the user it is)."""
    import os
    import shutil
    import subprocess
    import sys
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: permissions cannot be made to apply")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([*prefix, sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_unreadable_folders_are_warned_about_never_fatal(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "good")
    write_run(runs / "locked")
    write_run(runs / "nested" / "hidden")
    (runs / "locked").chmod(0)
    (runs / "nested").chmod(0)
    try:
        r = without_root_privileges(
            "import sys; from embxlib.runs import load_runs; "
            f"df = load_runs([{str(runs / 'locked')!r}, {str(runs)!r}]); print(sorted(df['run'].unique()))", tmp_path)
    finally:
        (runs / "locked").chmod(0o755)
        (runs / "nested").chmod(0o755)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['good']"
    assert f"{runs / 'locked'}: unreadable, skipped (Permission denied)" in r.stderr
    assert f"{runs / 'nested'}: unreadable folder, skipped (Permission denied)" in r.stderr
