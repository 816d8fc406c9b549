"""Text files -> token shards for pre-training (read by dataloader.h).

  python scripts/prepare_text.py --tokenizer MODEL_DIR/tokenizer.json --out-dir data/mytext \\
      [--docs file|paragraph|line] [--val-fraction 0.01] [--shard-tokens 50000000] [--workers N] \\
      FILE [FILE ...]

Each document (a whole file, a blank-line separated paragraph, or a line: --docs) is tokenized with
the model's tokenizer.json (Hugging Face `tokenizers`, no special tokens added by it) and written as
BOS, tokens, EOS (either id left out when the tokenizer has none). BOS/EOS/pad come from the
tokenizer_config.json next to tokenizer.json when there is one, else from the tokenizer's template
and common names (scripts/tokenizer_export.py). A fraction of the documents, spread evenly, goes to
val.bin; the rest goes, in order, to train_000000.bin, train_000001.bin, ..., each closed before the
document that would take it past --shard-tokens (a longer document gets a shard to itself).
The output is deterministic for given inputs and options (worker count included).

Shard format (see dataloader.h): 256 int32 header (magic 'MTSD', version 1, n_tokens, flags
(bit 0 = loss mask follows), vocab_size, bos_id, eos_id, pad_id, rest 0), n_tokens uint32 ids,
then, with the mask flag, n_tokens uint8 (1 = train on predicting this token).
"""
import argparse
import json
import multiprocessing
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizer_export import ExportError, find_special_ids  # noqa: E402

SHARD_MAGIC = 0x4453544D
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_FLAG_MASK = 1


def die(message):
    print("error: " + message, file=sys.stderr)
    sys.exit(1)


class TokenizerInfo:
    """The tokenizer.json path, vocabulary size and special ids (-1 = none)."""

    def __init__(self, path):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        try:
            with open(path, "r", encoding="utf-8") as f:
                tj = json.load(f)
            config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
            config = None
            if os.path.exists(config_path):
                with open(config_path, "r", encoding="utf-8") as f:
                    config = json.load(f)
            self.bos, self.eos, self.pad = find_special_ids(tj, config)
        except (OSError, ValueError, KeyError, ExportError) as e:
            die("cannot read tokenizer %s: %s" % (path, e))
        ids = list(tj["model"]["vocab"].values()) + [a["id"] for a in tj.get("added_tokens", [])]
        self.path = path
        self.vocab_size = max(ids) + 1


def write_shard(path, tokens, mask, info):
    """Writes one shard: tokens (uint32 array), mask (uint8 array or None)."""
    tokens = np.asarray(tokens, dtype=np.uint32)
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:8] = [SHARD_MAGIC, SHARD_VERSION, len(tokens), SHARD_FLAG_MASK if mask is not None else 0,
                  info.vocab_size, info.bos, info.eos, info.pad]
    if len(tokens) >= 2 ** 31:
        die("%s: %d tokens do not fit one shard; lower --shard-tokens" % (path, len(tokens)))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.astype("<i4").tobytes())
        f.write(tokens.astype("<u4").tobytes())
        if mask is not None:
            f.write(np.asarray(mask, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def read_shard(path):
    """(header int32 array, tokens uint32 array, mask uint8 array or None); used by the tests."""
    data = open(path, "rb").read()
    header = np.frombuffer(data[:SHARD_HEADER_INTS * 4], dtype="<i4")
    n = int(header[2])
    start = SHARD_HEADER_INTS * 4
    tokens = np.frombuffer(data[start:start + 4 * n], dtype="<u4")
    mask = None
    if header[3] & SHARD_FLAG_MASK:
        mask = np.frombuffer(data[start + 4 * n:start + 5 * n], dtype=np.uint8)
    return header, tokens, mask


# ---- parallel tokenization (one tokenizer per worker process)

_TOKENIZER = None


def _init_worker(tokenizer_path):
    global _TOKENIZER
    from tokenizers import Tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = Tokenizer.from_file(tokenizer_path)


def encode_text(text):
    """Token ids of text, no special tokens added (runs in a worker)."""
    return _TOKENIZER.encode(text, add_special_tokens=False).ids


class Progress:
    """tqdm when installed, else a line on stderr about once a second."""

    def __init__(self, total, desc):
        self.total, self.desc, self.done, self.last = total, desc, 0, 0.0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="doc")
        except ImportError:
            self.bar = None

    def update(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last > 1.0 or self.done == self.total:
            self.last = time.time()
            print("\r%s: %d/%d" % (self.desc, self.done, self.total), end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def map_parallel(fn, items, tokenizer_path, workers, desc):
    """[fn(x) for x in items] over a pool of `workers` processes, in order, with a progress bar."""
    progress = Progress(len(items), desc)
    out = []
    if workers <= 1:
        _init_worker(tokenizer_path)
        for x in items:
            out.append(fn(x))
            progress.update()
    else:
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
            for r in pool.imap(fn, items, chunksize=16):
                out.append(r)
                progress.update()
    progress.close()
    return out


def val_flags(n, fraction):
    """Which of n items go to val: floor(n * fraction) of them, spread evenly (at least one when
    fraction > 0 and n >= 2)."""
    if fraction <= 0:
        return [False] * n
    flags = [int((i + 1) * fraction) > int(i * fraction) for i in range(n)]
    if not any(flags) and n >= 2:
        flags[-1] = True
    return flags


def flush_shard(out_dir, name, parts, info, with_mask, written):
    """Writes the samples `parts` = [(ids, mask or None)] as one shard; appends (path, n_tokens)."""
    toks = np.concatenate([np.asarray(p[0], dtype=np.uint32) for p in parts])
    mask = np.concatenate([np.asarray(p[1], dtype=np.uint8) for p in parts]) if with_mask else None
    path = os.path.join(out_dir, name)
    write_shard(path, toks, mask, info)
    written.append((path, len(toks)))


def write_train_val(out_dir, samples, is_val, info, shard_tokens, with_mask):
    """Train samples into train_%06d.bin shards of at most shard_tokens (whole samples), val
    samples into val.bin. Returns [(path, n_tokens)]."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    current, count, index = [], 0, 0
    for s, v in zip(samples, is_val):
        if v:
            continue
        if current and count + len(s[0]) > shard_tokens:
            flush_shard(out_dir, "train_%06d.bin" % index, current, info, with_mask, written)
            current, count, index = [], 0, index + 1
        current.append(s)
        count += len(s[0])
    if current:
        flush_shard(out_dir, "train_%06d.bin" % index, current, info, with_mask, written)
    val = [s for s, v in zip(samples, is_val) if v]
    if val:
        flush_shard(out_dir, "val.bin", val, info, with_mask, written)
    return written


def with_specials(ids, info):
    """BOS + ids + EOS (each only when the tokenizer has it)."""
    return ([info.bos] if info.bos >= 0 else []) + list(ids) + ([info.eos] if info.eos >= 0 else [])


def read_documents(paths, mode):
    docs = []
    for path in paths:
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            die("cannot read %s: %s" % (path, e))
        except UnicodeDecodeError as e:
            die("%s is not UTF-8 text: %s" % (path, e))
        if mode == "file":
            parts = [text]
        elif mode == "paragraph":
            parts = re.split(r"\n\s*\n", text)
        else:
            parts = text.split("\n")
        docs.extend(p.strip() for p in parts if p.strip())
    return docs


def main():
    ap = argparse.ArgumentParser(description="Text files -> token shards for pre-training")
    ap.add_argument("inputs", nargs="+", help="UTF-8 text files")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json (or the model directory)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--docs", choices=["file", "paragraph", "line"], default="file",
                    help="what one document is (default: a whole file)")
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--shard-tokens", type=int, default=50_000_000)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = ap.parse_args()
    if not 0 <= args.val_fraction < 1:
        die("--val-fraction must be in [0, 1)")
    if args.shard_tokens < 1:
        die("--shard-tokens must be positive")
    info = TokenizerInfo(args.tokenizer)
    docs = read_documents(args.inputs, args.docs)
    if not docs:
        die("no text found in the inputs")
    if args.val_fraction > 0 and len(docs) < 2:
        die("only one document: a val split needs at least 2 (use --docs paragraph or --val-fraction 0)")
    ids = map_parallel(encode_text, docs, info.path, args.workers, "tokenizing")
    samples = [(with_specials(x, info), None) for x in ids]
    written = write_train_val(args.out_dir, samples, val_flags(len(docs), args.val_fraction), info,
                              args.shard_tokens, with_mask=False)
    for path, n in written:
        print("wrote %s: %d tokens" % (path, n))
    print("%d documents, vocab_size %d, bos %d, eos %d" % (len(docs), info.vocab_size, info.bos, info.eos))


if __name__ == "__main__":
    main()
