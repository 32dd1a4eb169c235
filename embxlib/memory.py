"""Peak memory of one training step and of one validation step per process, computed without the hardware.

The model and optimisers are built from fake tensors (shapes and dtypes, no storage) and one step is run under
torch's MemTracker, which adds up the live tensor storage by kind (parameters, gradients, optimiser state,
activations, temporaries) and keeps the peak. `python -m embxlib.train --preset medium_x01 --dry-run` prints it.

The compiled CUDA training step (`compiled_train_estimate`, what --dry-run reports for a compiled GPU run) is modelled
from what the compiled graph keeps: torch's own AOT autograd with inductor's min-cut partitioner (device-independent,
so it runs on a CPU on meta tensors) says which tensors the forward saves for the backward; those scale with the
tokens of a micro-step and are measured at 256 tokens. Added: parameters, Adam's state, Muon's state of the
rank's own matrices at the configured world size, the LM head's gradient, and the backward's transient: the bf16
logits' gradient and its transposed copy for the head's weight gradient (the forward saves the logits in that
(vocab, tokens) layout). Not modelled: fused kernels' workspace, the allocator's rounding and fragmentation, and
the other parameters' gradients, which the backward creates as it frees activations.

device_type="cuda" in `estimate` follows the GPU path eagerly: FlexAttention, whose kernel the tracker cannot trace,
is stood in for by a causal SDPA that keeps the same tensors for backward (q, k, v, output, log-sum-exp); the loss
is the autograd graph eager PyTorch would keep (logits, soft-cap, log-softmax), so with torch.compile, which fuses
the soft-cap and the cross-entropy, the real training peak is lower. device_type="cpu" is the CPU path exactly
(dense SDPA masks, the chunked HeadLoss), which the tests hold against a real run.
"""
from __future__ import annotations

import os
import warnings
import weakref

import torch
import torch._dynamo
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from .config import Config
from .model import GPT
from .optim import apply_schedules, build_optimizers, build_snoo

GiB = 2**30


class PeakMemory(TorchDispatchMode):
    """Bytes of live tensor storage while active, and their peak: every storage an op returns is counted until
    it is freed (a weak reference to the storage, so tensors that autograd keeps for backward count as long
    as it keeps them). Works the same on real and on fake tensors. `tensors`: what is live already."""

    def __init__(self, *tensors: torch.Tensor):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.now = self.peak = 0
        for t in tensors:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        self._seen[st] = n
        weakref.finalize(st, self._free, n)
        self.now += n
        self.peak = max(self.peak, self.now)

    def _free(self, n: int) -> None:
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())


def measure(model: GPT, cfg: Config, train: bool = True, tokens: torch.Tensor | None = None) -> dict:
    """Peak bytes of a training step (two micro-steps with an optimiser step each, so that the second backward runs
    with the optimiser state in place) or of one validation batch, with the static parts broken out.
    tokens: (1, T + 1) ids to use (default: random)."""
    device = next(model.parameters()).device
    T = cfg.train_seq_len if train else cfg.val_seq_len
    if tokens is None:
        tokens = torch.randint(0, cfg.vocab_size, (1, T + 1), device=device)
    x, y = tokens[:, :-1].int(), tokens[:, 1:].long()
    window = cfg.window_max // cfg.attn_block_size
    params = list(model.parameters()) + list(model.buffers())
    out = dict(parameters=_bytes(model.parameters()), buffers=_bytes(model.buffers()))
    if train:
        adam, muon = build_optimizers(model, cfg)
        snoo = build_snoo(model, cfg)  # (its outer copy is made before the step: static, like the parameters)
        if snoo is not None:
            params += snoo.outer
        with PeakMemory(*params) as pm:
            for _ in range(2):
                model(x, y, window).backward()
                out["gradients"] = _bytes(p.grad for p in model.parameters())
                apply_schedules(cfg.num_iterations // 2, cfg, adam, muon)
                adam.step()
                muon.step()
                if snoo is not None:
                    snoo.step()
                model.zero_grad(set_to_none=True)
        state = [t for opt in (adam, muon) for st in opt.state.values() for t in st.values()
                 if isinstance(t, torch.Tensor) and t.dim()]
        if snoo is not None:  # Snoo's outer copy and momentum
            state += snoo.outer + [b for b in snoo.momentum_buffers if b is not None]
        out["optimizer"] = _bytes(state)
    else:
        model.eval()
        with PeakMemory(*params) as pm, torch.no_grad():
            model(x, y, window)
        model.train()
    out["total"] = pm.peak
    out["activations"] = pm.peak - sum(v for k, v in out.items() if k != "total")
    return out


def estimate(cfg: Config, device_type: str = "cuda") -> dict:
    """Peak bytes by kind for one process of a run of cfg, on fake tensors: "train" and "val"; on the cuda path
    with compile also "train_graph_loss", the eager autograd graph of the loss (torch.compile fuses it, so
    "train" measures the loss chunked instead, which keeps about as little)."""
    phases = {"train": True, "train_graph_loss": True, "val": False}
    if device_type != "cuda" or not cfg.compile:
        del phases["train_graph_loss"]
    out = {}
    for phase, train in phases.items():
        with torch.device("meta"):
            model = GPT(cfg)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to_empty(device="cpu")  # fake: no storage is allocated
            if device_type == "cuda":
                model.fused_loss = phase != "train_graph_loss" and cfg.compile
                model.sparse_table_grads = False  # the fake tensors live on the CPU; CUDA's table gradients are dense
                model.masks = lambda idx, window=None: {"L": None, "S": None}  # causal SDPA for FlexAttention
            out[phase] = measure(model, cfg, train=train)
    return out


SAVED_TOKENS = 256  # the micro-step length at which the compiled graph's saved tensors are measured (2 blocks)


class _Partitioned(Exception):
    pass


_SAVED: dict[str, float] = {}  # per config: a compile takes tens of seconds on a CPU


def saved_bytes_per_token(cfg: Config, tokens: int = SAVED_TOKENS) -> float:
    """Bytes the compiled training graph saves for its backward per token of a micro-step, on the CUDA path (the
    loss as upstream's autograd graph, dense table gradients, FlexAttention stood in for by a causal SDPA that
    saves the same tensors). The model lives on the meta device; the forward never runs."""
    from functools import partial

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch.multiprocessing.reductions import StorageWeakRef
    key = f"{cfg.to_json()}:{tokens}"
    if key in _SAVED:
        return _SAVED[key]
    found = {}

    def forward_graph(gm, example_inputs):
        inputs = {StorageWeakRef(n.meta["val"].untyped_storage()) for n in gm.graph.find_nodes(op="placeholder")
                  if isinstance(n.meta.get("val"), torch.Tensor)}
        saved = {}
        for node in gm.graph.find_nodes(op="output")[0].args[0][1:]:  # (the loss, then what backward needs)
            val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
            if isinstance(val, torch.Tensor) and StorageWeakRef(val.untyped_storage()) not in inputs:
                saved[StorageWeakRef(val.untyped_storage())] = val.untyped_storage().nbytes()
        found["bytes"] = sum(saved.values())
        raise _Partitioned

    partition = partial(min_cut_rematerialization_partition, compiler="inductor")
    backend = aot_autograd(fw_compiler=forward_graph, bw_compiler=forward_graph, partition_fn=partition)
    with torch.device("meta"):
        model = GPT(cfg)
        x, y = torch.zeros(1, tokens, dtype=torch.int32), torch.zeros(1, tokens, dtype=torch.int64)
        window = torch.tensor(cfg.window_max // cfg.attn_block_size, dtype=torch.int32)
    model.fused_loss, model.sparse_table_grads = False, False
    model.masks = lambda idx, window=None: {"L": None, "S": None}
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():  # (meta tensors: "an autograd kernel was not registered" for nll_loss)
            warnings.simplefilter("ignore", UserWarning)
            torch.compile(model, dynamic=False, backend=backend)(x, y, window)
    except Exception as e:  # dynamo wraps what the backend raises
        if not (isinstance(e, _Partitioned) or isinstance(getattr(e, "inner_exception", None), _Partitioned)
                or "_Partitioned" in repr(e)):
            raise
    finally:
        torch._dynamo.reset()
    _SAVED[key] = found["bytes"] / tokens
    return _SAVED[key]


def compiled_train_estimate(cfg: Config, world_size: int) -> dict:
    """Peak bytes per GPU of a compiled CUDA training step of cfg at world_size, by kind (see the module doc)."""
    with torch.device("meta"):
        model = GPT(cfg)
        adam, muon = build_optimizers(model, cfg, rank=0, world_size=world_size)
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    adam_params = [p for g in adam.param_groups for p in g["params"]]
    owned = muon.owned()  # rank 0's matrices: it owns the most (the first of every chunk)
    tokens = cfg.train_seq_len
    logits = tokens * cfg.head_vocab * 2  # bf16
    muon_state = sum(p.numel() * (4 + (2 if p.dtype == torch.bfloat16 else 0)) for p in owned)  # momentum, mantissa
    if muon.smoothing:  # medium records 13-16: a bf16 smoothing buffer per own matrix
        muon_state += sum(p.numel() * 2 for p in owned)
    # medium records 12, 14-16: Snoo's outer copy and momentum of every parameter, on every rank (not split)
    snoo_state = 2 * nbytes(model.parameters()) if cfg.snoo_every else 0
    out = dict(parameters=nbytes(model.parameters()), optimizer=2 * nbytes(adam_params) + muon_state + snoo_state,
               saved_activations=int(saved_bytes_per_token(cfg) * tokens), head_gradient=nbytes([model.lm_head_w]),
               logits_gradient=2 * logits)
    out["total"] = sum(out.values())
    return out


# what upstream's own logs say (published/modded-nanogpt-logs): 8 x H100, compiled, training and validation
UPSTREAM_PEAK_MIB = {"medium": 50380, "medium_x01": 53988, "medium_r12": 56505, "medium_r13": 54036,
                     "medium_r14": 56556, "medium_r15": 56812, "medium_r16": 56810}


def capacity_of(device_type: str) -> tuple[int, str]:
    """(bytes, name) of the memory a run trains in: this machine's on the cpu path; this GPU, else an H100's."""
    if device_type == "cpu":
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return capacity, f"this machine's {capacity / GiB:.0f} GiB"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"this {props.name} ({props.total_memory / GiB:.0f} GiB)"
    return 80 * 10**9, "an H100 (80 GB)"


STATE_BYTES_PER_PARAM = 10  # at least: the weight (bf16) + its gradient (bf16) + Adam's two moments (fp32)


def check_fits(cfg: Config, device_type: str) -> None:
    """Before a run makes its folder: a model whose parameters alone, with their gradients and Adam's moments
    (10 bytes each at the least), do not fit the memory it would train in is refused, naming its largest table
    (a bigram_vocab_mult of 10^8 once allocated 24 PB and failed after making its folder). --dry-run models all."""
    from .model import count_params
    from .streams import tables
    need = count_params(cfg) * STATE_BYTES_PER_PARAM
    capacity, name = capacity_of(device_type)
    if need > capacity:
        t = max(tables(cfg), key=lambda t: t.rows * t.width)
        raise ValueError(f"the model's {count_params(cfg):,} parameters need at least {need / GiB:,.0f} GiB (weights, "
                         f"gradients, Adam's moments), over {name}; its largest table, {t.name}, has {t.rows:,} x "
                         f"{t.width:,}" + (f" (bigram_vocab_mult={cfg.bigram_vocab_mult})" if t.name == "bigram_embed"
                                          else "") + ": `--dry-run` models the memory of a config")


def report(cfg: Config, world_size: int, capacity: int | None = None, device_type: str = "cuda") -> list[str]:
    """Lines for --dry-run: the estimates and whether they fit in `capacity` bytes (default: this machine's GPU,
    else an H100's 80 GB; on the cpu path this machine's memory)."""
    est = estimate(cfg, device_type)
    compiled = device_type == "cuda" and cfg.compile
    if compiled:  # the compiled step replaces the eager ones
        est = {"train": compiled_train_estimate(cfg, world_size), "val": est["val"]}
    if capacity is not None:
        name = f"{capacity / GiB:.1f} GiB"
    else:
        capacity, name = capacity_of(device_type)
    how = ("training: the compiled step's saved tensors (inductor's partitioner) + state; validation: fake tensors"
           if compiled else "fake tensors, eager PyTorch")
    lines = [f"peak memory per process at world_size {world_size} ({how}, {device_type} path):"]
    labels = {"train": f"training step, {cfg.train_seq_len:,} tokens per micro-step",
              "train_graph_loss": "  the same with the loss as an eager autograd graph (no torch.compile)",
              "val": f"validation, {cfg.val_seq_len:,} tokens per batch"}
    for phase, p in est.items():
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in p.items() if k != "total" and v > GiB / 100)
        verdict = "fits" if p["total"] <= capacity else "EXCEEDS"
        lines.append(f"  {labels[phase]}: {p['total'] / GiB:.2f} GiB ({parts}); {verdict} {name}")
    if cfg.preset in UPSTREAM_PEAK_MIB and device_type == "cuda":
        up = UPSTREAM_PEAK_MIB[cfg.preset]
        vs = f"; this estimate of training {est['train']['total'] / 2**20 / up - 1:+.1%}" if compiled else ""
        lines.append(f"  upstream's {cfg.preset} log: peak memory allocated {up:,} MiB ({up / 1024:.1f} GiB) on each "
                     f"of 8 H100s, compiled{vs}")
    return lines
