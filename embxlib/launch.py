"""Launch training runs from notebooks: torchrun as a subprocess, a tqdm bar, a console log, a loss figure; sweeps.

    papermill nbs/run_variant.ipynb out.ipynb -p extra_embeds 3        # one run (the notebook calls launch())
    python -m embxlib.launch demo                                      # the README's main job
    python -m embxlib.launch sweep -y '{grid: {extra_embeds: [0, 1]}, seeds: [0, 1]}'

The bar lives here, in the parent; the ranks print plain `step:` lines (papermill's IOPub limits: only validation
lines reach the notebook's output, everything goes to <run>/console.log).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from datetime import datetime
from pathlib import Path

from .config import PRESETS, Config, coerce
from .train import is_new_run_dir

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "nbs" / "run_variant.ipynb"
STEP = re.compile(r"step:(\d+)/(\d+)(?: val_loss:([\d.]+|nan))?")
CONFIG_FIELDS = list(Config.__dataclass_fields__)
# launch settings of run_variant.ipynb besides the Config fields (defaults; a test keeps the notebook in step)
LAUNCH_SETTINGS = dict(nproc_per_node=None, nnodes=1, node_rank=0, master_addr="", master_port=29500,
                       run_name="", runs_root="runs", resume=False, progress=True, fail_at_step=-1, fail_rank=0)


class LaunchError(RuntimeError):
    pass


# --- checking parameters before anything starts ------------------------------------------------------

def resolve(params: dict, world_size: int = 1) -> Config:
    """Config from notebook parameters (None means: the preset's value). Raises ValueError naming the parameter."""
    given = {k: v for k, v in params.items() if v is not None}
    preset = given.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: allowed: {sorted(PRESETS)}")
    cfg = PRESETS[preset](**{k: coerce(k, v) for k, v in given.items()})
    return cfg.validate(world_size)


def default_nproc() -> int:
    import torch
    return torch.cuda.device_count() or 1


def check_settings(s: dict) -> dict:
    s = {**LAUNCH_SETTINGS, **s}
    unknown = set(s) - set(LAUNCH_SETTINGS)
    if unknown:
        raise ValueError(f"unknown launch setting(s) {sorted(unknown)}; allowed: {sorted(LAUNCH_SETTINGS)}")
    if s["nproc_per_node"] is None:
        s["nproc_per_node"] = default_nproc()
    for k in ("nproc_per_node", "nnodes"):
        if not isinstance(s[k], int) or s[k] < 1:
            raise ValueError(f"{k}={s[k]!r}: must be an integer >= 1")
    if not 0 <= s["node_rank"] < s["nnodes"]:
        raise ValueError(f"node_rank={s['node_rank']!r}: must be in 0..nnodes-1={s['nnodes'] - 1}")
    if s["nnodes"] > 1 and not s["master_addr"]:
        raise ValueError("master_addr='': several nodes need the address of node 0")
    if s["run_name"] and (Path(s["run_name"]).name != s["run_name"] or s["run_name"].startswith(".")):
        raise ValueError(f"run_name={s['run_name']!r}: must be a plain folder name (no '/')")
    return s


def run_dir_for(cfg: Config, s: dict) -> Path:
    name = s["run_name"] or f"{datetime.now():%Y%m%d-%H%M%S}_{cfg.name}_s{cfg.seed}"
    return Path(s["runs_root"]) / name


def run_state(run_dir: Path) -> str:
    """new (nothing there but executed notebooks), finished, resumable (a checkpoint), or broken."""
    if is_new_run_dir(run_dir):
        return "new"
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "finished":
        return "finished"
    return "resumable" if (run_dir / "checkpoint.pt").exists() else "broken"


# --- the subprocess --------------------------------------------------------------------------------

def command(cfg: Config, params: dict, s: dict, run_dir: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={s['nproc_per_node']}"]  # = torchrun
    if s["nnodes"] == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={s['nnodes']}", f"--node_rank={s['node_rank']}", f"--master_addr={s['master_addr']}",
                f"--master_port={s['master_port']}"]
    cmd += ["-m", "embxlib.train"]
    if resume:
        cmd += ["--resume", str(run_dir)]
    else:
        cmd += ["--run-dir", str(run_dir), *config_flags(cfg, params)]
    if s["fail_at_step"] >= 0:
        cmd += ["--fail-at-step", str(s["fail_at_step"]), "--fail-rank", str(s["fail_rank"])]
    return cmd


def config_flags(cfg: Config, params: dict) -> list[str]:
    """Flags for the parameters that were set: the child resolves the same preset + overrides."""
    out = ["--preset", cfg.preset]
    for k, v in params.items():
        if v is None or k == "preset":
            continue
        v = getattr(cfg, k)
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, tuple):
            out += [flag, ",".join(map(str, v))]
        else:
            out += [flag, str(v)]
    return out


def launch(params: dict, echo=print, **settings) -> Path:
    """Validate, start torchrun, stream its output to <run>/console.log and a tqdm bar, return the run folder.
    Raises LaunchError with the failing rank's last lines if the run fails; no child process is left behind."""
    s = check_settings(settings)
    world = s["nproc_per_node"] * s["nnodes"]
    cfg = resolve({k: v for k, v in params.items() if k in CONFIG_FIELDS}, world)
    unknown = set(params) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)}; allowed: Config fields and {sorted(LAUNCH_SETTINGS)}")
    run_dir = run_dir_for(cfg, s)
    state = run_state(run_dir)
    if state == "finished":
        echo(f"{run_dir}: already finished, nothing to train")
        return run_dir
    if state in ("resumable", "broken") and not s["resume"]:
        raise ValueError(f"run_name={run_dir.name!r}: {run_dir} already holds a run; runs are never overwritten "
                         f"(pick another run_name, or resume=True to continue it)")
    if state == "broken":
        raise ValueError(f"{run_dir} has no checkpoint to resume from; move it away or pick another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(cfg, params, s, run_dir, resume=state == "resumable")
    threads = max(1, (os.cpu_count() or 1) // s["nproc_per_node"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    _stream(cmd, env, run_dir, cfg, s["progress"], echo)
    return run_dir


def _stream(cmd, env, run_dir: Path, cfg: Config, progress: bool, echo) -> None:
    from tqdm.auto import tqdm
    tail: deque[str] = deque(maxlen=40)
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
                m = STEP.search(line)
                if not m:
                    continue
                bar.n = int(m[1])
                if m[3]:
                    bar.set_postfix(val_loss=float(m[3]), refresh=False)
                    msg = line.strip()
                    bar.write(msg) if progress else echo(msg)
                bar.refresh()
        rc = proc.wait()
    except BaseException:
        _kill(proc)
        raise
    finally:
        bar.close()
        _kill(proc)
    if rc != 0:
        raise LaunchError(f"training failed (exit code {rc}); full output in {run_dir / 'console.log'}; "
                          f"last lines:\n" + "\n".join(_failing_lines(tail)))


def _failing_lines(tail) -> list[str]:
    """The failing rank's own error first (train.py prints '[rank N] Error: ...'), then the end of the output."""
    own = [t for t in tail if re.match(r"\[rank \d+\] \w+", t) or "FAILED on rank" in t]
    return own + ["..."] + list(tail)[-20:]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # grandchildren of a finished torchrun, if any
        except (ProcessLookupError, PermissionError):
            pass
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


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
        fig.savefig(run_dir / "loss.png", dpi=110)
    return fig


# --- notebooks and sweeps -----------------------------------------------------------------------------

def run_notebook(parameters: dict, output: Path, notebook: Path = NOTEBOOK, log_output: bool = False):
    import papermill as pm
    output.parent.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(ROOT), progress_bar=False,
                               log_output=log_output, kernel_name="python3")


def sweep_runs(grid: dict, seeds, base: dict | None = None) -> list[tuple[str, dict]]:
    """(run_name, parameters) for every combination of the grid and every seed, named from the parameters."""
    base = dict(base or {})
    for k in list(grid) + list(base):
        if k not in CONFIG_FIELDS:
            raise ValueError(f"sweep parameter {k!r} is not a Config field")
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            p = {**base, **dict(zip(keys, values)), "seed": seed}
            label = "_".join(f"{k}{_label(v)}" for k, v in zip(keys, values)) or "base"
            out.append((f"{label}_s{seed}", p))
    return out


def _label(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) if v != "" else "none"


def sweep(grid: dict, seeds=(0,), base: dict | None = None, sweep_dir="runs/sweep", nproc_per_node: int = 1,
          echo=print) -> "pd.DataFrame":
    """Run every (variant, seed) through nbs/run_variant.ipynb with papermill, one after another, each into
    <sweep_dir>/<name>/. Finished runs are skipped, interrupted ones resumed from their checkpoints.
    Writes and returns the summary table <sweep_dir>/summary.csv."""
    sweep_dir = Path(sweep_dir)
    runs = sweep_runs(grid, seeds, base)
    for name, p in runs:  # every parameter is checked before the first run starts
        resolve(p, nproc_per_node)
    for i, (name, p) in enumerate(runs):
        run_dir = sweep_dir / name
        state = run_state(run_dir)
        if state == "finished":
            echo(f"[{i + 1}/{len(runs)}] {name}: finished, skipped")
            continue
        if state == "broken":  # crashed before its first checkpoint: keep it aside, start again
            aside = run_dir.with_name(f"{name}.failed-{datetime.now():%Y%m%d-%H%M%S}")
            run_dir.rename(aside)
            echo(f"[{i + 1}/{len(runs)}] {name}: no checkpoint, moved to {aside.name}, starting again")
        echo(f"[{i + 1}/{len(runs)}] {name}: {'resuming' if state == 'resumable' else 'training'}")
        out = run_dir / ("notebook-resumed.ipynb" if state == "resumable" else "notebook.ipynb")
        run_notebook({**p, "run_name": name, "runs_root": str(sweep_dir), "resume": True,
                      "nproc_per_node": nproc_per_node, "progress": False}, out)
    table = sweep_table(sweep_dir, [n for n, _ in runs], list(grid) + ["seed"])
    table.to_csv(sweep_dir / "summary.csv", index=False)
    return table


def sweep_table(sweep_dir: Path, names: list[str], keys: list[str]):
    import pandas as pd
    rows = []
    for name in names:
        d = Path(sweep_dir) / name
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        s = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        t = s.get("time_to_target_ms")
        rows.append({"run": name, **{k: _label(cfg.get(k, "")) if isinstance(cfg.get(k), (list, tuple))
                                     else cfg.get(k) for k in keys}, "variant": cfg.get("name"),
                     "status": s.get("status", "missing"), "final_val_loss": s.get("final_val_loss"),
                     "train_time_s": s["train_time_ms"] / 1000 if s.get("train_time_ms") else None,
                     "step_to_target": s.get("step_to_target"), "time_to_target_s": t / 1000 if t else None,
                     "num_params": s.get("num_params"), "tokens_per_s": s.get("tokens_per_s")})
    return pd.DataFrame(rows)


# --- command line ------------------------------------------------------------------------------------

def demo(runs_root: str = "runs/demo") -> Path:
    """The README's main job: a tiny run on the bundled corpus through the papermill notebook, on CPU."""
    name = f"{datetime.now():%Y%m%d-%H%M%S}_tiny_x01"
    run_dir = Path(runs_root) / name
    print(f"running nbs/run_variant.ipynb with papermill into {run_dir} (tiny preset, extra_embeds=1, 200 steps)")
    t = time.time()
    run_notebook(dict(preset="tiny", extra_embeds=1, run_name=name, runs_root=runs_root, progress=False),
                 run_dir / "notebook.ipynb", log_output=True)
    s = json.loads((run_dir / "summary.json").read_text())
    print(f"done in {time.time() - t:.0f} s: final val_loss {s['final_val_loss']:.4f}; run folder {run_dir}; "
          f"figure {run_dir / 'loss.png'}; executed notebook {run_dir / 'notebook.ipynb'}")
    return run_dir


def main(argv=None):
    import yaml
    ap = argparse.ArgumentParser(prog="python -m embxlib.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the README's main job")
    d.add_argument("--runs-root", default="runs/demo")
    sw = sub.add_parser("sweep", help="run a grid of variants x seeds through the notebook")
    sw.add_argument("-y", "--yaml", required=True, help="YAML with grid, seeds, base, sweep_dir")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        demo(args.runs_root)
    else:
        spec = yaml.safe_load(args.yaml)
        print(sweep(spec["grid"], spec.get("seeds", [0]), spec.get("base"), spec.get("sweep_dir", "runs/sweep")))


if __name__ == "__main__":
    main()
