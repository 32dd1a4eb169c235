"""Logit lens: what each component of a trained model predicts when read through the LM head.

Components, as in snimu's 00004 predictions: x-i (the residual entering block i, un-normed), x-out (the normed
final residual), x00..x0N (the normed input embeddings), bigram (the bigram hash rows) and ve0.. (the raw value
embeddings): the streams of streams.streams, each sent through
the LM head and the soft-cap; probabilities by softmax over the padded vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from . import at_root
from .config import Config
from .data import tokenizer
from .model import GPT
from .checkpoint import load_checkpoint


def load_model(run_dir: str | Path) -> GPT:
    """The model of a run folder (config.json + checkpoint.pt; a relative path from the repository root), on CPU,
    in eval mode."""
    run_dir = at_root(run_dir)
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    model = GPT(cfg)
    ck = load_checkpoint(run_dir / "checkpoint.pt")
    model.load_state_dict(ck["model"])
    return model.eval()


@torch.no_grad()
def topk(model: GPT, text: str, k: int = 10, positions: int = 32) -> pd.DataFrame:
    """Long table: component, position, input token, rank, predicted token, probability."""
    enc = tokenizer()
    ids = enc.encode_ordinary(text)[:positions]
    if not ids:
        raise ValueError("text: needs at least one token")
    idx = torch.tensor([ids])
    acts: dict = {}
    model(idx, collect=acts)
    rows = []
    for name, h in acts.items():
        probs = model.head(h.float()).softmax(-1)[0]
        p, t = probs.topk(k, dim=-1)
        for pos in range(len(ids)):
            for r in range(k):
                rows.append((name, pos, enc.decode([ids[pos]]), r, enc.decode([int(t[pos, r])]), float(p[pos, r])))
    return pd.DataFrame(rows, columns=["component", "position", "input", "rank", "token", "prob"])


def logit_lens(model: GPT | str | Path, text: str, components=None, positions: int = 32) -> pd.DataFrame:
    """Top-1 next-token prediction per position (rows) and component (columns), like seed 003's table."""
    if not isinstance(model, GPT):
        model = load_model(model)
    long = topk(model, text, k=1, positions=positions)
    table = long.pivot(index=["position", "input"], columns="component", values="token")
    order = [c for c in _component_order(model) if c in table.columns]
    return table[[c for c in order if components is None or c in components]]


def _component_order(model: GPT) -> list[str]:
    L = model.cfg.num_layers
    return [f"x-{i}" for i in range(L)] + ["x-out"] + [s.name for s in model.streams]
