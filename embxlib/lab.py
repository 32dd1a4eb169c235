"""JupyterLab settings of `make lab`: the tracked notebooks under nbs/ stay output-free when saved.

`make lab` passes `--ContentsManager.pre_save_hook=embxlib.lab.keep_output_free`: saving (or autosaving) a notebook
under nbs/ writes it without outputs, execution counts, per-cell run metadata and JupyterLab's rewrite of the
notebook metadata (language_info, widget state), so running a notebook in the lab leaves `git diff` empty, while the
open notebook keeps showing its outputs. Executed copies elsewhere (runs/**/notebook.ipynb) are saved as they are.
Chosen over an nbstripout git filter: it needs no git configuration in each clone (or in a worktree's shared
config), keeps the files on disk clean rather than only what git sees, and works for notebooks JupyterLab saves
whatever tool commits them.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

TRACKED = "nbs"  # notebooks directly in this folder (API path from the server's root, the repository) are kept clean
VOLATILE_CELL_METADATA = ("execution", "scrolled", "collapsed", "jupyter")


def is_tracked(path: str) -> bool:
    p = PurePosixPath(str(path).lstrip("/"))
    return p.suffix == ".ipynb" and str(p.parent) == TRACKED


def strip(nb: dict, committed_metadata: dict | None = None) -> dict:
    """nb (a notebook as JSON) without outputs, execution counts and volatile metadata, in place; its notebook
    metadata replaced by committed_metadata when that is a dict (what the file on disk holds). Whatever else a cell
    holds, a code cell's outputs go."""
    cells = nb.get("cells", [])
    for cell in cells if isinstance(cells, list) else []:
        if not isinstance(cell, dict):
            continue
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        metadata = cell.get("metadata")
        for key in VOLATILE_CELL_METADATA if isinstance(metadata, dict) else ():
            metadata.pop(key, None)
    if isinstance(committed_metadata, dict):
        nb["metadata"] = committed_metadata
    elif isinstance(nb.get("metadata"), dict):
        nb["metadata"].pop("widgets", None)
    return nb


def keep_output_free(model: dict, path: str, contents_manager=None, **kwargs) -> None:
    """jupyter_server pre-save hook: strip a tracked notebook before it is written (see the module docstring)."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict) or not is_tracked(path):
        return
    on_disk = None
    if contents_manager is not None and hasattr(contents_manager, "_get_os_path"):
        on_disk = Path(contents_manager._get_os_path(path))
    committed = None
    try:  # the committed metadata, from a well-formed notebook on disk; anything else keeps the notebook's own
        if on_disk is not None and on_disk.is_file():
            data = json.loads(on_disk.read_text(encoding="utf-8"))
            committed = data.get("metadata") if isinstance(data, dict) else None
    except (OSError, ValueError, RecursionError):
        committed = None
    try:
        strip(model["content"], committed if isinstance(committed, dict) else None)
    except Exception as exc:  # jupyter_server logs a failed hook and saves anyway: refuse instead of saving outputs
        from tornado.web import HTTPError
        raise HTTPError(400, f"{path}: not saved, its outputs could not be removed ({type(exc).__name__})") from exc
