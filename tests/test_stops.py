"""How a run ends: stopped by a signal (SIGTERM, SIGHUP, SIGINT; at a step boundary, mid-step, mid-checkpoint; one
process and two under torchrun), bounded by --max-steps, refused when a resume would extend a finished run, go back
before its checkpoint or continue an edited config. Real trainers, real signals (os.kill), real files; the tests
only choose the moment a signal is sent. fp32: the same code paths, many times faster on a CPU without bf16."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from embxlib import train
from embxlib.checkpoint import load_checkpoint
from embxlib.config import Config
from embxlib.runfolder import RunLog
from conftest import FAST, PYTHON, python_env

FAST32 = [*FAST, "--precision", "fp32"]
SIX = ["--num-iterations", "6", "--save-every", "2"]


def read_json(path):
    return json.loads(Path(path).read_text())


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def args(corpus, run, *extra):
    return [*FAST32, "--data-dir", str(corpus), "--run-dir", str(run), *map(str, extra)]


def model_state(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


def assert_same_run(a, b):
    """b (stopped and resumed) ends exactly as a (uninterrupted): every validation, every weight, the optimiser."""
    assert [(r["step"], r["val_loss"]) for r in metrics(b)] == [(r["step"], r["val_loss"]) for r in metrics(a)]
    ca, cb = model_state(a), model_state(b)
    torch.testing.assert_close(cb["model"], ca["model"], rtol=0, atol=0)
    assert cb["stream"] == ca["stream"]  # position, epoch and the shards' fingerprints: plain data
    for opt in ("adam", "muon"):
        torch.testing.assert_close(cb[opt]["state"], ca[opt]["state"], rtol=0, atol=0)


def assert_stopped_cleanly(run, name, checkpoint_step):
    summary = read_json(run / "summary.json")
    assert summary["status"] == "stopped" and summary["error"] == f"stopped by {name}", summary
    assert f"# STOPPED on rank 0: stopped by {name}; --resume {run} continues" in (run / "log.txt").read_text()
    assert not (run / "run.lock").exists() and list(run.glob("*.tmp")) == []
    assert model_state(run)["step"] == checkpoint_step  # the last good checkpoint, whole


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 6-step run, checkpointing every 2 steps."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train.main(args(corpus, run, *SIX))
    return run


def send_at(monkeypatch, target, name, when, signum):
    """Wrap target.name so that the process signals itself (a real signal through the kernel) when when(*args)."""
    real = getattr(target, name)

    def wrapped(*a, **k):
        if when(*a, **k):
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs at the next bytecode: here, inside this wrapper
        return real(*a, **k)
    monkeypatch.setattr(target, name, wrapped)


@pytest.mark.slow
@pytest.mark.parametrize("moment, signame", [("step boundary", "SIGTERM"), ("mid-step", "SIGHUP"),
                                             ("mid-checkpoint", "SIGINT")])
def test_a_stopped_run_says_so_and_resumes_bit_for_bit(corpus, tmp_path, monkeypatch, reference, moment, signame):
    run, signum = tmp_path / "run", getattr(signal, signame)
    with monkeypatch.context() as m:
        if moment == "step boundary":  # right after step 3's line is logged
            send_at(m, RunLog, "line", lambda self, s, *a, **k: s.startswith("step:3/6 train_loss"), signum)
        elif moment == "mid-step":  # step 4 (index 3): after its backward, before the optimisers step
            send_at(m, train, "apply_schedules", lambda step, *a: step == 3, signum)
        else:  # while the step-4 checkpoint is being written: half of it is in checkpoint.pt.tmp
            real_save = torch.save

            def save(obj, f, *a, **k):
                if obj.get("step") != 4:
                    return real_save(obj, f, *a, **k)

                class Half:
                    def __init__(self):
                        self.n = 0

                    def write(self, b):
                        self.n += len(b)
                        if self.n > 2**20 and not getattr(self, "sent", False):
                            self.sent = True
                            os.kill(os.getpid(), signum)
                            time.sleep(1)
                        return f.write(b)

                    def flush(self):
                        f.flush()
                return real_save(obj, Half(), *a, **k)
            m.setattr(torch, "save", save)
        with pytest.raises(SystemExit) as exit_:
            train.main(args(corpus, run, *SIX))
    assert exit_.value.code == 128 + signum
    assert_stopped_cleanly(run, signame, checkpoint_step=2)
    train.main(["--resume", str(run)])
    assert read_json(run / "summary.json")["status"] == "finished"
    assert_same_run(reference, run)


def start_torchrun(corpus, run, *extra, nproc=2):
    return subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             "-m", "embxlib.train", *extra] + ([] if "--resume" in extra else args(corpus, run, *SIX)),
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(run, text, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if (run / "log.txt").exists() and text in (run / "log.txt").read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended before {text!r}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"timed out waiting for {text!r}")


def ranks_of(proc):
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [int(c) for c in children]


@pytest.mark.slow
def test_torchrun_stopped_by_sigterm_or_a_dead_peer_leaves_a_true_record(corpus, tmp_path):
    """SIGTERM to torchrun (Slurm, timeout, docker stop): it passes it on to both ranks, the run says `stopped` and
    resumes to exactly the uninterrupted 2-process run. SIGKILL of rank 1 (the OOM killer): torchrun tears rank 0
    down, and the run says so too (no `running` left, lock released, no .tmp)."""
    full, stopped, peer = tmp_path / "full", tmp_path / "stopped", tmp_path / "peer"
    proc = start_torchrun(corpus, full)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]

    proc = start_torchrun(corpus, stopped)
    wait_for_line(stopped, "step:3/6 train_loss", proc)
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert_stopped_cleanly(stopped, "SIGTERM", checkpoint_step=2)
    proc = start_torchrun(corpus, stopped, "--resume", str(stopped))
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    assert_same_run(full, stopped)

    proc = start_torchrun(corpus, peer)
    wait_for_line(peer, "step:3/6 train_loss", proc)
    rank1 = next(p for p in ranks_of(proc)
                 if "LOCAL_RANK=1" in Path(f"/proc/{p}/environ").read_bytes().decode(errors="replace").split("\0"))
    os.kill(rank1, signal.SIGKILL)
    out = proc.communicate(timeout=120)[0]
    summary = read_json(peer / "summary.json")
    assert summary["status"] in ("stopped", "failed") and summary.get("error"), (summary, out[-3000:])
    log = (peer / "log.txt").read_text()
    assert "# STOPPED on rank 0" in log or "# FAILED on rank 0" in log
    assert not (peer / "run.lock").exists() and list(peer.glob("*.tmp")) == []


# --- --max-steps and resume ---------------------------------------------------------------------------

def refused(argv):
    """The trainer as a user starts it; a refusal comes at once (the old code trained on, or never stopped)."""
    r = subprocess.run([PYTHON, "-m", "embxlib.train", *argv], capture_output=True, text=True, env=python_env(),
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, (r.returncode, r.stderr[-2000:])
    return r.stderr


def snapshot(run):
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


@pytest.mark.slow
def test_max_steps_and_resume_never_pass_the_end_or_go_back(corpus, tmp_path, reference):
    assert "--max-steps -1: must be >= 1" in refused(args(corpus, tmp_path / "new", "--max-steps", "-1"))
    assert "--max-steps 0: must be >= 1" in refused(args(corpus, tmp_path / "new", "--max-steps", "0"))
    assert not (tmp_path / "new").exists()

    # a finished run is never extended or rewritten
    before = snapshot(reference)
    for extra in ([], ["--max-steps", "5"], ["--max-steps", "8"]):
        assert f"--resume {reference}: the run is finished (6 of 6 steps)" in refused(["--resume", str(reference),
                                                                                        *extra])
    assert snapshot(reference) == before

    # a run stopped by --max-steps continues, never past num_iterations and never back before its checkpoint
    run = tmp_path / "run"
    train.main(args(corpus, run, *SIX, "--max-steps", "4"))
    assert read_json(run / "summary.json")["status"] == "stopped"
    assert "--max-steps 3: below the step of" in refused(["--resume", str(run), "--max-steps", "3"])
    train.main(["--resume", str(run), "--max-steps", "5"])
    assert [r["step"] for r in metrics(run)] == [0, 2, 4, 5]
    train.main(["--resume", str(run), "--max-steps", "50"])  # at most num_iterations
    assert [r["step"] for r in metrics(run)] == [0, 2, 4, 5, 6]
    assert read_json(run / "summary.json")["status"] == "finished"
    steps = [int(line.split("/")[0][5:]) for line in (run / "log.txt").read_text().splitlines()
             if line.startswith("step:")]
    assert max(steps) == 6


@pytest.mark.slow
def test_a_resume_refuses_a_config_json_edited_since_the_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    train.main(args(corpus, run, *SIX, "--max-steps", "2"))
    cfg = read_json(run / "config.json")
    (run / "config.json").write_text(json.dumps({**cfg, "embed_lr": 0.5, "num_iterations": 8}))
    before = snapshot(run)
    err = refused(["--resume", str(run)])
    assert (f"--resume {run}: config.json differs from the config its checkpoint.pt was trained with: "
            f"num_iterations 6 in checkpoint.pt, 8 in config.json; embed_lr 0.3 in checkpoint.pt, 0.5 in "
            f"config.json") in err, err
    assert snapshot(run) == before


def test_a_run_stopped_before_its_first_checkpoint_does_not_offer_a_resume(corpus, tmp_path, monkeypatch):
    """Issue 33, Low: the stop line said "--resume continues from its last checkpoint" when there was none."""
    run = tmp_path / "run"
    with monkeypatch.context() as m, pytest.raises(SystemExit) as stop:
        send_at(m, train, "apply_schedules", lambda step, *a: step == 1, signal.SIGTERM)
        train.main(args(corpus, run, "--save-every", 0))  # the first checkpoint would be at the end
    assert stop.value.code == 128 + signal.SIGTERM and not (run / "checkpoint.pt").exists()
    log = (run / "log.txt").read_text()
    assert "# STOPPED on rank 0: stopped by SIGTERM\n" in log and "--resume" not in log


def test_a_resume_on_a_changed_training_shard_is_refused_naming_it(corpus, tmp_path, capsys):
    """Issue 33, M-h: a train shard rewritten (same size) between a stop and a resume: the resume finished on other
    data and nothing recorded it. The checkpoint records each shard's size and hash; a resume compares them."""
    import shutil

    import numpy as np
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(corpus, data)
    train.main(args(data, run, "--max-steps", 2))
    shard = sorted(data.glob("*_train_*.bin"))[0]
    raw = np.fromfile(shard, dtype=np.uint16)
    raw[256:] = np.random.default_rng(0).permutation(raw[256:])  # the header kept, the tokens shuffled in place
    raw.tofile(shard)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{shard.name}: same size, other content" in err and err.count("\n") == 1, err


def test_no_checkpoint_advice_does_not_go_in_a_circle(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("step:0/4 val_loss:10.8 train_time:0ms step_avg:0ms\n")
    err = refused(args(corpus, run))
    assert "already exists and is not empty" in err and "it holds no checkpoint.pt to resume from" in err
    assert "--resume" not in err
    err = refused(["--resume", str(run)])
    assert "no checkpoint.pt there to continue from" in err and "start a new run in another folder" in err


def test_a_corrupt_checkpoint_is_called_corrupt(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"checkpoint.pt: corrupt: not a checkpoint as torch.save writes one") as e:
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert "could run code" not in str(e.value)


def test_the_log_names_the_interpreter_and_the_torch_build():
    cfg = Config()
    lines = train.header_lines(cfg, ["python -m embxlib.train"], 1, 1, torch.device("cpu"), "abc (clean)")
    found = [s for s in lines if s.startswith("python: ")]
    assert found == [f"python: {os.sys.executable}; torch: {torch.__version__} (git {torch.version.git_version}, "
                     f"debug {torch.version.debug}) from {Path(torch.__file__).parent}"]


def test_the_launcher_reads_which_python_trained(tmp_path):
    from embxlib import launch
    lines = train.header_lines(Config(), ["x"], 1, 1, torch.device("cpu"), "abc (clean)")
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\nstep:0/4 val_loss:10.8 train_time:0ms step_avg:0ms\n")
    assert launch.trained_with(tmp_path) == os.sys.executable
    assert launch.trained_with(tmp_path / "missing") is None


@pytest.mark.slow
def test_a_shard_truncated_under_a_running_trainer_fails_the_run_naming_it(corpus, tmp_path):
    """The stream reads its batches from the files (not a memory map, where this was a SIGBUS that no Python code
    survives): the run fails with an error naming the shard, in its summary and log."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    run = tmp_path / "run"
    proc = subprocess.Popen([PYTHON, "-m", "embxlib.train", *FAST32, "--data-dir", str(data), "--run-dir", str(run),
                             "--num-iterations", "400", "--val-loss-every", "1000"], env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_line(run, "step:2/400 train_loss", proc)
    for shard in data.glob("*_train_*.bin"):
        os.truncate(shard, 1024)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "ShardError" in summary["error"] and "_train_" in summary["error"]
    assert "is shorter than when training started" in (run / "log.txt").read_text()
