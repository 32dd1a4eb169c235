"""Launch training runs from notebooks: torchrun as a subprocess, a tqdm bar, a console log, a loss figure; sweeps.

    papermill nbs/run_variant.ipynb out.ipynb -p extra_embeds 3        # one run (the notebook calls launch())
    python -m embxlib.launch demo                                      # the README's main job
    python -m embxlib.launch run --config runs/<run>/config.json --seed 1   # any run, flags as embxlib.train
    python -m embxlib.launch sweep -y '{grid: {extra_embeds: [0, 1]}, seeds: [0, 1]}'
    python -m embxlib.launch sweep --backend slurm -f sweep.yaml           # each run a SLURM job (embxlib/slurm.py)
    python -m embxlib.launch cancel runs/sweep                             # scancel a SLURM sweep's jobs

The bar lives here, in the parent; the ranks print plain `step:` lines (papermill's IOPub limits: only validation
lines reach the notebook's output, everything goes to <run>/console.log).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import typing
from collections import deque
from datetime import datetime
from pathlib import Path

from . import ROOT, at_root
from .checkpoint import reuse_problem, run_state
from .config import Config, add_config_args, build_config, coerce_value, unknown_names
from .runfolder import (FAILURE_CAUSE, RUN_LOCK, SLURM_RECORD, SWEEP_LOCK, FolderLock, FolderLocked,
                        check_folder_name, clock, default_run_name, end_torn_line, first_line, move_aside,
                        parse_step_line, rank_death, read_json, record_death, write_atomically, write_json_atomically,
                        write_text_atomically)
from .stops import kill_tree, signals_interrupt

if typing.TYPE_CHECKING:  # (annotations only: pandas is imported where a table is made)
    import pandas as pd

NOTEBOOK = ROOT / "nbs" / "run_variant.ipynb"
CONFIG_FIELDS = list(Config.__dataclass_fields__)
# launch settings of run_variant.ipynb besides the Config fields (defaults; a test keeps the notebook in step)
LAUNCH_SETTINGS = dict(nproc_per_node=None, nnodes=1, node_rank=0, master_addr="", master_port=29500,
                       run_name="", runs_root="runs", resume=False, progress=True)
NONE_DEFAULT_TYPES = dict(nproc_per_node=int)  # the type of a launch setting whose default is None
# parameters of nbs/sweep.ipynb and keys of `python -m embxlib.launch sweep -y` (defaults of the command line)
SWEEP_SETTINGS = dict(grid=None, seeds=[0], base={}, config=None, sweep_dir="runs/sweep", nproc_per_node=1,
                      backend="local", slurm={}, order="shuffled", repeat_first=False, control=False)
# the order of a seed's arms: shuffled by the seed (a drift of the machine within a seed does not favour the arm that
# always runs first), or fixed (the grid's order, as sweeps ran before)
ARM_ORDERS = ("shuffled", "fixed")
MAX_RUNS = 2000  # a sweep of more runs is refused with its count before anything is built (a grid typo: 1e6 runs)
BACKENDS = ("local", "slurm")  # local: one run after another here; slurm: each run a job (embxlib/slurm.py)


class LaunchError(RuntimeError):
    pass


# --- checking parameters before anything starts ------------------------------------------------------

def resolve(params: dict, world_size: int = 1, config=None) -> Config:
    """Config from notebook parameters on top of the config file, if one is given (None means: the file's value,
    else the preset's). Raises ValueError naming the parameter."""
    return build_config(params, at_root(config) if config else None).validate(world_size)


def default_nproc() -> int:
    import torch
    return torch.cuda.device_count() or 1


def check_injected(allowed) -> None:
    """papermill only warns about a -p/-y name that its notebook does not have, then runs with the default: a
    misspelt parameter would silently train the baseline. Fail on any name that papermill's injected cell
    ('# Parameters') set and that is not a parameter of the notebook."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    injected = [t.id for src in shell.user_ns.get("In", []) if src.startswith("# Parameters\n")
                for node in ast.parse(src).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)]
    message = unknown_names(injected, allowed)
    if message:
        raise ValueError(f"{message}; allowed: the parameters cell of this notebook")


def check_settings(s: dict) -> dict:
    message = unknown_names(s, LAUNCH_SETTINGS)
    if message:
        raise ValueError(f"{message}; allowed launch settings: {sorted(LAUNCH_SETTINGS)}")
    s = {**LAUNCH_SETTINGS, **s}
    for k, default in LAUNCH_SETTINGS.items():
        t = type(default) if default is not None else NONE_DEFAULT_TYPES.get(k)
        if t is not None and not (default is None and s[k] is None):
            s[k] = coerce_value(k, s[k], t)
    if s["nproc_per_node"] is None:
        s["nproc_per_node"] = default_nproc()
    for k in ("nproc_per_node", "nnodes"):
        if not isinstance(s[k], int) or s[k] < 1:
            raise ValueError(f"{k}={s[k]!r}: must be an integer >= 1")
    if not 0 <= s["node_rank"] < s["nnodes"]:
        raise ValueError(f"node_rank={s['node_rank']!r}: must be in 0..nnodes-1={s['nnodes'] - 1}")
    if s["nnodes"] > 1 and not s["master_addr"]:
        raise ValueError("master_addr='': several nodes need the address of node 0")
    if s["run_name"]:
        check_folder_name("run_name", s["run_name"])
    if not s["runs_root"]:
        raise ValueError("runs_root='': needs a folder (e.g. runs)")
    return s


def run_dir_for(cfg: Config, s: dict) -> Path:
    name = s["run_name"] or default_run_name(cfg.name, cfg.seed)
    return at_root(s["runs_root"]) / name


# --- the subprocess --------------------------------------------------------------------------------

def command(s: dict, run_dir: Path, resume: bool) -> list[str]:
    """torchrun's command line: a new run trains the validated config the launcher wrote to <run>/config.json, a
    resume continues the run folder with its own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={s['nproc_per_node']}"]  # = torchrun
    if s["nnodes"] == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={s['nnodes']}", f"--node_rank={s['node_rank']}", f"--master_addr={s['master_addr']}",
                f"--master_port={s['master_port']}"]
    cmd += ["-m", "embxlib.train"]
    if resume:
        return cmd + ["--resume", str(run_dir)]
    return cmd + ["--run-dir", str(run_dir), "--config", str(run_dir / "config.json")]


def launch(params: dict, echo=print, config=None, node0_state: str | None = None, **settings) -> Path:
    """Validate, start torchrun, stream its output to <run>/console.log and a tqdm bar (or, with progress=False,
    plain lines through echo), return the run folder. config: a config file the parameters override.
    Raises LaunchError with the failing rank's last lines if the run fails; no child process is left behind.
    node0_state: on a node other than 0, the run folder's state (run_state) as node 0 found it: the folder changes
    under the other nodes once node 0's trainer starts, and every node must agree on new or resume."""
    s = check_settings(settings)
    message = unknown_names(params, CONFIG_FIELDS)
    if message:
        raise ValueError(f"{message}; allowed: Config fields and the launch settings {sorted(LAUNCH_SETTINGS)}")
    world = s["nproc_per_node"] * s["nnodes"]
    cfg = resolve(params, world, config)
    run_dir = run_dir_for(cfg, s)
    problem = reuse_problem(run_dir, cfg)
    if problem:
        raise ValueError(f"run_name={run_dir.name!r}: {problem}")
    if (node0_state or run_state(run_dir)) == "finished":
        echo(f"{run_dir}: already finished, nothing to train")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # held until torchrun has ended: one launcher per folder (node 0's: the other nodes share its folder)
    with FolderLock(run_dir, RUN_LOCK, note=echo) if s["node_rank"] == 0 else contextlib.nullcontext():
        state = node0_state or run_state(run_dir)
        problem = reuse_problem(run_dir, cfg)  # again: another process may have started it meanwhile
        if problem:
            raise ValueError(f"run_name={run_dir.name!r}: {problem}")
        if state == "finished":
            echo(f"{run_dir}: already finished, nothing to train")
            return run_dir
        if state in ("resumable", "broken") and not s["resume"]:
            raise ValueError(f"run_name={run_dir.name!r}: {run_dir} already holds a run; runs are never overwritten "
                             f"(pick another run_name, or resume=True to continue it)")
        if state == "broken":
            raise ValueError(f"{run_dir} has no checkpoint to resume from; move it away or pick another run_name")
        if state == "new":  # the trainer starts from the config validated here, as it is
            write_json_atomically(run_dir / "config.json", cfg.to_dict())
        cmd = command(s, run_dir, resume=state == "resumable")
        threads = max(1, (os.cpu_count() or 1) // s["nproc_per_node"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
               "EMBXLIB_LAUNCHER_PID": str(os.getpid())}  # the trainers stop when this process is gone
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with signals_interrupt():  # SIGTERM/SIGHUP of this process stop the trainers as Ctrl-C does
            _stream(cmd, env, run_dir, cfg, s["progress"], echo)
    return run_dir


PLAIN_EVERY_S = 30  # with progress=False: a step line at least this often besides the validation lines


def _plain(step: int, total: int, elapsed: float, val_loss: float | str | None = None,
           left: float | None = None) -> str:
    """A progress line for a terminal or a notebook without widgets: step, val_loss, elapsed and remaining time."""
    left = f", about {clock(left)} left" if left is not None and step < total else ""
    loss = f"  val_loss {float(val_loss):.4f}" if val_loss is not None else ""
    return f"step {step}/{total}{loss}  elapsed {clock(elapsed)}{left}"


def _stream(cmd, env, run_dir: Path, cfg: Config, progress: bool, echo) -> None:
    from tqdm.auto import tqdm
    tail: deque[str] = deque(maxlen=400)  # (torchrun's failure report is at the end: about 10 lines a process)
    start = last = time.time()
    first = None  # (time, step) of the first step line: the rate excludes start-up
    causes: list[str] = []  # error lines from anywhere in the output: torchrun's report can push them out of the tail
    if end_torn_line(run_dir / "console.log"):
        echo(f"{run_dir / 'console.log'}: ended its torn last line (the previous launcher was stopped mid-write)")
    bar = tqdm(total=cfg.num_iterations, desc=run_dir.name, disable=not progress, mininterval=2.0)
    # a session of its own: on failure or interrupt the whole torchrun tree is killed, nothing is left running
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            cwd=ROOT, start_new_session=True)
    try:
        with open(run_dir / "console.log", "a", buffering=1) as con:
            con.write(f"$ {' '.join(cmd)}\n")
            for line in proc.stdout:
                con.write(line)
                tail.append(line.rstrip("\n"))
                if len(causes) < 8 and FAILURE_CAUSE.match(line.strip()) and line.strip() not in causes:
                    causes.append(line.strip())
                m = parse_step_line(line.rstrip("\n"), anywhere=True)
                if not m:
                    if line.startswith(("# ", "Warmup step")):  # the trainer saying what it does (compiling...)
                        bar.write(line.strip()) if progress else echo(line.strip())
                    continue
                step, total, val_loss, now = m["step"], m["total"], m["val_loss"], time.time()
                bar.n = step
                if val_loss is not None:
                    bar.set_postfix(val_loss=val_loss, refresh=False)
                if progress and val_loss is not None:
                    bar.write(line.strip())
                first = first or (now, step)
                if not progress and (val_loss is not None or now - last >= PLAIN_EVERY_S):
                    last = now
                    left = (now - first[0]) / (step - first[1]) * (total - step) if step > first[1] else None
                    echo(_plain(step, total, now - start, val_loss, left))
                bar.refresh()
        rc = proc.wait()
    except BaseException:
        kill_tree(proc)
        raise
    finally:
        bar.close()
        kill_tree(proc)
    if rc != 0:
        died = rank_death("\n".join(tail))  # a rank's own death, also where the others were stopped by torchrun
        if died and ("killed by" in died or not causes):  # (a rank that raised has said why: its own line leads)
            causes.insert(0, f"{died} (torchrun's report; the other ranks were stopped by torchrun)")
        record_death(run_dir, causes[0] if causes else f"torchrun exit code {rc}", rank_died=bool(died))
        raise LaunchError(f"training failed (exit code {rc}): {causes[0] if causes else 'no error line in its output'}"
                          f"; full output in {run_dir / 'console.log'}; errors found there:\n" + "\n".join(causes)
                          + "\n...\nlast lines:\n" + "\n".join(list(tail)[-20:]))


def show_run(run_dir: Path, save: bool = True):
    """The run's loss curve vs step and vs training time, saved as <run>/loss.png."""
    import matplotlib.pyplot as plt

    from .plots import plot_val_loss
    from .runs import load_runs
    df = load_runs([run_dir])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_val_loss(df, x="step", ax=axes[0])
    plot_val_loss(df, x="train_time_s", ax=axes[1])
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    if save:
        write_atomically(run_dir / "loss.png", lambda f: fig.savefig(f, format="png", dpi=110))
    return fig


# --- notebooks and sweeps -----------------------------------------------------------------------------

def run_notebook(parameters: dict, output: Path, notebook: Path = NOTEBOOK, stdout=None):
    """Execute notebook with papermill (cwd the repository root) into output; stdout: a file that gets the
    notebook's printed lines as they come (e.g. sys.stdout for a terminal)."""
    import papermill as pm
    output.parent.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(ROOT), progress_bar=False,
                               stdout_file=stdout, kernel_name="python3")


def sweep_runs(grid: dict, seeds, base: dict | None = None, order: str = "shuffled",
               repeat_first: bool = False, control: bool = False) -> list[tuple[str, dict]]:
    """(run_name, parameters) for every seed and combination of the grid, seed by seed, named from the parameters.
    Within a seed the arms run in the grid's order (order="fixed") or in an order drawn from the seed
    (order="shuffled": random.Random(seed), so a rerun of the sweep runs them in the same order); repeat_first
    (A/B/A) runs the seed's first arm once more after the others, into <name>_again (same config: the difference
    between the two is the machine's drift over the seed). control: next to each arm with a bigram table, its
    parameter-matched control (the same run with bigram_control 1, into <label>_control_s<seed>: the table, its
    parameters and cost without the bigrams; see streams.position_hash). Raises ValueError naming the setting when a value has
    the wrong shape or two runs would share a folder."""
    if order not in ARM_ORDERS:
        raise ValueError(f"order={order!r}: allowed: {', '.join(ARM_ORDERS)}")
    for name, flag in (("repeat_first", repeat_first), ("control", control)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}={flag!r}: expected true or false")
    if not isinstance(grid, dict):
        raise ValueError(f"grid={grid!r}: expected a mapping Config field -> list of values, e.g. {{extra_embeds: [0, 1]}}")
    base = {} if base is None else base
    if not isinstance(base, dict):
        raise ValueError(f"base={base!r}: expected a mapping Config field -> value, e.g. {{num_iterations: 100}}")
    for k in list(grid) + list(base):
        if k not in CONFIG_FIELDS:
            hint = difflib.get_close_matches(str(k), CONFIG_FIELDS, n=1)
            raise ValueError(f"sweep parameter {k!r} is not a Config field" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    for k, values in grid.items():
        _check_list(f"grid[{k!r}]", values, f"[{values!r}]" if not isinstance(values, (list, tuple)) else "[0, 1]")
    _check_list("seeds", seeds, f"[{seeds!r}]" if not isinstance(seeds, (list, tuple)) else "[0, 1, 2]")
    arms = math.prod(len(v) for v in grid.values())
    count = arms * len(seeds)  # (before control arms and A/B/A repeats, which add at most as many again)
    if count > MAX_RUNS:
        raise ValueError(f"the sweep has {count:,} runs ({' x '.join(f'{len(v)} {k}' for k, v in grid.items())} x "
                         f"{len(seeds)} seeds), over the limit of {MAX_RUNS:,}: check the grid (a sweep this size "
                         f"is a SLURM array per part)")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seeds={seeds!r}: seed {seed!r} is not an integer")
    clash = [k for k in ("seed", *grid) if k in base] + (["seed"] if "seed" in grid else [])
    if clash:
        raise ValueError(f"{clash[0]!r} is set by {'seeds' if clash[0] == 'seed' else 'grid'}; drop it from "
                         f"{'base' if clash[0] in base else 'grid'}")
    keys = list(grid)
    out = []
    # seed-major: every variant's run of seed 0, then of seed 1, ...: a slow spell of the machine (or a sweep cut
    # short) lands on every arm of a seed, and the finished seeds are pairs
    for seed in seeds:
        arms = []
        for values in itertools.product(*(grid[k] for k in keys)):
            p = {**base, **dict(zip(keys, values)), "seed": seed}
            label = "_".join(f"{k}{_label(v)}" for k, v in zip(keys, values)) or "base"
            arms.append((check_folder_name("run name", f"{label}_s{seed}"), p))
            if control and p.get("bigram_embeds") and not p.get("bigram_control"):
                arms.append((check_folder_name("run name", f"{label}_control_s{seed}"), {**p, "bigram_control": 1}))
        if control and not any(p.get("bigram_control") for _, p in arms):
            raise ValueError("control=true adds the control of a bigram table (bigram_control): no arm has one; "
                             "give bigram_embeds: 1 in base or grid")
        if order == "shuffled":
            random.Random(seed).shuffle(arms)
        if repeat_first and len(arms) > 1:
            arms.append((check_folder_name("run name", f"{arms[0][0]}_again"), arms[0][1]))
        out += arms
    return out


def _check_list(what: str, values, example: str) -> None:
    """A non-empty list whose values give distinct run names: a duplicate would train one folder twice."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what}={values!r}: expected a list, e.g. {example}")
    if not values:
        raise ValueError(f"{what}=[]: needs at least one value")
    labels = [_label(v) for v in values]
    twice = sorted({v for v in labels if labels.count(v) > 1})
    if twice:
        raise ValueError(f"{what}={list(values)!r}: {', '.join(twice)} given twice; each value once")


def _label(v) -> str:
    text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) if v != "" else "none"
    return text.replace("/", "_").replace("\\", "_")  # a path as a value (data_dir) stays one folder name


def sweep_spec(spec) -> dict:
    """The keyword arguments of sweep() from a YAML mapping; unknown or missing keys are errors."""
    if not isinstance(spec, dict):
        raise ValueError(f"sweep YAML {spec!r}: expected a mapping with keys {sorted(SWEEP_SETTINGS)}")
    message = unknown_names(spec, SWEEP_SETTINGS)
    if message:
        raise ValueError(f"{message}; allowed sweep keys: {sorted(SWEEP_SETTINGS)}")
    if "grid" not in spec:
        raise ValueError("sweep YAML needs grid: Config field -> list of values, e.g. '{grid: {extra_embeds: [0, 1]}}'")
    return {**SWEEP_SETTINGS, **spec}


def check_sweep(grid: dict, seeds=(0,), base: dict | None = None, sweep_dir="runs/sweep",
                nproc_per_node: int = 1, config=None, backend: str = "local", slurm: dict | None = None,
                ask_cluster: bool = True, order: str = "shuffled", repeat_first: bool = False,
                control: bool = False) -> list[tuple[str, dict]]:
    """Everything a sweep checks before its first run starts (with backend slurm, also what the cluster offers,
    unless ask_cluster is False); its runs as sweep_runs gives them."""
    if not isinstance(sweep_dir, (str, os.PathLike)) or not str(sweep_dir):
        raise ValueError(f"sweep_dir={sweep_dir!r}: expected a folder, e.g. runs/sweep")
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node!r}: must be an integer >= 1")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed: {', '.join(BACKENDS)}")
    from . import slurm as sl
    s = sl.check_settings(slurm)
    world = nproc_per_node * (s["nodes"] if backend == "slurm" else 1)
    runs = sweep_runs(grid, seeds, base, order, repeat_first, control)
    cfgs, seen = [], {}
    for name, p in runs:
        cfgs.append(resolve(p, world, config))
        key = json.dumps(cfgs[-1].to_dict(), sort_keys=True)  # the coerced values: 10 and 10.0 are one run
        if key in seen and not name.endswith("_again"):  # (A/B/A's repeat is the same run on purpose)
            raise ValueError(f"runs {seen[key]!r} and {name!r} train the same config (values that differ only in how "
                             f"they are written, e.g. 10 and 10.0): give each value once")
        seen.setdefault(key, name)
        problem = reuse_problem(at_root(sweep_dir) / name, cfgs[-1])
        if problem:
            raise ValueError(f"run {name!r}: {problem}")
    if backend == "slurm" and ask_cluster:
        sl.check_cluster(sl.resources(s, cfgs, nproc_per_node), len(runs))
    return runs


class SweepFailed(LaunchError):
    """Some runs of a sweep failed; the others ran. table: the summary table, as written to summary.csv."""

    def __init__(self, message: str, table):
        super().__init__(message)
        self.table = table


def sweep(grid: dict, seeds=(0,), base: dict | None = None, sweep_dir="runs/sweep", nproc_per_node: int = 1,
          echo=print, config=None, backend: str = "local", slurm: dict | None = None, order: str = "shuffled",
          repeat_first: bool = False, control: bool = False, checked: list | None = None) -> "pd.DataFrame":
    """Run every (variant, seed) through nbs/run_variant.ipynb with papermill, one after another, each into
    <sweep_dir>/<name>/, starting from the config file `config` if given. Finished runs are skipped, interrupted
    ones resumed from their checkpoints. A run that fails is recorded (status and error in summary.csv) and the
    sweep goes on; at the end it raises SweepFailed naming the failed runs. Writes and returns the summary table
    <sweep_dir>/summary.csv. One sweep at a time holds sweep_dir.
    backend="slurm": each run is a job of one SLURM array instead, with the settings `slurm` (embxlib/slurm.py);
    the same folders, skips, resumes and table. order, repeat_first: the order of each seed's arms (sweep_runs);
    summary.csv's `position` column is each run's place in it; control: a control arm beside each bigram arm.
    checked: the runs check_sweep returned for these settings, if the caller checked them already (each check once)."""
    runs = checked if checked is not None else check_sweep(grid, seeds, base, sweep_dir, nproc_per_node, config, backend, slurm, ask_cluster=False,
                       order=order, repeat_first=repeat_first, control=control)
    sweep_dir = at_root(sweep_dir)

    def tell(line: str) -> None:
        # one line per run started and finished: through echo (the notebook's output) and, when that is not the
        # terminal (a notebook's kernel), also on the terminal the kernel or JupyterLab was started from
        echo(line)
        if echo is print and sys.stdout is not sys.__stdout__ and sys.__stdout__ is not None:
            print(line, file=sys.__stdout__, flush=True)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    with FolderLock(sweep_dir, SWEEP_LOCK, note=echo):
        if backend == "slurm":
            from . import slurm as sl
            s = sl.check_settings(slurm)
            cfgs = [resolve(p, nproc_per_node * s["nodes"], config) for _, p in runs]
            errors = sl.sweep(runs, cfgs, sweep_dir, nproc_per_node, config and at_root(config), s, tell, echo,
                              launch=launch, show=show_run)
        for i, (name, p) in enumerate(runs if backend == "local" else []):
            run_dir = sweep_dir / name
            state = run_state(run_dir)
            if state == "finished":
                echo(f"[{i + 1}/{len(runs)}] {name}: finished, skipped")
                continue
            if state == "broken":  # crashed before its first checkpoint: keep it aside, start again
                aside = move_aside(run_dir, echo)
                echo(f"[{i + 1}/{len(runs)}] {name}: no checkpoint, moved to {aside.name}, starting again")
            tell(f"[{i + 1}/{len(runs)}] {name}: {'resuming' if state == 'resumable' else 'training'} "
                 f"({datetime.now():%H:%M:%S})")
            out = executed_notebook(run_dir, resumed=state == "resumable")
            started = time.time()
            try:
                run_notebook({**p, "config": config and str(at_root(config)), "run_name": name,
                              "runs_root": str(sweep_dir), "resume": True, "nproc_per_node": nproc_per_node,
                              "progress": False}, out)
            except Exception as e:  # noqa: BLE001 (recorded, and raised at the end; Ctrl-C still stops the sweep)
                errors[name] = first_line(e)
                tell(f"[{i + 1}/{len(runs)}] {name}: failed after {clock(time.time() - started)}: {errors[name]} "
                     f"(notebook: {out}); going on")
                continue
            final = (read_json(run_dir / "summary.json") or {}).get("final_val_loss")
            tell(f"[{i + 1}/{len(runs)}] {name}: finished in {clock(time.time() - started)}"
                 + (f", final val_loss {final:.4f}" if isinstance(final, (int, float)) else ""))
        keys = list(grid) + ["bigram_control"] * (control and "bigram_control" not in grid) + ["seed"]
        table = sweep_table(sweep_dir, [n for n, _ in runs], keys, errors)
        write_text_atomically(sweep_dir / "summary.csv", table.to_csv(index=False))
    if errors:
        failed = table[table["run"].isin(list(errors))]
        raise SweepFailed(f"{len(errors)} of {len(runs)} runs failed: "
                          + "; ".join(f"{r.run} ({r.error})" for r in failed.itertuples())
                          + f"; every run is in {sweep_dir / 'summary.csv'}", table)
    return table


def sweep_table(sweep_dir: Path, names: list[str], keys: list[str], errors: dict | None = None):
    import pandas as pd
    rows = []
    errors = errors or {}
    for position, name in enumerate(names, 1):  # names in the sweep's order: position is the order the arms ran in
        d = Path(sweep_dir) / name
        cfg = read_json(d / "config.json") or {}
        s = read_json(d / "summary.json") or {}
        t = s.get("time_to_target_ms")
        status = s.get("status", "missing")
        if name in errors and status in ("running", "missing", "finished"):
            status = "failed"  # the notebook failed (before the trainer, or after it, e.g. its figure)
        if status != "finished" and (read_json(d / SLURM_RECORD) or {}).get("cancelled"):
            status = "cancelled"  # its SLURM job was cancelled (launch cancel, an interrupted sweep): queued or not
        rows.append({"run": name, "position": position, **{k: _label(cfg.get(k, "")) if isinstance(cfg.get(k), (list, tuple))
                                     else cfg.get(k) for k in keys}, "variant": cfg.get("name"),
                     "status": status, "error": s.get("error") or errors.get(name),
                     "final_val_loss": s.get("final_val_loss"),
                     "train_time_s": s["train_time_ms"] / 1000 if s.get("train_time_ms") else None,
                     "step_to_target": s.get("step_to_target"), "time_to_target_s": t / 1000 if t else None,
                     "num_params": s.get("num_params"), "tokens_per_s": s.get("tokens_per_s")})
    return pd.DataFrame(rows)


# --- command line ------------------------------------------------------------------------------------

def run(params: dict, config=None, run_name: str = "", runs_root: str = "runs", nproc_per_node=None) -> Path:
    """One run through nbs/run_variant.ipynb with papermill, its printed lines (a plain progress line at every
    validation and at least every 30 s) shown here as they come; the executed notebook stays in the run folder."""
    cfg = resolve(params, 1 if nproc_per_node is None else nproc_per_node, config)  # checked before anything starts
    run_name = run_name or default_run_name(cfg.name, cfg.seed)
    check_folder_name("run_name", run_name)
    run_dir = at_root(runs_root) / run_name
    shown = run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir
    print(f"running nbs/run_variant.ipynb with papermill into {shown} ({cfg.preset} preset, variant {cfg.name}, "
          f"{cfg.num_iterations} steps)", flush=True)
    t = time.time()
    notebook = executed_notebook(run_dir)
    run_notebook({**params, "config": config and str(at_root(config)), "run_name": run_name, "runs_root": runs_root,
                  "nproc_per_node": nproc_per_node, "progress": False}, notebook, stdout=sys.stdout)
    s = json.loads((run_dir / "summary.json").read_text())
    print(f"done in {clock(time.time() - t)}: final val_loss {s['final_val_loss']:.4f}; run folder {shown}/ with "
          f"config.json, log.txt, metrics.jsonl, summary.json, checkpoint.pt, console.log, loss.png, {notebook.name}")
    other = trained_with(run_dir)
    if other and other != sys.executable:
        print(f"note: the notebook's kernel (python3) trained with {other}, not this Python ({sys.executable}): "
              f"its kernelspec points elsewhere (make kernel registers .venv's)", flush=True)
    return run_dir


def executed_notebook(run_dir: Path, resumed: bool = False) -> Path:
    """Where a launch writes its executed notebook: notebook.ipynb for the run's first, beside it with the time for
    any later one (a resume, a launch again over a finished run): the training's own notebook is never replaced."""
    first = run_dir / "notebook.ipynb"
    if not resumed and not first.exists():
        return first
    return run_dir / f"notebook-{'resumed-' * resumed}{datetime.now():%Y%m%d-%H%M%S}.ipynb"


def trained_with(run_dir: Path) -> str | None:
    """The Python that trained the run, as its log.txt records it (None for a log without that line)."""
    try:
        with open(Path(run_dir) / "log.txt", errors="replace") as f:
            head = f.read(16384)
    except OSError:
        return None
    found = re.search(r"^python: (.+?); torch: ", head, re.M)
    return found[1] if found else None


def demo(runs_root: str = "runs/demo") -> Path:
    """The README's main job: a tiny run on the bundled corpus through the papermill notebook, on CPU; in fp32 where
    the CPU has no bf16 matrix instructions (upstream's bf16 policy would run there several times slower)."""
    from .config import cpu_bf16_matmul
    settings = dict(preset="tiny", extra_embeds=1)
    if not torch_cuda_available() and not cpu_bf16_matmul():
        print("this CPU has no bf16 matrix instructions (avx512_bf16/amx_bf16): the demo trains in fp32 "
              "(precision=fp32, named -fp32), several times faster here than upstream's bf16 policy", flush=True)
        settings["precision"] = "fp32"
    return run(settings, runs_root=runs_root)  # the default folder name: <date>-<time>_<variant>_s<seed>


def torch_cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv=None):
    import yaml
    ap = argparse.ArgumentParser(prog="python -m embxlib.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the README's main job: tiny preset, one extra embedding, 200 steps")
    d.add_argument("--runs-root", default="runs/demo")
    r = sub.add_parser("run", help="one run through the notebook, configured like python -m embxlib.train")
    r.add_argument("--run-name", default="", help="folder name under --runs-root (default <date>_<variant>_s<seed>)")
    r.add_argument("--runs-root", default="runs", help="parent folder of the run (default: runs)")
    r.add_argument("--nproc-per-node", type=int, default=None, help="processes (default: the GPUs, or 1 on CPU)")
    add_config_args(r)
    sw = sub.add_parser("sweep", help="run a grid of variants x seeds through the notebook (or as SLURM jobs)")
    sw.add_argument("-y", "--yaml", default=None, help="YAML with grid, seeds, base, config (a config file every "
                    "run starts from), sweep_dir, nproc_per_node, backend (local or slurm), slurm (its settings)")
    sw.add_argument("-f", "--file", default=None, help="a YAML file with the same keys (-y's keys override it)")
    sw.add_argument("--backend", choices=BACKENDS, default=None, help="local: one run after another on this machine "
                    "(default); slurm: each run a job of a SLURM array (overrides the YAML's backend)")
    c = sub.add_parser("cancel", help="scancel every job a SLURM sweep submitted")
    c.add_argument("sweep_dir", help="the sweep's folder (its sweep_dir)")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        demo(args.runs_root)
    elif args.cmd == "run":
        fields = {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS and v is not None}
        try:
            resolve(fields, 1 if args.nproc_per_node is None else args.nproc_per_node, args.config)
            if args.run_name:
                check_folder_name("run_name", args.run_name)
        except ValueError as e:  # the error before anything starts, not a traceback
            ap.exit(2, f"{ap.prog} run: error: {e}\n")
        with signals_interrupt():
            try:
                run(fields, args.config, args.run_name, args.runs_root, args.nproc_per_node)
            except (FolderLocked, OSError, _notebook_error()) as e:
                ap.exit(1, f"{ap.prog} run: error: {first_line(e)}\n")
    elif args.cmd == "cancel":
        from .slurm import cancel
        try:
            cancel(args.sweep_dir)
        except (ValueError, OSError) as e:
            ap.exit(1, f"{ap.prog} cancel: error: {e}\n")
    else:
        try:
            spec = sweep_file_and_yaml(args.file, args.yaml, args.backend)
            runs = check_sweep(**spec)  # the error before the first run (or job), not a traceback
        except (ValueError, yaml.YAMLError) as e:
            ap.exit(2, f"{ap.prog} sweep: error: {e}\n")
        print(f"{len(runs)} run{'s' * (len(runs) != 1)} into {spec['sweep_dir']}", flush=True)
        with signals_interrupt():
            try:
                print(sweep(**spec, checked=runs))
            except SweepFailed as e:
                print(e.table)
                ap.exit(1, f"{ap.prog} sweep: error: {e}\n")
            except (FolderLocked, OSError, ValueError) as e:  # ValueError: the cluster refused (slurm.SlurmError)
                ap.exit(1, f"{ap.prog} sweep: error: {e}\n")
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (signals_interrupt): one line, no traceback
                name = str(e) or "stopped by SIGINT"
                sig = getattr(signal, name.rsplit(" ", 1)[-1], signal.SIGINT)
                ap.exit(128 + sig, f"{ap.prog} sweep: {name}; running the sweep again skips its finished runs and "
                                   f"resumes the stopped ones\n")


def sweep_file_and_yaml(path, text, backend) -> dict:
    """sweep()'s keyword arguments from a sweep file, -y's YAML over it, --backend over both."""
    from .config import load_yaml
    if path is None and text is None:
        raise ValueError("needs -y YAML or -f FILE with the sweep's keys, e.g. -y '{grid: {extra_embeds: [0, 1]}}'")
    spec = {}
    if path is not None:
        try:
            spec = load_yaml(Path(path).read_text(), f"sweep file {path}")
        except OSError as e:
            raise ValueError(f"sweep file {path}: {e.strerror or e}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"sweep file {path}: expected a mapping with keys {sorted(SWEEP_SETTINGS)}")
    if text is not None:
        given = load_yaml(text, "sweep YAML (-y)")
        if not isinstance(given, dict):
            raise ValueError(f"sweep YAML {given!r}: expected a mapping with keys {sorted(SWEEP_SETTINGS)}")
        spec = {**spec, **given}
    if backend is not None:
        spec["backend"] = backend
    return sweep_spec(spec)


def _notebook_error() -> type:
    from papermill.exceptions import PapermillExecutionError
    return PapermillExecutionError


if __name__ == "__main__":
    main()
