"""Export a Hugging Face tokenizer.json to our tokenizer.bin (read by tokenizer.h).

Reads tokenizer.json with the json module only (the `tokenizers` package is not needed).
Supported: BPE models of two kinds,
  kind 1 = byte-level BPE (GPT-2 / Llama-3 / Qwen2: ByteLevel pre-tokenizer or decoder),
  kind 2 = SentencePiece-style BPE (Llama-2 / Mistral / Gemma: '\u2581' for spaces, <0xXX> byte fallback).
Decoding works for every supported tokenizer; encoding (prompts) needs a pre-tokenizer that
tokenizer.h implements (Llama-3 or Qwen2 split regex, or SentencePiece-style spaces): for any other
the file is still written, marked decode-only, and the exporter says so.

tokenizer.bin, little-endian:
  header of 256 int32:
    [0] magic 0x4B53544D ('M','T','S','K')   [1] version 1
    [2] vocab_size (= the model's vocab size; ids the tokenizer lacks are "unused" entries)
    [3] bos_id  [4] eos_id  [5] pad_id  (-1 = none)
    [6] kind (1 byte-level BPE, 2 SentencePiece-style BPE)
    [7] n_merges  [8] max_token_bytes
    [9] pretokenizer used by encode: 0 none (decode-only), 1 Llama-3 regex (digit groups of 1-3),
        2 Qwen2 regex (single digits), 3 SentencePiece-style (spaces as '\u2581')
    [10] ignore_merges (1: a pre-tokenized piece that is itself a token is emitted whole)
    [11] SentencePiece prepend of '\u2581': 0 never, 1 always (unless the segment starts with one),
         2 first (only the segment at the start of the text), 3 unconditional on every non-empty
         segment (the legacy Prepend normalizer)
    [12] SentencePiece split (1: split before every '\u2581', Metaspace split=true)
    [13] unk_id (-1 none)
    [14] n_tokenizer_vocab (ids >= this are unused rows of a padded embedding)
    [15] n_letter_ranges  [16] n_number_ranges (Unicode \\p{L} / \\p{N} code point ranges)
    [17] normalizer: 0 none, 1 NFC (encode assumes its input is already NFC)
    rest 0
  then for each id 0..vocab_size-1:
    uint8 flags (1 special/control, 2 unused id, 4 byte-fallback token <0xXX>, 8 added token:
    matched literally in the text before pre-tokenization), uint32 length, the token's raw bytes
    (byte-level: the GPT-2 bytes<->unicode map undone; SentencePiece: '\u2581' -> ' ', <0xXX> -> that
    byte; added tokens: their UTF-8 text)
  then n_merges triples uint32 (left, right, merged) in priority order (first = applied first)
  then n_letter_ranges pairs uint32 (lo, hi) and n_number_ranges pairs uint32 (lo, hi), inclusive,
  sorted: the Unicode categories L and N (from Python's unicodedata) that the split regex needs.

CLI: python scripts/tokenizer_export.py tokenizer.json out.bin [--config tokenizer_config.json]
     [--vocab-size N]   (N defaults to the tokenizer's own size)
"""
import argparse
import json
import os
import struct
import sys
import unicodedata

TOKENIZER_MAGIC = 0x4B53544D
TOKENIZER_VERSION = 1
HEADER_INTS = 256

KIND_BYTE_LEVEL = 1
KIND_SENTENCEPIECE = 2

PRETOK_NONE, PRETOK_LLAMA3, PRETOK_QWEN2, PRETOK_SENTENCEPIECE = 0, 1, 2, 3
PREPEND_NEVER, PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_UNCONDITIONAL = 0, 1, 2, 3

FLAG_SPECIAL, FLAG_UNUSED, FLAG_BYTE_FALLBACK, FLAG_ADDED = 1, 2, 4, 8

SPACE_MARK = "\u2581"

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

BOS_NAMES = ["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"]
EOS_NAMES = ["<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"]
PAD_NAMES = ["<pad>", "<|pad|>", "<|finetune_right_pad_id|>"]


class ExportError(Exception):
    """A tokenizer we cannot (or must not) export; the message says why."""


def gpt2_unicode_to_byte():
    """The inverse of GPT-2's bytes->unicode map: printable bytes map to themselves, the other
    bytes to chr(256 + k) in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
                 + list(range(0xAE, 0xFF + 1)))
    table = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def unicode_ranges():
    """Sorted inclusive (lo, hi) code point ranges of the Unicode categories L (letters) and N
    (numbers), from Python's unicodedata: (letter_ranges, number_ranges)."""
    out = {"L": [], "N": []}
    open_class, start = None, 0
    for cp in range(0x110001):
        cls = unicodedata.category(chr(cp))[0] if cp <= 0x10FFFF else None
        if cls == open_class:
            continue
        if open_class in out:
            out[open_class].append((start, cp - 1))
        open_class, start = cls, cp
    return out["L"], out["N"]


def components(node):
    """A pipeline node (normalizer, pre-tokenizer, decoder) as a flat list of its parts."""
    if node is None:
        return []
    kind = node.get("type")
    if kind == "Sequence":
        parts = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
        out = []
        for p in parts:
            out.extend(components(p))
        return out
    return [node]


def detect_kind(tj):
    model = tj["model"]
    types = [c.get("type") for c in components(tj.get("pre_tokenizer")) + components(tj.get("decoder"))]
    if "ByteLevel" in types:
        return KIND_BYTE_LEVEL
    if model.get("byte_fallback") or "Metaspace" in types or "ByteFallback" in types:
        return KIND_SENTENCEPIECE
    raise ExportError("unsupported tokenizer: neither byte-level (ByteLevel pre-tokenizer/decoder) "
                      "nor SentencePiece-style (Metaspace / byte_fallback)")


def regex_of(split):
    pattern = split.get("pattern", {})
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def byte_level_encoder(tj, notes):
    """The pretokenizer code for a byte-level tokenizer, or PRETOK_NONE with a note saying why."""
    parts = components(tj.get("pre_tokenizer"))
    types = [p.get("type") for p in parts]
    if types != ["Split", "ByteLevel"]:
        notes.append("pre-tokenizer %s is not Split(regex)+ByteLevel" % types)
        return PRETOK_NONE
    split, byte_level = parts
    if split.get("behavior") != "Isolated" or split.get("invert"):
        notes.append("the Split pre-tokenizer is not behavior=Isolated, invert=false")
        return PRETOK_NONE
    if byte_level.get("use_regex", True) or byte_level.get("add_prefix_space", False):
        notes.append("ByteLevel uses its own regex or add_prefix_space")
        return PRETOK_NONE
    regex = regex_of(split)
    if regex == LLAMA3_SPLIT:
        return PRETOK_LLAMA3
    if regex == QWEN2_SPLIT:
        return PRETOK_QWEN2
    notes.append("split regex %r is neither Llama-3's nor Qwen2's" % regex)
    return PRETOK_NONE


def sentencepiece_encoder(tj, notes):
    """(pretokenizer, prepend scheme, split) for a SentencePiece-style tokenizer."""
    prepend = PREPEND_NEVER
    split = 0
    for n in components(tj.get("normalizer")):
        if n.get("type") == "Prepend" and n.get("prepend") == SPACE_MARK:
            prepend = PREPEND_UNCONDITIONAL
        elif n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " " \
                and n.get("content") == SPACE_MARK:
            continue
        else:
            notes.append("normalizer %s is not supported by the encoder" % n.get("type"))
            return PRETOK_NONE, prepend, split
    for p in components(tj.get("pre_tokenizer")):
        if p.get("type") != "Metaspace" or p.get("replacement", SPACE_MARK) != SPACE_MARK:
            notes.append("pre-tokenizer %s is not supported by the encoder" % p.get("type"))
            return PRETOK_NONE, prepend, split
        scheme = p.get("prepend_scheme")
        if scheme is None:
            scheme = "always" if p.get("add_prefix_space", True) else "never"
        prepend = {"always": PREPEND_ALWAYS, "first": PREPEND_FIRST, "never": PREPEND_NEVER}[scheme]
        split = 1 if p.get("split", True) else 0
    return PRETOK_SENTENCEPIECE, prepend, split


def token_bytes(kind, text, unicode_to_byte):
    """(raw bytes, is_byte_fallback) of one vocabulary entry."""
    if kind == KIND_BYTE_LEVEL:
        try:
            return bytes(unicode_to_byte[c] for c in text), False
        except KeyError as e:
            raise ExportError("byte-level token %r has a character outside the byte map: %r"
                              % (text, e.args[0]))
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return bytes([int(text[3:5], 16)]), True
        except ValueError:
            pass
    return text.replace(SPACE_MARK, " ").encode("utf-8"), False


def special_name(value):
    """A tokenizer_config.json special token entry: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def find_special_ids(tj, config):
    """(bos_id, eos_id, pad_id), -1 where none: from tokenizer_config.json when given, else the
    post-processor's template (BOS) and common token names."""
    ids = dict(tj["model"]["vocab"])
    for a in tj.get("added_tokens", []):
        ids[a["content"]] = a["id"]
    out = {}
    for key, names in (("bos", BOS_NAMES), ("eos", EOS_NAMES), ("pad", PAD_NAMES)):
        found = -1
        if config is not None and config.get(key + "_token") is not None:
            name = special_name(config[key + "_token"])
            if name not in ids:
                raise ExportError("tokenizer_config.json names %s_token %r, which is not in the "
                                  "vocabulary" % (key, name))
            found = ids[name]
        elif config is None:
            if key == "bos":
                found = template_bos(tj, ids)
            for name in names:
                if found < 0 and name in ids:
                    found = ids[name]
        out[key] = found
    return out["bos"], out["eos"], out["pad"]


def template_bos(tj, ids):
    """The special token that the post-processor puts first in a single sequence, or -1."""
    for p in components(tj.get("post_processor")) + [tj.get("post_processor") or {}]:
        if p.get("type") == "TemplateProcessing":
            first = (p.get("single") or [{}])[0]
            name = first.get("SpecialToken", {}).get("id")
            if name in ids:
                return ids[name]
    return -1


def merge_pairs(model):
    """Merges as (left, right) string pairs; tokenizer.json stores "a b" or ["a", "b"]."""
    pairs = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise ExportError("merge %r is not two tokens separated by one space" % m)
            pairs.append((parts[0], parts[1]))
        else:
            pairs.append((m[0], m[1]))
    return pairs


def export_tokenizer(tokenizer_json_path, tokenizer_config_path, out_path, model_vocab_size):
    """Writes tokenizer.bin for the model; returns a dict of what was written. Raises ExportError
    (with a message fit for the user) for tokenizers we cannot export."""
    with open(tokenizer_json_path, "r", encoding="utf-8") as f:
        tj = json.load(f)
    config = None
    if tokenizer_config_path is not None and os.path.exists(tokenizer_config_path):
        with open(tokenizer_config_path, "r", encoding="utf-8") as f:
            config = json.load(f)
    model = tj.get("model", {})
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise ExportError("unsupported tokenizer model type %r (only BPE is supported)"
                          % model.get("type"))
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ExportError("BPE with continuing_subword_prefix / end_of_word_suffix is not supported")
    kind = detect_kind(tj)
    notes = []
    prepend, split = PREPEND_NEVER, 0
    if kind == KIND_BYTE_LEVEL:
        pretok = byte_level_encoder(tj, notes)
    else:
        pretok, prepend, split = sentencepiece_encoder(tj, notes)
    normalizer = 0
    if kind == KIND_BYTE_LEVEL:
        norms = [n.get("type") for n in components(tj.get("normalizer"))]
        if norms == ["NFC"]:
            normalizer = 1
        elif norms:
            notes.append("normalizer %s is not supported by the encoder" % norms)
            pretok = PRETOK_NONE

    entries = {}  # id -> (flags, bytes)
    unicode_to_byte = gpt2_unicode_to_byte()
    for text, idx in model["vocab"].items():
        raw, is_fallback = token_bytes(kind, text, unicode_to_byte)
        entries[idx] = (FLAG_BYTE_FALLBACK if is_fallback else 0, raw)
    for a in tj.get("added_tokens", []):
        flags = FLAG_ADDED | (FLAG_SPECIAL if a.get("special") else 0)
        entries[a["id"]] = (flags, a["content"].encode("utf-8"))
    n_tok_vocab = max(entries) + 1
    if n_tok_vocab > model_vocab_size:
        raise ExportError("the tokenizer has ids up to %d (%d entries) but the model's vocab_size is "
                          "%d: the model cannot embed them" % (n_tok_vocab - 1, n_tok_vocab, model_vocab_size))
    if min(entries) < 0:
        raise ExportError("negative token id %d in tokenizer.json" % min(entries))

    ids = dict(model["vocab"])
    merges = []
    for left, right in merge_pairs(model):
        for t in (left, right, left + right):
            if t not in ids:
                raise ExportError("merge (%r, %r) uses %r, which is not in the vocabulary" % (left, right, t))
        merges.append((ids[left], ids[right], ids[left + right]))
    bos, eos, pad = find_special_ids(tj, config)
    unk_name = model.get("unk_token")
    unk = ids.get(unk_name, -1) if unk_name is not None else -1
    letters, numbers = unicode_ranges()
    max_len = max(len(raw) for _, raw in entries.values())

    header = [0] * HEADER_INTS
    header[0:18] = [TOKENIZER_MAGIC, TOKENIZER_VERSION, model_vocab_size, bos, eos, pad, kind,
                    len(merges), max_len, pretok, 1 if model.get("ignore_merges") else 0, prepend,
                    split, unk, n_tok_vocab, len(letters), len(numbers), normalizer]
    tmp_path = out_path + ".tmp"
    with open(tmp_path, "wb") as f:
        f.write(struct.pack("<%di" % HEADER_INTS, *header))
        for i in range(model_vocab_size):
            flags, raw = entries.get(i, (FLAG_UNUSED, b""))
            f.write(struct.pack("<BI", flags, len(raw)))
            f.write(raw)
        for triple in merges:
            f.write(struct.pack("<3I", *triple))
        for lo, hi in letters + numbers:
            f.write(struct.pack("<2I", lo, hi))
    os.replace(tmp_path, out_path)
    return {"kind": kind, "vocab_size": model_vocab_size, "n_tokenizer_vocab": n_tok_vocab,
            "n_merges": len(merges), "bos_id": bos, "eos_id": eos, "pad_id": pad,
            "pretokenizer": pretok, "notes": notes}


def describe(info, out_path):
    kinds = {KIND_BYTE_LEVEL: "byte-level BPE", KIND_SENTENCEPIECE: "SentencePiece-style BPE"}
    print("wrote %s: %s, %d ids (%d from the tokenizer), %d merges, bos %d, eos %d, pad %d"
          % (out_path, kinds[info["kind"]], info["vocab_size"], info["n_tokenizer_vocab"],
             info["n_merges"], info["bos_id"], info["eos_id"], info["pad_id"]))
    if info["pretokenizer"] == PRETOK_NONE:
        print("note: encoding (prompts) is not supported for this tokenizer, decoding is: "
              + "; ".join(info["notes"]))


def main():
    ap = argparse.ArgumentParser(description="Export a Hugging Face tokenizer.json to tokenizer.bin")
    ap.add_argument("tokenizer_json")
    ap.add_argument("out")
    ap.add_argument("--config", default=None, help="tokenizer_config.json (BOS/EOS/pad names)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="the model's vocab size (default: the tokenizer's own size)")
    args = ap.parse_args()
    try:
        vocab_size = args.vocab_size
        if vocab_size is None:
            with open(args.tokenizer_json, "r", encoding="utf-8") as f:
                tj = json.load(f)
            all_ids = list(tj["model"]["vocab"].values()) + [a["id"] for a in tj.get("added_tokens", [])]
            vocab_size = max(all_ids) + 1
        info = export_tokenizer(args.tokenizer_json, args.config, args.out, vocab_size)
    except (ExportError, OSError, ValueError, KeyError) as e:
        print("error: %s: %s" % (args.tokenizer_json, e), file=sys.stderr)
        sys.exit(1)
    describe(info, args.out)


if __name__ == "__main__":
    main()
