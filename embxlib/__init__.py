"""embxlib: train, launch, analyse and publish modded-nanogpt embedding variants."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository (the package is installed editable from it)


def at_root(path) -> Path:
    """A relative path from the repository root, where the training processes and papermill run, also when the
    caller runs elsewhere (a notebook opened in JupyterLab runs in nbs/); an absolute path as it is."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path
