"""Tests of the data preparation scripts and the tokenizer exporter (pytest; needs numpy and
`tokenizers`, no torch):

  python3 -m pytest -q tests/test_prepare.py

prepare_text.py and prepare_longalpaca.py on tiny inputs must write valid shards (header, ids,
document layout, val split); the loss mask must cover exactly each response and its EOS; bad input
must stop with exit 1 and a clear message. tokenizer_export.py must refuse what it cannot export.
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)
from prepare_longalpaca import format_prompt  # noqa: E402
from prepare_text import SHARD_MAGIC, read_shard  # noqa: E402

TOKENIZER = os.path.join(ROOT, "tests", "tokenizer", "bytelevel", "tokenizer.json")
SAMPLE = os.path.join(ROOT, "data", "longalpaca_sample.jsonl")
BOS, EOS = 0, 1  # <|begin_of_text|>, <|end_of_text|> in the bytelevel fixture


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, script)] + [str(a) for a in args],
                          capture_output=True, text=True, cwd=ROOT)


def tokenizer():
    return Tokenizer.from_file(TOKENIZER)


def check_header(header, has_mask, n_tokens):
    assert header[0] == SHARD_MAGIC and header[1] == 1
    assert header[2] == n_tokens
    assert header[3] == (1 if has_mask else 0)
    assert header[4] == tokenizer().get_vocab_size()
    assert (header[5], header[6], header[7]) == (BOS, EOS, -1)
    assert not header[8:].any()


def split_docs(tokens):
    """Documents of a stream: each from a BOS up to the next."""
    starts = [i for i, t in enumerate(tokens) if t == BOS] + [len(tokens)]
    assert starts[0] == 0
    return [tokens[a:b] for a, b in zip(starts, starts[1:])]


# ---- prepare_text.py

DOCS = ["The first document. It has two sentences.",
        "Second: numbers 123 and 45678, and 'quotes'.",
        "Third document\nwith two lines and caf\u00e9.",
        "Fourth, short.",
        "Fifth and last document, a bit longer than the others, to fill a shard on its own maybe."]


def write_docs(tmp_path):
    paths = []
    for i, d in enumerate(DOCS):
        p = tmp_path / ("doc%d.txt" % i)
        p.write_text(d, encoding="utf-8")
        paths.append(p)
    return paths


def test_prepare_text_shards(tmp_path):
    out = tmp_path / "out"
    r = run("prepare_text.py", "--tokenizer", TOKENIZER, "--out-dir", out, "--val-fraction", "0.2",
            "--shard-tokens", "40", "--workers", "2", *write_docs(tmp_path))
    assert r.returncode == 0, r.stderr
    tok = tokenizer()
    expected = [[BOS] + tok.encode(d, add_special_tokens=False).ids + [EOS] for d in DOCS]
    train_files = sorted(f for f in os.listdir(out) if f.startswith("train_"))
    assert len(train_files) >= 2, "--shard-tokens 40 should give several shards"
    train_docs = []
    for f in train_files:
        header, tokens, mask = read_shard(str(out / f))
        check_header(header, False, len(tokens))
        assert mask is None
        assert len(tokens) <= 40 or len(split_docs(list(tokens))) == 1
        train_docs += [list(d) for d in split_docs(list(tokens))]
    header, val_tokens, _ = read_shard(str(out / "val.bin"))
    check_header(header, False, len(val_tokens))
    val_docs = [list(d) for d in split_docs(list(val_tokens))]
    assert val_docs == [expected[4]]  # 5 docs x 0.2: the last one, spread evenly
    assert train_docs == expected[:4]
    assert tok.decode(train_docs[2][1:-1]) == DOCS[2]


def test_prepare_text_paragraphs_and_workers_agree(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(DOCS), encoding="utf-8")
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / ("out" + workers)
        r = run("prepare_text.py", "--tokenizer", TOKENIZER, "--out-dir", out, "--docs", "paragraph",
                "--val-fraction", "0.4", "--workers", workers, text)
        assert r.returncode == 0, r.stderr
        outs.append({f: (out / f).read_bytes() for f in sorted(os.listdir(out))})
    assert outs[0] == outs[1]
    _, tokens, _ = read_shard(str(tmp_path / "out1" / "val.bin"))
    assert len(split_docs(list(tokens))) == 2


@pytest.mark.parametrize("args,phrase", [
    (["--val-fraction", "0.1"], "only one document"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["--tokenizer-missing"], "cannot read tokenizer"),
])
def test_prepare_text_errors(tmp_path, args, phrase):
    one = tmp_path / "one.txt"
    one.write_text("just one document", encoding="utf-8")
    tok = TOKENIZER
    if args == ["--tokenizer-missing"]:
        tok, args = str(tmp_path / "missing.json"), []
    r = run("prepare_text.py", "--tokenizer", tok, "--out-dir", tmp_path / "out", *args, one)
    assert r.returncode == 1
    assert phrase in r.stderr


def test_prepare_text_not_utf8(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    r = run("prepare_text.py", "--tokenizer", TOKENIZER, "--out-dir", tmp_path / "out",
            "--val-fraction", "0", bad)
    assert r.returncode == 1 and "is not UTF-8" in r.stderr


# ---- prepare_longalpaca.py

def load_records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_masked_samples(out_dir, records, val_every):
    """Every sample: BOS + prompt unmasked, then response + EOS masked, nothing else masked."""
    tok = tokenizer()
    samples = []
    for f in sorted(os.listdir(out_dir)):
        header, tokens, mask = read_shard(os.path.join(out_dir, f))
        check_header(header, True, len(tokens))
        starts = [i for i, t in enumerate(tokens) if t == BOS] + [len(tokens)]
        part = [(tokens[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(starts, starts[1:])]
        samples += [(f, s) for s in part]
    val = [s for f, s in samples if f == "val.bin"]
    train = [s for f, s in samples if f != "val.bin"]
    expect_val = [r for i, r in enumerate(records) if (i + 1) % val_every == 0]
    expect_train = [r for i, r in enumerate(records) if (i + 1) % val_every != 0]
    assert len(val) == len(expect_val) and len(train) == len(expect_train)
    for (ids, mask), record in zip(train + val, expect_train + expect_val):
        n_answer = sum(mask)
        assert mask == [0] * (len(ids) - n_answer) + [1] * n_answer, "mask is not one run at the end"
        assert ids[-1] == EOS
        assert tok.decode(ids[len(ids) - n_answer:-1]) == record["output"]
        assert tok.decode(ids[1:len(ids) - n_answer]) == format_prompt(record)
        assert n_answer == len(tok.encode(record["output"], add_special_tokens=False).ids) + 1


def test_longalpaca_jsonl_sample(tmp_path):
    out = tmp_path / "sft"
    r = run("prepare_longalpaca.py", SAMPLE, "--tokenizer", TOKENIZER, "--out-dir", out,
            "--val-fraction", "0.1", "--shard-tokens", "3000", "--workers", "2")
    assert r.returncode == 0, r.stderr
    records = load_records(SAMPLE)
    assert len(records) >= 30
    assert any(not r.get("input") for r in records) and any(r.get("input") for r in records)
    assert len([f for f in os.listdir(out) if f.startswith("train_")]) >= 2
    check_masked_samples(str(out), records, val_every=10)


def test_longalpaca_json_list(tmp_path):
    records = load_records(SAMPLE)[:4]
    src = tmp_path / "records.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "sft"
    r = run("prepare_longalpaca.py", src, "--tokenizer", TOKENIZER, "--out-dir", out,
            "--val-fraction", "0", "--workers", "1")
    assert r.returncode == 0, r.stderr
    check_masked_samples(str(out), records, val_every=10 ** 9)


@pytest.mark.parametrize("content,phrase", [
    ('{"instruction": "a", "input": ""}\n', "record has no 'output' field"),
    ('{"output": "b"}\n', "record has no 'instruction' field"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', ":2: not valid JSON"),
    ('[{"instruction": "a", "output": "b"},', "not valid JSON"),
    ('{"instruction": "a", "input": 3, "output": "b"}\n', "field 'input' must be a string"),
    ('["a list, not an object"]\n', "must be a JSON object"),
    ('{"instruction": "a", "output": ""}\n', "field 'output' is empty"),
    ('\n\n', "no records"),
])
def test_longalpaca_bad_input(tmp_path, content, phrase):
    src = tmp_path / "bad.jsonl"
    src.write_text(content, encoding="utf-8")
    r = run("prepare_longalpaca.py", src, "--tokenizer", TOKENIZER, "--out-dir", tmp_path / "out")
    assert r.returncode == 1
    assert phrase in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ---- tokenizer_export.py

def test_export_header_and_specials(tmp_path):
    out = tmp_path / "t.bin"
    r = run("tokenizer_export.py", TOKENIZER, out, "--vocab-size", "700")
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    h = struct.unpack("<256i", data[:1024])
    n_tok = tokenizer().get_vocab_size()
    assert h[0] == 0x4B53544D and h[1] == 1 and h[2] == 700
    assert (h[3], h[4], h[5], h[6], h[9], h[10], h[14]) == (BOS, EOS, -1, 1, 1, 1, n_tok)
    pos, flags = 1024, []
    for _ in range(700):
        f, n = struct.unpack("<BI", data[pos:pos + 5])
        flags.append(f)
        pos += 5 + n
    assert flags[BOS] & 1 and flags[EOS] & 1  # special
    assert all(f == 2 for f in flags[n_tok:])  # padding rows are unused ids
    assert len(data) == pos + 12 * h[7] + 8 * (h[15] + h[16])


def test_export_refuses_small_model_vocab(tmp_path):
    r = run("tokenizer_export.py", TOKENIZER, tmp_path / "t.bin", "--vocab-size", "100")
    assert r.returncode == 1 and "the model's vocab_size is 100" in r.stderr


def test_export_refuses_other_models(tmp_path):
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}}, "added_tokens": []}
    src = tmp_path / "wp.json"
    src.write_text(json.dumps(wordpiece))
    r = run("tokenizer_export.py", src, tmp_path / "t.bin")
    assert r.returncode == 1 and "unsupported tokenizer model type 'WordPiece'" in r.stderr


def test_export_decode_only_note(tmp_path):
    tj = json.loads(open(TOKENIZER, encoding="utf-8").read())
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                           "use_regex": True}
    src = tmp_path / "gpt2style.json"
    src.write_text(json.dumps(tj))
    out = tmp_path / "t.bin"
    r = run("tokenizer_export.py", src, out)
    assert r.returncode == 0 and "encoding (prompts) is not supported" in r.stdout
    assert struct.unpack("<i", out.read_bytes()[36:40])[0] == 0


def test_shipped_corpus_is_valid():
    """data/default: the committed shards use the committed tokenizer's ids and layout."""
    d = os.path.join(ROOT, "data", "default")
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    assert tok.get_vocab_size() == 2048
    for f in sorted(os.listdir(d)):
        if f.endswith(".bin") and f != "tokenizer.bin":
            header, tokens, mask = read_shard(os.path.join(d, f))
            assert header[0] == SHARD_MAGIC and header[2] == len(tokens) and mask is None
            assert tokens.max() < 2048 and tokens[0] == 0
    _, tokens, _ = read_shard(os.path.join(d, "train_000000.bin"))
    first = list(tokens[:list(tokens).index(1)])
    assert tok.decode(first[1:]).startswith("Genesis 1\nIn the beginning God created the heaven")
    assert np.count_nonzero(tokens == 0) > 100
