"""LongAlpaca-style instruction records -> fine-tuning shards with a loss mask (dataloader.h).

  python scripts/prepare_longalpaca.py --tokenizer MODEL_DIR/tokenizer.json --out-dir data/sft \\
      [--val-fraction 0.05] [--shard-tokens 50000000] [--workers N] RECORDS.json[l]

Input: a JSON list of records, or JSON Lines (one record per line). Each record is an object with
"instruction" (string, required), "output" (string, required) and "input" (string, may be empty or
absent). Anything else (bad JSON, a missing or non-string field) stops the script with exit 1,
naming the file, line and record.

Prompt template (Alpaca):
  with an input:
    Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.\\n\\n### Instruction:\\n
    {instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n
  without one:
    Below is an instruction that describes a task. Write a response that appropriately completes
    the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n
(each line above is one line of the template; the wrapping is this comment's).
A sample is BOS + tokens(prompt) with loss mask 0, then tokens(output) + EOS with loss mask 1, so
the model is trained only to produce the response and to end it. Prompt and response are tokenized
separately, so the mask boundary falls exactly between them. The data loader packs whole samples
into sequences (a sample longer than the sequence is truncated there). Shards as in prepare_text.py.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_text import (TokenizerInfo, die, encode_text, map_parallel, val_flags,  # noqa: E402
                          write_train_val)

PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                     "further context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def format_prompt(record):
    if record.get("input", ""):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def check_record(record, where):
    if not isinstance(record, dict):
        die("%s: a record must be a JSON object, got %s" % (where, type(record).__name__))
    for key in ("instruction", "output"):
        if key not in record:
            die("%s: record has no '%s' field" % (where, key))
    for key in ("instruction", "output", "input"):
        if key in record and not isinstance(record[key], str):
            die("%s: field '%s' must be a string, got %s" % (where, key, type(record[key]).__name__))
    if not record["output"]:
        die("%s: field 'output' is empty (nothing to train on)" % where)


def read_records(path):
    """Records of a JSON list or JSON Lines file, each checked; dies on the first bad one."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        die("cannot read %s: %s" % (path, e))
    except UnicodeDecodeError as e:
        die("%s is not UTF-8: %s" % (path, e))
    records = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            die("%s: not valid JSON: %s" % (path, e))
        for i, r in enumerate(items):
            check_record(r, "%s: record %d" % (path, i))
            records.append(r)
    else:
        for line_no, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                die("%s:%d: not valid JSON: %s" % (path, line_no, e))
            check_record(r, "%s:%d: record %d" % (path, line_no, len(records)))
            records.append(r)
    if not records:
        die("%s: no records" % path)
    return records


def build_samples(records, info, workers):
    """[(ids, mask)] for each record: BOS + prompt (mask 0), response + EOS (mask 1)."""
    texts = []
    for r in records:
        texts.append(format_prompt(r))
        texts.append(r["output"])
    ids = map_parallel(encode_text, texts, info.path, workers, "tokenizing")
    samples = []
    for k in range(len(records)):
        prompt = ([info.bos] if info.bos >= 0 else []) + ids[2 * k]
        answer = ids[2 * k + 1] + ([info.eos] if info.eos >= 0 else [])
        samples.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return samples


def main():
    ap = argparse.ArgumentParser(description="LongAlpaca-style records -> masked fine-tuning shards")
    ap.add_argument("input", help="JSON list or JSON Lines of {instruction, input, output}")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json (or the model directory)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--shard-tokens", type=int, default=50_000_000)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = ap.parse_args()
    if not 0 <= args.val_fraction < 1:
        die("--val-fraction must be in [0, 1)")
    info = TokenizerInfo(args.tokenizer)
    if info.eos < 0:
        die("the tokenizer has no EOS token: responses could not be ended")
    records = read_records(args.input)
    samples = build_samples(records, info, args.workers)
    written = write_train_val(args.out_dir, samples, val_flags(len(samples), args.val_fraction), info,
                              args.shard_tokens, with_mask=True)
    for path, n in written:
        print("wrote %s: %d tokens" % (path, n))
    lengths = sorted(len(s[0]) for s in samples)
    trained = sum(sum(s[1]) for s in samples)
    print("%d records, sample tokens min %d / median %d / max %d, %d of %d tokens trained on"
          % (len(samples), lengths[0], lengths[len(lengths) // 2], lengths[-1], trained,
             sum(lengths)))


if __name__ == "__main__":
    main()
