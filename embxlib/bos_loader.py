"""Record 18's BOS-aligned loader (upstream train_gpt_medium.py at f411b3d3: BOSFinder + distributed_data_generator
with align_to_bos=True): every sequence starts at a document's first token (BOS), documents are cut at max_seq_len
tokens, and a micro-batch is one flat stream of whole documents per rank with their cumulative lengths (for varlen
attention), rather than TokenStream's contiguous windows.

A micro-step of a global batch of B tokens with accumulation A at world size W gives each rank L = B / A / W input
tokens: starting from the next unused BOS of the shard, rank 0 takes documents (each cut at max_seq_len, the last
cut so that the rank has exactly L + 1 tokens), then rank 1 from where rank 0 stopped, and so on; the inputs are the
first L tokens, the targets the last L, and cum_lengths the document boundaries (0, ends..., padded with L up to
a multiple of 128 entries, as upstream). When the shard has no BOS left for the whole micro-batch, the batch is
taken from the next shard instead (the rest of the shard is skipped); the tokens before a shard's first BOS are never
used. At the end of the files it raises DataExhausted (upstream's generator would wait forever).

Differences from upstream that do not change a token: the shard is read and scanned for BOS in full when it is
opened (upstream scans the first shard's first 4 M tokens and the rest in a thread, and loads the next shard in a
thread; the first 5 batches, all it reads before switching to the full scan, never reach 4 M tokens), and
the batch size comes as an argument of every call instead of by generator.send. Not wired into the trainer yet
(issue 29). The test holding its equality: tests/test_upstream_r18_loader.py.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import EOT_TOKEN
from .data import DataExhausted, read_shard


def next_multiple_of_n(v: float | int, *, n: int) -> int:
    return next(x for x in range(n, int(v) + 1 + n, n) if x >= v)


class BOSLoader:
    """next(batch_tokens, accum) -> (inputs int32 [L], targets int64 [L], cum_lengths int32) for this rank's
    micro-step; see the module's docstring. state_dict/load_state_dict: the shard and the next BOS index."""

    def __init__(self, files: list[str], rank: int = 0, world_size: int = 1, max_seq_len: int = 4096,
                 bos_id: int = EOT_TOKEN):
        if not files:
            raise FileNotFoundError("BOSLoader: no shards")
        self.files, self.rank, self.world_size = list(files), rank, world_size
        self.max_seq_len, self.bos_id = max_seq_len, bos_id
        self.shard, self.i = -1, 0
        self._open(0)

    def _open(self, shard: int) -> None:
        if shard >= len(self.files):
            raise DataExhausted(f"the {len(self.files)} shard(s) from {self.files[0]} are used up "
                                f"(BOS-aligned batches: the rest of the last shard holds too few documents)")
        self.tokens = torch.from_numpy(np.array(read_shard(self.files[shard])))
        self.bos = (self.tokens == self.bos_id).nonzero(as_tuple=True)[0].to(torch.int64).numpy()
        self.shard, self.i = shard, 0

    def _spans(self, local: int, max_seq_len: int):
        """Every rank's (starts, ends) of documents for a micro-batch of local + 1 tokens each, or None when the
        shard's BOS run out first."""
        bos, n, size = self.bos, len(self.bos), len(self.tokens)
        spans, idx = [], self.i
        for _ in range(self.world_size):
            starts, ends, length = [], [], 0
            while length <= local:
                if idx >= n:
                    return None, idx
                start = int(bos[idx])
                end = min(int(bos[idx + 1]) if idx + 1 < n else size, start + max_seq_len,
                          start + local - length + 1)
                starts.append(start)
                ends.append(end)
                length += end - start
                idx += 1
            assert length == local + 1
            spans.append((starts, ends))
        return spans, idx

    def next(self, batch_tokens: int, accum: int = 1, max_seq_len: int | None = None):
        max_seq_len = self.max_seq_len if max_seq_len is None else max_seq_len
        assert batch_tokens % (self.world_size * accum) == 0, "batch must be divisible by world size x accumulation"
        local = batch_tokens // accum // self.world_size
        max_docs = next_multiple_of_n(local // 300, n=128)  # (upstream: the median document has ~400 tokens)
        while True:
            spans, idx = self._spans(local, max_seq_len)
            if spans is not None:
                break
            self._open(self.shard + 1)
        self.i = idx
        starts, ends = (torch.tensor(x, dtype=torch.int64) for x in spans[self.rank])
        buf = torch.cat([self.tokens[s:e] for s, e in zip(starts.tolist(), ends.tolist())])
        ends[-1] -= 1  # the last document's extra token is only a target
        lengths = (ends - starts).cumsum(0)
        cum = torch.full((max_docs,), local)
        cum[0] = 0
        cum[1:len(lengths) + 1] = lengths
        return buf[:-1].to(torch.int32), buf[1:].to(torch.int64), cum.to(torch.int32)

    def state_dict(self) -> dict:
        return dict(shard=self.shard, i=self.i)

    def load_state_dict(self, d: dict) -> None:
        self._open(d["shard"])
        self.i = d["i"]
