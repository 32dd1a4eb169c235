"""Run under torchrun by tests/test_cuda_step.py: two training steps of a tiny model with the trainer's own step
(train.train_step + StepLines), the second one watched. Writes <out>/rank<r>.json: host syncs (aten ops that read
a tensor's value back into Python), collectives issued blocking vs asynchronously, and the Muon state held."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from embxlib import train
from embxlib.config import tiny
from embxlib.dist import Dist
from embxlib.metrics import StepLines
from embxlib.data import TokenStream, shard_files
from embxlib.model import GPT
from embxlib.optim import build_optimizers

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
         torch.ops.aten.equal.default, torch.ops.aten.allclose.default}


class HostReads(TorchDispatchMode):
    """Ops that hand a tensor's value to Python: on a GPU each waits for the device. The optimiser's 0-d float64
    hyperparameters are CPU tensors everywhere (upstream's _as_tensor_fullprec) and are not counted."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            t = args[0]
            if not (t.dim() == 0 and t.dtype == torch.float64 and t.device.type == "cpu"):
                self.reads.append(f"{func} {tuple(t.shape)} {t.dtype}")
        return func(*args, **(kwargs or {}))


class Collectives:
    """Counts every collective call by whether it was issued blocking (async_op False) or asynchronously."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "barrier", "reduce_scatter", "all_to_all")

    def __init__(self):
        self.blocking, self.issued, self.bytes = [], [], {}
        self.originals = {n: getattr(dist, n) for n in self.NAMES}
        for n, fn in self.originals.items():
            setattr(dist, n, self._wrap(n, fn))

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            (self.issued if kwargs.get("async_op") else self.blocking).append(name)
            sent = args[1] if name == "all_gather" else args[0]  # (all_gather: the output list, then this rank's)
            if isinstance(sent, torch.Tensor):
                self.bytes[name] = self.bytes.get(name, 0) + sent.numel() * sent.element_size()
            return fn(*args, **kwargs)
        return call


class Lines:
    def __init__(self):
        self.lines = []

    def line(self, s, console=True):
        self.lines.append(s)


def main(data_dir: str, out: str) -> None:
    precision = os.environ.get("PROBE_PRECISION", "fp32")  # (fp32: the same step, fast on a CPU without bf16 units)
    cfg = tiny(train_seq_len=128, train_batch_tokens=1024, window_max=128, compile=False, warmup_steps=0,
               muon_momentum_warmup_steps=10, data_dir=data_dir, precision=precision,
               bigram_embeds=int(os.environ.get("PROBE_BIGRAM", "0")),
               sparse_table_comm=os.environ.get("PROBE_SPARSE_COMM") == "1")
    device = torch.device("cpu")
    D = Dist(device)
    accum = cfg.grad_accum_steps(D.world)
    torch.manual_seed(0)
    model = GPT(cfg)
    adam, muon = build_optimizers(model, cfg, D.rank, D.world)
    stream = TokenStream(shard_files(data_dir, "train"), cfg.train_seq_len, D.rank, D.world, accum)
    window = torch.tensor(2, dtype=torch.int32)
    lines = StepLines(Lines(), cfg.num_iterations, device, out)
    result = {}
    for step in range(2):
        batches = [stream.next(device) for _ in range(accum)]
        watch, coll = HostReads(), Collectives()
        with watch:
            loss, works = train.train_step(model, model, D, adam, muon, cfg, step, batches, window, accum)
            lines.add(step + 1, loss, works, 0.0, D)
        for n, fn in coll.originals.items():
            setattr(dist, n, fn)
        result[f"step{step}"] = dict(host_reads=watch.reads, blocking=coll.blocking, issued=len(coll.issued),
                                     bytes=coll.bytes)
    state = [t for st in muon.state.values() for t in st.values()]
    own = muon.owned()
    result.update(config=cfg.to_dict(), world=D.world, rank=D.rank, muon_state_bytes=sum(t.numel() * t.element_size() for t in state),
                  owned_bytes=sum(p.numel() * (4 + 2 * (p.dtype == torch.bfloat16)) for p in own), owned=len(own), lines=lines.log.lines)
    Path(out, f"rank{D.rank}.json").write_text(json.dumps(result))
    D.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
