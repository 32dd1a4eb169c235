"""Notebooks: stored clean with their parameters tag, in step with Config, and really executed by papermill:
a run, a bad parameter, a failing rank, a sweep that resumes instead of retraining."""
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nbformat
import papermill as pm
import pytest
import yaml

from embxlib import launch
from embxlib.checkpoint import run_state
from embxlib.config import field_help
from conftest import FAST, PYTHON, ROOT, python_env
from faults import in_trainers

NBS = sorted((ROOT / "nbs").glob("*.ipynb"))


def fast_params(corpus) -> dict:
    """conftest.FAST as notebook parameters."""
    out, words = {}, iter(FAST)
    for flag in words:
        name = flag[2:].replace("-", "_")
        if name.startswith("no_"):  # --no-compile
            out[name[3:]] = False
        else:
            value = next(words)
            out[name] = value if name in ("preset", "precision") else int(value)
    return {**out, "data_dir": str(corpus)}


def parameters_cell(path) -> nbformat.NotebookNode:
    cells = [c for c in nbformat.read(path, 4).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: needs exactly one cell tagged parameters"
    return cells[0]


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, 4)
    parameters_cell(path)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{path.name} has outputs: strip them"


def test_run_variant_parameters_match_config():
    cell = parameters_cell(ROOT / "nbs" / "run_variant.ipynb")
    names = [t.id for node in ast.parse(cell.source).body for t in node.targets]
    assert names == ["config"] + launch.CONFIG_FIELDS + list(launch.LAUNCH_SETTINGS), \
        "nbs/run_variant.ipynb's parameters cell must list config, every Config field, then the launch settings"
    helps = field_help()
    for line in cell.source.splitlines():
        name = line.split(" = ")[0]
        if name in helps:
            assert line.endswith("# " + helps[name]), f"comment of {name} differs from its Config comment"
    import papermill  # its own parser of the cell (papermill --help-notebook; a comment it cannot parse is a warning
    assert list(papermill.inspect_notebook(str(ROOT / "nbs" / "run_variant.ipynb"))) == names  # on every run)
    values = {t.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body for t in node.targets}
    assert {k: values[k] for k in launch.LAUNCH_SETTINGS} == launch.LAUNCH_SETTINGS and values["config"] is None


def no_process_mentions(text: str) -> bool:
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                return False
        except OSError:
            continue
    return True


@pytest.mark.slow
def test_papermill_runs_a_variant(corpus, tmp_path):
    out = tmp_path / "runs" / "x02" / "notebook.ipynb"  # the executed notebook kept inside its run folder
    out.parent.mkdir(parents=True)
    pm.execute_notebook(str(ROOT / "nbs" / "run_variant.ipynb"), str(out), cwd=str(ROOT), progress_bar=False,
                        parameters={**fast_params(corpus), "extra_embeds": 2, "run_name": "x02",
                                    "runs_root": str(tmp_path / "runs")})
    run = tmp_path / "runs" / "x02"
    for f in ("config.json", "log.txt", "metrics.jsonl", "summary.json", "console.log", "loss.png", "checkpoint.pt"):
        assert (run / f).exists(), f
    assert json.loads((run / "config.json").read_text())["extra_embeds"] == 2
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    text = "".join(o.get("text", "") for c in nbformat.read(out, 4).cells for o in c.get("outputs", []))
    assert "val_loss" in text and str(run) in text
    assert text.count("train_loss") == 0  # only validation lines reach the notebook; the rest is in console.log
    assert "train_loss" in (run / "console.log").read_text()


@pytest.mark.parametrize("param, value, message", [
    ("extra_embeds", -1, "extra_embeds=-1: must be >= 0"),
    ("nproc_per_node", 0, "nproc_per_node=0"),
    ("ve_layout", "diagonal", "ve_layout='diagonal'"),
    ("extra_embed", 3, "unknown parameter(s) ['extra_embed'] (did you mean 'extra_embeds'?)"),  # papermill only warns
    ("name", "a/../../../x", "name='a/../../../x': must be one plain folder name"),
    ("resume", "yes", "resume='yes': expected true or false"),
])
def test_bad_parameter_fails_fast_without_starting_anything(corpus, tmp_path, param, value, message):
    t = time.time()
    with pytest.raises(pm.PapermillExecutionError, match=re.escape(message)):
        pm.execute_notebook(str(ROOT / "nbs" / "run_variant.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT),
                            progress_bar=False, parameters={**fast_params(corpus), param: value, "run_name": "bad",
                                                            "runs_root": str(tmp_path / "runs")})
    assert time.time() - t < 60
    assert not (tmp_path / "runs").exists() and not list(tmp_path.parent.glob("*x_s*"))  # nothing in runs_root or out


def test_unknown_sweep_parameter_fails_fast(tmp_path):
    message = "unknown parameter(s) ['seed'] (did you mean 'seeds'?)"
    with pytest.raises(pm.PapermillExecutionError, match=re.escape(message)):
        pm.execute_notebook(str(ROOT / "nbs" / "sweep.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT),
                            progress_bar=False, parameters={"seed": [3], "sweep_dir": str(tmp_path / "sweep"),
                                                            "base": {"data_dir": str(tmp_path / "no-data")}})
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_failing_rank_fails_the_notebook_and_leaves_no_process(corpus, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for k, v in in_trainers(fail_at_step=1, fail_rank=1).items():  # the trainers the notebook starts fail
        monkeypatch.setenv(k, v)
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(ROOT / "nbs" / "run_variant.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT),
                            progress_bar=False, parameters={**fast_params(corpus), "nproc_per_node": 2,
                                                            "run_name": "boom", "runs_root": str(runs)})
    assert "injected fault at step 1 on rank 1" in str(err.value)
    time.sleep(1)
    assert no_process_mentions(str(runs / "boom"))
    assert "step:1/4 train_loss" in (runs / "boom" / "log.txt").read_text()  # rank 0's log survived


@pytest.mark.slow
def test_sweep_runs_each_variant_once(corpus, tmp_path):
    sweep_dir = tmp_path / "sweep"
    base = {**fast_params(corpus), "num_iterations": 2}
    table = launch.sweep({"extra_embeds": [0, 1]}, [0, 1], base, sweep_dir)
    names = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert names == ["extra_embeds0_s0", "extra_embeds0_s1", "extra_embeds1_s0", "extra_embeds1_s1"]
    assert (sweep_dir / "summary.csv").exists() and len(table) == 4 and set(table.status) == {"finished"}
    assert table.position.tolist() == [1, 2, 3, 4] and table.run.tolist() == [n for n, _ in launch.sweep_runs(
        {"extra_embeds": [0, 1]}, [0, 1])]  # the order the runs ran in, recorded
    assert sorted(table.extra_embeds) == [0, 0, 1, 1] and table.final_val_loss.notna().all()
    for n in names:
        assert (sweep_dir / n / "notebook.ipynb").exists()
    stamps = {n: os.stat(sweep_dir / n / "log.txt").st_mtime_ns for n in names}
    said = []
    launch.sweep({"extra_embeds": [0, 1]}, [0, 1], base, sweep_dir, echo=said.append)
    assert {n: os.stat(sweep_dir / n / "log.txt").st_mtime_ns for n in names} == stamps
    assert sum("skipped" in s for s in said) == 4


@pytest.mark.slow
def test_sweep_resumes_an_interrupted_run(corpus, tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    base = {**fast_params(corpus), "num_iterations": 4, "save_every": 2}
    with pytest.raises(launch.LaunchError, match="injected fault"), monkeypatch.context() as m:
        for k, v in in_trainers(fail_at_step=3).items():
            m.setenv(k, v)
        launch.launch({**base, "extra_embeds": 1, "seed": 0}, run_name="extra_embeds1_s0", runs_root=str(sweep_dir),
                      progress=False)
    assert run_state(sweep_dir / "extra_embeds1_s0") == "resumable"
    said = []
    table = launch.sweep({"extra_embeds": [1]}, [0], base, sweep_dir, echo=said.append)
    assert any("resuming" in s for s in said) and table.status.tolist() == ["finished"]
    assert "resumed from checkpoint.pt" in (sweep_dir / "extra_embeds1_s0" / "log.txt").read_text()


def test_relative_run_folders_are_under_the_repository_root_from_any_cwd(monkeypatch):
    """A notebook opened in JupyterLab runs in nbs/; its runs still go where the training processes write them."""
    monkeypatch.chdir(ROOT / "nbs")
    cfg = launch.resolve({})
    assert launch.run_dir_for(cfg, {**launch.LAUNCH_SETTINGS, "run_name": "x", "runs_root": "runs/demo"}) == \
        ROOT / "runs" / "demo" / "x"
    sweep_dir = Path("runs") / "scratch" / f"test-cwd-{os.getpid()}"
    finished = ROOT / sweep_dir / "base_s0"
    finished.mkdir(parents=True)
    try:
        (finished / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 5.0}))
        said = []
        table = launch.sweep({}, [0], {}, str(sweep_dir), echo=said.append)
        assert said == ["[1/1] base_s0: finished, skipped"] and table.status.tolist() == ["finished"]
        assert (ROOT / sweep_dir / "summary.csv").is_file() and not (ROOT / "nbs" / "runs").exists()
    finally:
        shutil.rmtree(ROOT / sweep_dir)


@pytest.mark.slow
def test_launch_run_starts_from_a_config_file_and_prints_progress_lines(corpus, tmp_path):
    """`python -m embxlib.launch run` (what make run's demo does): the notebook with a config file that flags
    override, plain progress lines in the terminal while it trains."""
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump({**fast_params(corpus), "extra_embeds": 3}))
    r = subprocess.run([PYTHON, "-m", "embxlib.launch", "run", "--config", str(config), "--extra-embeds", "1",
                        "--runs-root", str(tmp_path / "runs"), "--run-name", "r"], capture_output=True, text=True,
                       env=python_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    saved = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert saved["extra_embeds"] == 1 and saved["train_seq_len"] == 128  # the flag over the file over the preset
    lines = r.stdout.splitlines()
    assert any(re.fullmatch(r"step 2/4  val_loss \d+\.\d{4}  elapsed \d+:\d\d, about \d+:\d\d left", s) for s in lines)
    assert any(re.fullmatch(r"step 4/4  val_loss \d+\.\d{4}  elapsed \d+:\d\d", s) for s in lines), r.stdout
    assert lines[-1].startswith("done in ") and f"run folder {tmp_path / 'runs' / 'r'}/" in lines[-1]
    first = tmp_path / "runs" / "r" / "notebook.ipynb"
    before = first.read_bytes()
    r = subprocess.run([PYTHON, "-m", "embxlib.launch", "run", "--config", str(config), "--extra-embeds", "1",
                        "--runs-root", str(tmp_path / "runs"), "--run-name", "r"], capture_output=True, text=True,
                       env=python_env(), cwd=ROOT, timeout=600)  # again over the finished run (issue 33, M-g)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert first.read_bytes() == before  # the training's executed notebook is kept; the second one lies beside it
    again = [p.name for p in first.parent.glob("notebook-*.ipynb")]
    assert len(again) == 1 and again[0] in r.stdout.splitlines()[-1], (again, r.stdout[-500:])


def test_plain_progress_line():
    assert launch._plain(40, 200, 62.0, left=248.0) == "step 40/200  elapsed 1:02, about 4:08 left"
    assert launch._plain(0, 200, 31.0, "10.82581") == "step 0/200  val_loss 10.8258  elapsed 0:31"
    assert launch._plain(200, 200, 3725.0, "5.55733") == "step 200/200  val_loss 5.5573  elapsed 1:02:05"


def test_launch_run_with_a_missing_config_file_starts_nothing(tmp_path):
    r = subprocess.run([PYTHON, "-m", "embxlib.launch", "run", "--config", str(tmp_path / "nope.json"),
                        "--runs-root", str(tmp_path / "runs")], capture_output=True, text=True, env=python_env(),
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and f"config file {tmp_path / 'nope.json'}: No such file or directory" in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_sweep_stopped_from_outside_says_so_in_one_line(corpus, tmp_path):
    """Issue 33, Low: `launch sweep` stopped by SIGTERM (or Ctrl-C) printed a 20-line traceback."""
    spec = dict(grid={"extra_embeds": [0]}, seeds=[0], base={**fast_params(corpus), "num_iterations": 2000},
                sweep_dir=str(tmp_path / "sweep"))
    p = subprocess.Popen([PYTHON, "-m", "embxlib.launch", "sweep", "-y", json.dumps(spec)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=python_env(), cwd=ROOT)
    log = tmp_path / "sweep" / "extra_embeds0_s0" / "log.txt"
    deadline = time.time() + 120
    while not (log.exists() and "train_loss" in log.read_text()) and time.time() < deadline:
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    # (the notebook's kernel, stopped mid-reply, may log its own ZMQ error: the launcher's own traceback is gone)
    assert "KeyboardInterrupt" not in err and err.strip().splitlines()[-1] == (
        "python -m embxlib.launch sweep: stopped by SIGTERM; running the sweep again skips its finished runs and "
        "resumes the stopped ones"), err[-2000:]
    assert json.loads((log.parent / "summary.json").read_text())["status"] == "stopped"
