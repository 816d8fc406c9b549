"""Builds the default training corpus that the repository ships in data/default/.

  apt-get install -y bible-kjv bible-kjv-text      # the text (and the `bible` program to read it)
  python scripts/build_default_corpus.py [--out-dir data/default]

Source: the King James Version of the Bible (1611; public domain: its copyright has expired), from
Debian's bible-kjv-text package, which stores it compressed in /usr/lib/bible.data; the `bible`
program of the bible-kjv package (GPL-2+) prints it. One document per chapter: the chapter's title
line ("Genesis 1"), then one line per verse, without verse numbers. Every 40th chapter (the 40th,
80th, ...) is validation; the tokenizer is trained on the other chapters only.

Writes:
  tokenizer.json   byte-level BPE, vocab 2048 (Llama-3 split regex, ByteLevel, ignore_merges),
                   specials <|begin_of_text|> (BOS, id 0) and <|end_of_text|> (EOS, id 1)
  tokenizer.bin    its export (scripts/tokenizer_export.py), vocab_size 2048
  train_000000.bin, train_000001.bin   the training chapters in canonical order, BOS ... EOS each,
                   up to TRAIN_TOKEN_BUDGET tokens in all (a prefix of the Bible when it has more),
                   split into two shards of whole chapters
  val.bin          the validation chapters
Deterministic: the same package version gives byte-identical files.
"""
import argparse
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from prepare_text import TokenizerInfo, die, write_train_val, with_specials  # noqa: E402
from tokenizer_export import LLAMA3_SPLIT, export_tokenizer  # noqa: E402

VOCAB_SIZE = 2048
VAL_EVERY = 40                 # every 40th chapter is validation
TRAIN_TOKEN_BUDGET = 900_000   # keeps the committed shards under ~4 MB
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]
ALL_VERSES = "Gen1:1-Rev22:21"


def read_chapters():
    """The Bible as a list of chapters, each 'Title N\\nverse\\nverse...'."""
    if shutil.which("bible") is None:
        die("the `bible` program is missing: apt-get install -y bible-kjv bible-kjv-text")
    try:
        out = subprocess.run(["bible", "-l100000", ALL_VERSES], check=True, capture_output=True).stdout
    except subprocess.CalledProcessError as e:
        die("`bible` failed (%s): %s" % (e.returncode, e.stderr.decode(errors="replace")))
    chapters = []
    for line in out.decode("utf-8").split("\n"):
        if not line.strip():
            continue
        if not line.startswith(" "):
            chapters.append([line.strip()])
            continue
        number, _, verse = line.strip().partition(" ")
        if not number.isdigit() or not chapters:
            die("unexpected line in the `bible` output: %r" % line)
        chapters[-1].append(verse.strip())
    if len(chapters) != 1189:
        die("expected the 1189 chapters of the KJV, got %d" % len(chapters))
    return ["\n".join(c) for c in chapters]


def train_tokenizer(texts, out_dir):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    return tok, path


def main():
    ap = argparse.ArgumentParser(description="Build data/default (KJV shards + tokenizer)")
    ap.add_argument("--out-dir", default=os.path.normpath(os.path.join(HERE, "..", "data", "default")))
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    chapters = read_chapters()
    is_val = [(i + 1) % VAL_EVERY == 0 for i in range(len(chapters))]
    tok, tok_path = train_tokenizer([c for c, v in zip(chapters, is_val) if not v], args.out_dir)
    info = export_tokenizer(tok_path, None, os.path.join(args.out_dir, "tokenizer.bin"), VOCAB_SIZE)
    tinfo = TokenizerInfo(tok_path)
    if (tinfo.bos, tinfo.eos) != (0, 1) or (info["bos_id"], info["eos_id"]) != (0, 1):
        die("unexpected special ids: bos %d, eos %d" % (tinfo.bos, tinfo.eos))
    ids = [with_specials(e.ids, tinfo) for e in tok.encode_batch(chapters, add_special_tokens=False)]
    samples, flags, used, n_train, full = [], [], 0, 0, False
    for sample, v in zip(ids, is_val):
        if not v:
            full = full or used + len(sample) > TRAIN_TOKEN_BUDGET
            if full:
                continue
            used += len(sample)
            n_train += 1
        samples.append((sample, None))
        flags.append(v)
    # the first shard takes whole chapters past half the tokens, so the rest fits the second
    shard_tokens = (used + 1) // 2 + max(len(s) for s, _ in samples)
    for name in os.listdir(args.out_dir):
        if name.startswith("train_") and name.endswith(".bin"):
            os.remove(os.path.join(args.out_dir, name))
    written = write_train_val(args.out_dir, samples, flags, tinfo, shard_tokens, with_mask=False)
    total_bytes = 0
    for path, n in written:
        total_bytes += os.path.getsize(path)
        print("wrote %s: %d tokens, %d bytes" % (path, n, os.path.getsize(path)))
    print("%d of %d training chapters (%d tokens), %d validation chapters; shards %.2f MB in all; "
          "%.2f bytes of text per token" % (n_train, len(chapters) - sum(is_val), used, sum(is_val),
                                             total_bytes / 1e6, sum(len(c.encode()) for c in chapters)
                                             / sum(len(x) - 2 for x in ids)))


if __name__ == "__main__":
    main()
