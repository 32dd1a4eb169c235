"""The slurm backend of sweeps against a real one-node SLURM cluster (tests/slurm_cluster.py: munged, slurmctld and
slurmd in a temporary folder, real sbatch, real torchrun on the node): the same results as the local backend, runs
side by side, a SIGTERM'd job requeued to the same loss, no second submission, cancel, refusals before anything
is submitted. Skipped where slurm-wlm is not installed, except in CI (.ci/run installs it)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import papermill as pm
import pandas as pd
import pytest

from embxlib import launch, slurm
from embxlib.runfolder import SLURM_RECORD, read_json
from embxlib.checkpoint import CHECKPOINT, peek_checkpoint
from conftest import PYTHON, ROOT, python_env
from slurm_cluster import Cluster, missing
from test_notebooks import fast_params

GRID, SEEDS = {"extra_embeds": [0, 1]}, [0, 1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    absent = missing()
    if absent:
        if os.environ.get("CI"):
            pytest.fail(f"CI: SLURM is not installed ({', '.join(absent)} missing); .ci/run installs slurm-wlm munge")
        pytest.skip(f"SLURM is not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI: the test cluster's daemons run as root")
        pytest.skip("the test cluster's daemons run as root (SlurmUser=root)")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "OMP_NUM_THREADS")}
    try:
        c.start()
        # jobs inherit the submitter's environment (sbatch --export=ALL): one thread per run on both backends,
        # so that their losses are the same numbers
        os.environ.update(SLURM_CONF=str(c.conf), OMP_NUM_THREADS="1")
        yield c
    finally:
        c.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def records(sweep_dir: Path, names) -> dict:
    return {n: read_json(sweep_dir / n / SLURM_RECORD) for n in names}


def squeue_ids(c: Cluster) -> list[str]:
    return c.run("squeue", "--noheader", "--array", "--states=all", "--format=%i").stdout.split()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(ok, timeout: float, what: str, c: Cluster):
    end = time.time() + timeout
    while time.time() < end:
        got = ok()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout:.0f} s\n{c.run('squeue', '-t', 'all').stdout}\n{c.logs()}")


@pytest.mark.slow
def test_the_notebook_on_slurm_runs_side_by_side_and_writes_the_local_summary(cluster, corpus, tmp_path, capsys):
    """papermill nbs/sweep.ipynb with backend slurm: four jobs of one array, running at once on the 4-CPU node, into
    run folders whose summary.csv equals the local backend's (same seeds, same losses); a second submission of
    the finished sweep submits nothing."""
    on, here = tmp_path / "slurm", tmp_path / "local"
    base = fast_params(corpus)
    t = time.time()
    # the local sweep meanwhile, in a process of its own (the test's time is the longer of the two)
    local = subprocess.Popen([PYTHON, "-m", "embxlib.launch", "sweep", "-y", json.dumps(dict(
        grid=GRID, seeds=SEEDS, base=base, sweep_dir=str(here)))], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=python_env(), cwd=ROOT)
    pm.execute_notebook(str(ROOT / "nbs" / "sweep.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT),
                        progress_bar=False, parameters=dict(grid=GRID, seeds=SEEDS, base=base, sweep_dir=str(on),
                                                            backend="slurm", slurm={"poll_s": 1}))
    took = time.time() - t
    names = ["extra_embeds0_s0", "extra_embeds0_s1", "extra_embeds1_s0", "extra_embeds1_s1"]
    rec = records(on, names)
    arrays = {r["job_id"].split("_")[0] for r in rec.values()}
    assert len(arrays) == 1 and sorted(r["job_id"].split("_")[1] for r in rec.values()) == ["0", "1", "2", "3"]
    starts = [r["started"] for r in rec.values()]
    ends = [r["ended"] for r in rec.values()]
    assert max(starts) < min(ends), f"the four jobs did not overlap: {rec}"  # all four ran at once
    out = (tmp_path / "out.ipynb").read_text()  # the notebook's output: a line per change of a job's state
    assert f"job {rec[names[0]]['job_id']} running on embx1" in out and "finished, final val_loss" in out
    assert rec[names[0]]["node"] == "embx1"
    with capsys.disabled():  # for the closing note: the jobs, where and when they ran
        print(f"\nslurm sweep through the notebook: {took:.1f} s")
        for n, r in rec.items():
            print(f"  {n}: job {r['job_id']} on {r['node']} {r['started']} .. {r['ended']}")

    said = local.communicate(timeout=600)[0]
    assert local.returncode == 0, said[-3000:]
    with capsys.disabled():
        print(f"the same sweep locally, meanwhile: done {time.time() - t:.1f} s after the start")
    slurm_table = pd.read_csv(on / "summary.csv")
    local_table = pd.read_csv(here / "summary.csv")
    same = ["run", "extra_embeds", "seed", "variant", "status", "final_val_loss", "num_params"]
    pd.testing.assert_frame_equal(slurm_table[same], local_table[same])
    assert list(slurm_table.status) == ["finished"] * 4

    before = squeue_ids(cluster)
    r = subprocess.run([PYTHON, "-m", "embxlib.launch", "sweep", "--backend", "slurm", "-y",
                        json.dumps(dict(grid=GRID, seeds=SEEDS, base=base, sweep_dir=str(on)))],
                       capture_output=True, text=True, env=python_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("finished, skipped") == 4 and "submitted" not in r.stdout, r.stdout
    assert squeue_ids(cluster) == before


@pytest.mark.slow
def test_a_job_stopped_by_sigterm_is_requeued_and_resumes_to_the_same_loss(cluster, corpus, tmp_path, capsys):
    sweep_dir, name = tmp_path / "sweep", "extra_embeds1_s0"
    base = {**fast_params(corpus), "num_iterations": 12, "val_loss_every": 4, "save_every": 4}
    run = sweep_dir / name
    launch.sweep({"extra_embeds": [1]}, [0], base, str(sweep_dir), backend="slurm",
                 slurm={"wait": False, "poll_s": 1}, echo=lambda s: None)
    job = read_json(run / SLURM_RECORD)["job_id"]

    def checkpointed():
        ck = peek_checkpoint(run / CHECKPOINT) if (run / CHECKPOINT).exists() else None
        return ck and ck["step"] >= 4 and (read_json(run / "summary.json") or {}).get("status") == "running"
    wait_for(checkpointed, 120, "checkpoint at step 4 while running", cluster)
    stopped_at, at_step = time.time(), peek_checkpoint(run / CHECKPOINT)["step"]
    assert cluster.run("scancel", "--signal=TERM", job).returncode == 0
    # SLURM holds a requeued job for about two minutes (BeginTime); the test lets it start at once
    wait_for(lambda: "BeginTime" in cluster.run("squeue", "-h", "-j", job, "-o", "%r").stdout, 60,
             "the requeued job pending on BeginTime", cluster)
    summary = read_json(run / "summary.json")
    assert summary["status"] == "stopped" and summary["error"] == "stopped by SIGTERM"
    assert cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0

    said = []
    table = launch.sweep({"extra_embeds": [1]}, [0], base, str(sweep_dir), backend="slurm", slurm={"poll_s": 1},
                         echo=said.append)
    assert f"[1/1] {name}: job {job} is pending, not submitted again" in said or \
        f"[1/1] {name}: job {job} is running, not submitted again" in said, said
    assert table.status.tolist() == ["finished"]
    log = (run / "log.txt").read_text()
    assert "STOPPED on rank 0: stopped by SIGTERM" in log and "resumed from checkpoint.pt" in log
    assert read_json(run / SLURM_RECORD)["restarts"] == 1

    reference = launch.launch({**base, "extra_embeds": 1, "seed": 0}, run_name="ref", runs_root=str(tmp_path / "ref"),
                              nproc_per_node=1, progress=False, echo=lambda s: None)
    want = read_json(reference / "summary.json")["final_val_loss"]
    got = float(table.final_val_loss[0])
    assert got == pytest.approx(want, abs=1e-6)
    with capsys.disabled():
        print(f"\nrequeue: job {job} TERM'd after its checkpoint at step {at_step} of 12: final val_loss {got!r} after "
              f"the requeue, {want!r} uninterrupted "
              f"({time.time() - stopped_at:.0f} s from the TERM to the end)")


@pytest.mark.slow
def test_a_rerun_while_jobs_are_queued_submits_nothing_and_an_interrupt_cancels_them(cluster, corpus, tmp_path):
    """Submitted without waiting; the sweep run again (the command line) finds both jobs by the ids in their run
    folders and watches them; Ctrl-C there cancels both, and neither requeues itself on the SIGTERM."""
    sweep_dir = tmp_path / "sweep"
    base = {**fast_params(corpus), "num_iterations": 2000, "val_loss_every": 1000}
    spec = dict(grid=GRID, seeds=[0], base=base, sweep_dir=str(sweep_dir))
    launch.sweep(**spec, backend="slurm", slurm={"wait": False, "poll_s": 1}, echo=lambda s: None)
    names = ["extra_embeds0_s0", "extra_embeds1_s0"]
    jobs = [r["job_id"] for r in records(sweep_dir, names).values()]
    for n, r in records(sweep_dir, names).items():  # each job's config, for a rerun to compare (issue 33, H-b)
        assert r["config"]["extra_embeds"] == int(n[12]) and r["config"]["num_iterations"] == 2000
    with pytest.raises(ValueError, match=r"num_iterations 2000 in its (config\.json|slurm\.json \(its SLURM job's "
                                         r"config\)), 4 requested"):
        launch.sweep(**{**spec, "base": {**base, "num_iterations": 4}}, backend="slurm", slurm={"wait": False},
                     echo=lambda s: None)
    watcher = subprocess.Popen([PYTHON, "-m", "embxlib.launch", "sweep", "--backend", "slurm", "-y", json.dumps(
        {**spec, "slurm": {"poll_s": 1}})], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=python_env(), cwd=ROOT)
    wait_for(lambda: all("step:1/2000 train_loss" in _text(sweep_dir / n / "log.txt") for n in names), 60,
             "both runs training", cluster)
    wait_for(lambda: (sweep_dir / "sweep.lock").exists(), 30, "the rerun watching", cluster)
    time.sleep(2)
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode != 0
    for n, j in zip(names, jobs):  # (pending: the rerun asked before the cluster had started them)
        assert f"{n}: job {j} is running, not submitted again" in out or \
            f"{n}: job {j} is pending, not submitted again" in out, out
    assert "submitted" not in out.replace("not submitted again", "") and squeue_ids(cluster).count(jobs[0]) == 1
    assert f"cancelled 2 job(s) of {sweep_dir}: {' '.join(jobs)}" in out, out + err
    states = wait_for(lambda: (lambda s: s if all(x == "CANCELLED" for x in s) else None)(
        [cluster.run("squeue", "-h", "-t", "all", "-j", j, "-o", "%T").stdout.strip() for j in jobs]), 60,
        "both jobs cancelled", cluster)
    time.sleep(3)  # a job that requeued itself on the SIGTERM would be pending again by now
    assert [cluster.run("squeue", "-h", "-t", "all", "-j", j, "-o", "%T").stdout.strip() for j in jobs] == states
    for n in names:
        assert read_json(sweep_dir / n / "summary.json")["status"] == "stopped"  # resumable by a rerun
        assert read_json(sweep_dir / n / SLURM_RECORD)["cancelled"]
    said = []
    assert slurm.cancel(sweep_dir, said.append) == [] and said == [f"cancelled 0 job(s) of {sweep_dir}: none was "
                                                                  f"queued or running"]


def test_a_sweep_stopped_between_sbatch_and_its_records_finds_its_jobs_when_run_again(cluster, corpus, tmp_path):
    """The records name the submission before sbatch; the job ids come after it. Stopped in between (here: the
    array submitted by hand, held, under that name), the rerun finds the jobs by the name and submits nothing."""
    sweep_dir, name = tmp_path / "sweep", "embx-sweep-20261202000000-1"
    r = cluster.run("sbatch", "--hold", f"--job-name={name}", "--array=0-1", "--parsable", "--wrap", "true")
    array = r.stdout.strip()
    names = ["extra_embeds0_s0", "extra_embeds1_s0"]
    for k, n in enumerate(names):
        (sweep_dir / n).mkdir(parents=True)
        (sweep_dir / n / SLURM_RECORD).write_text(json.dumps({"pending": {"job_name": name, "task": k, "array": True}}))
    said = []
    launch.sweep(GRID, [0], fast_params(corpus), str(sweep_dir), backend="slurm", slurm={"wait": False},
                 echo=said.append)
    assert said[:2] == [f"[1/2] {names[0]}: job {array}_0 is pending, not submitted again",
                        f"[2/2] {names[1]}: job {array}_1 is pending, not submitted again"], said
    assert [read_json(sweep_dir / n / SLURM_RECORD)["job_id"] for n in names] == [f"{array}_0", f"{array}_1"]
    assert slurm.cancel(sweep_dir, said.append) == [f"{array}_0", f"{array}_1"]


def test_forty_runs_are_one_array_submitted_in_seconds(cluster, corpus, tmp_path):
    sweep_dir = tmp_path / "sweep"
    grid, seeds = {"extra_embeds": list(range(10))}, [0, 1, 2, 3]
    said = []
    t = time.time()
    launch.sweep(grid, seeds, fast_params(corpus), str(sweep_dir), backend="slurm", echo=said.append,
                 slurm={"wait": False, "sbatch": {"hold": True}})  # held: none of them starts
    took = time.time() - t
    ids = {r["job_id"] for r in records(sweep_dir, [n for n, _ in launch.sweep_runs(grid, seeds)]).values()}
    assert len(ids) == 40 and len({j.split("_")[0] for j in ids}) == 1 and took < 10, (took, said)
    assert any(s.startswith("submitted 40 run(s) as job ") and "(an array)" in s for s in said), said
    r = subprocess.run([PYTHON, "-m", "embxlib.launch", "cancel", str(sweep_dir)], capture_output=True, text=True,
                       env=python_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 0 and f"cancelled 40 job(s) of {sweep_dir}: " in r.stdout, r.stdout + r.stderr
    assert not [j for j in squeue_ids(cluster) if j in ids and
                cluster.run("squeue", "-h", "-t", "all", "-j", j, "-o", "%T").stdout.strip() != "CANCELLED"]


@pytest.mark.slow
def test_a_run_failing_on_the_node_is_recorded_failed_with_its_error(cluster, corpus, tmp_path):
    sweep_dir, missing_data = tmp_path / "sweep", tmp_path / "no-data"
    base = {**fast_params(corpus), "data_dir": str(missing_data)}
    with pytest.raises(launch.SweepFailed) as err:
        launch.sweep({"extra_embeds": [1]}, [0], base, str(sweep_dir), backend="slurm", slurm={"poll_s": 1},
                     echo=lambda s: None)
    assert "1 of 1 runs failed: extra_embeds1_s0 (" in str(err.value) and "no *_train_*.bin shards" in str(err.value)
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert table.status.tolist() == ["failed"] and "no *_train_*.bin shards" in table.error[0]
    assert "no *_train_*.bin shards" in read_json(sweep_dir / "extra_embeds1_s0" / SLURM_RECORD)["error"]


@pytest.mark.parametrize("settings, message", [
    ({"partition": "gpu"}, "slurm.partition='gpu': no such partition; sinfo offers: debug (default): 1 node(s) up, "
                           "4 CPUs and 0 GPUs per node, time limit 60 min; lab: 1 node(s) up"),
    ({"partition": "lab", "account": "chemistry"}, "slurm.account='chemistry': partition 'lab' takes only the "
                                                   "account(s) ['physics']"),
    ({"cpus_per_task": 64}, "slurm.cpus_per_task=64: more CPUs than a node has; partition debug (default): 1 "
                            "node(s) up, 4 CPUs"),
    ({"gpus_per_node": 1}, "slurm.gpus_per_node=1: more GPUs than a node has"),
    ({"time_min": 120}, "slurm.time_min=120: over the partition's time limit; partition debug (default): 1 node(s) "
                        "up, 4 CPUs and 0 GPUs per node, time limit 60 min"),
    ({"nodes": 2}, "slurm.nodes=2: more nodes than the partition has"),
    ({"mem_gb": 100}, "slurm: the cluster refuses the request (partition='debug', nodes=1, cpus_per_task=1, "
                      "time_min=30, mem_gb=100): allocation failure: Requested node configuration is not available"),
    ({"partiton": "debug"}, "slurm: unknown parameter(s) ['partiton'] (did you mean 'partition'?)"),
    ({"poll_s": 0.1}, "slurm.poll_s=0.1: expected seconds >= 1"),
], ids=str)
def test_a_request_the_cluster_cannot_satisfy_fails_before_anything_is_submitted(cluster, corpus, tmp_path, capsys,
                                                                                  settings, message):
    sweep_dir = tmp_path / "sweep"
    before = squeue_ids(cluster)
    with pytest.raises(SystemExit) as exit_:
        launch.main(["sweep", "--backend", "slurm", "-y", json.dumps(dict(
            grid=GRID, seeds=[0], base=fast_params(corpus), sweep_dir=str(sweep_dir), slurm=settings))])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not sweep_dir.exists() and squeue_ids(cluster) == before


def test_no_sbatch_or_no_controller_is_one_line_before_anything(cluster, corpus, tmp_path):
    spec = dict(grid=GRID, seeds=[0], base=fast_params(corpus), sweep_dir=str(tmp_path / "sweep"), backend="slurm")
    (tmp_path / "empty").mkdir()
    bare = python_env(PATH=str(tmp_path / "empty"))  # no SLURM commands (nor anything else) on PATH
    r = subprocess.run([PYTHON, "-m", "embxlib.launch", "sweep", "-y", json.dumps(spec)], capture_output=True,
                       text=True, env=bare, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "backend=slurm: sbatch is not on PATH" in r.stderr and "or use backend: local" in r.stderr
    down = tmp_path / "down.conf"  # the controller's port, with nothing listening there
    down.write_text("\n".join(f"SlurmctldPort={_closed_port()}" if line.startswith("SlurmctldPort=") else line
                              for line in cluster.conf.read_text().splitlines()))
    t = time.time()
    r = subprocess.run([PYTHON, "-m", "embxlib.launch", "sweep", "-y", json.dumps(spec)], capture_output=True,
                       text=True, env=python_env(SLURM_CONF=str(down)), cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "backend=slurm: the SLURM controller does not answer (sinfo: slurm_load_partitions: Unable to contact " \
           "slurm controller (connect failure))" in r.stderr and time.time() - t < 60
    assert not (tmp_path / "sweep").exists()


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_two_node_job_runs_one_launcher_per_node_with_the_rendezvous_from_slurm(tmp_path):
    """One node here: the script and each node's launch settings are checked, not a two-node run."""
    pytest.importorskip("submitit")
    s = slurm.resources(slurm.check_settings({"nodes": 2, "partition": "gpu", "account": "lab", "time_min": 40,
                                              "sbatch": {"qos": "high"}}), [launch.resolve({"preset": "medium"})], 4)
    script = slurm.sbatch_script(slurm.executor(s, tmp_path, "embx-x"), 3)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --time=40", "#SBATCH --partition=gpu", "#SBATCH --account=lab",
                 "#SBATCH --qos=high", "#SBATCH --requeue", "#SBATCH --array=0-2%3", "#SBATCH --signal=TERM@90"):
        assert line in script.splitlines(), script
    assert "srun --unbuffered" in script and f"cd {ROOT}" in script
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "4711"}
    assert slurm.node_settings({**env, "SLURM_NODEID": "0"}) == dict(nnodes=2, node_rank=0, master_addr="gpu03",
                                                                     master_port=24711)
    assert slurm.node_settings({**env, "SLURM_NODEID": "1"})["node_rank"] == 1
    cfg = launch.resolve({"preset": "medium"}, 8)
    settings = launch.check_settings(dict(nproc_per_node=4, **slurm.node_settings({**env, "SLURM_NODEID": "1"}),
                                          run_name="r", runs_root=str(tmp_path)))
    cmd = launch.command(settings, tmp_path / "r", resume=False)
    assert cmd[3:8] == ["--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=gpu03",
                        "--master_port=24711"], cmd
    # every node's trainer starts from the config the launcher validated and wrote into the run folder
    assert cmd[-4:] == ["--run-dir", str(tmp_path / "r"), "--config", str(tmp_path / "r" / "config.json")], cmd
    assert cfg.preset == "medium"
    assert slurm.node_settings({}) == dict(nnodes=1, node_rank=0)
    # the other nodes start as node 0 decided for this attempt (new or resume), whatever the folder shows later
    run = tmp_path / "r"
    run.mkdir()
    (run / SLURM_RECORD).write_text(json.dumps({"attempt": "4711#0", "state": "new"}))
    with pytest.raises(TimeoutError, match="node 0 did not record attempt 4711#1"):
        slurm.node0_state(run, "4711#1", timeout_s=1)
    (run / SLURM_RECORD).write_text(json.dumps({"attempt": "4711#1", "state": "resumable"}))
    assert slurm.node0_state(run, "4711#1", timeout_s=1) == "resumable"
    assert slurm.first_host("cpu1,gpu[03-05,07]") == "cpu1" and slurm._minutes("2-00:00:00") == 2880
    assert slurm._gpus("gpu:h100:8(S:0-1)") == 8 and slurm._minutes("infinite") is None
