"""Logit lens on a tiny model: components decoded through the head, checked against a hand computation,
and loaded from a run folder in the format train.py writes."""
import json
import os

import pytest
import torch

from embxlib import train
from embxlib.config import tiny
from embxlib.data import tokenizer
from embxlib.lens import load_model, logit_lens, topk
from embxlib.model import GPT, norm

TEXT = "mail account: email@example.com\n- Emails will include links. Nothing fancy."


def random_model(**kw):
    torch.manual_seed(0)
    m = GPT(tiny(extra_embeds=1, **kw)).eval()
    with torch.no_grad():
        m.lm_head_w.normal_()  # the zero-init head would predict token 0 everywhere
    return m


def test_x00_row_is_the_head_applied_to_the_embedding():
    m = random_model()
    table = logit_lens(m, TEXT, positions=8)
    enc = tokenizer()
    ids = enc.encode_ordinary(TEXT)[:8]
    x00 = norm(m.embed.weight[ids, :128])
    expected = [enc.decode([int(t)]) for t in m.head(x00).argmax(-1)]
    assert table["x00"].tolist() == expected
    assert list(table.columns)[:7] == [f"x-{i}" for i in range(6)] + ["x-out"]
    assert {"x01", "ve0", "ve1"} <= set(table.columns)
    assert [i for _, i in table.index] == [enc.decode([t]) for t in ids]


def test_topk_probabilities_are_sorted_and_sum_below_one():
    long = topk(random_model(), TEXT, k=5, positions=4)
    for _, g in long.groupby(["component", "position"]):
        assert g["prob"].is_monotonic_decreasing and 0 < g["prob"].sum() <= 1.0 + 1e-6


def test_model_loads_from_a_run_folder(tmp_path):
    m = random_model()
    (tmp_path / "config.json").write_text(json.dumps(m.cfg.to_dict()))
    torch.save({"model": m.state_dict()}, tmp_path / "checkpoint.pt")
    assert logit_lens(tmp_path, TEXT, positions=6).equals(logit_lens(m, TEXT, positions=6))


class RunsCode:
    """What a hostile checkpoint.pt can hold: unpickling it calls os.mkdir (it could be anything)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_checkpoints_are_loaded_as_weights_only(corpus, tmp_path):
    m = random_model()
    cfg = dict(m.cfg.to_dict(), data_dir=str(corpus))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "code-ran"
    torch.save({"model": m.state_dict(), "step": 0, "extra": RunsCode(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint.pt: holds more than tensors and plain data \(unsupported GLOBAL "
                                         r"posix.mkdir.*\); refusing to unpickle it"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="refusing to unpickle it"):
        train.main(["--resume", str(tmp_path)])
    assert not marker.exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "refusing to unpickle it" in summary["error"]
