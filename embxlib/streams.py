"""The embedding streams of a config, specified once.

A *table* is a parameter looked up by token (or by a hash of the token pair): the packed input table (x00..x0N side
by side, one gather for all), the packed value-embedding table, the bigram hash table, the per-token lambdas. A
*stream* is what one slice of a table feeds into the model: an input stream is mixed into the residual before every
block with its own per-layer lambda column; a value stream is added to the attention values of its layers (scaled
by the SA lambda, or by a gate). The model builds its parameters, the optimiser its Adam groups, training its
lambda log, the logit lens its components, the analysis its mixing shares, the config its variant name, and the
benchmarks their parameter and FLOP counts from these lists; nothing else spells a stream's name.

Adding a stream: a `Table` in `tables`, its `Stream`(s) in `streams`, the lookup in model.GPT.lookup if it is not
by token, a name `stream_kind` recognises, and its tests.
"""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass

if typing.TYPE_CHECKING:  # (annotations only: the config imports this module to check token_lambdas)
    from .config import Config

# upstream's bigram hash (records/track_1_short/2026-01-19_BigramHashEmbedding): two odd multipliers spread
# (prev, cur) over int32; position 0 of a sequence, which has no previous token, gets the table's last row
BIGRAM_MULTIPLIERS = (36313, 27191)


@dataclass(frozen=True)
class Table:
    name: str  # the model's attribute (an nn.Embedding): embed, value_embed, bigram_embed, token_lambda
    rows: int
    width: int  # slices x model_dim (1 column per layer for the token lambdas)
    lookup: str  # "token" (the token id), "bigram_hash" (bigram_hash of the sequence) or "position_hash" (its control)
    init: str  # "normal:<std>", "zeros" or "ones"
    group: str  # Adam group (optim.adam_groups)
    lr: str  # the Config field of that group's learning rate


@dataclass(frozen=True)
class Stream:
    name: str  # as logged and analysed: x00, x01, bigram (input), ve0, ve1, ... (value)
    kind: str  # "input" or "value"
    table: str  # Table.name
    slot: int  # which model_dim slice of the table
    normed: bool  # RMS-normed after the lookup (the x0 streams) or added as looked up
    lambda_init: float | None = None  # input streams: the initial value of their per-layer lambda column
    layers: tuple[int, ...] = ()  # value streams: the layers whose attention values it joins


def tables(cfg: Config) -> list[Table]:
    """The looked-up parameters of cfg's model, in the order of model.GPT.lookup (the Adam groups' order)."""
    D, V = cfg.model_dim, cfg.vocab_size
    out = [Table("embed", V, (1 + cfg.extra_embeds) * D, "token", "normal:1", "embed", "embed_lr")]
    if cfg.num_ve_tables:
        out.append(Table("value_embed", V, cfg.num_ve_tables * D, "token", f"normal:{cfg.ve_init_std}", "embed",
                         "embed_lr"))
    if cfg.token_lambdas:
        out.append(Table("token_lambda", V, cfg.num_layers, "token", "ones", "token_lambdas", "token_lambda_lr"))
    if cfg.bigram_embeds:
        out.append(Table("bigram_embed", bigram_rows(cfg), D, "position_hash" if cfg.bigram_control else "bigram_hash",
                         "zeros", "bigram", "bigram_lr"))
    return out


def streams(cfg: Config) -> list[Stream]:
    """Input streams in lambda-column order (x00, x01, ..., bigram), then value streams (ve0, ve1, ...)."""
    out = [Stream(f"x0{k}", "input", "embed", k, True, 0.0) for k in range(1 + cfg.extra_embeds)]
    if cfg.bigram_embeds:
        out.append(Stream("bigram", "input", "bigram_embed", 0, False, 0.1))  # upstream's 0.1 start
    ve_map = cfg.ve_map()
    for t in range(cfg.num_ve_tables):
        out.append(Stream(f"ve{t}", "value", "value_embed", t, False, layers=tuple(
            i for i, u in enumerate(ve_map) if u == t)))
    return out


def input_streams(cfg: Config) -> list[Stream]:
    return [s for s in streams(cfg) if s.kind == "input"]


def mixing_columns(cfg: Config) -> list[str]:
    """The columns of the per-layer lambda matrix: the residual x, then each input stream."""
    return ["x"] + [s.name for s in input_streams(cfg)]


def scalar_layout(cfg: Config) -> list[tuple[str, tuple[int, ...], list[float]]]:
    """The one scalar vector, as upstream Record 8 / x01 lay it out: (name, shape, initial values) segments of
    skip weights (L), block lambdas (L x mixing columns), SA lambdas (L x 2: v, ve); then the smear lambda (1) and
    the backout pair (2) where they are on (medium records 15-16). A new input stream adds a
    lambda column, so every layout without it is unchanged."""
    L = cfg.num_layers
    cols = [1.0] + [s.lambda_init for s in input_streams(cfg)]  # x passes through; the streams start small
    out = [("skip", (L,), [1.0] * L), ("lambdas", (L, len(cols)), cols * L), ("sa", (L, 2), [0.5] * (2 * L))]
    # medium records 15-16 append theirs at the end, as upstream: [smear (record 16)], backout (record 15)
    if cfg.smear:
        out.append(("smear", (1,), [0.0]))
    if cfg.backout_layer >= 0:
        out.append(("backout", (2,), [1.0, 0.0]))  # the final residual's weight, then the backed-out layer's
    return out


def stream_kind(name: str) -> str | None:
    """What a lambda or lens stream named `name` is: "residual" (x), "input" (mixed in with a lambda), "value",
    or None (v, skip, norm, ...: not an embedding stream). Logs and published files carry only the names."""
    if name == "x":
        return "residual"
    if re.fullmatch(r"x0\d+|bigram", name):
        return "input"
    if re.fullmatch(r"ve\d+", name):
        return "value"
    return None


def describe_stream(cfg: Config, s: Stream) -> str:
    """One line for --dry-run: 'bigram: input, bigram_embed[0] (251,520 rows, by bigram hash), lambdas from 0.1'."""
    t = next(t for t in tables(cfg) if t.name == s.table)
    how = f"{s.kind}, {t.name}[{s.slot}] ({t.rows:,} rows, by {t.lookup.replace('_', ' ')}{', normed' if s.normed else ''})"
    if s.kind == "input":
        return f"{s.name}: {how}, lambdas from {s.lambda_init:g}"
    gate = f", gated ({cfg.ve_gates}, {cfg.ve_gate_dim} channels)" if cfg.ve_gates != "off" else ""
    return f"{s.name}: {how}, layers {','.join(map(str, s.layers))}{gate}"


def table_params(cfg: Config) -> int:
    """Parameters that are looked up, not multiplied: left out of the matmul FLOP count."""
    return sum(t.rows * t.width for t in tables(cfg))


def bigram_rows(cfg: Config) -> int:
    """Rows of the bigram hash table: bigram_vocab_mult x the padded vocabulary (upstream 5 x 50,304)."""
    return cfg.bigram_vocab_mult * cfg.head_vocab  # (the vocabulary padded to a multiple of 128)


if typing.TYPE_CHECKING:
    from torch import Tensor


def bigram_hash(idx: "Tensor", rows: int) -> "Tensor":
    """Upstream's get_bigram_hash on each sequence (last dim) of idx: (36313 x cur) XOR (27191 x prev) mod
    (rows - 1) in int32 (products past 2^31 wrap, as upstream's; % keeps the result non-negative), row rows - 1 for
    the first position. Upstream writes that row into the sequence before hashing, so it is also the second
    position's "previous token". Cheap enough to run inside the forward (see bench.bench_bigram_hash)."""
    import torch  # here: the analysis imports this module for stream_kind, without needing torch
    a, b = BIGRAM_MULTIPLIERS
    x = idx.to(torch.int32)
    first = torch.full_like(x[..., :1], rows - 1)
    prev = torch.cat([first, x[..., 1:-1]], dim=-1)
    return torch.cat([first, torch.bitwise_xor(a * x[..., 1:], b * prev) % (rows - 1)], dim=-1)


def position_hash(idx: "Tensor", rows: int) -> "Tensor":
    """The bigram table's control (Config.bigram_control): bigram_hash with the previous token replaced by a
    stand-in that depends only on the position in the sequence, ((2654435761 x position) mod 2^31) mod 50,257. The
    table keeps its rows, parameters, initialisation, optimiser and cost, and each row still belongs to a token,
    but no bigram reaches it: what the table gives beyond its parameters is the bigram. (Sequences pack documents
    at arbitrary offsets, so the position says next to nothing about the text.)"""
    import torch
    a, b = BIGRAM_MULTIPLIERS
    x = idx.to(torch.int32)
    pos = torch.arange(x.size(-1), device=x.device, dtype=torch.int64)
    stand_in = ((pos * 2654435761) % 2**31 % 50257).to(torch.int32).expand_as(x)
    first = torch.full_like(x[..., :1], rows - 1)
    return torch.cat([first, torch.bitwise_xor(a * x[..., 1:], b * stand_in[..., :-1]) % (rows - 1)], dim=-1)


def bigram_pair_rows(prev, cur, rows: int):
    """bigram_hash for given (previous, current) token pairs, in numpy: the row of each pair (int32 products
    wrapping as upstream's, the modulo non-negative)."""
    import numpy as np
    a, b = BIGRAM_MULTIPLIERS
    with np.errstate(over="ignore"):
        h = np.bitwise_xor(np.int32(a) * np.asarray(cur, dtype=np.int32), np.int32(b) * np.asarray(prev, dtype=np.int32))
    return np.mod(h.astype(np.int64), rows - 1)


def bigram_row_sharing(tokens, rows: int) -> dict:
    """How far "a learned vector for every pair" holds on a text: its distinct adjacent pairs, the rows they hash
    to, and the share of pairs that share their row with another pair of the text (a collision: the row learns a
    mix of both). Returns pairs, rows_used, shared_pairs, share."""
    import numpy as np
    t = np.asarray(tokens, dtype=np.int64)
    pairs = np.unique(t[:-1] * 65536 + t[1:])
    r = bigram_pair_rows(pairs // 65536, pairs % 65536, rows)
    used, counts = np.unique(r, return_counts=True)
    shared = int(counts[counts > 1].sum())
    return {"pairs": int(len(pairs)), "rows_used": int(len(used)), "shared_pairs": shared,
            "share": shared / len(pairs) if len(pairs) else float("nan")}
