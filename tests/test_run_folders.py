"""Run folders under faults: results are replaced only by newer complete results, resumes survive torn writes and
leftovers, a full disk fails cleanly, one process trains a folder, and a killed launcher leaves no process behind.
Real trainers, real SIGKILLs, real file-size limits."""
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from embxlib import launch, train
from embxlib.runfolder import RUN_LOCK, SWEEP_LOCK, FolderLock, FolderLocked, check_folder_name
from conftest import FAST, PYTHON, ROOT, python_env
from faults import fail_at
from test_notebooks import fast_params


def read_json(path):
    return json.loads(Path(path).read_text())


def steps_in_metrics(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def file_has(path, text):
    return lambda: Path(path).exists() and text in Path(path).read_text(errors="replace")


# --- results are never lost -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_resume_that_fails_keeps_what_the_run_had(fast_args, tmp_path):
    """(A finished run is never resumed: tests/test_stops.py.) A run stopped by --max-steps, resumed from a
    truncated checkpoint: the failure is recorded, nothing it had is dropped; from the good checkpoint it finishes."""
    run = tmp_path / "run"
    train.main(fast_args(run, "--precision", "fp32", "--max-steps", "2"))
    assert read_json(run / "summary.json")["status"] == "stopped"
    checkpoint = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    with pytest.raises(RuntimeError):
        train.main(["--resume", str(run)])
    failed = read_json(run / "summary.json")
    assert failed["status"] == "failed" and "RuntimeError" in failed["error"]
    assert steps_in_metrics(run) == [0, 2]  # the resume that died dropped no record
    (run / "checkpoint.pt").write_bytes(checkpoint)
    train.main(["--resume", str(run)])
    assert read_json(run / "summary.json")["status"] == "finished"
    assert steps_in_metrics(run) == [0, 2, 4]


@pytest.mark.slow
def test_resume_after_a_crash_mid_write(fast_args, tmp_path, monkeypatch):
    """Torn last lines in metrics.jsonl and log.txt and half-written .tmp files, as a SIGKILL mid-write leaves them."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected fault"), monkeypatch.context() as m:
        fail_at(3, monkeypatch=m)
        train.main(fast_args(run, "--num-iterations", "6", "--save-every", "2"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "val_loss": 10.6, "train_ti')
    with open(run / "log.txt", "a") as f:
        f.write("step:4/6 train_loss:10.")
    (run / "checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")
    (run / "summary.json.tmp").write_text('{"status": "fin')
    train.main(["--resume", str(run)])
    assert read_json(run / "summary.json")["status"] == "finished"
    assert steps_in_metrics(run) == [0, 2, 4, 6]
    assert sorted(p.name for p in run.glob("*.tmp")) == []
    log = (run / "log.txt").read_text()
    assert f"# {run / 'log.txt'}: ended its torn last line" in log
    assert f"# {run / 'metrics.jsonl'}:3: skipped malformed line" in log
    assert "# removed checkpoint.pt.tmp: a half-written file of the interrupted run" in log
    assert "# removed summary.json.tmp" in log
    assert "step:4/6 train_loss:10.\n" in log  # the torn line kept, ended: nothing glued to it


@pytest.mark.slow
def test_a_full_disk_fails_the_run_cleanly(corpus, tmp_path):
    """RLIMIT_FSIZE makes every write past 20 MB fail with EFBIG (Python ignores SIGXFSZ): the checkpoint cannot be
    written, the small files can."""
    run = tmp_path / "run"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20)); "
            "from embxlib.train import main; main(sys.argv[1:])")
    r = subprocess.run([PYTHON, "-c", code, *FAST, "--data-dir", str(corpus), "--run-dir", str(run)],
                       capture_output=True, text=True, env=python_env(), timeout=180)
    assert r.returncode == 1
    summary = read_json(run / "summary.json")
    assert summary["status"] == "failed"
    assert summary["error"] == f"OSError: [Errno 27] File too large: '{run / 'checkpoint.pt'}'"
    made = sorted(p.name for p in run.iterdir() if p.name != "git.diff")  # (git.diff: when the checkout has changes)
    assert made == ["config.json", "log.txt", "metrics.jsonl", "summary.json"]
    assert "# FAILED on rank 0: OSError: [Errno 27] File too large" in (run / "log.txt").read_text()


# --- one process per folder -----------------------------------------------------------------------------

def hold_lock(folder, name=RUN_LOCK):
    proc = subprocess.Popen([PYTHON, "-c", "import sys, time; from embxlib.runfolder import FolderLock; "
                             "FolderLock(sys.argv[1], sys.argv[2]).acquire(); print('held', flush=True); "
                             "time.sleep(120)",
                             str(folder), name], env=python_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_locked_run_folder_is_refused_and_a_dead_holder_taken_over(fast_args, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = hold_lock(run)
    try:
        with pytest.raises(FolderLocked, match=rf"{run} is in use by pid {holder.pid} on \S+ since \S+ \(.*\) "
                                               rf"\({run / RUN_LOCK}\); two processes never train one folder"):
            FolderLock(run).acquire()
        with pytest.raises(SystemExit, match=rf"error: {run} is in use by pid {holder.pid}"):
            train.main(fast_args(run))
        assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK]  # the trainer wrote nothing
    finally:
        holder.kill()
        holder.wait()
    notes = []
    with FolderLock(run, note=notes.append):
        assert read_json(run / RUN_LOCK)["pid"] == os.getpid()
    assert len(notes) == 1 and re.fullmatch(rf"{re.escape(str(run / RUN_LOCK))}: took over the lock left by pid "
                                            rf"{holder.pid} on \S+ since \S+ \(.*\): that process is gone", notes[0])
    assert not (run / RUN_LOCK).exists()


def test_a_second_sweep_into_a_folder_is_refused(corpus, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    holder = hold_lock(sweep_dir, SWEEP_LOCK)
    try:
        with pytest.raises(FolderLocked, match=rf"{sweep_dir} is in use by pid {holder.pid}"):
            launch.sweep({"extra_embeds": [0]}, [0], fast_params(corpus), sweep_dir)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in sweep_dir.iterdir()) == [SWEEP_LOCK]  # no run folder, no notebook


def test_a_sweep_does_not_move_aside_a_folder_another_process_trains(corpus, tmp_path):
    run = tmp_path / "sweep" / "extra_embeds0_s0"
    run.mkdir(parents=True)
    (run / "log.txt").write_text("step:0/4 val_loss:10.8 train_time:0ms step_avg:0ms\n")  # no checkpoint yet
    holder = hold_lock(run)
    try:
        with pytest.raises(FolderLocked, match=rf"{run} is in use by pid {holder.pid}"):
            launch.sweep({"extra_embeds": [0]}, [0], fast_params(corpus), tmp_path / "sweep")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [run.name]  # not moved, and no sweep.lock left


@pytest.mark.slow
def test_killing_a_sweep_stops_every_process_under_it(corpus, tmp_path):
    """SIGKILL of the papermill process of a sweep: its kernel, the run's papermill kernel, torchrun and the trainer
    all end, and a second launcher is refused while they run."""
    sweep_dir = tmp_path / "sweep"
    run = sweep_dir / "extra_embeds1_s0"
    # a wide model validating 64k tokens at step 0: a minute in which the trainer prints nothing, so nothing but the
    # watchdog can stop it (a broken pipe to the dead kernel would only at its next line)
    base = {**fast_params(corpus), "num_iterations": 100000, "repeat_data": True, "val_tokens": 65536,
            "val_seq_len": 4096, "model_dim": 512, "num_heads": 4, "head_dim": 128, "mlp_dim": 2048}
    spec = json.dumps({"grid": {"extra_embeds": [1]}, "seeds": [0], "base": base, "sweep_dir": str(sweep_dir)})
    papermill = subprocess.Popen([str(Path(PYTHON).parent / "papermill"), str(ROOT / "nbs" / "sweep.ipynb"),
                                  str(tmp_path / "sweep.ipynb"), "-y", spec, "--cwd", str(ROOT)], env=python_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(file_has(run / "log.txt", "grad_accum_steps"), 180, "the sweep's run to start")
        with pytest.raises(FolderLocked, match=rf"{run} is in use by pid \d+ on"):
            launch.launch({**base, "extra_embeds": 1, "seed": 0}, run_name=run.name, runs_root=str(sweep_dir),
                          resume=True, progress=False)
        assert processes_mentioning(str(run))
        os.kill(papermill.pid, signal.SIGKILL)
        wait_for(lambda: not processes_mentioning(str(run)), 30, "torchrun and the trainer to stop")
    finally:  # what a failure of this test would leave behind: the processes it started, found by their folder
        os.killpg(papermill.pid, signal.SIGKILL)
        papermill.wait()
        for pid in processes_mentioning(str(run)):
            os.kill(pid, signal.SIGKILL)
    summary = read_json(run / "summary.json")
    assert summary["status"] == "failed" and summary["error"].startswith("stopped: the launcher (pid ")
    assert "# FAILED on rank 0: stopped: the launcher" in (run / "log.txt").read_text()


# --- clear errors -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_launch_error_names_the_cause_from_the_console_log(corpus, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    with pytest.raises(launch.LaunchError) as err:
        launch.launch({**fast_params(corpus), "data_dir": str(empty)}, run_name="r", runs_root=str(tmp_path / "runs"),
                      nproc_per_node=2, progress=False)
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"training failed (exit code 1): error: data_dir='{empty}': no *_train_*.bin shards in")
    assert str(tmp_path / "runs" / "r" / "console.log") in first


GRID = {"extra_embeds": [0]}


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"extra_embeds": []}}, "grid['extra_embeds']=[]: needs at least one value"),
    ({"grid": GRID, "seeds": []}, "seeds=[]: needs at least one value"),
    ({"grid": {"extra_embeds": 3}}, "grid['extra_embeds']=3: expected a list, e.g. [3]"),
    ({"grid": GRID, "seeds": 3}, "seeds=3: expected a list, e.g. [3]"),
    ({"seeds": [0, 1]}, "sweep YAML needs grid: Config field -> list of values"),
    ({"grid": GRID, "seed": [1]}, "unknown parameter(s) ['seed'] (did you mean 'seeds'?)"),
    ({"grid": GRID, "seeds": [0, 1, 0]}, "seeds=[0, 1, 0]: 0 given twice; each value once"),
    ({"grid": {"extra_embeds": [1, 1]}}, "grid['extra_embeds']=[1, 1]: 1 given twice"),
    ({"grid": {"extra_embedz": [1]}}, "'extra_embedz' is not a Config field (did you mean 'extra_embeds'?)"),
    ({"grid": GRID, "seeds": [0.5]}, "seeds=[0.5]: seed 0.5 is not an integer"),
    ({"grid": {"extra_embeds": [0, "x"]}}, "extra_embeds='x': expected int"),
    ({"grid": GRID, "base": {"seed": 3}}, "'seed' is set by seeds; drop it from base"),
    ({"grid": GRID, "nproc_per_node": 0}, "nproc_per_node=0: must be an integer >= 1"),
    ([1, 2], "sweep YAML [1, 2]: expected a mapping"),
], ids=str)
def test_bad_sweeps_fail_before_anything_runs(tmp_path, capsys, spec, message):
    if isinstance(spec, dict):  # where a bad spec got through, its runs fail at once instead of training
        spec = {**spec, "sweep_dir": str(tmp_path / "sweep"),
                "base": {"data_dir": str(tmp_path / "no-data"), **spec.get("base", {})}}
    with pytest.raises(SystemExit) as exit_:
        launch.main(["sweep", "-y", json.dumps(spec)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "sweep").exists()


def test_sweep_run_names_are_plain_folders():
    names = [n for n, _ in launch.sweep_runs({"data_dir": ["data/a", "data/b"]}, [0])]
    assert names == ["data_dirdata_a_s0", "data_dirdata_b_s0"]
    with pytest.raises(ValueError, match=r"grid\['data_dir'\]=\['a/b', 'a_b'\]: a_b given twice"):
        launch.sweep_runs({"data_dir": ["a/b", "a_b"]}, [0])


GRID = {"extra_embeds": [0, 1], "bigram_embeds": [0, 1]}
ARMS = ["extra_embeds0_bigram_embeds0", "extra_embeds0_bigram_embeds1", "extra_embeds1_bigram_embeds0",
        "extra_embeds1_bigram_embeds1"]


def test_sweeps_run_seed_by_seed():
    """Arms interleaved by seed: machine drift, or a sweep stopped early, hits every variant alike."""
    names = [n for n, _ in launch.sweep_runs(GRID, [0, 1], order="fixed")]
    assert names == [f"{a}_s{s}" for s in (0, 1) for a in ARMS]
    names = [n for n, _ in launch.sweep_runs(GRID, [0, 1])]  # the default: each seed's arms shuffled
    assert [n[-2:] for n in names] == ["s0"] * 4 + ["s1"] * 4 and sorted(names) == sorted(f"{a}_s{s}" for s in (0, 1)
                                                                                          for a in ARMS)


def test_each_seed_shuffles_its_arms_by_the_seed_and_a_b_a_repeats_the_first():
    """A fixed order within a seed lets a drifting machine favour the arm that always runs first (issue 31): the
    order is drawn from the seed (random.Random(seed), the same on a rerun), differs between seeds, and every arm
    runs first about equally often."""
    def order(seed):
        return [n[:-len(f"_s{seed}")] for n, _ in launch.sweep_runs(GRID, [seed])]
    assert order(3) == order(3)
    expected = ARMS.copy()
    random.Random(3).shuffle(expected)  # by hand: the seed's own draw
    assert order(3) == expected
    firsts = [order(s)[0] for s in range(40)]
    assert len({tuple(order(s)) for s in range(40)}) > 5 and all(firsts.count(a) >= 4 for a in ARMS), firsts
    runs = launch.sweep_runs(GRID, [0, 1], repeat_first=True)  # A/B/A: the seed's first arm again, last
    assert len(runs) == 10
    for seed, part in ((0, runs[:5]), (1, runs[5:])):
        assert part[-1][0] == part[0][0] + "_again" and part[-1][1] == part[0][1] and part[0][1]["seed"] == seed
    with pytest.raises(ValueError, match="order='random': allowed: shuffled, fixed"):
        launch.sweep_runs(GRID, [0], order="random")


def test_a_sweep_adds_the_control_arm_of_each_bigram_arm():
    """control=true: beside each arm with a bigram table, the same run with bigram_control (the table without the
    bigrams: the parameter-matched control), in the seed's shuffled order."""
    runs = dict(launch.sweep_runs({"extra_embeds": [0, 1]}, [0, 1], {"bigram_embeds": 1}, control=True))
    assert sorted(runs) == sorted(f"extra_embeds{e}{c}_s{s}" for e in (0, 1) for c in ("", "_control") for s in (0, 1))
    assert runs["extra_embeds1_control_s1"] == {"bigram_embeds": 1, "extra_embeds": 1, "seed": 1, "bigram_control": 1}
    runs = [n for n, _ in launch.sweep_runs({"bigram_embeds": [0, 1]}, [0], control=True, order="fixed")]
    assert runs == ["bigram_embeds0_s0", "bigram_embeds1_s0", "bigram_embeds1_control_s0"]
    with pytest.raises(ValueError, match="control=true adds the control of a bigram table"):
        launch.sweep_runs({"extra_embeds": [0, 1]}, [0], control=True)


@pytest.mark.parametrize("settings, message", [
    (dict(resume="yes"), "resume='yes': expected true or false"),
    (dict(progress=1), "progress=1: expected true or false"),
    (dict(nnodes="two"), "nnodes='two': expected int"),
    (dict(run_name="a/../../x"), "run_name='a/../../x': must be one plain folder name"),
    (dict(run_name=".."), "run_name='..': must be one plain folder name"),
    (dict(runs_root=""), "runs_root='': needs a folder"),
    (dict(runs_root=None), "runs_root=None: expected str"),
    (dict(resum=True), "unknown parameter(s) ['resum'] (did you mean 'resume'?)"),
])
def test_launch_settings_are_checked(settings, message):
    with pytest.raises(ValueError) as err:
        launch.check_settings({"nproc_per_node": 1, **settings})
    assert message in str(err.value)
    assert launch.check_settings({"nproc_per_node": 1, "resume": "true"})["resume"] is True


def test_folder_names():
    for name in ("x01", "20260101-000000_x00-ve2_s0", "a b"):
        assert check_folder_name("name", name) == name
    for name in ("", ".", "..", ".x", "a/b", "a\\b", "../x", None, 3):
        with pytest.raises(ValueError, match="must be one plain folder name"):
            check_folder_name("name", name)


# --- folders reused only for the same config; sweeps that go on; launchers stopped by signals --------------

FP32 = {"precision": "fp32"}  # the same code paths, many times faster on a CPU without bf16


def made_run(corpus, folder, status="finished", **params):
    """A run folder as the trainer leaves it (config.json, summary.json) for params."""
    cfg = launch.resolve({**fast_params(corpus), **params})
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg.to_json())
    (folder / "summary.json").write_text(json.dumps({"status": status, "final_val_loss": 10.5}))
    (folder / "log.txt").write_text("step:4/4 val_loss:10.5 train_time:1ms step_avg:1ms\n")
    return folder


def test_a_folder_is_reused_only_for_the_same_config(corpus, tmp_path):
    run = made_run(corpus, tmp_path / "runs" / "x", status="stopped")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError) as err:
        launch.launch({**fast_params(corpus), "extra_embeds": 1, "num_iterations": 12, "embed_lr": 0.5},
                      run_name="x", runs_root=str(tmp_path / "runs"), resume=True, nproc_per_node=1, progress=False)
    assert (f"run_name='x': {run} holds a run with another config: name 'x00-ve2-fp32' in its config.json, "
            f"'x01-ve2-fp32' requested; extra_embeds 0 in its config.json, 1 requested; num_iterations 4 in its config.json, 12 "
            f"requested; embed_lr 0.3 in its config.json, 0.5 requested") in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing started, nothing written


def test_a_finished_sweep_rerun_with_another_config_is_refused(corpus, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    made_run(corpus, sweep_dir / "extra_embeds0_s0", extra_embeds=0, seed=0)
    spec = {"grid": {"extra_embeds": [0]}, "seeds": [0], "base": {**fast_params(corpus), "num_iterations": 8},
            "sweep_dir": str(sweep_dir)}
    with pytest.raises(SystemExit) as exit_:
        launch.main(["sweep", "-y", json.dumps(spec)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert (f"run 'extra_embeds0_s0': {sweep_dir / 'extra_embeds0_s0'} holds a run with another config: "
            f"num_iterations 4 in its config.json, 8 requested") in err
    assert not (sweep_dir / "summary.csv").exists()


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_the_sweep_goes_on(corpus, tmp_path, capsys):
    """The first run fails (its data folder is missing), the second still trains; summary.csv has both, the sweep
    exits non-zero naming the failure."""
    sweep_dir, missing = tmp_path / "sweep", tmp_path / "no-data"
    base = {**fast_params(corpus), **FP32}
    del base["data_dir"]
    spec = {"grid": {"data_dir": [str(missing), str(corpus)]}, "seeds": [0], "base": base,
            "sweep_dir": str(sweep_dir), "order": "fixed"}  # (the grid's order: the failing run first)
    with pytest.raises(SystemExit) as exit_:
        launch.main(["sweep", "-y", json.dumps(spec)])
    err = capsys.readouterr().err
    bad, good = (f"data_dir{launch._label(str(d))}_s0" for d in (missing, corpus))
    assert exit_.value.code == 1 and err.count("\n") == 1, err
    assert f"1 of 2 runs failed: {bad} (" in err and "summary.csv" in err
    import pandas as pd
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert list(table["run"]) == [bad, good] and list(table["status"]) == ["failed", "finished"]
    assert "no *_train_*.bin shards" in table["error"][0] and table["error"].isna()[1]


def launcher_process(corpus, runs_root, run_name, **params):
    code = ("import json, sys; from embxlib import launch; "
            "launch.launch(json.loads(sys.argv[1]), run_name=sys.argv[2], runs_root=sys.argv[3], nproc_per_node=1, "
            "progress=False)")
    return subprocess.Popen([PYTHON, "-c", code, json.dumps({**fast_params(corpus), **FP32, **params}), run_name,
                             str(runs_root)], env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_launcher_stopped_by_a_signal_stops_its_trainers_and_the_run_says_so(corpus, tmp_path, signame):
    run = tmp_path / "runs" / "r"
    proc = launcher_process(corpus, tmp_path / "runs", "r", num_iterations=400, val_loss_every=100)
    try:
        wait_for(file_has(run / "log.txt", "step:2/400 train_loss"), 240, "training to start")
        os.kill(proc.pid, getattr(signal, signame))
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in out, out[-2000:]
    summary = read_json(run / "summary.json")
    assert summary["status"] == "stopped" and summary["error"] == "stopped by SIGTERM", summary  # the launcher's _kill
    assert not (run / RUN_LOCK).exists() and list(run.glob("*.tmp")) == []
    wait_for(lambda: not processes_mentioning(str(run)), 30, "no process left")


def test_launch_command_line_errors_are_one_line(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        launch.main(["run", "--run-name", "../x", "--runs-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "run_name='../x': must be one plain folder name" in err
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    holder = hold_lock(sweep_dir, SWEEP_LOCK)
    try:
        spec = {"grid": {"extra_embeds": [0]}, "seeds": [0], "base": fast_params(corpus), "sweep_dir": str(sweep_dir)}
        with pytest.raises(SystemExit) as exit_:
            launch.main(["sweep", "-y", json.dumps(spec)])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and f"{sweep_dir} is in use by pid {holder.pid}" in err


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_fails_it_and_the_summary_says_so(corpus, tmp_path):
    """A real full disk (a 4 MiB tmpfs, filled while the run trains): the error names the file it refused, and
    summary.json, whose .tmp finds no free block, is rewritten in place to `failed`, saying so on stderr."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        run = disk / "run"
        proc = subprocess.Popen([PYTHON, "-m", "embxlib.train", *FAST, "--precision", "fp32", "--data-dir",
                                 str(corpus), "--run-dir", str(run), "--num-iterations", "400", "--val-loss-every",
                                 "1"], env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(file_has(run / "metrics.jsonl", '"step": 1,'), 240, "the first validations")
            fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
            for size in (2**16, 2**12):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == 28
            os.close(fd)
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        summary = read_json(run / "summary.json")
        leftovers = sorted(p.name for p in run.glob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(disk)])
    assert proc.returncode == 1, err[-2000:]
    assert summary["status"] == "failed", summary
    assert re.fullmatch(rf"OSError: \[Errno 28\] No space left on device: '{run}/(metrics\.jsonl|log\.txt)'",
                        summary["error"]), summary["error"]
    assert f"error: could not write {run / 'summary.json'} whole (" in err
    assert "rewrote it in place: status failed" in err
    assert leftovers == []


@pytest.mark.slow
def test_a_trainer_killed_outright_under_the_launcher_is_recorded_by_it(corpus, tmp_path):
    """SIGKILL (the OOM killer) leaves the trainer no moment to write; the launcher records torchrun's report."""
    run = tmp_path / "runs" / "r"
    proc = launcher_process(corpus, tmp_path / "runs", "r", num_iterations=400, val_loss_every=100)
    try:
        wait_for(file_has(run / "log.txt", "step:2/400 train_loss"), 240, "training to start")
        trainer = next(p for p in processes_mentioning(str(run)) if "embxlib.train" in
                       Path(f"/proc/{p}/cmdline").read_bytes().decode() and "torch.distributed.run" not in
                       Path(f"/proc/{p}/cmdline").read_bytes().decode())
        os.kill(trainer, signal.SIGKILL)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0 and "LaunchError" in out, out[-2000:]
    summary = read_json(run / "summary.json")
    assert summary["status"] == "failed" and "SIGKILL" in summary["error"], summary
    assert "recorded by the launcher" in summary["error"]
    assert not (run / RUN_LOCK).exists()


def test_the_step_line_format_and_its_parser_agree():
    """log.txt's step lines are written by runfolder.step_line and read by runfolder.parse_step_line (the launcher's
    progress, the GPU check, the step-time model): one format."""
    from embxlib.runfolder import parse_step_line, step_line
    val = step_line(0, 200, 0.0, val_loss=10.825812)
    train_line = step_line(3, 200, 4567.4, train_loss=7.34512)
    assert val == "step:0/200 val_loss:10.825812 train_time:0ms step_avg:0.00ms"
    assert train_line == "step:3/200 train_loss:7.3451 train_time:4567ms step_avg:1522.47ms"
    assert parse_step_line(val) == dict(step=0, total=200, val_loss=10.825812, train_loss=None, train_time_ms=0.0,
                                        step_avg_ms=0.0)
    assert parse_step_line(train_line)["train_loss"] == 7.3451 and parse_step_line(train_line)["val_loss"] is None
    assert parse_step_line("[rank0]: " + val) is None and parse_step_line("[rank0]: " + val, anywhere=True)["step"] == 0
    assert parse_step_line("# stopped at step 3 of 6 (--max-steps)") is None


def test_a_queued_slurm_job_of_another_config_is_refused_naming_the_fields(tmp_path):
    """Issue 33, H-b: a run folder whose SLURM job is still queued holds only slurm.json; a sweep with another config
    into it watched that job and reported its result as its own. The config the job was submitted with is in
    slurm.json, and the reuse check compares it as it compares config.json and the checkpoint's."""
    sweep_dir = tmp_path / "sweep"
    queued = launch.resolve({"num_iterations": 10, "seed": 0})
    (sweep_dir / "base_s0").mkdir(parents=True)
    (sweep_dir / "base_s0" / "slurm.json").write_text(json.dumps({"job_id": "25", "config": queued.to_dict()}))
    assert launch.reuse_problem(sweep_dir / "base_s0", queued) == ""  # the same config: the rerun watches the job
    other = {"num_iterations": 4, "embed_lr": 0.6}
    with pytest.raises(ValueError, match=r"run 'base_s0': .* num_iterations 10 in its slurm\.json \(its SLURM job's "
                                         r"config\), 4 requested; embed_lr 0\.3 in its slurm\.json"):
        launch.check_sweep({}, [0], other, str(sweep_dir), backend="slurm", ask_cluster=False)


@pytest.mark.parametrize("settings, message", [
    ({"time_min": 1}, "slurm.signal_delay_s=90: the time limit's warning would leave 0 s of a 1-min job to train; at "
                      "most half the job: give time_min >= 3 or signal_delay_s <= 30"),
    ({"time_min": 2, "signal_delay_s": 61}, "would leave 59 s of a 2-min job"),
])
def test_the_time_limits_warning_must_leave_time_to_train(settings, message):
    """Issue 33, M-b: time_min 1 with the default signal_delay_s 90 was accepted, and the job requeued itself
    forever without training a step."""
    from embxlib import slurm
    with pytest.raises(ValueError, match=re.escape(message)):
        slurm.check_settings(settings)
    assert slurm.check_settings({"time_min": 3})["signal_delay_s"] == 90


def test_an_absurd_grid_is_refused_with_its_count_at_once():
    """Issue 33, M-c: a 2 KB sweep file with 1e6 combinations was checked silently for ~100 min, twice."""
    grid = {"embed_lr": [i / 1000 for i in range(1, 1001)], "muon_lr": [i / 1000 for i in range(1, 1001)]}
    t = time.perf_counter()
    with pytest.raises(ValueError, match=r"the sweep has 1,000,000 runs \(1000 embed_lr x 1000 muon_lr x 1 seeds\), "
                                         r"over the limit of 2,000"):
        launch.check_sweep(grid, [0])
    assert time.perf_counter() - t < 5


def test_runs_that_differ_only_in_how_a_value_is_written_are_one_run():
    """Issue 33, Low: duplicate runs (10 and 10.0) were compared by label, and trained twice."""
    with pytest.raises(ValueError, match=r"runs 'num_iterations10_s0' and 'num_iterations10.0_s0' train the same "
                                         r"config"):
        launch.check_sweep({"num_iterations": [10, 10.0]}, [0], order="fixed")
    assert len(launch.check_sweep({"extra_embeds": [0, 1]}, [0], repeat_first=True)) == 3  # A/B/A's repeat is fine


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_is_a_failure_naming_the_rank_not_a_stop(corpus, tmp_path, monkeypatch):
    """Issue 33, M-a: a rank killed by SIGKILL (the OOM killer) was recorded as "stopped by SIGTERM" (torchrun
    SIGTERMs the survivors), which a SLURM job then requeued. The launcher reads torchrun's report: failed, naming
    the rank and the signal; slurm.stopped_by_sigterm (the requeue's test) says no."""
    from embxlib import slurm
    from faults import in_trainers
    from test_notebooks import fast_params
    for k, v in in_trainers(fail_at_step=2, fail_rank=1, signum=signal.SIGKILL).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(launch.LaunchError, match="rank 1 killed by SIGKILL") as e:
        launch.launch({**fast_params(corpus), "train_batch_tokens": 512}, run_name="r", runs_root=str(tmp_path),
                      nproc_per_node=2, progress=False, echo=lambda s: None)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("rank 1 killed by SIGKILL"), summary
    assert not slurm.stopped_by_sigterm(tmp_path / "r", e.value)


def test_torchruns_report_names_the_rank_that_died():
    """rank_death on torchrun's failure report (its format, from torch.distributed.elastic's ChildFailedError):
    a stop signal or a stop's exit code is no death of its own."""
    from embxlib.runfolder import rank_death
    entry = ("[{i}]:\n  time      : 2026-12-08_01:58:00\n  host      : node\n  rank      : {r} (local_rank: {r})\n"
             "  exitcode  : {c} (pid: 10{r})\n  error_file: <N/A>\n  traceback : {t}\n")
    killed = entry.format(i=0, r=1, c=-9, t="Signal 9 (SIGKILL) received by PID 101")
    stopped = entry.format(i=1, r=0, c=-15, t="Signal 15 (SIGTERM) received by PID 100")
    stopped_by_handler = entry.format(i=1, r=0, c=143, t="To enable traceback see: https://pytorch.org/docs/")
    crashed = entry.format(i=0, r=2, c=1, t="To enable traceback see: https://pytorch.org/docs/")
    assert rank_death("Failures:\n" + stopped + "Root Cause:\n" + killed) == "rank 1 killed by SIGKILL"
    assert rank_death(stopped_by_handler + crashed) == "rank 2 exited with code 1"
    assert rank_death(stopped + stopped_by_handler) is None and rank_death("no report") is None


def test_a_cancelled_job_reads_cancelled_in_the_sweeps_table(tmp_path):
    """Issue 33, Low: a cancelled array read failed or missing in summary.csv."""
    for name, summary in (("queued_s0", None), ("running_s0", {"status": "stopped", "error": "stopped by SIGTERM"}),
                          ("done_s0", {"status": "finished", "final_val_loss": 5.0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "slurm.json").write_text(json.dumps({"job_id": "7", "cancelled": "2026-12-08 02:00"}))
        if summary:
            (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    table = launch.sweep_table(tmp_path, ["queued_s0", "running_s0", "done_s0"], ["seed"])
    assert table.status.tolist() == ["cancelled", "cancelled", "finished"]
