"""Builds the tokenizer test fixtures with the Hugging Face `tokenizers` library.

Run with the reference venv:  /opt/hfref/bin/python tests/tokenizer/make_fixtures.py
Writes, for each of two small tokenizers (tests/tokenizer/<name>/):
  tokenizer.json   the HF tokenizer (trained here on TRAIN_TEXT)
  tokenizer.bin    our export of it (scripts/tokenizer_export.py)
  expected.bin     a tensor bundle (tensor_file.h) with, for each text k of TEXTS (a multi-line
                   text with punctuation, digits, contractions, UTF-8, an emoji and an added
                   token, then short edge cases): "text_k" (its UTF-8 bytes, one int32 per byte),
                   "ids_k" (HF's encoding, add_special_tokens=False) and "decoded_k" (the UTF-8
                   bytes of HF's decode of those ids, skip_special_tokens=False)
tests/test_tokenizer.c checks our C encoder and decoder against them.
  bytelevel: byte-level BPE, Llama-3 split regex + ByteLevel, ignore_merges, vocab 800
  sentencepiece: SentencePiece-style BPE, Metaspace(prepend_scheme="first", split=false),
                 byte_fallback with <0x00>..<0xFF>, vocab ~600
and tests/tokenizer/default/expected.bin for the shipped tokenizer data/default/tokenizer.json
(scripts/build_default_corpus.py; the C test reads data/default/tokenizer.bin).
"""
import json
import os
import struct
import sys

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
from tokenizer_export import LLAMA3_SPLIT, export_tokenizer  # noqa: E402

TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. It's a sunny day, and they're going outside.
We'll see what happens: perhaps 42 birds, 7 cats and 1999 ants will join them; I'd guess so.
She said, "Don't worry -- everything is fine!" He replied: "Isn't it?" (Maybe.)
Numbers like 3.14159, 2718 and 1,000,000 appear in the text; so do dates like 2024-05-17.
A café in München served crème brûlée; the waiter was naïve about über-fast service.
Tokenizers split text into pieces, then merge frequent pairs of symbols into longer tokens.
The model reads the tokens, predicts the next one, and learns from its mistakes over time.
In the beginning the text was short; later it grew longer, with more words and more merges.
Programs print lines:   indented lines, tabs\tand\tmore tabs, and blank lines follow.

Lists: apples, oranges, pears; colours: red, green, blue. You've seen them; we've counted them.
Counting: 123, 456, 12345, 123456 and 45; 123 again, 45 again, 2024 and 1999 again.
THE END OF THE FIRST PART. The second part repeats words: the the the, and and and, of of of.
"""

TEST_TEXT = """\
Hello, world! It's a test: we'll see how they're doing; I'd say 12345 apples cost $3.50.
Café naïve über straße — 日本語のテキスト 🙂 and emoji 🎉!
   Leading spaces, trailing tabs\t\t
<|special|> inside text, CAPS'LL 'Re SHOUT'S, x=1,000,000; (a+b)*c/d -> e


  \r\n end  """

KJV_TEXT = ("Genesis 1\nIn the beginning God created the heaven and the earth.\n"
            "And God said, Let there be light: and there was light.")

TEXTS = [TEST_TEXT, KJV_TEXT, "x", " leading space", "   ", "\n\n\n", "<|special|>", "<|special|>start",
         "end<|special|>", "12345678 9", "don't DON'T y'all", "日本", "tab\tand  two  spaces  ",
         "a\u2581b", "Zürich 3.5%!!"]

SPECIALS_BYTELEVEL = ["<|begin_of_text|>", "<|end_of_text|>", "<|special|>"]


def write_bundle(path, tensors):
    """tensor_file.h format: magic, version, count, then (name, dtype 1 = int32, ndim 1, dim, data)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<3I", 0x4E53544D, 1, len(tensors)))
        for name, values in tensors:
            f.write(struct.pack("<I", len(name)) + name.encode())
            f.write(struct.pack("<3I", 1, 1, len(values)))
            f.write(struct.pack("<%di" % len(values), *values))


def make_bytelevel():
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIALS_BYTELEVEL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TRAIN_TEXT] * 3, trainer=trainer)
    return tok


def make_sentencepiece():
    """Trains a char-level BPE over '\u2581'-spaced text, then inserts <0x00>..<0xFF> byte tokens
    after the specials (as Llama-2 does) and turns on byte_fallback."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator([TRAIN_TEXT] * 3, trainer=trainer)
    tj = json.loads(tok.to_str())
    old = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = [t for t, _ in old[:3]]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for t, _ in old[3:]:
        vocab[t] = len(vocab)
    tj["model"]["vocab"] = vocab
    tj["model"]["byte_fallback"] = True
    tj["model"]["fuse_unk"] = True
    tj["added_tokens"] = [dict(a, id=vocab[a["content"]]) for a in tj["added_tokens"]]
    tj["added_tokens"].append({"id": len(vocab), "content": "<|special|>", "single_word": False,
                               "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    tj["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return Tokenizer.from_str(json.dumps(tj))


def write_fixture(name, tok):
    out_dir = os.path.join(HERE, name)
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "tokenizer.json")
    tok.save(json_path)
    info = export_tokenizer(json_path, None, os.path.join(out_dir, "tokenizer.bin"), tok.get_vocab_size())
    write_expected(name, out_dir, tok, info["n_merges"])


def write_expected(name, out_dir, tok, n_merges):
    os.makedirs(out_dir, exist_ok=True)
    tensors = [("count", [len(TEXTS)])]
    for k, text in enumerate(TEXTS):
        ids = tok.encode(text, add_special_tokens=False).ids
        decoded = tok.decode(ids, skip_special_tokens=False)
        tensors += [("text_%d" % k, list(text.encode("utf-8"))), ("ids_%d" % k, ids),
                    ("decoded_%d" % k, list(decoded.encode("utf-8")))]
        if k == 0:
            print("%s: vocab %d, %d merges, test text -> %d ids, decode %s the text"
                  % (name, tok.get_vocab_size(), n_merges, len(ids),
                     "reproduces" if decoded == text else "differs from"))
    write_bundle(os.path.join(out_dir, "expected.bin"), tensors)


def main():
    write_fixture("bytelevel", make_bytelevel())
    write_fixture("sentencepiece", make_sentencepiece())
    default_json = os.path.join(HERE, "..", "..", "data", "default", "tokenizer.json")
    default = Tokenizer.from_file(default_json)
    write_expected("default", os.path.join(HERE, "default"), default,
                   len(json.load(open(default_json))["model"]["merges"]))


if __name__ == "__main__":
    main()
