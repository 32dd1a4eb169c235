"""The one configuration of embxlib: every model variant and training setting is a field of `Config`.

Presets are plain functions (`medium`, `medium_x01`, `tiny`). The CLI flags of `python -m embxlib.train`
and the notebook parameters are generated from / checked against the fields, so the three never drift.
Each field's trailing comment is its help text.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from .runfolder import check_folder_name
from .streams import input_streams

# fields that take one of a few values: the CLI offers them as choices, validate() enforces them
CHOICES = {"ve_layout": ("upstream", "mirrored", "adjacent"), "ve_gates": ("off", "x", "x_ve"), "precision": ("bf16", "fp32"),
           "device": ("auto", "cpu", "cuda"), "attention": ("auto", "flex", "sdpa"), "fused_loss": ("auto", "on", "off"),
           "sparse_table_grads": ("auto", "on", "off"),
           "muon_smoothing_mode": ("ema", "nesterov")}

# FlexAttention on CUDA: the block size must be a multiple of every tile of torch inductor's default kernel configs
# on sm80/sm90/sm100 (bf16 and fp32, head_dim <= 256): on sm90 bf16 head_dim 64 they are 128x128 forward and
# (64, 128, 128, 64) backward, and a block of 64 tokens fails there with "Q and KV block size must be divisible by
# BLOCK_M and BLOCK_N" (tests/test_gpu.py reads the configs from the installed torch for each capability)
FLEX_CUDA_BLOCK = 128

MAX_SEED = 2**63 - 1
MAX_VARIANT_NAME = 100  # bytes: the run folder is <date>-<time>_<name>_s<seed>, at most 255 bytes

VOCAB_SIZE = 50257  # GPT-2; embedding tables keep this many rows, the LM head is padded
EOT_TOKEN = 50256  # <|endoftext|>, also the document separator of the data shards


@dataclass
class Config:
    # --- run identity ---
    preset: str = "tiny"  # preset the other fields started from (tiny, medium, medium_x01, medium_r12..medium_r17)
    name: str = ""  # variant label used in run-folder names and analysis; empty: derived from the variant fields
    seed: int = 0  # seed of the initialisation, and of the data order with shuffle_data

    # --- architecture (upstream Record 8 / x01 record) ---
    vocab_size: int = VOCAB_SIZE  # rows of every embedding table; the LM head is padded to a multiple of 128
    num_layers: int = 6  # transformer blocks
    model_dim: int = 128  # residual width; num_heads * head_dim must equal it
    num_heads: int = 2  # attention heads
    head_dim: int = 64  # width of one head (upstream 128)
    mlp_dim: int = 512  # hidden width of the ReLU^2 MLP (upstream 4 * model_dim)
    no_attn_layers: tuple[int, ...] = (2,)  # layers whose block has an MLP only (upstream: layer 7)
    skip_map: tuple[int, ...] = (3, 1, 4, 0)  # U-net skips as flat dest,src pairs: output of src is added before dest
    window_pattern: str = "LSLSSL"  # per-layer attention window: L (long) or S (short, half the long window)
    window_max: int = 384  # long window at the end of training, in tokens (upstream 3456)
    attn_block_size: int = 64  # granularity of the window schedule in tokens (upstream 128, FlexAttention's block)
    attn_scale: float = 0.17  # softmax scale on QK-normed heads (upstream 0.12 at head_dim 128)
    logit_softcap: float = 15.0  # ISRU soft-cap of the logits: c * z / sqrt(z^2 + c^2)
    backout_layer: int = -1  # before the head x becomes norm(x) l0 + norm(output of this layer) l1, l from (1, 0) (record 15: 11); -1: off
    smear: bool = False  # after the final norm each position adds l times the one before it, l from 0 (record 16's Smear-MTP)
    precision: str = "bf16"  # bf16: upstream's policy (bf16 tables, blocks, residual; fp32 masters); fp32: all fp32

    # --- embedding variants (the subject of the seed experiments) ---
    extra_embeds: int = 0  # N extra input embeddings x01..x0N mixed into the residual before every block
    value_embeds: int = 2  # number of value-embedding tables (upstream Record 8: 3, x01 record: 5)
    ve_layout: str = "upstream"  # table placement: upstream (i & L-n+i), mirrored (i & L-1-i), adjacent (runs of ve_span layers)
    ve_span: int = 3  # with the adjacent layout: how many consecutive layers share one table
    ve_shift: int = 0  # shift the early group of value-embedding layers this many layers deeper
    ve_remove: tuple[int, ...] = ()  # layers whose value embedding is removed (a table no layer uses is dropped)
    ve_layers: tuple[int, ...] = ()  # explicit per-layer table index (-1: none), length num_layers; overrides layout
    token_lambdas: str = ""  # per-token lambda embeddings (vocab, 1) per layer on this input stream (x00, x01, ..., bigram); empty: off
    ve_init_std: float = 1.0  # value-embedding tables start N(0, std^2) (nn.Embedding's 1; the 2026-02-03 VeTuned record 0.01)
    ve_gates: str = "off"  # value embedding times a per-head gate 2 sigmoid(W g), g the first ve_gate_dim channels of norm(x) (x), or half from norm(x), half from ve (x_ve)
    ve_gate_dim: int = 16  # channels the value-embedding gate reads (upstream medium record 18: 16; VeTuned: 6 + 6)
    bigram_embeds: int = 0  # 1: a bigram hash embedding, zero-init, added un-normed before every block with lambdas from 0.1
    bigram_vocab_mult: int = 5  # rows of the bigram hash table in multiples of the padded vocabulary (upstream 5 x 50,304)
    bigram_control: int = 0  # 1: the bigram table's parameter-matched control: the same table looked up at (token, a stand-in for the previous token fixed by the position), so no bigram reaches it

    # --- optimisation (upstream section 2) ---
    num_iterations: int = 200  # training steps
    cooldown_frac: float = 0.7  # fraction of training spent decaying the learning rate linearly to 0
    train_batch_tokens: int = 2048  # global tokens per step, fixed for any world size (gradient accumulation)
    train_seq_len: int = 512  # tokens per rank per micro-step (one flat document-masked sequence)
    embed_lr: float = 0.3  # Adam lr of the input, extra and value embeddings
    head_lr: float = 0.003125  # Adam lr of the LM head (upstream 1/320)
    scalar_lr: float = 0.015  # Adam lr of the per-layer lambdas and skip weights
    token_lambda_lr: float = 0.3  # Adam lr of the per-token lambda embeddings (they sit in the embedding group)
    bigram_lr: float = 0.3  # Adam lr of the bigram hash table (its own group; upstream gives it the value embeddings' settings)
    adam_beta1: float = 0.8  # Adam beta1 for all Adam groups
    adam_beta2: float = 0.95  # Adam beta2 for all Adam groups
    adam_eps: float = 1e-10  # Adam epsilon
    muon_lr: float = 0.025  # Muon lr of the block matrices
    muon_momentum: float = 0.95  # Muon momentum after warm-up
    muon_momentum_start: float = 0.85  # Muon momentum at step 0
    muon_momentum_warmup_steps: int = 300  # steps of the linear momentum warm-up
    muon_weight_decay: float = 0.01  # decoupled weight decay of Muon (times 2 on the MLP, as upstream)
    muon_smoothing: float = 0.0  # Muon update smoothing s (a bf16 buffer becomes s buf + (1 - s) v; medium records 13-16); 0: off
    muon_smoothing_start: float = 0.0  # smoothing s at step 0 when muon_smoothing_steps > 0 (record 13: 0.5)
    muon_smoothing_steps: int = 0  # steps of the linear move of s from muon_smoothing_start to muon_smoothing (record 13: 3000); 0: s fixed
    muon_smoothing_mode: str = "ema"  # the update Muon applies: ema (the buffer, records 14-16) or nesterov (s buf + (1 - s) v again, record 13)
    final_lr_frac: float = 0.0  # the lr multiplier's floor at the end of the cooldown (records 13-16: 0.01)
    snoo_every: int = 0  # Snoo outer optimiser over all parameters every this many steps (records 12, 14-16: 28); 0: off
    snoo_lr: float = 0.68  # Snoo's SGD-Nesterov lr on the outer gradient (outer copy - current weights)
    snoo_momentum: float = 0.37  # Snoo's SGD-Nesterov momentum

    # --- validation and logging ---
    val_tokens: int = 16384  # tokens per validation, fixed for comparability (upstream 10,485,760)
    val_seq_len: int = 1024  # tokens per rank per validation micro-step
    val_loss_every: int = 25  # validate every this many steps (and at the last step)
    target_val_loss: float = 6.0  # loss whose first crossing is reported in summary.json (medium: 2.92)
    save_every: int = 0  # also checkpoint every this many steps (0: only at the end)
    save_checkpoint: bool = True  # write checkpoint.pt (at save_every and at the end); off: a benchmark that never resumes
    data_dir: str = "data/shakespeare"  # folder of *_train_*.bin / *_val_*.bin shards
    repeat_data: bool = False  # allow more than one pass over the training shards (off: refuse to start, as upstream)
    shuffle_data: bool = False  # visit the training batches in an order drawn from seed, new each epoch (off: upstream's)

    # --- compilation (seed 003 compares runs with and without coordinate_descent_tuning) ---
    compile: bool = True  # torch.compile the model (on a CPU too: a tiny step takes 0.7x the eager time)
    coordinate_descent_tuning: bool = False  # torch._inductor.config.coordinate_descent_tuning
    compiled_autograd: bool = False  # torch._dynamo.config.compiled_autograd (Record 8 had it), set before compile; it reaches only a backward run inside a compiled call, and the trainer's (as upstream's) runs outside the compiled forward: it captures nothing (tests/test_gpucheck.py)
    warmup_steps: int = 2  # untimed steps on random tokens before training, then the state is restored (compile)
    device: str = "auto"  # auto (cuda if available), cuda or cpu
    attention: str = "auto"  # auto (flex on cuda, sdpa on cpu), flex or sdpa
    fused_loss: str = "auto"  # training loss as model.HeadLoss (on) or the autograd graph torch.compile fuses (off); auto: on on cpu
    sparse_table_grads: str = "auto"  # table gradients of only the looked-up rows (model.SparseRowsGrad); auto: on cpu when training
    sparse_table_comm: bool = False  # ranks exchange only the looked-up rows of table gradients where that moves fewer bytes (gloo only)

    # ----------------------------------------------------------------------------------------------
    def __post_init__(self):
        for f in fields(self):  # JSON and the CLI give lists; keep tuples so configs compare equal
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        if not self.name:
            self.name = variant_name(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)}; allowed: {sorted(f.name for f in fields(cls))}")
        return cls(**d)

    # derived sizes -------------------------------------------------------------------------------
    @property
    def head_vocab(self) -> int:
        return next_multiple(self.vocab_size, 128)

    @property
    def skip_pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.skip_map[0::2], self.skip_map[1::2]))

    def ve_map(self) -> list[int | None]:
        """Value-embedding table of each layer (None: no value embedding), after layout, shift and removal.
        Tables used by no attention layer are dropped and the rest renumbered 0.. in their original order."""
        L = self.num_layers
        raw = self._layout_map()
        if self.ve_shift and not self.ve_layers:
            early_layers = [i for i in range(L // 2) if raw[i] is not None]
            shifted = {i + self.ve_shift: raw[i] for i in early_layers}
            for i in early_layers:
                raw[i] = None
            for i, t in shifted.items():
                raw[i] = t
        for i in self.ve_remove:
            raw[i] = None
        for i in self.no_attn_layers:
            raw[i] = None
        order = {t: i for i, t in enumerate(sorted({t for t in raw if t is not None}))}
        return [None if t is None else order[t] for t in raw]

    def _layout_map(self) -> list[int | None]:
        L, n = self.num_layers, self.value_embeds
        if self.ve_layers:
            return [None if t < 0 else t for t in self.ve_layers]
        raw: list[int | None] = [None] * L
        if self.ve_layout == "upstream":
            for i in range(n):
                raw[i], raw[L - n + i] = i, i
        elif self.ve_layout == "mirrored":
            for i in range(n):
                raw[i], raw[L - 1 - i] = i, i
        elif self.ve_layout == "adjacent":
            early = (n + 1) // 2
            for t in range(early):
                for j in range(self.ve_span):
                    raw[t * self.ve_span + j] = t
            for t in range(n - early):
                for j in range(self.ve_span):
                    raw[L - (n - early - t) * self.ve_span + j] = early + t
        return raw

    @property
    def num_ve_tables(self) -> int:
        return len({t for t in self.ve_map() if t is not None})

    def validate(self, world_size: int | None = None) -> "Config":
        """Raise ValueError naming the bad field and what is allowed. Cheap: runs before anything is built."""
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        check_folder_name("name", self.name, MAX_VARIANT_NAME)  # part of the run folder's name
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"must be an integer in 0..{MAX_SEED} (2**63-1; torch.manual_seed's range)")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                bad(f.name, "must be a finite number")
        for name in ("embed_lr", "head_lr", "scalar_lr", "token_lambda_lr", "bigram_lr", "muon_lr", "muon_weight_decay",
                     "adam_eps", "ve_init_std", "snoo_lr"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0 (torch's optimizers refuse a negative value)")
        for name in ("adam_beta1", "adam_beta2", "muon_momentum", "muon_momentum_start", "muon_smoothing",
                     "muon_smoothing_start", "snoo_momentum", "final_lr_frac"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")
        for name in ("logit_softcap", "attn_scale"):
            if getattr(self, name) <= 0:
                bad(name, "must be > 0" + (" (the cap c z / sqrt(z^2 + c^2) is 0/0 at c = 0)"
                                           if name == "logit_softcap" else ""))
        for name in ("num_layers", "model_dim", "num_heads", "head_dim", "mlp_dim", "num_iterations", "train_batch_tokens",
                     "train_seq_len", "val_tokens", "val_seq_len", "val_loss_every", "window_max", "attn_block_size",
                     "vocab_size", "ve_span", "bigram_vocab_mult"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("extra_embeds", "value_embeds", "save_every", "warmup_steps", "ve_shift", "muon_momentum_warmup_steps",
                     "muon_smoothing_steps", "snoo_every"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        L = self.num_layers
        if self.preset not in PRESETS:
            bad("preset", f"allowed: {sorted(PRESETS)}")
        if self.num_heads * self.head_dim != self.model_dim:
            bad("head_dim", f"num_heads * head_dim must equal model_dim={self.model_dim}")
        if self.head_dim % 4:
            bad("head_dim", "must be a multiple of 4 (half-truncated rotary)")
        for i in self.no_attn_layers:
            if not 0 <= i < L:
                bad("no_attn_layers", f"layer {i} does not exist; allowed 0..{L - 1}")
        if len(self.skip_map) % 2:
            bad("skip_map", "must be dest,src pairs")
        for d, s in self.skip_pairs:
            if not (0 <= s < d < L):
                bad("skip_map", f"pair {d},{s} needs 0 <= src < dest < num_layers={L}")
        if len(self.window_pattern) != L or set(self.window_pattern) - set("LS"):
            bad("window_pattern", f"needs one of L/S per layer ({L} characters)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                bad(name, f"allowed: {', '.join(allowed)}")
        if self.ve_layers:
            if len(self.ve_layers) != L:
                bad("ve_layers", f"needs one entry per layer ({L}), -1 for none")
            if any(t >= self.value_embeds or t < -1 for t in self.ve_layers):
                bad("ve_layers", f"table indices must be -1 or 0..value_embeds-1={self.value_embeds - 1}")
        elif self.ve_layout in ("upstream", "mirrored") and 2 * self.value_embeds > L:
            bad("value_embeds", f"the {self.ve_layout} layout puts each table on two layers: at most num_layers/2={L // 2}")
        elif self.ve_layout == "adjacent" and self.value_embeds * self.ve_span > L:
            bad("value_embeds", f"adjacent layout needs value_embeds * ve_span <= num_layers={L}")
        if self.ve_shift and not self.ve_layers:
            early = [i for i, t in enumerate(self._layout_map()[: L // 2]) if t is not None]
            if early and max(early) + self.ve_shift >= L // 2:
                bad("ve_shift", f"shifted early layers {early} must stay in the first half (< {L // 2})")
        if not -1 <= self.backout_layer < L:
            bad("backout_layer", f"-1 (off) or a layer 0..{L - 1}")
        for i in self.ve_remove:
            if not 0 <= i < L:
                bad("ve_remove", f"layer {i} does not exist; allowed 0..{L - 1}")
        if self.bigram_embeds not in (0, 1):
            bad("bigram_embeds", "allowed: 0 (off) or 1 (one bigram hash table, as upstream)")
        if self.bigram_control not in (0, 1) or (self.bigram_control and not self.bigram_embeds):
            bad("bigram_control", "allowed: 0 (off) or 1 with bigram_embeds 1 (the control of a bigram table)")
        if self.ve_gates != "off" and not 2 <= self.ve_gate_dim <= self.model_dim:
            bad("ve_gate_dim", f"the gate reads 2..model_dim={self.model_dim} channels")
        if self.ve_gates == "x_ve" and self.ve_gate_dim % 2:
            bad("ve_gate_dim", "x_ve gates read half their channels from x and half from ve: must be even")
        if self.token_lambdas:
            allowed = [s.name for s in input_streams(self)]
            if self.token_lambdas not in allowed:
                bad("token_lambdas", f"allowed: '' (off) or one of {allowed}")
        if self.train_seq_len % self.attn_block_size or self.val_seq_len % self.attn_block_size:
            bad("train_seq_len", f"train_seq_len and val_seq_len must be multiples of attn_block_size={self.attn_block_size}")
        if not 0 <= self.cooldown_frac <= 1:
            bad("cooldown_frac", "must be in [0, 1]")
        if self.flex_on_cuda() and self.attn_block_size % FLEX_CUDA_BLOCK:
            bad("attn_block_size", f"FlexAttention on CUDA needs a multiple of {FLEX_CUDA_BLOCK} (its kernel tiles on "
                f"sm80/sm90/sm100): allowed {FLEX_CUDA_BLOCK}, {2 * FLEX_CUDA_BLOCK}, ...; or attention='sdpa'")
        if self.sparse_table_comm and (self.device == "cuda" or self.device == "auto" and self._cuda_available()):
            bad("sparse_table_comm", "gloo (CPU) only: each step reads the ranks' row counts on the host, a sync "
                "per step on a GPU; allowed there: false")
        if world_size is not None:
            self.grad_accum_steps(world_size)
            self.val_steps(world_size)
        return self

    def flex_on_cuda(self) -> bool:
        """Whether a run of this config attends with FlexAttention's CUDA kernels (device and attention resolved
        as training resolves them)."""
        if self.attention == "sdpa" or self.device == "cpu":
            return False
        if self.device == "cuda":
            return True
        return self._cuda_available()  # device auto: CUDA where there is one

    @staticmethod
    def _cuda_available() -> bool:
        import torch
        return torch.cuda.is_available()

    def grad_accum_steps(self, world_size: int) -> int:
        return self._micro_steps("train_batch_tokens", "train_seq_len", world_size)

    def val_steps(self, world_size: int) -> int:
        return self._micro_steps("val_tokens", "val_seq_len", world_size)

    def _micro_steps(self, total_field: str, len_field: str, world_size: int) -> int:
        """total_field tokens in micro-steps of world_size x len_field; raise naming what would fit otherwise."""
        total, seq_len = getattr(self, total_field), getattr(self, len_field)
        per_micro = world_size * seq_len
        if total % per_micro == 0:
            return total // per_micro
        worlds = [w for w in range(1, 65) if total % (w * seq_len) == 0]
        below, above = total // per_micro * per_micro, (total // per_micro + 1) * per_micro
        lens = [n for n in range(self.attn_block_size, total // world_size + 1, self.attn_block_size)
                if total % (world_size * n) == 0][-3:]
        fits = [f"{total_field} a multiple of {per_micro} (e.g. {', '.join(map(str, filter(None, (below, above))))})"]
        if lens:
            fits.append(f"{len_field} in {lens}")
        if worlds:
            fits.append(f"world sizes {worlds}")
        raise ValueError(f"{total_field}={total} is not a multiple of world_size={world_size} x {len_field}={seq_len}; "
                         f"what fits: {' or '.join(fits)}")


def cpu_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX). Without, oneDNN's bf16 products
    run ~7x slower than fp32 ones (an AVX2 EPYC: 14.5 s against 2.1 s for 512 x 1024 x 50,304)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: keep upstream's policy
        return True
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def differing_fields(found: dict, wanted: dict) -> list[tuple[str, object, object]]:
    """(field, value in found, value in wanted) for every Config field whose values differ, lists and tuples alike.
    A field one dict lacks (added to Config after that config was written) counts as its default: that run
    trained as the default says."""
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v
    missing = "(missing)"
    defaults = {k: f.default for k, f in Config.__dataclass_fields__.items()}
    found, wanted = {**defaults, **found}, {**defaults, **wanted}
    return [(k, found.get(k, missing), wanted.get(k, missing))
            for k in Config.__dataclass_fields__ if norm(wanted.get(k, missing)) != norm(found.get(k, missing))]


def config_differences(found: dict, wanted: dict, found_as: str = "in the folder",
                       wanted_as: str = "requested") -> list[str]:
    """'field A <found_as>, B <wanted_as>' for every Config field whose values differ (differing_fields)."""
    return [f"{k} {a!r} {found_as}, {b!r} {wanted_as}" for k, a, b in differing_fields(found, wanted)]


def next_multiple(v: float, n: int) -> int:
    """The smallest multiple of n that is >= v and >= n, v a float, as upstream's next_multiple_of_n (which rounds the
    float up: 256.5 -> 384 for n = 128, where truncating to an int first would give 256)."""
    k = max(1, math.ceil(v / n))
    while k > 1 and (k - 1) * n >= v:  # v / n can round across an integer; settle it on the exact comparison
        k -= 1
    while k * n < v:
        k += 1
    return k * n


_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def variant_name(cfg: Config) -> str:
    """Short label of the embedding variant, e.g. 'x00-ve3' (Record 8), 'x01-ve5' (x01 record), 'x02-ve2-tlx00',
    'x01-ve5-gatex-bigram'. tests/test_config.py checks that every field of the embedding-variant section of Config
    changes it.
    It says what is built: value embeddings that no layer uses are not counted (ve0), and attention-free layers
    other than the preset's are named, so two different models never share a label."""
    parts = [f"x0{cfg.extra_embeds}"]
    try:
        tables = cfg.num_ve_tables
    except IndexError:  # a layer out of range: validate() names the field; keep the name derivable until then
        tables = cfg.value_embeds
    if tables == 0:
        parts.append("ve0")
    else:
        parts.append(f"ve{cfg.value_embeds}")
        if cfg.ve_layout != "upstream":
            parts.append(cfg.ve_layout + (str(cfg.ve_span) if cfg.ve_layout == "adjacent" else ""))
        if cfg.ve_shift:
            parts.append(f"shift{cfg.ve_shift}")
        if cfg.ve_remove:
            parts.append("rm" + "-".join(map(str, cfg.ve_remove)))
        if cfg.ve_layers:  # each layer's table as one character, x for none: the layout itself, not just "explicit"
            parts.append("velayers" + "".join("x" if t < 0 else _DIGITS[t % 36] for t in cfg.ve_layers))
        if cfg.ve_init_std != 1.0:
            parts.append(f"veinit{cfg.ve_init_std:g}")
        if cfg.ve_gates != "off":
            parts.append("gate" + cfg.ve_gates.replace("_", "") + (str(cfg.ve_gate_dim) if cfg.ve_gate_dim != 16 else ""))
    if cfg.preset in PRESETS and cfg.no_attn_layers != PRESETS[cfg.preset](name=cfg.preset).no_attn_layers:
        parts.append("noattn" + "-".join(map(str, cfg.no_attn_layers)))
    if cfg.token_lambdas:
        parts.append(f"tl{cfg.token_lambdas}")
    if cfg.bigram_embeds:
        parts.append("bigram" + (str(cfg.bigram_vocab_mult) if cfg.bigram_vocab_mult != 5 else "")
                     + ("control" if cfg.bigram_control else ""))
    if cfg.backout_layer >= 0:
        parts.append(f"backout{cfg.backout_layer}")
    if cfg.smear:
        parts.append("smear")
    if cfg.snoo_every:
        parts.append(f"snoo{cfg.snoo_every}" + (f"lr{cfg.snoo_lr:g}" if cfg.snoo_lr != 0.68 else "")
                     + (f"m{cfg.snoo_momentum:g}" if cfg.snoo_momentum != 0.37 else ""))
    if cfg.muon_smoothing > 0 or (cfg.muon_smoothing_steps > 0 and cfg.muon_smoothing_start > 0):
        parts.append(f"smooth{cfg.muon_smoothing:g}"
                     + (f"from{cfg.muon_smoothing_start:g}over{cfg.muon_smoothing_steps}" if cfg.muon_smoothing_steps else "")
                     + ("nesterov" if cfg.muon_smoothing_mode == "nesterov" else ""))
    if cfg.final_lr_frac:
        parts.append(f"lrfloor{cfg.final_lr_frac:g}")
    if cfg.precision != "bf16":
        parts.append(cfg.precision)
    return "-".join(parts)


# --- presets -------------------------------------------------------------------------------------

def tiny(**kw) -> Config:
    """The medium architecture scaled down for 2 CPU cores: value embeddings on first/last layers, an
    attention-free middle layer, U-net skips and lambdas kept; a 200-step run takes a few minutes."""
    return Config(**{"preset": "tiny", **kw})


def medium(**kw) -> Config:
    """Upstream Record 8 exactly: the baseline of every seed experiment."""
    d = dict(preset="medium", num_layers=16, model_dim=1024, num_heads=8, head_dim=128, mlp_dim=4096,
             no_attn_layers=(7,), skip_map=(9, 6, 10, 4, 11, 2), window_pattern="LSSSLSSSSSSLSSSL",
             window_max=3456, attn_block_size=128, attn_scale=0.12, value_embeds=3, num_iterations=5960,
             train_batch_tokens=524288, train_seq_len=65536, val_tokens=10485760, val_seq_len=262144,
             val_loss_every=125, target_val_loss=2.92, compile=True, coordinate_descent_tuning=True,
             compiled_autograd=True, warmup_steps=10, data_dir="data/fineweb10B")
    return Config(**{**d, **kw})


def medium_x01(**kw) -> Config:
    """The x01 record (PR #124): 5 value embeddings, one extra input embedding, 5690 steps, no compiled_autograd."""
    return medium(**{"preset": "medium_x01", "value_embeds": 5, "extra_embeds": 1, "num_iterations": 5690,
                     "compiled_autograd": False, **kw})


# the medium records built on x01 (records/track_2_medium at f411b3d3; each script is its log's text before the first
# "=====" line). Each keeps x01's model, tables and schedules except what it names.

def medium_r12(**kw) -> Config:
    """Medium record 12 (2025-09-16_Snoo): x01 + Snoo over all parameters every 28 steps (lr 0.68, momentum 0.37),
    Muon lr 0.027, 5640 steps."""
    return medium_x01(**{"preset": "medium_r12", "snoo_every": 28, "snoo_lr": 0.68, "snoo_momentum": 0.37,
                         "muon_lr": 0.027, "num_iterations": 5640, **kw})


def medium_r13(**kw) -> Config:
    """Medium record 13 (2025-09-17_UpdateSmoothing): x01 + Muon update smoothing (bf16 buffer, the Nesterov-like
    v = s buf + (1 - s) v, s from 0.5 to 0.2 over 3000 steps), Muon lr 0.03, lr floor 0.01, 5610 steps."""
    return medium_x01(**{"preset": "medium_r13", "muon_smoothing": 0.2, "muon_smoothing_start": 0.5,
                         "muon_smoothing_steps": 3000, "muon_smoothing_mode": "nesterov", "muon_lr": 0.03,
                         "final_lr_frac": 0.01, "num_iterations": 5610, **kw})


def medium_r14(**kw) -> Config:
    """Medium record 14 (2025-09-30_SmoothedSnooMedium): record 12 + a plain EMA of Muon's update (v = buf,
    s = 0.2 fixed), Muon lr 0.03, lr floor 0.01, 5590 steps."""
    return medium_r12(**{"preset": "medium_r14", "muon_smoothing": 0.2, "muon_smoothing_mode": "ema",
                         "muon_lr": 0.03, "final_lr_frac": 0.01, "num_iterations": 5590, **kw})


def medium_r15(**kw) -> Config:
    """Medium record 15 (2025-10-04_GPT2MediumLayerReuse): record 14 + backout, x = norm(x) l0 + norm(output of
    layer 11) l1 before the head (two scalars from 1, 0), 5550 steps."""
    return medium_r14(**{"preset": "medium_r15", "backout_layer": 11, "num_iterations": 5550, **kw})


def medium_r16(**kw) -> Config:
    """Medium record 16 (2025-11-02-Smear-MTP): record 15 + smear, x[:, 1:] += l x[:, :-1] after the backout (one
    scalar from 0), in training and validation, 5535 steps."""
    return medium_r15(**{"preset": "medium_r16", "smear": True, "num_iterations": 5535, **kw})


def medium_r17(**kw) -> Config:
    """Medium record 17 (2025-11-12_BlockMaskRedundantOp) = record 16: upstream dropped a redundant term of the
    block mask, a form embxlib's block mask already has; numerically the same model and training (an alias)."""
    return medium_r16(**{"preset": "medium_r17", **kw})


PRESETS: dict[str, typing.Callable[..., Config]] = {"tiny": tiny, "medium": medium, "medium_x01": medium_x01,
                                                    "medium_r12": medium_r12, "medium_r13": medium_r13,
                                                    "medium_r14": medium_r14, "medium_r15": medium_r15,
                                                    "medium_r16": medium_r16, "medium_r17": medium_r17}


# --- CLI generated from the fields ---------------------------------------------------------------

def field_help() -> dict[str, str]:
    """Each field's documentation: the comment that ends its line in the class (Python's tokenizer finds the
    comments, the class's syntax tree which line declares which field), so that a field stays one line."""
    src = textwrap.dedent(inspect.getsource(Config))
    comments = {tok.start[0]: tok.string[1:].strip() for tok in tokenize.generate_tokens(io.StringIO(src).readline)
                if tok.type == tokenize.COMMENT}
    body = ast.parse(src).body[0].body
    return {node.target.id: comments[node.lineno] for node in body
            if isinstance(node, ast.AnnAssign) and node.lineno in comments}


def _field_type(f: dataclasses.Field):
    hints = typing.get_type_hints(Config)
    return hints[f.name]


def _parse_tuple(s: str) -> tuple[int, ...]:
    s = s.strip().strip("()[]")
    return tuple(int(x) for x in re.split(r"[,\s]+", s) if x)


def _default_text(name: str) -> str:
    """The tiny preset's value, and the other presets' where they differ: what a flag left out means."""
    def show(v):
        if isinstance(v, tuple):
            return ",".join(map(str, v)) or "none"
        return repr(v) if v == "" else str(v)
    shown = {p: show(getattr(make(), name)) for p, make in PRESETS.items()}
    others: dict[str, list[str]] = {}
    for p, v in shown.items():
        if v != shown["tiny"]:
            others.setdefault(v, []).append(p)
    return "; ".join([f"default: {shown['tiny']}"] + [f"{', '.join(ps)}: {v}" for v, ps in others.items()])


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per field: --extra-embeds 3 for extra_embeds; booleans get --flag/--no-flag; --config FILE.
    Help shows each field's comment and default (the tiny preset's, and the other presets' where they differ)."""
    helps = field_help()
    group = parser.add_argument_group(
        "config fields", "Start from --preset (and --config FILE), then each flag given overrides one field. The "
        "defaults shown are the tiny preset's, followed by medium's and medium_x01's where they differ.")
    group.add_argument("--config", metavar="FILE", default=None, help="start from this config file (JSON or YAML, "
                       "e.g. a run's config.json, which re-runs it); flags given override its values")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        t = _field_type(f)
        h = f"{helps.get(f.name, '')} ({_default_text(f.name)})".replace("%", "%%")  # argparse formats help with %
        choices = tuple(PRESETS) if f.name == "preset" else CHOICES.get(f.name)
        # choices shown, checked by validate(): its one-line message names the field and what is allowed
        metavar = "{" + ",".join(choices) + "}" if choices else None
        if t is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif typing.get_origin(t) is tuple:
            group.add_argument(flag, dest=f.name, type=_parse_tuple, default=None, metavar="I,J,...", help=h)
        else:
            group.add_argument(flag, dest=f.name, type=t, default=None, metavar=metavar, help=h)
    # `--ve-layers -1,0,1,...`: a word that starts like a negative number is a value, not an option (Python 3.13's rule)
    parser._negative_number_matcher = re.compile(r"^-\.?\d")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    return build_config(overrides, getattr(args, "config", None))


YAML_MAX_BYTES = 1 << 20  # a sweep or config file is a few hundred bytes; more is not one of ours


def load_yaml(text: str, source: str):
    """The one YAML reader of config and sweep files: safe tags only, no aliases (`*a`: expanding them is how a few
    hundred bytes become gigabytes), no key twice in a mapping (YAML's own loader keeps the last silently), at most
    YAML_MAX_BYTES. Raises ValueError starting with source (e.g. "sweep file s.yaml") and naming the line and column."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"an alias (*{event.anchor}): aliases are not "
                                                  "allowed here", event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        twice = key in seen
                        seen.add(key)
                    except TypeError:
                        continue  # an unhashable key: the constructor names it
                    if twice:
                        raise yaml.constructor.ConstructorError(None, None, f"the key {str(key)[:80]!r} twice",
                                                                key_node.start_mark)
            return super().construct_mapping(node, deep)

    if len(text.encode("utf-8", errors="replace")) > YAML_MAX_BYTES:
        raise ValueError(f"{source}: larger than {YAML_MAX_BYTES} bytes, not read")
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{source}: not valid YAML: {e.problem or e.context}{where}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except RecursionError:
        raise ValueError(f"{source}: not valid YAML: nested too deeply") from None


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key[:80]!r} twice")
        out[key] = value
    return out


def load_config_file(path) -> dict:
    """The fields of a config file (JSON, or YAML by its .yaml/.yml suffix), each converted to the field's type.
    Raises ValueError naming the file and any key that is not a Config field, or a key given twice."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"config file {path}: {e.strerror or e}") from None
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    if is_yaml:
        data = load_yaml(text, f"config file {path}")
    else:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"config file {path}: not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of Config fields, got {type(data).__name__}")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown field(s) {unknown}; allowed: the Config fields "
                         f"(python -m embxlib.train --help)")
    try:
        values = {k: coerce(k, v) for k, v in data.items()}
    except ValueError as e:
        raise ValueError(f"config file {path}: {e}") from None
    make = PRESETS.get(values.get("preset"), tiny)
    if values.get("name") and values["name"] == variant_name(make(**{**values, "preset": make().preset, "name": "_"})):
        del values["name"]  # a derived name (a run's config.json) follows the fields, also when flags change them
    return values


def build_config(overrides: dict | None = None, config_file=None) -> Config:
    """The preset, then the config file's fields, then overrides (None values are ignored)."""
    values = load_config_file(config_file) if config_file else {}
    values.update({k: coerce(k, v) for k, v in (overrides or {}).items() if v is not None})
    preset = values.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: allowed: {sorted(PRESETS)}")
    return PRESETS[preset](**values)


def coerce(name: str, value):
    """Convert a notebook/papermill parameter to the field's type, or raise naming the field."""
    f = {f.name: f for f in fields(Config)}.get(name)
    if f is None:
        raise ValueError(f"unknown config field {name!r}")
    return coerce_value(name, value, _field_type(f))


def unknown_names(given, allowed) -> str:
    """'unknown parameter(s) [...] (did you mean ...?)' for the names in given that are not in allowed, or ''."""
    unknown = sorted(set(given) - set(allowed))
    if not unknown:
        return ""
    close = {u: difflib.get_close_matches(str(u), list(allowed), n=1) for u in unknown}
    hints = [f"{c[0]!r}" + (f" for {u!r}" if len(unknown) > 1 else "") for u, c in close.items() if c]
    return f"unknown parameter(s) {unknown}" + (f" (did you mean {', '.join(hints)}?)" if hints else "")


def coerce_value(name: str, value, t):
    """value as type t (bool, int, float, str or tuple[int, ...]); a bool is only a bool or 'true'/'false'."""
    try:
        if value is None:  # None means "the default" only where a caller says so, before calling this
            raise TypeError
        if t is bool:
            if isinstance(value, str):
                return {"true": True, "false": False}[value.lower()]
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typing.get_origin(t) is tuple:
            return _parse_tuple(value) if isinstance(value, str) else tuple(int(x) for x in value)
        if t is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return t(value)
    except (TypeError, ValueError, KeyError):
        expected = "true or false" if t is bool else getattr(t, "__name__", str(t))
        raise ValueError(f"{name}={value!r}: expected {expected}") from None
