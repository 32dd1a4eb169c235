"""SHA-256 hashes of what a preset computes at seed 0: the initial state dict, the training loss, every gradient,
and the weights after three optimizer steps (Adam and Muon with their schedules). A refactor or a new Config field
that is switched off must leave every line unchanged:

    python tests/state_hashes.py > before.txt      # on the start commit
    python tests/state_hashes.py > after.txt       # on the result
    diff before.txt after.txt

The medium presets are narrowed (model_dim 128, one head, MLP 512, 512 tokens) so that this runs on a CPU in a
minute; every other field is the preset's. Tokens are random with documents across block edges.
"""
import hashlib

import numpy as np
import torch

from embxlib.config import EOT_TOKEN, PRESETS
from embxlib.model import GPT
from embxlib.optim import apply_schedules, build_optimizers

T, W = 512, 3
NARROW = dict(model_dim=128, num_heads=1, mlp_dim=512, train_seq_len=T, val_seq_len=T, device="cpu")
CASES = {  # name: (preset, overrides)
    "tiny": ("tiny", dict(device="cpu")),
    "tiny_tl": ("tiny", dict(device="cpu", token_lambdas="x00")),
    "medium": ("medium", NARROW),
    "medium_x01": ("medium_x01", NARROW),
}


def digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tokens(n: int):
    g = np.random.default_rng(0)
    t = g.integers(0, 50000, n + 1)
    t[[0, 70, 130, 300]] = EOT_TOKEN
    t = torch.from_numpy(t)
    return t[:-1][None].int(), t[1:][None].long()


def case_lines(name: str, preset: str, kw: dict) -> list[str]:
    cfg = PRESETS[preset](**kw)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg)
    lines = [f"{name} init {digest(sorted(model.state_dict().items()))}"]
    seq = min(T, cfg.train_seq_len)
    window = W if preset != "tiny" else None
    adam, muon = build_optimizers(model, cfg)
    for step in range(3):
        x, y = tokens(seq + step)
        x, y = x[:, :seq], y[:, :seq]
        loss = model(x, y, window=window) if window else model(x, y)
        loss.backward()
        grads = [(n, p.grad) for n, p in sorted(model.named_parameters()) if p.grad is not None]
        lines.append(f"{name} step{step} loss {loss.item():.9g} {digest([('loss', loss.float())])} "
                     f"grads {digest(grads)}")
        apply_schedules(step, cfg, adam, muon)
        for opt in (adam, muon):
            opt.step()
        model.zero_grad(set_to_none=True)
    lines.append(f"{name} after3 {digest(sorted(model.state_dict().items()))}")
    return lines


if __name__ == "__main__":
    torch.set_num_threads(2)
    for name, (preset, kw) in CASES.items():
        for line in case_lines(name, preset, kw):
            print(line, flush=True)
