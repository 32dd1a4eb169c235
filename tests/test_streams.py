"""The stream specification (embxlib/streams.py) against what reads it: every stream a config can have is one the
analysis recognises, every embedding-variant field names the variant, and the parameter count of the spec's tables
is what the model allocates."""
import inspect
import itertools
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

from embxlib import config as config_module
from embxlib.config import Config, medium_x01, tiny, variant_name
from embxlib.model import GPT, count_params
from embxlib.stats import final_lambdas, is_mixing_stream, mixing_shares
from embxlib.streams import scalar_layout, stream_kind, streams, table_params, tables
from embxlib.metrics import lambda_record

# every combination of the stream-adding fields, on a model small enough to build many times
VARIANTS = [dict(extra_embeds=e, bigram_embeds=b, token_lambdas=t, ve_gates=g, value_embeds=v)
            for e, b, t, g, v in itertools.product((0, 2), (0, 1), ("", "x00"), ("off", "x_ve"), (0, 2))]


def small(**kw):
    return tiny(num_layers=4, window_pattern="LSSL", no_attn_layers=(), skip_map=(3, 0), model_dim=64, num_heads=1,
                mlp_dim=128, vocab_size=1000, **kw)


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: variant_name(small(**kw)))
def test_every_stream_is_recognised_by_the_analysis(kw):
    cfg = small(**kw)
    for s in streams(cfg):
        assert stream_kind(s.name) == s.kind, f"stream {s.name!r} ({s.kind}) is not recognised by streams.stream_kind"
    model = GPT(cfg)
    rec = lambda_record(model)
    lam = pd.DataFrame([dict(run="r", variant=cfg.name, step=10, stream=k, layer=i, value=v)
                        for k, vals in rec.items() if k != "token_lambda_mean" for i, v in enumerate(vals)
                        if v is not None and not (isinstance(v, float) and v != v)])
    inputs = {s.name for s in streams(cfg) if s.kind == "input"}
    assert {k for k in rec if is_mixing_stream(k)} == inputs | {"x"}
    shares = mixing_shares(final_lambdas(lam))
    assert set(shares["stream"]) == inputs | {"x"}  # no stream drops out of the mixing shares
    lens_components = [s.name for s in model.streams]
    assert set(lens_components) == {s.name for s in streams(cfg)}


def test_scalar_layout_is_upstreams_where_no_stream_is_added():
    """medium_x01: skip weights, 3 lambdas per layer, 2 SA lambdas per layer (test_upstream copies it as 6 x 16)."""
    layout = scalar_layout(medium_x01())
    assert [(n, shape) for n, shape, _ in layout] == [("skip", (16,)), ("lambdas", (16, 3)), ("sa", (16, 2))]
    assert [(n, shape) for n, shape, _ in scalar_layout(medium_x01(bigram_embeds=1))][1] == ("lambdas", (16, 4))


def _variant_fields() -> list[str]:
    src = inspect.getsource(Config)
    section = src.split("# --- embedding variants")[1].split("# ---")[0]
    return re.findall(r"^\s{4}(\w+):", section, re.M)


# for each embedding-variant field: (the other fields that make it matter, a different value)
ALTERNATIVES = {
    "extra_embeds": ({}, 3), "value_embeds": ({}, 1), "ve_layout": ({}, "mirrored"),
    "ve_span": ({"ve_layout": "adjacent", "value_embeds": 1}, 2), "ve_shift": ({"value_embeds": 1}, 1),
    "ve_remove": ({}, (0,)), "ve_layers": ({}, (0, -1, -1, -1, -1, 0)), "token_lambdas": ({}, "x00"),
    "ve_init_std": ({}, 0.01), "ve_gates": ({}, "x"), "ve_gate_dim": ({"ve_gates": "x"}, 8),
    "bigram_embeds": ({}, 1), "bigram_vocab_mult": ({"bigram_embeds": 1}, 2),
    "bigram_control": ({"bigram_embeds": 1}, 1),
}


@pytest.mark.parametrize("name", _variant_fields())
def test_every_embedding_variant_field_changes_the_variant_name(name):
    """Two models that differ in an embedding variant never share a label (the analysis would merge them)."""
    assert name in ALTERNATIVES, (f"Config.{name} is an embedding-variant field: give it a part in "
                                  f"config.variant_name and an entry in ALTERNATIVES here")
    context, other = ALTERNATIVES[name]
    base = tiny(**context).validate()
    changed = tiny(**{**context, name: other}).validate()
    assert getattr(base, name) != other
    assert base.name != changed.name, f"{name}={other!r} leaves the variant name {base.name!r}"


@pytest.mark.parametrize("kw", [{}, dict(extra_embeds=2, bigram_embeds=1, token_lambdas="x01", ve_gates="x")])
def test_the_specs_tables_are_what_the_model_allocates(kw):
    cfg = tiny(**kw)
    with torch.device("meta"):
        model = GPT(cfg)
    assert table_params(cfg) == sum(model.table(t.name).weight.numel() for t in tables(cfg))
    assert {n.split(".")[0] for n, _ in model.named_parameters()} - {t.name for t in tables(cfg)} == {
        "blocks", "lm_head_w", "scalars"}  # nothing looked up outside the spec
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


def test_dry_run_prints_the_bigram_variants_parameter_count():
    out = subprocess.run([sys.executable, "-m", "embxlib.train", "--dry-run", "--preset", "medium_x01",
                          "--bigram-embeds", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    n = count_params(medium_x01(bigram_embeds=1))
    assert n - count_params(medium_x01()) == 50304 * 5 * 1024 + 16  # the table and one lambda per layer
    assert f"parameters: {n:,}" in out.stdout
    assert "bigram: input, bigram_embed[0] (251,520 rows, by bigram hash), lambdas from 0.1" in out.stdout


def test_bad_stream_settings_are_refused_naming_the_field():
    for kw, msg in ((dict(bigram_embeds=2), "bigram_embeds=2: allowed: 0"), (dict(ve_gates="y"), "ve_gates='y'"),
                    (dict(ve_gates="x_ve", ve_gate_dim=7), "ve_gate_dim=7"), (dict(bigram_vocab_mult=0), "must be >= 1"),
                    (dict(ve_init_std=-1.0), "ve_init_std=-1.0"),
                    (dict(bigram_control=1), "bigram_control=1: allowed: 0 (off) or 1 with bigram_embeds 1")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            tiny(**kw).validate()
    assert config_module.CHOICES["ve_gates"] == ("off", "x", "x_ve")


def test_bigram_row_sharing_counts_pairs_that_share_their_hashed_row():
    import numpy as np
    import torch

    from embxlib.streams import bigram_hash, bigram_pair_rows, bigram_row_sharing
    rows = 1000
    x = torch.randint(0, 50257, (1, 400), generator=torch.Generator().manual_seed(0))
    # the numpy hash is the model's: position i >= 2 hashes (x[i-1], x[i])
    assert (bigram_hash(x, rows)[0, 2:].numpy() == bigram_pair_rows(x[0, 1:-1].numpy(), x[0, 2:].numpy(), rows)).all()
    tokens = x[0].numpy()
    out = bigram_row_sharing(tokens, rows)
    pairs = {(int(a), int(b)) for a, b in zip(tokens[:-1], tokens[1:])}
    row_of = {p: int(bigram_pair_rows(p[0], p[1], rows)) for p in pairs}
    counts = np.bincount(list(row_of.values()), minlength=rows)
    assert out["pairs"] == len(pairs) and out["rows_used"] == int((counts > 0).sum())
    assert out["shared_pairs"] == sum(1 for r in row_of.values() if counts[r] > 1)


def test_the_bigram_control_is_the_same_table_without_the_bigrams():
    """bigram_control (the parameter-matched control of a sweep's bigram arm): the same table, parameters, start and
    lookup cost; each row is keyed by the token and its position, never by the previous token."""
    import torch

    from embxlib.streams import BIGRAM_MULTIPLIERS, bigram_hash, position_hash
    rows = 1000
    x = torch.randint(0, 50257, (2, 300), generator=torch.Generator().manual_seed(0))
    r = position_hash(x, rows)
    assert r.shape == x.shape and int(r.min()) >= 0 and int(r.max()) == rows - 1 and (r[:, 0] == rows - 1).all()
    y = x.clone()
    y[:, :-1] = torch.randint(0, 50257, (2, 299), generator=torch.Generator().manual_seed(1))  # every other token
    assert torch.equal(position_hash(y, rows)[:, 1:][y[:, 1:] == x[:, 1:]], r[:, 1:][y[:, 1:] == x[:, 1:]])
    assert not torch.equal(bigram_hash(y, rows), bigram_hash(x, rows))  # the bigram hash does see them
    a, b = BIGRAM_MULTIPLIERS  # by hand: position 5's stand-in for the previous token is that of position 4
    stand_in = (4 * 2654435761) % 2**31 % 50257
    assert int(r[0, 5]) == ((a * int(x[0, 5])) ^ (b * stand_in)) % (rows - 1)
    same = tiny(bigram_embeds=1, precision="fp32")
    ctl = tiny(bigram_embeds=1, bigram_control=1, precision="fp32")
    assert [t.rows for t in tables(ctl)] == [t.rows for t in tables(same)] and count_params(ctl) == count_params(same)
    torch.manual_seed(0)
    m1 = GPT(same)
    torch.manual_seed(0)
    m2 = GPT(ctl)
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))  # paired seeds
    assert ctl.name == "x00-ve2-bigramcontrol-fp32" and stream_kind("bigram") == "input"
