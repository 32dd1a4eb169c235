"""Record 18's BOS-aligned loader (embxlib.bos_loader.BOSLoader) against upstream's, transcribed below from
train_gpt_medium.py at f411b3d3 (_load_data_shard, BOSFinder, DataPreloader, distributed_data_generator), token for
token on the bundled corpus (data/shakespeare, upstream's shard format) over record 18's batch-size schedule narrowed
to the corpus (batches / 32, 24 + 4 steps; documents cut at 1024 tokens so that the cut happens), at 1, 2 and 8
ranks with upstream's accumulation 8 // world_size, across the shard boundary.

Transcription edits (GPU-only pieces): no pinned memory (a CPU-only torch has none), the batch stays on the CPU
(no .to("cuda")), and the rank and world size are arguments (upstream reads them from torch.distributed).
"""
import glob
import threading
from pathlib import Path

import torch
from torch import Tensor

from embxlib import r18_schedule as r18
from embxlib.bos_loader import BOSLoader
from embxlib.data import DataExhausted, shard_files

import pytest


def next_multiple_of_n(v: float | int, *, n: int):
    return next(x for x in range(n, int(v) + 1 + n, n) if x >= v)

# ---------------------------------------------------------------------------------------------------------------
# upstream, transcribed (train_gpt_medium.py at f411b3d3, lines 1223-1396)

def _load_data_shard(file: Path):
    header = torch.from_file(str(file), False, 256, dtype=torch.int32) # header is 256 int32
    assert header[0] == 20240520, "magic number mismatch in the data .bin file"
    assert header[1] == 1, "unsupported version"
    num_tokens = int(header[2]) # number of tokens (claimed)
    with file.open("rb", buffering=0) as f:
        tokens = torch.empty(num_tokens, dtype=torch.uint16, pin_memory=False) # (upstream: pin_memory=True) avoid pin_memory copy by @YouJiacheng
        f.seek(256 * 4)
        nbytes = f.readinto(tokens.numpy()) # avoid bytes->array copy by @YouJiacheng
        assert nbytes == 2 * num_tokens, "number of tokens read does not match header"
    return tokens

BOS_ID = 50256

class BOSFinder:
    # Helper for getting sequences that start at the beginning of documents by @varunneal based on work by @classiclarryd
    def __init__(self, tokens: Tensor, world_size: int = 1, quickload: bool = False):
        # Precompute BOS positions once per shard
        self.tokens=tokens
        self.size = tokens.numel()
        self.quickload = quickload
        if quickload:
            # only scan first 4 million tokens, then kickoff async thread to scan rest
            self.bos_idx = (tokens[:4_000_000] == BOS_ID).nonzero(as_tuple=True)[0].to(torch.int64).cpu().numpy()
            self.thread = None
            self.ready = threading.Event()
            self.start()
        else:
            self.bos_idx = (tokens == BOS_ID).nonzero(as_tuple=True)[0].to(torch.int64).cpu().numpy()
        self.i = 0
        self.world_size = world_size
        self.batch_iter = 0

    def _load(self):
        self.bos_idx_async = (self.tokens == BOS_ID).nonzero(as_tuple=True)[0].to(torch.int64).cpu().numpy()
        self.ready.set()

    def start(self):
        self.ready.clear()
        self.thread = threading.Thread(target=self._load)
        self.thread.start()

    def get(self):
        if self.thread:
            self.ready.wait()
            self.thread.join()
        self.bos_idx = self.bos_idx_async

    def next_batch(self, num_tokens_local: int, max_seq_len: int):
        # if quickload was used, repoint to the full dataset after 5 batches
        if self.quickload and self.batch_iter==5:
            self.get()
        n = len(self.bos_idx)
        starts = [[] for _ in range(self.world_size)]
        ends = [[] for _ in range(self.world_size)]

        idx = self.i
        for r in range(self.world_size):
            cur_len = 0
            while cur_len <= num_tokens_local:
                if idx >= n:
                    raise StopIteration(f"Insufficient BOS ahead; hit tail of shard.")
                cur = self.bos_idx[idx]
                starts[r].append(cur)
                end = min(self.bos_idx[idx + 1] if idx + 1 < n else self.size,
                          cur + max_seq_len,
                          cur + num_tokens_local - cur_len + 1)
                ends[r].append(end)
                cur_len += end - cur
                idx += 1

            assert cur_len == num_tokens_local + 1
        self.i = idx
        self.batch_iter+=1
        return starts, ends

class DataPreloader:
    # Helper for asynchronously loading next shard and indexing bos tokens
    def __init__(self, file_iter, world_size: int = 1):
        self.file_iter = file_iter
        self.world_size = world_size
        self.thread = None
        self.data = None
        self.ready = threading.Event()

    def _load(self):
        tokens = _load_data_shard(next(self.file_iter))
        self.data = (tokens, BOSFinder(tokens, self.world_size))
        self.ready.set()

    def start(self):
        self.ready.clear()
        self.thread = threading.Thread(target=self._load)
        self.thread.start()

    def get(self):
        if self.thread:
            self.ready.wait()
            self.thread.join()
        return self.data

def distributed_data_generator(filename_pattern: str, num_tokens: int, max_seq_len: int, grad_accum_steps: int = 1, align_to_bos: bool = True, rank: int = 0, world_size: int = 1):
    # align_to_bos: each sequence begins with Beginning of Sequence token, sequences truncated to max_seq_len
    # (upstream: rank and world_size from torch.distributed)
    assert num_tokens % (world_size * grad_accum_steps) == 0, "Batch size must be divisible by world size"
    num_tokens = num_tokens // grad_accum_steps

    files = [Path(file) for file in sorted(glob.glob(filename_pattern))]
    if not files:
        raise FileNotFoundError(f"No files found for pattern: {filename_pattern}")

    file_iter = iter(files)  # Use itertools.cycle(files) for multi-epoch training
    tokens = _load_data_shard(next(file_iter))
    if align_to_bos:
        finder = BOSFinder(tokens, world_size=world_size, quickload=True)
        preloader = DataPreloader(file_iter, world_size)
        preloader.start()
    else:
        pos = 0  # for unaligned case

    while True:
        num_tokens_local = num_tokens // world_size
        max_num_docs = next_multiple_of_n(num_tokens_local // 300, n=128)  # median doc length is ~400

        if align_to_bos:
            try:
                seq_starts, seq_ends = finder.next_batch(num_tokens_local, max_seq_len)
                start_idxs, end_idxs = torch.tensor(seq_starts[rank]), torch.tensor(seq_ends[rank])
            except StopIteration:
                # This shard is exhausted, load the next one in the next loop iteration.
                tokens, finder = preloader.get()
                preloader.start()
                continue

            buf = torch.cat([tokens[i:j] for i, j in zip(start_idxs, end_idxs)])
            _inputs = buf[:-1]
            _targets = buf[1:]
            end_idxs[-1] -= 1  # last document was too long to account for _targets offset
            cum_lengths = (end_idxs - start_idxs).cumsum(0)

        else:
            if pos + num_tokens + 1 >= len(tokens):  # should not occur for val data
                tokens, pos = _load_data_shard(next(file_iter)), 0

            pos_local = pos + rank * num_tokens_local
            buf = tokens[pos_local: pos_local + num_tokens_local + 1]
            _inputs = buf[:-1].view(num_tokens_local, )
            _targets = buf[1:].view(num_tokens_local, )

            cum_lengths = torch.nonzero(_inputs == BOS_ID)[:, 0]
            pos += num_tokens


        _cum_lengths = torch.full((max_num_docs,), num_tokens_local)
        _cum_lengths[0] = 0
        _cum_lengths[1:len(cum_lengths) + 1] = cum_lengths

        # Cast to int32 on CPU before transfer to avoid dtype conversion during .to()
        _inputs = _inputs.to(dtype=torch.int32)
        _targets = _targets.to(dtype=torch.int64)
        _cum_lengths = _cum_lengths.to(dtype=torch.int32)

        new_params = yield (
            _inputs,  # (upstream: .to(device="cuda", non_blocking=True), here and below)
            _targets,
            _cum_lengths
        )

        if new_params is not None:
            # makes it possible for generator to receive new (num_tokens, max_seq_len, grad_accum_steps) via .send()
            new_num_tokens, new_max_seq_len, new_grad_accum_steps = new_params
            assert new_num_tokens % (world_size * new_grad_accum_steps) == 0, "Num tokens must be divisible by world size"
            num_tokens = new_num_tokens // new_grad_accum_steps


# ---------------------------------------------------------------------------------------------------------------

CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare"
NARROW = r18.R18Schedule(num_scheduled_iterations=24, num_extension_iterations=4,
                         train_bs_schedule=tuple(b // 32 for b in r18.RECORD18.train_bs_schedule),
                         train_bs_extension=r18.RECORD18.train_bs_extension // 32)
MAX_SEQ_LEN = 1024


def upstream_batches(rank, world):
    """What upstream's training loop reads at every micro-step: the loader created with the first batch size, then
    train_loader.send(send_args) with advance_schedule's send_args (new sizes whenever get_bs differs from the
    initial batch size, else None)."""
    accum = 8 // world
    pattern = str(CORPUS / "shakespeare_train_*.bin")
    loader = distributed_data_generator(pattern, NARROW.train_bs_schedule[0], MAX_SEQ_LEN, grad_accum_steps=accum,
                                        rank=rank, world_size=world)
    initial = r18.batch_tokens(0, NARROW)
    for step in range(NARROW.num_iterations):
        bs = r18.batch_tokens(step, NARROW)
        send_args = (bs, MAX_SEQ_LEN, accum) if bs != initial else None
        for _ in range(accum):
            yield step, bs, loader.send(send_args)


# (upstream's preloader, started again after it hands over the last shard, finds no further file: a StopIteration in
# its thread, which pytest reports; upstream's run never gets there)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("world", [1, 2, 8])
def test_bos_loader_equals_upstream_token_for_token(world):
    accum = 8 // world
    files = shard_files(CORPUS, "train")
    assert len(files) == 2
    sizes, cut = set(), False
    for rank in range(world):
        ours = BOSLoader(files, rank=rank, world_size=world, max_seq_len=MAX_SEQ_LEN)
        shards = []
        for step, bs, (inputs, targets, cum) in upstream_batches(rank, world):
            got = ours.next(bs, accum)
            for a, b, what in zip(got, (inputs, targets, cum), ("inputs", "targets", "cum_lengths")):
                assert a.dtype == b.dtype and torch.equal(a, b), (rank, step, what)
            assert inputs.numel() == bs // accum // world
            sizes.add(bs)
            shards.append(ours.shard)
            ends = cum[cum < inputs.numel()].tolist() + [inputs.numel()]
            cut |= max(b - a for a, b in zip(ends, ends[1:])) == MAX_SEQ_LEN
        assert shards[0] == 0 and shards[-1] == 1  # the batches crossed into the second shard
    assert sizes == {4096, 8192, 12288, 16384}
    assert cut  # some document was cut at max_seq_len


def test_bos_loader_sequences_start_at_bos_and_are_cut():
    files = shard_files(CORPUS, "train")
    loader = BOSLoader(files, max_seq_len=MAX_SEQ_LEN)
    cut = False
    for _ in range(8):
        inputs, targets, cum = loader.next(8192, 1)
        bounds = cum[cum < inputs.numel()].tolist()
        assert bounds[0] == 0 and all((inputs[b] == 50256).item() for b in bounds)  # every sequence starts at a BOS
        lengths = torch.diff(torch.tensor(bounds + [inputs.numel()]))
        assert lengths.max() <= MAX_SEQ_LEN
        cut |= bool((lengths == MAX_SEQ_LEN).any())
        assert torch.equal(inputs[1:], targets[:-1].to(torch.int32))
    assert cut
    state = loader.state_dict()
    again = BOSLoader(files, max_seq_len=MAX_SEQ_LEN)
    again.load_state_dict(state)
    for a, b in zip(loader.next(8192, 2), again.next(8192, 2)):
        assert torch.equal(a, b)
    with pytest.raises(DataExhausted):
        for _ in range(100):
            loader.next(32768, 1)
