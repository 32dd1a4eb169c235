"""Sweeps on a SLURM cluster (`backend: slurm`): every (variant, seed) run is one task of a job array submitted with
submitit; the task runs launch() on its node, i.e. the same `torchrun ... -m embxlib.train` into the same run folder
as the local backend, so skips, resumes, summary.csv and the live view are the local backend's.

    python -m embxlib.launch sweep --backend slurm -y '{grid: {extra_embeds: [0, 1]}, seeds: [0, 1],
                                                       slurm: {partition: gpu, time_min: 60}}'
    python -m embxlib.launch cancel runs/sweep          # scancel every job that sweep submitted

The cluster is asked before anything is submitted (sinfo, scontrol, sbatch --test-only): a partition, account or
resource it cannot give fails with one line naming the setting and what it offers. Each run folder keeps its job id
in slurm.json: a rerun of the sweep watches jobs still queued or running instead of submitting them again. A task
stopped by SIGTERM (preemption, `scancel --signal=TERM`, the time limit) requeues itself and resumes from the run's
checkpoint. The time limit's warning is a SIGTERM too (--signal=TERM@signal_delay_s), not submitit's USR2: SLURM
sends it to every process of the job, and a USR2 kills the trainers before they can record anything. Watching
costs one squeue per poll_s for the whole sweep.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from . import ROOT
from .checkpoint import run_state
from .config import unknown_names
from .runfolder import (FAILURE_CAUSE, SLURM_RECORD, clock, first_line, move_aside, read_json, record_death,
                        write_json_atomically)
from .stops import signals_interrupt

JOBS_FOLDER = "slurm"  # <sweep_dir>/slurm/: submitit's pickles, the array's script and every job's log
TOOLS = ("sbatch", "squeue", "sinfo", "scancel", "scontrol")
# the keys of a sweep's `slurm:` mapping, with their defaults (None: derived from the preset and world size)
SETTINGS = dict(partition="", account="", time_min=None, nodes=1, gpus_per_node=None, cpus_per_task=None,
                mem_gb=None, max_parallel=0, sbatch={}, poll_s=5.0, signal_delay_s=90, max_requeues=10, wait=True)
MIN_POLL_S = 1.0  # the controller is shared: never more than one squeue a second, whatever the sweep's size
# states in which a job may still run (squeue's long names); anything else, or a job squeue no longer knows, ended
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
          "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "SPECIAL_EXIT", "STOPPED"}
TIME_MIN = {"tiny": 30}  # default time limit by preset (minutes); the others, a medium run with its compile: 90


class SlurmError(ValueError):
    """The cluster cannot run the sweep as asked (raised before anything is submitted)."""


# --- settings and the cluster's answers ---------------------------------------------------------------

def check_settings(slurm: dict | None) -> dict:
    slurm = {} if slurm is None else slurm
    if not isinstance(slurm, dict):
        raise ValueError(f"slurm={slurm!r}: expected a mapping of SLURM settings, e.g. "
                         f"{{partition: gpu, time_min: 60}}")
    message = unknown_names(slurm, SETTINGS)
    if message:
        raise ValueError(f"slurm: {message}; allowed: {sorted(SETTINGS)}")
    s = {**SETTINGS, **slurm}
    for k in ("partition", "account"):
        if not isinstance(s[k], str):
            raise ValueError(f"slurm.{k}={s[k]!r}: expected a name (text)")
    for k, low in (("time_min", 1), ("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("max_parallel", 0),
                   ("signal_delay_s", 0), ("max_requeues", 0)):
        if s[k] is not None and (isinstance(s[k], bool) or not isinstance(s[k], int) or s[k] < low):
            raise ValueError(f"slurm.{k}={s[k]!r}: expected an integer >= {low}")
    if s["mem_gb"] is not None and (isinstance(s["mem_gb"], bool) or not isinstance(s["mem_gb"], (int, float))
                                    or s["mem_gb"] <= 0):
        raise ValueError(f"slurm.mem_gb={s['mem_gb']!r}: expected a number of GB > 0")
    if isinstance(s["poll_s"], bool) or not isinstance(s["poll_s"], (int, float)) or s["poll_s"] < MIN_POLL_S:
        raise ValueError(f"slurm.poll_s={s['poll_s']!r}: expected seconds >= {MIN_POLL_S:g} (one squeue per poll)")
    if not isinstance(s["wait"], bool):
        raise ValueError(f"slurm.wait={s['wait']!r}: expected true or false")
    if not isinstance(s["sbatch"], dict):
        raise ValueError(f"slurm.sbatch={s['sbatch']!r}: expected a mapping of sbatch options, e.g. {{qos: high}}")
    for k in s["sbatch"]:
        if not isinstance(k, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", k):
            raise ValueError(f"slurm.sbatch: option {k!r}: expected an sbatch long option name, e.g. qos or mail-user")
    if s["time_min"] is not None:
        check_signal_delay(s)
    return s


def check_signal_delay(s: dict) -> None:
    """The time limit's warning (SIGTERM signal_delay_s before the end) must leave the job most of its time to
    train: at most half of time_min. (With time_min 1 and the default 90 s the warning came before the start, and
    the job stopped and requeued itself forever without a step.)"""
    if s["signal_delay_s"] > s["time_min"] * 30:
        raise ValueError(f"slurm.signal_delay_s={s['signal_delay_s']}: the time limit's warning would leave "
                         f"{max(0, s['time_min'] * 60 - s['signal_delay_s'])} s of a {s['time_min']}-min job to train; "
                         f"at most half the job: give time_min >= {-(-s['signal_delay_s'] // 30)} or signal_delay_s "
                         f"<= {s['time_min'] * 30}")


def on_gpu(cfg) -> bool:
    """Where a run trains on its node: as train's device=auto decides there (the tiny preset is the CPU one)."""
    return cfg.device == "cuda" or (cfg.device == "auto" and cfg.preset != "tiny")


def resources(s: dict, cfgs: list, nproc_per_node: int) -> dict:
    """The settings with what was left to derive filled in from the runs' presets and the world size: a GPU per
    process on a CUDA run, a CPU per process (four per GPU), the longest preset's time limit."""
    gpu = any(on_gpu(c) for c in cfgs)
    out = dict(s)
    if out["gpus_per_node"] is None:
        out["gpus_per_node"] = nproc_per_node if gpu else 0
    if out["cpus_per_task"] is None:
        out["cpus_per_task"] = nproc_per_node * (4 if gpu else 1)
    if out["time_min"] is None:
        out["time_min"] = max(TIME_MIN.get(c.preset, 90) for c in cfgs)
    check_signal_delay(out)
    return out


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"backend=slurm: {name} is not on PATH ({os.environ.get('PATH', '')}); this machine needs the "
                         f"SLURM client commands ({', '.join(TOOLS)}), or use backend: local")
    return path


def _call(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"backend=slurm: the SLURM controller does not answer ({' '.join(args[:1])} gave nothing in "
                         f"{timeout:.0f} s); check slurmctld, or use backend: local") from None


def _first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "failure" in line.lower()]
    return (errors or lines or ["no output"])[0]


def partitions() -> dict[str, dict]:
    """What sinfo offers, by partition: default, availability, nodes, CPUs and GPUs per node, time limit (minutes,
    None: unlimited). Raises SlurmError when a SLURM command is missing or the controller does not answer."""
    for tool in TOOLS:
        _tool(tool)
    r = _call("sinfo", "--noheader", "--format=%P|%a|%D|%c|%G|%l")
    if r.returncode != 0:
        raise SlurmError(f"backend=slurm: the SLURM controller does not answer (sinfo: {_first_error(r.stderr)}); "
                         f"check slurmctld (SLURM_CONF={os.environ.get('SLURM_CONF', '/etc/slurm/slurm.conf')}), "
                         f"or use backend: local")
    out: dict[str, dict] = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue
        name, avail, nodes, cpus, gres, limit = parts  # a line per partition and node state
        p = out.setdefault(name.rstrip("*"), dict(default=name.endswith("*"), up=False, nodes=0, cpus=0, gpus=0,
                                                  time_min=_minutes(limit)))
        p["up"] |= avail == "up"
        p["nodes"] += int(nodes)
        p["cpus"] = max(p["cpus"], int(cpus.rstrip("+")))
        p["gpus"] = max(p["gpus"], _gpus(gres))
    return out


def _minutes(limit: str) -> int | None:
    """sinfo's time limit ('infinite', '30:00', '1:00:00', '2-00:00:00') in whole minutes (None: unlimited)."""
    if limit in ("infinite", "n/a", "UNLIMITED"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    h, m, sec = {1: lambda: (0, parts[0], 0), 2: lambda: (0, *parts), 3: lambda: tuple(parts)}[len(parts)]()
    return (int(days or 0) * 24 + h) * 60 + m + (sec > 0)


def _gpus(gres: str) -> int:
    """GPUs per node from sinfo's GRES ('gpu:8', 'gpu:h100:8(S:0-1)', '(null)')."""
    return sum(int(m[1]) for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", gres))


def _offer(name: str, p: dict) -> str:
    limit = "no time limit" if p["time_min"] is None else f"time limit {p['time_min']} min"
    return (f"{name}{' (default)' if p['default'] else ''}: {p['nodes']} node(s) {'up' if p['up'] else 'DOWN'}, "
            f"{p['cpus']} CPUs and {p['gpus']} GPUs per node, {limit}")


def _partition_accounts(name: str) -> tuple[list[str] | None, list[str]]:
    r = _call("scontrol", "show", "partition", name, "--oneliner")
    allow = re.search(r"\bAllowAccounts=(\S+)", r.stdout)
    deny = re.search(r"\bDenyAccounts=(\S+)", r.stdout)
    allowed = None if not allow or allow[1] == "ALL" else allow[1].split(",")
    return allowed, [] if not deny or deny[1] == "(null)" else deny[1].split(",")


def check_cluster(s: dict, n: int = 1) -> dict:
    """The request (an array of n runs) against what the cluster offers; returns the settings with the partition
    filled in. Every refusal is one line naming the setting and what sinfo offers, before anything is submitted:
    our own checks first (their messages are clearer), then the controller's verdict on the very script."""
    offered = partitions()
    if not offered:
        raise SlurmError("backend=slurm: sinfo lists no partitions; this cluster has nowhere to run jobs")
    everything = "; ".join(_offer(n, p) for n, p in offered.items())
    name = s["partition"]
    if not name:
        defaults = [n for n, p in offered.items() if p["default"]]
        if not defaults:
            raise SlurmError(f"slurm.partition='': the cluster has no default partition; set one of: {everything}")
        name = defaults[0]
    elif name not in offered:
        raise SlurmError(f"slurm.partition={name!r}: no such partition; sinfo offers: {everything}")
    p = offered[name]
    where = f"partition {_offer(name, p)}"
    if not p["up"]:
        raise SlurmError(f"slurm.partition={name!r}: the partition is down; sinfo offers: {everything}")
    if s["nodes"] > p["nodes"]:
        raise SlurmError(f"slurm.nodes={s['nodes']}: more nodes than the partition has; {where}")
    if s["cpus_per_task"] > p["cpus"]:
        raise SlurmError(f"slurm.cpus_per_task={s['cpus_per_task']}: more CPUs than a node has; {where}")
    if s["gpus_per_node"] > p["gpus"]:
        raise SlurmError(f"slurm.gpus_per_node={s['gpus_per_node']}: more GPUs than a node has; {where}"
                         + ("; a run on the CPU: device: cpu (or the tiny preset)" if not p["gpus"] else ""))
    if p["time_min"] is not None and s["time_min"] > p["time_min"]:
        raise SlurmError(f"slurm.time_min={s['time_min']}: over the partition's time limit; {where}")
    allowed, denied = _partition_accounts(name)
    account = s["account"]
    if allowed is not None and account not in allowed:
        raise SlurmError(f"slurm.account={account!r}: partition {name!r} takes only the account(s) {allowed}")
    if account and account in denied:
        raise SlurmError(f"slurm.account={account!r}: partition {name!r} denies it (DenyAccounts={','.join(denied)})")
    s = {**s, "partition": name}
    with tempfile.TemporaryDirectory(prefix="embxlib-slurm-") as folder:
        test_only(executor(s, Path(folder), "embx-test-only"), n, s)
    return s


# --- submitting --------------------------------------------------------------------------------------

def executor(s: dict, folder: Path, job_name: str):
    import submitit
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=s["max_requeues"])
    # TERM, not submitit's USR2, before the time limit (see the module's docstring); requeue: also after a node failure
    extra = {"requeue": True, "signal": f"TERM@{s['signal_delay_s']}",
             **{k.replace("_", "-"): v for k, v in s["sbatch"].items()}}
    params = dict(job_name=job_name, partition=s["partition"], time=s["time_min"], nodes=s["nodes"], ntasks_per_node=1,
                  cpus_per_task=s["cpus_per_task"], signal_delay_s=s["signal_delay_s"], additional_parameters=extra,
                  # the node imports this checkout's embxlib (the one that pickled the job), from its root
                  setup=[f"cd {_quote(ROOT)}", f"export PYTHONPATH={_quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}"])
    if s["account"]:
        params["account"] = s["account"]
    if s["gpus_per_node"]:
        params["gpus_per_node"] = s["gpus_per_node"]
    if s["mem_gb"]:
        params["mem"] = f"{int(s['mem_gb'] * 1024)}MB"
    if s["max_parallel"]:
        params["array_parallelism"] = s["max_parallel"]
    ex.update_parameters(**params)
    return ex


def _quote(path) -> str:
    import shlex
    return shlex.quote(str(path))


def sbatch_script(ex, n: int) -> str:
    """The array's batch script as submitit writes it (for sbatch --test-only, and to show)."""
    from submitit.slurm.slurm import _make_sbatch_string
    return _make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder,
                               map_count=n if n > 1 else None, **ex.parameters)


def test_only(ex, n: int, s: dict) -> None:
    """sbatch --test-only on the very script: the controller's own verdict (an account it does not know, a
    configuration no node has) without submitting."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="embxlib-test-only-") as f:
        f.write(sbatch_script(ex, n))
        f.flush()
        r = _call("sbatch", "--test-only", f.name)
    if r.returncode != 0:
        asked = ", ".join(f"{k}={s[k]!r}" for k in ("partition", "account", "nodes", "cpus_per_task", "gpus_per_node",
                                                       "time_min", "mem_gb", "sbatch") if s[k] not in (None, "", {}, 0))
        offered = "; ".join(_offer(k, p) for k, p in partitions().items())
        raise SlurmError(f"slurm: the cluster refuses the request ({asked}): {_first_error(r.stderr)}; sinfo offers: "
                         f"{offered}")


class RunJob:
    """One run as a submitit job: launch (embxlib.launch.launch, given by the sweep) on the node into its run
    folder, then show (launch.show_run) its loss figure. submitit pickles this object (the two functions by name); a
    requeued job runs it again unchanged: the run folder's checkpoint is where it continues."""

    def __init__(self, name: str, params: dict, sweep_dir: str, nproc_per_node: int, config: str | None,
                 max_requeues: int, launch, show):
        self.name, self.params, self.sweep_dir = name, params, sweep_dir
        self.nproc_per_node, self.config, self.max_requeues = nproc_per_node, config, max_requeues
        self.launch, self.show = launch, show

    def __call__(self):
        # a SIGTERM from here on stops the job (submitit's own handler ignores it): raised as KeyboardInterrupt,
        # then either requeued or recorded below
        with signals_interrupt():
            return self._run()

    def _run(self):
        env = os.environ
        run_dir = Path(self.sweep_dir) / self.name
        node_rank = int(env.get("SLURM_NODEID", "0"))
        job = job_id_here()
        print(f"# {self.name}: job {job} on {_node()} (node {node_rank}), restart "
              f"{env.get('SLURM_RESTART_COUNT', '0')}, {datetime.now():%Y-%m-%d %H:%M:%S}", flush=True)
        state = job_state(job)
        if state not in ("RUNNING", "UNKNOWN"):  # cancelled while Python started, when submitit ignored the SIGTERM
            print(f"# {self.name}: job {job} is {state}, not starting", flush=True)
            return str(run_dir)
        if "OMP_NUM_THREADS" not in env and env.get("SLURM_CPUS_PER_TASK"):  # launch() would take the machine's
            env["OMP_NUM_THREADS"] = str(max(1, int(env["SLURM_CPUS_PER_TASK"]) // self.nproc_per_node))
        attempt = f"{job}#{env.get('SLURM_RESTART_COUNT', '0')}"
        try:
            if node_rank == 0:
                self._prepare(run_dir, job, attempt)
            self.launch(self.params, echo=lambda line: print(line, flush=True), config=self.config,
                          run_name=self.name, runs_root=self.sweep_dir, resume=True, progress=False,
                          nproc_per_node=self.nproc_per_node, **node_settings(env),
                          node0_state=None if node_rank == 0 else node0_state(run_dir, attempt))
        except BaseException as e:
            if node_rank == 0 and stopped_by_sigterm(run_dir, e) and self._requeue(job, run_dir):
                sys.exit(f"{self.name}: stopped by SIGTERM; requeued job {job}, it resumes from {run_dir}")
            if node_rank == 0:
                _note(run_dir, error=first_line(e), ended=_now())
            raise
        if node_rank == 0:
            _note(run_dir, error=None, ended=_now())
            import matplotlib
            matplotlib.use("Agg")
            self.show(run_dir)  # loss.png, as the run notebook saves it
        return str(run_dir)

    def _prepare(self, run_dir: Path, job: str, attempt: str) -> None:
        """Node 0, before its trainer starts: a folder without a checkpoint aside, then this attempt's record (with
        the state the other nodes go by)."""
        record = read_json(run_dir / SLURM_RECORD) or {}
        if run_state(run_dir) == "broken":  # stopped before its first checkpoint: aside, start again
            aside = move_aside(run_dir, print)
            print(f"# {run_dir.name}: no checkpoint, moved to {aside.name}, starting again", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(run_dir / SLURM_RECORD, {**record, "job_id": job, "node": _node(), "started": _now(),
                                                        "ended": None, "error": None, "attempt": attempt,
                                                        "state": run_state(run_dir),
                                                        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))})

    def _requeue(self, job: str, run_dir: Path) -> bool:
        """Requeue after a SIGTERM, unless the job is being cancelled (scancel without --signal, our cancel())
        or has been requeued max_requeues times."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        record = read_json(run_dir / SLURM_RECORD) or {}
        state = job_state(job)
        if record.get("cancelled") or state != "RUNNING" or restarts >= self.max_requeues:
            print(f"# {self.name}: not requeued (job state {state}, restarts {restarts} of {self.max_requeues}"
                  f"{', cancelled by the sweep' if record.get('cancelled') else ''})", flush=True)
            return False
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        print(f"# {self.name}: stopped by SIGTERM, scontrol requeue {job}: "
              f"{'done' if r.returncode == 0 else _first_error(r.stderr)}", flush=True)
        return r.returncode == 0


def node0_state(run_dir: Path, attempt: str, timeout_s: float = 600, poll_s: float = 0.5) -> str:
    """On the other nodes of a multi-node job: the run folder's state as node 0 found it for this attempt (job id
    and restart count), from the record node 0 writes before its trainer starts."""
    end = time.time() + timeout_s
    while time.time() < end:
        record = read_json(run_dir / SLURM_RECORD) or {}
        if record.get("attempt") == attempt and record.get("state"):
            return record["state"]
        time.sleep(poll_s)
    raise TimeoutError(f"{run_dir / SLURM_RECORD}: node 0 did not record attempt {attempt} in {timeout_s:.0f} s")


def _node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _note(run_dir: Path, **fields) -> None:
    record = read_json(run_dir / SLURM_RECORD) or {}
    try:
        write_json_atomically(run_dir / SLURM_RECORD, {**record, **fields})
    except OSError as e:
        print(f"error: could not update {run_dir / SLURM_RECORD}: {e}", file=sys.stderr, flush=True)


def job_id_here() -> str:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def node_settings(env) -> dict:
    """launch()'s multi-node settings from the job's environment: one launcher per node (srun's task), node 0's
    host as the rendezvous, a port from the job id (two jobs sharing a node do not collide)."""
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    out = dict(nnodes=nnodes, node_rank=int(env.get("SLURM_NODEID", "0")))
    if nnodes > 1:
        out["master_addr"] = first_host(env["SLURM_JOB_NODELIST"])
        out["master_port"] = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    return out


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[03-05,07],cpu1' -> 'gpu03')."""
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    return m[1] + (m[2] or "") if m else nodelist


def stopped_by_sigterm(run_dir: Path, e: BaseException) -> bool:
    summary = read_json(run_dir / "summary.json") or {}
    part = summary.get("resume") or summary
    if part.get("status") == "failed":  # a rank died by itself (the launcher recorded it): not a stop to requeue
        return False
    return "SIGTERM" in str(e) or (part.get("status") == "stopped" and "SIGTERM" in str(part.get("error")))


# --- the queue ------------------------------------------------------------------------------------------

def job_state(job: str) -> str:
    r = subprocess.run(["scontrol", "show", "job", job, "--oneliner"], capture_output=True, text=True, timeout=30)
    m = re.search(r"\bJobState=(\S+)", r.stdout)
    return m[1] if m else "UNKNOWN"


def queue(job_ids) -> dict[str, dict] | None:
    """One squeue for every job given ('12_3' or '15'): job id -> state, reason, node. None when the controller
    did not answer (then nothing is known to have ended)."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    r = subprocess.run([_tool("squeue"), "--noheader", "--array", "--states=all", f"--jobs={','.join(arrays)}",
                        "--format=%i|%T|%r|%N"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        # every id purged from the controller's memory (MinJobAge after their end): they have ended
        return {} if "Invalid job id" in r.stderr else None
    out = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            out[parts[0]] = dict(state=parts[1].split()[0], reason=parts[2], node=parts[3])
    return out


def cancel(sweep_dir, echo=print) -> list[str]:
    """scancel every job the sweep in sweep_dir submitted that may still run (by the job ids in its run folders);
    the runs are marked so that their jobs do not requeue themselves on the SIGTERM. Returns the job ids."""
    from . import at_root
    sweep_dir = at_root(sweep_dir)
    records = {d: read_json(d / SLURM_RECORD) for d in sorted(sweep_dir.iterdir()) if (d / SLURM_RECORD).is_file()} \
        if sweep_dir.is_dir() else {}
    ids = {d: r["job_id"] for d, r in records.items() if r and r.get("job_id")}
    live = queue(ids.values())
    active = {d: j for d, j in ids.items() if live is None or (live.get(j, {}).get("state") in ACTIVE)}
    for d in active:
        _note(d, cancelled=_now())
    if active:
        r = subprocess.run([_tool("scancel"), *active.values()], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            echo(f"scancel: {_first_error(r.stderr)}")
    echo(f"cancelled {len(active)} job(s) of {sweep_dir}: {' '.join(active.values()) or 'none was queued or running'}")
    return list(active.values())


# --- the sweep -----------------------------------------------------------------------------------------

def recorded_job(run_dir: Path) -> str | None:
    """The run's job id from its record; for a submission that stopped before it wrote the id, the job squeue
    lists under the submission's name (then written into the record), else None: it was never submitted."""
    record = read_json(run_dir / SLURM_RECORD) or {}
    pending = record.get("pending")
    if not pending:
        return record.get("job_id")
    r = _call("squeue", "--noheader", "--array", "--states=all", f"--name={pending['job_name']}", "--format=%i")
    ids = r.stdout.split() if r.returncode == 0 else []
    if r.returncode != 0:
        raise SlurmError(f"backend=slurm: squeue did not answer ({_first_error(r.stderr)}); nothing was submitted")
    want = [i for i in ids if i.endswith(f"_{pending['task']}")] if pending.get("array") else ids[:1]
    if not want:
        _note(run_dir, pending=None)
        return None
    _note(run_dir, job_id=want[0], pending=None, submitted=record.get("submitted") or _now())
    return want[0]


def describe(info: dict | None, run_dir: Path) -> tuple[str, bool]:
    """(the words for a job's state, whether it has ended)."""
    if info is not None and info["state"] in ACTIVE:
        state = info["state"]
        if state == "PENDING":
            return f"pending ({info['reason']})" if info["reason"] not in ("None", "") else "pending", False
        if state == "RUNNING":
            return f"running on {info['node']}", False
        return state.lower(), False
    summary = read_json(run_dir / "summary.json") or {}
    status = summary.get("status", "missing")
    if status == "finished":
        final = summary.get("final_val_loss")
        return "finished" + (f", final val_loss {final:.4f}" if isinstance(final, (int, float)) else ""), True
    return f"{status if status != 'running' else 'failed'} ({job_error(run_dir, info)})", True


def job_error(run_dir: Path, info: dict | None) -> str:
    """Why a job that ended did not finish its run: the trainer's error, else the job's (its record, its log)."""
    summary = read_json(run_dir / "summary.json") or {}
    part = summary.get("resume") if summary.get("status") == "finished" else summary
    if part and part.get("error") and part.get("status") != "running":
        return part["error"]
    record = read_json(run_dir / SLURM_RECORD) or {}
    if record.get("error"):
        return record["error"]
    log = Path(record.get("log", ""))
    if log.is_file():
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
        causes = [line for line in lines if "slurmstepd" in line or FAILURE_CAUSE.match(line)]
        if causes:
            return causes[-1]
    state = (info or {}).get("state")
    return f"job {record.get('job_id')} ended {state}" if state else f"job {record.get('job_id')} ended (no log)"


def sweep(runs: list[tuple[str, dict]], cfgs: list, sweep_dir: Path, nproc_per_node: int, config, s: dict,
          tell, echo, launch, show):
    """The slurm backend of launch.sweep (which has checked the runs, holds the sweep's lock and writes summary.csv):
    submit the runs that are neither finished nor queued as one array, watch every job to its end (unless
    slurm.wait is false). Returns the failed runs' errors."""
    n = len(runs)
    s = check_cluster(resources(s, cfgs, nproc_per_node), n)
    known = {name: recorded_job(sweep_dir / name) for name, _ in runs}
    live = queue([j for j in known.values() if j])
    if live is None:
        raise SlurmError("backend=slurm: squeue did not answer; nothing was submitted (a rerun continues)")
    todo, watching = [], {}
    for i, (name, p) in enumerate(runs):
        run_dir = sweep_dir / name
        job = known[name]
        if job and live.get(job, {}).get("state") in ACTIVE:
            echo(f"[{i + 1}/{n}] {name}: job {job} is {live[job]['state'].lower()}, not submitted again")
            watching[name] = job
            continue
        state = run_state(run_dir)
        if state == "finished":
            echo(f"[{i + 1}/{n}] {name}: finished, skipped")
            continue
        if state == "broken":
            aside = move_aside(run_dir, echo)
            echo(f"[{i + 1}/{n}] {name}: no checkpoint, moved to {aside.name}, starting again")
        todo.append((name, p))
    try:
        configs = {name: cfg.to_dict() for (name, _), cfg in zip(runs, cfgs)}
        return _submit_and_watch(todo, watching, runs, sweep_dir, nproc_per_node, config, s, tell, launch, show,
                                 configs)
    except KeyboardInterrupt:  # Ctrl-C, the notebook's stop button, a SIGTERM or SIGHUP of this process
        tell("interrupted: cancelling the sweep's jobs")
        cancel(sweep_dir, tell)
        raise


def _submit_and_watch(todo, watching, runs, sweep_dir, nproc_per_node, config, s, tell, launch, show,
                      configs: dict) -> dict[str, str]:
    """One array for the runs to do (one sbatch: all of them or none), their job ids and configs (configs: run name
    -> the validated Config's dict) into their folders, then the watch over these and the jobs found still queued
    (watching: run name -> job id). The config in slurm.json is what a rerun compares before it watches a job still
    queued, which has written nothing else (checkpoint.reuse_problem)."""
    folder = sweep_dir / JOBS_FOLDER
    if todo:
        # a name of this submission's own, in every run's record before sbatch: a sweep stopped between sbatch and
        # the job ids below finds its jobs by it when run again (recorded_job), instead of submitting them twice
        job_name = f"embx-{sweep_dir.name}-{datetime.now():%Y%m%d%H%M%S}-{os.getpid()}"
        ex = executor(s, folder, job_name)
        for k, (name, _) in enumerate(todo):
            (sweep_dir / name).mkdir(parents=True, exist_ok=True)
            previous = read_json(sweep_dir / name / SLURM_RECORD) or {}
            write_json_atomically(sweep_dir / name / SLURM_RECORD, dict(
                pending=dict(job_name=job_name, task=k, array=len(todo) > 1), config=configs[name],
                earlier_jobs=previous.get("earlier_jobs", []) + ([previous["job_id"]] if previous.get("job_id") else [])))
        jobs = [RunJob(name, p, str(sweep_dir), nproc_per_node, config and str(config), s["max_requeues"],
                       launch, show)
                for name, p in todo]
        t = time.time()
        submitted = ex.submit_array(jobs) if len(jobs) > 1 else [ex.submit(jobs[0])]
        took = time.time() - t
        for (name, _), job in zip(todo, submitted):  # merged: a job that started already has added its own fields
            _note(sweep_dir / name, job_id=job.job_id, pending=None, submitted=_now(), partition=s["partition"],
                  log=str(job.paths.stdout), err=str(job.paths.stderr))
            watching[name] = job.job_id
        first = submitted[0].job_id.split("_")[0]
        gpus = f", {s['gpus_per_node']} GPUs" if s["gpus_per_node"] else ""
        tell(f"submitted {len(todo)} run(s) as job {first}{' (an array)' if len(todo) > 1 else ''} to partition "
             f"{s['partition']} in {took:.2f} s ({datetime.now():%H:%M:%S}): {s['nodes']} node(s), "
             f"{s['cpus_per_task']} CPUs{gpus} and "
             f"{s['time_min']} min per run; job logs in {folder}")
    errors: dict[str, str] = {}
    if watching and s["wait"]:
        errors = watch({name: watching[name] for name, _ in runs if name in watching}, sweep_dir,
                       [name for name, _ in runs], s["poll_s"], tell)
    elif watching:
        tell(f"not waiting (slurm.wait: false): {len(watching)} job(s) queued; run the sweep again to watch them, "
             f"python -m embxlib.launch cancel {sweep_dir} to cancel them")
    return errors


def watch(jobs: dict[str, str], sweep_dir: Path, order: list[str], poll_s: float, tell) -> dict[str, str]:
    """Follow the jobs (run name -> job id) to their ends with one squeue per poll_s, one line per change of a
    job's state. Returns the failed runs' errors. A job whose run was left `running` (killed past every handler)
    is recorded failed, as the local launcher records such a death."""
    seen: dict[str, str] = {}
    unlisted: dict[str, int] = {}  # polls in a row that squeue did not list the job
    ended: set[str] = set()
    errors: dict[str, str] = {}
    n, start, silent = len(order), time.time(), False
    while len(ended) < len(jobs):
        live = queue(jobs.values())
        if live is None:
            if not silent:
                tell(f"squeue did not answer ({datetime.now():%H:%M:%S}); still watching")
            silent = True
        else:
            silent = False
            for name, job in jobs.items():
                if name in ended:
                    continue
                run_dir = sweep_dir / name
                info = live.get(job)
                unlisted[name] = 0 if info else unlisted.get(name, 0) + 1
                if info is None and unlisted[name] < 2:  # squeue lists an ended job for minutes: be sure
                    continue
                words, done = describe(info, run_dir)
                if done:
                    ended.add(name)
                    summary = read_json(run_dir / "summary.json") or {}
                    if summary.get("status") == "running":
                        record_death(run_dir, job_error(run_dir, info))
                    if not words.startswith("finished"):
                        errors[name] = job_error(run_dir, info)
                if seen.get(name) != words:
                    seen[name] = words
                    tell(f"[{order.index(name) + 1}/{n}] {name}: job {job} {words} ({datetime.now():%H:%M:%S}, "
                         f"{clock(time.time() - start)} into the sweep)")
        if len(ended) < len(jobs):
            time.sleep(poll_s)
    return errors
