"""A run's checkpoint (<run>/checkpoint.pt): save it whole, load only tensors and plain data, peek at its step and
config without its tensors, and the rules of continuing from it (resume) or reusing a folder that holds one."""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from .config import Config, config_differences
from .data import changed_shards, shard_files
from .runfolder import MAX_NAME_BYTES, SLURM_RECORD, is_new_run_dir, read_json, write_atomically

CHECKPOINT = "checkpoint.pt"


def peek_checkpoint(path: Path) -> dict | None:
    """The checkpoint's step and config without reading its tensors (memory-mapped), or None when it cannot be
    read: the real load reports why (corrupt, or holding code) and records it in the summary."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(step=int(ck["step"]), config=ck.get("config"), shards=(ck.get("stream") or {}).get("shards"))
    except Exception:  # noqa: BLE001 (any failure: the load in training names it)
        return None


def load_checkpoint(path: Path, device="cpu") -> dict:
    """Tensors and plain data only (weights_only): unpickling anything else could run code from a shared file."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"[Uu]nsupported [^\n]*?(?=\.?\n|\.?$)", str(e))
        if not zipfile.is_zipfile(path) or "GLOBAL" not in str(e):  # torch.save writes a zip; code needs a GLOBAL
            raise ValueError(f"{path}: corrupt: not a checkpoint as torch.save writes one (unpickling failed: "
                             f"{found[0] if found else 'unreadable'}); resume from a good copy or start a new "
                             f"run") from None
        detail = found[0] if found else "not a weights-only checkpoint"
        raise ValueError(f"{path}: holds more than tensors and plain data ({detail}); refusing to unpickle it: "
                         f"it could run code") from None


def save_checkpoint(run_dir, is_rank0, model, adam, muon, stream, step, train_ms, history, cfg, snoo=None):
    if not is_rank0:
        return
    ck = dict(model=model.state_dict(), adam=adam.state_dict(), muon=muon.state_dict(), stream=stream.state_dict(),
              step=step, train_time_ms=train_ms, history=history, config=cfg.to_dict())
    if snoo is not None:  # Snoo's state (the same on every rank)
        ck["snoo"] = snoo.state_dict()
    write_atomically(run_dir / CHECKPOINT, lambda f: torch.save(ck, f))  # never a half-written checkpoint


def check_resume(run_dir: Path, cfg: Config, max_steps: int | None) -> None:
    """A resume continues only what it can continue as it was: never a finished run, never back to an earlier
    step, never with a config.json edited since the checkpoint, never on training shards changed since it."""
    summary = read_json(run_dir / "summary.json") or {}
    if summary.get("status") == "finished":
        raise ValueError(f"--resume {run_dir}: the run is finished ({summary.get('steps', cfg.num_iterations)} of "
                         f"{cfg.num_iterations} steps); a finished run is never extended or rewritten: start a new "
                         f"run, e.g. --config {run_dir / 'config.json'} --num-iterations N --run-dir <new folder>")
    ck = peek_checkpoint(run_dir / CHECKPOINT)
    if ck is None:
        return
    if max_steps is not None and max_steps < ck["step"]:
        raise ValueError(f"--max-steps {max_steps}: below the step of {run_dir / CHECKPOINT} ({ck['step']}); a "
                         f"resume continues from there: give --max-steps {ck['step'] + 1}..{cfg.num_iterations} "
                         f"or leave it out")
    if ck["config"] is not None:
        diff = config_differences(ck["config"], cfg.to_dict(), f"in {CHECKPOINT}", "in config.json")
        if diff:
            raise ValueError(f"--resume {run_dir}: config.json differs from the config its {CHECKPOINT} was "
                             f"trained with: {'; '.join(diff)}; a resume continues the checkpoint's run: restore "
                             f"config.json, or start a new run in another folder")
    if ck["shards"]:  # (a checkpoint from before shards were recorded resumes as it did)
        try:
            files = shard_files(cfg.data_dir, "train")
        except FileNotFoundError:
            files = []
        changed = changed_shards(ck["shards"], files)
        if changed:
            raise ValueError(f"--resume {run_dir}: the training data changed since its {CHECKPOINT} "
                             f"({'; '.join(changed)}, in {cfg.data_dir}); a resume would continue the run on other "
                             f"data: restore those shards, or start a new run in another folder")


def run_state(run_dir: Path) -> str:
    """new (nothing there but what the launcher writes first), finished, resumable (a checkpoint), or broken."""
    if is_new_run_dir(run_dir):
        return "new"
    if (read_json(run_dir / "summary.json") or {}).get("status") == "finished":
        return "finished"
    return "resumable" if (run_dir / CHECKPOINT).exists() else "broken"


def reuse_problem(run_dir: Path, cfg: Config) -> str:
    """'' when run_dir holds nothing or a run of exactly cfg; else what differs, from its config.json, its
    checkpoint's config and the config its SLURM job was submitted with (slurm.json: a job still queued has written
    nothing else): a folder reused with another config would silently continue (or report) another run (also a new
    one: the config.json a launcher wrote there for a run that never started)."""
    if not run_dir.exists():
        return ""
    wanted = cfg.to_dict()
    saved = read_json(run_dir / "config.json")
    diff = config_differences(saved, wanted, "in its config.json") if saved is not None else []
    ck = peek_checkpoint(run_dir / CHECKPOINT) if not diff and (run_dir / CHECKPOINT).exists() else None
    if ck and ck.get("config"):
        diff = config_differences(ck["config"], wanted, f"in its {CHECKPOINT}")
    job = read_json(run_dir / SLURM_RECORD) if not diff and (run_dir / SLURM_RECORD).exists() else None
    if job and job.get("config"):
        diff = config_differences(job["config"], wanted, f"in its {SLURM_RECORD} (its SLURM job's config)")
    if not diff:
        return ""
    return (f"{run_dir} holds a run with another config: {'; '.join(diff)}; a folder is reused only for the same "
            f"config: pick another run_name (or sweep_dir), or move that folder away")


def resume_config(run_dir: Path, max_steps: int | None) -> Config:
    """The config a resume of run_dir trains with: its own config.json, when its checkpoint can be continued."""
    cfg_path = run_dir / "config.json"
    if not (run_dir / CHECKPOINT).exists():
        raise ValueError(f"--resume {run_dir}: no {CHECKPOINT} there to continue from (the run ended before its first "
                         f"checkpoint; its logs stay there): start a new run in another folder, e.g. --config "
                         f"{cfg_path} --run-dir <new folder>")
    saved = read_json(cfg_path)
    if saved is None:
        raise ValueError(f"--resume {run_dir}: {cfg_path} is missing or unreadable")
    cfg = Config.from_dict(saved)
    check_resume(run_dir, cfg, max_steps)
    return cfg


def check_new_run_dir(run_dir: str | None) -> None:
    """A new run's --run-dir: one whose names the file system takes, and new (runs are never overwritten)."""
    too_long = [part for part in Path(run_dir or "").parts if len(part.encode()) > MAX_NAME_BYTES]
    if too_long:
        raise ValueError(f"--run-dir {run_dir[:60]!r}...: the folder name {too_long[0][:40]!r}... has "
                         f"{len(too_long[0].encode())} bytes; at most {MAX_NAME_BYTES}")
    if run_dir and not is_new_run_dir(Path(run_dir)):
        resumable = (Path(run_dir) / CHECKPOINT).exists()
        raise ValueError(f"--run-dir {run_dir} already exists and is not empty; runs are never overwritten: choose "
                         f"another folder" + (f" or continue it with --resume {run_dir}" if resumable else
                                              f" (it holds no {CHECKPOINT} to resume from)"))
