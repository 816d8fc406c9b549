#!/usr/bin/env python3
"""Training-step throughput of train_llama against Hugging Face transformers, one table.

For each model shape (--models) and (B, S) cell (S in --seqs at batch 1, and S=4096 at the batches
of --batches) it runs, each as a subprocess with a timeout:
  ours      ./train_llama --preset P --synthetic-data --bench --mst auto --recompute 0
  ours-rc   the same with --recompute 1 (only at S in --rc-seqs: the long sequences); the layers keep
            their attention activations as far as memory allows (--keep-attn auto, the default)
  ours-rc-nokeep  --recompute 1 --keep-attn 0: every layer's attention recomputed (not in the default list)
  hf        scripts/hf_peer.py (transformers, sdpa, fused AdamW)
  hf-gc     scripts/hf_peer.py --gc (gradient checkpointing)
and prints ONE table (device, date, the exact command; model, method, B, S, tok/s, TFLOP/s, MFU,
peak GiB or OOM, ratio of tok/s to HF vanilla, or to HF --gc where vanilla is OOM, marked 'gc')
and writes it as CSV, with the raw BENCH records as JSONL next to it.

A run counts as 'refused' when train_llama's planner refuses it before allocating ("does not fit"),
and as OOM when it prints a BENCH record with "oom": true (hf_peer.py), or exits non-zero
saying "does not fit" (train_llama's planner refuses before allocating) or "out of memory".

Helpers here (parse_bench, classify, run_command, format_table, write_csv) are shared with max_seq.py.
"""
import argparse
import csv
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from hf_peer import PRESETS  # noqa: E402

ALL_METHODS = ["ours", "ours-rc", "ours-rc-nokeep", "hf", "hf-gc"]
DEFAULT_METHODS = ["ours", "ours-rc", "hf", "hf-gc"]
RC_METHODS = ("ours-rc", "ours-rc-nokeep")  # run only at S in --rc-seqs
COLUMNS = ["model", "method", "B", "S", "tok/s", "TFLOP/s", "MFU", "peak GiB", "vs HF"]


def parse_bench(text):
    """The record of the last 'BENCH {json}' line of a run's output, or None."""
    rec = None
    for line in text.splitlines():
        if line.startswith("BENCH "):
            try:
                rec = json.loads(line[len("BENCH "):])
            except json.JSONDecodeError:
                continue
    return rec


def classify(rc, text, timed_out):
    """A run's outcome: ('ok', record) | ('oom', record or None) | ('refused', None) | ('timeout', None) |
    ('error', last line). 'refused': train_llama's planner said it does not fit, before allocating."""
    rec = parse_bench(text)
    if rec is not None and rec.get("oom"):
        return "oom", rec
    if rec is not None and rc == 0:
        return "ok", rec
    if timed_out:
        return "timeout", None
    low = text.lower()
    if "does not fit" in low:
        return "refused", None
    if "out of memory" in low or "outofmemoryerror" in low:
        return "oom", None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "error", (lines[-1][:300] if lines else f"exit {rc}, no output")


def run_command(cmd, timeout, log_path=None):
    """Runs cmd (a list) in the repository root with a timeout; returns (rc, output, timed_out, seconds)."""
    t0 = time.time()
    timed_out = False
    try:
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout, errors="replace")
        rc, out = p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        timed_out, rc = True, 124
        out = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode("utf-8", "replace")
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        with open(log_path, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n" + out)
    return rc, out, timed_out, time.time() - t0


def ours_command(binary, preset, B, S, steps, extra):
    """train_llama on synthetic data with --bench; extra: the memory flags of the method."""
    return [binary, "--preset", preset, "--synthetic-data", "--bench", "--batch", str(B), "--seq-len", str(S),
            "--steps", str(steps), "--lr", "1e-5", "--warmup", "0", "--schedule", "constant"] + list(extra)


def hf_command(python, preset, B, S, steps, gc):
    return [python, os.path.join("scripts", "hf_peer.py"), "--preset", preset, "--batch", str(B), "--seq-len", str(S),
            "--steps", str(steps)] + (["--gc"] if gc else [])


METHOD_FLAGS = {"ours": ["--mst", "auto", "--recompute", "0"], "ours-rc": ["--mst", "auto", "--recompute", "1"],
                "ours-rc-nokeep": ["--mst", "auto", "--recompute", "1", "--keep-attn", "0"]}


def method_command(method, args, preset, B, S):
    if method in METHOD_FLAGS:
        return ours_command(args.binary, preset, B, S, args.steps, METHOD_FLAGS[method])
    return hf_command(args.python, preset, B, S, args.steps, method == "hf-gc")


def cells(models, seqs, batches, methods, rc_seqs):
    """(model, method, B, S) in table order: batch-1 sequences, then S=4096 at the larger batches."""
    shapes = [(1, s) for s in seqs] + [(b, 4096) for b in batches if b != 1]
    out = []
    for m in models:
        for B, S in shapes:
            for meth in methods:
                if meth in RC_METHODS and S not in rc_seqs:
                    continue
                out.append((m, meth, B, S))
    return out


def dominated_by_failure(failures, B, S):
    """The (B', S') in failures (cells of the same model and method that ran out of memory or were
    refused) with B' <= B and S' <= S, or None: a cell with at least as many rows and as long rows
    needs at least as much memory, so it is not run."""
    for fb, fs in failures:
        if fb <= B and fs <= S:
            return fb, fs
    return None


def row_of(model, method, B, S, status, rec):
    """A result row: the fields of the table and CSV."""
    r = {"model": model, "method": method, "B": B, "S": S, "status": status}
    rec = rec or {}
    for k in ("tok_s", "tflops", "mfu", "peak_gib", "median_ms", "M", "vocab_chunk", "recompute", "attn_kept_layers",
              "offload", "device"):
        r[k] = rec.get(k)
    return r


def add_ratios(rows):
    """ratio = tok/s / HF vanilla tok/s of the same (model, B, S); HF --gc where vanilla did not run ('gc')."""
    ref = {}
    for r in rows:
        if r["status"] == "ok" and r["method"] in ("hf", "hf-gc"):
            ref.setdefault((r["model"], r["B"], r["S"]), {})[r["method"]] = r["tok_s"]
    for r in rows:
        r["ratio"], r["ratio_ref"] = None, None
        base = ref.get((r["model"], r["B"], r["S"]), {})
        key = "hf" if "hf" in base else ("hf-gc" if "hf-gc" in base else None)
        if r["status"] == "ok" and key and base[key]:
            r["ratio"], r["ratio_ref"] = r["tok_s"] / base[key], key
    return rows


STATUS_TEXT = {"oom": "OOM", "refused": "does not fit", "timeout": "timeout", "error": "error", "skipped": "OOM*"}
SKIPPED_NOTE = "OOM*: not run: the same method already ran out of memory (or did not fit) at no larger B and S"


def fmt_cell(r, col):
    ok = r["status"] == "ok"
    if col == "model":
        return r["model"]
    if col == "method":
        return r["method"]
    if col in ("B", "S"):
        return str(r[col])
    if not ok:
        return STATUS_TEXT.get(r["status"], r["status"]) if col == "peak GiB" else "-"
    if col == "tok/s":
        return f"{r['tok_s']:,.0f}"
    if col == "TFLOP/s":
        return f"{r['tflops']:.1f}"
    if col == "MFU":
        return "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    if col == "peak GiB":
        return "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
    if col == "vs HF":
        if r.get("ratio") is None:
            return "-"
        return f"{r['ratio']:.2f}x" + (" (gc)" if r["ratio_ref"] == "hf-gc" else "")
    raise KeyError(col)


def format_table(rows, columns, header_lines, fmt=fmt_cell):
    """A plain-text table: header lines, then the columns right-aligned (text columns left-aligned)."""
    body = [[fmt(r, c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    left = {"model", "method"}

    def line(vals):
        return "  ".join(v.ljust(w) if c in left else v.rjust(w) for v, w, c in zip(vals, widths, columns))

    out = list(header_lines) + [line(columns), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def write_csv(path, rows, fields):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def device_name():
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)
        names = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
        return names[0] if p.returncode == 0 and names else "no GPU (nvidia-smi found none)"
    except (OSError, subprocess.TimeoutExpired):
        return "no GPU (no nvidia-smi)"


def header_lines(argv):
    return [f"device: {device_name()}",
            f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"command: {shlex.join([sys.executable, os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else 'bench_step.py'] + list(argv))}"]


def int_list(s):
    return [int(x) for x in s.split(",") if x.strip()]


def str_list(allowed):
    def parse(s):
        v = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in v if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return v
    return parse


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Time per cell on an H100 (8B shapes, --steps 6): train_llama about 15-25 s of start-up "
               "(random init of the 8B parameters on the GPU, cuDNN plans) plus the steps (Llama-3-8B: "
               "~0.5 s a step at S=4K, ~3 s at S=16K; x1.3 with recompute); hf_peer.py about 15-25 s of "
               "start-up (imports, GPU init) plus similar steps; a cell that is OOM ends in 10-30 s. Plan "
               "about 30-45 s a cell at S<=8K and 45-70 s at S=16K; the full default grid (2 models x 7 "
               "shapes x 3 methods + recompute at 16K = 44 cells) takes 25-30 min: split it with --models, "
               "--seqs, --batches, --methods so one call stays under 10 minutes.")
    ap.add_argument("--models", type=str_list(sorted(PRESETS)), default=["llama3-8b", "llama2-7b"],
                    help="comma list of presets (default llama3-8b,llama2-7b)")
    ap.add_argument("--seqs", type=int_list, default=[2048, 4096, 8192, 16384],
                    help="sequence lengths at batch 1 (default 2048,4096,8192,16384)")
    ap.add_argument("--batches", type=int_list, default=[2, 4, 8],
                    help="batches at S=4096 (default 2,4,8; '' for none)")
    ap.add_argument("--methods", type=str_list(ALL_METHODS), default=DEFAULT_METHODS,
                    help=f"comma list of {', '.join(ALL_METHODS)} (default {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--rc-seqs", type=int_list, default=[16384],
                    help="sequence lengths where ours-rc and ours-rc-nokeep run (default 16384)")
    ap.add_argument("--steps", type=int, default=6, help="steps a run; the median leaves out the first 2 (default 6)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a run may take (default 300)")
    ap.add_argument("--binary", default="./train_llama")
    ap.add_argument("--python", default=sys.executable, help="python for hf_peer.py (default this one)")
    ap.add_argument("--out", default="bench_results", help="directory of the CSV, JSONL and run logs")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    todo = cells(args.models, args.seqs, args.batches, args.methods, args.rc_seqs)
    if args.dry_run:
        for m, meth, B, S in todo:
            print(shlex.join(method_command(meth, args, m, B, S)))
        return 0
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rows, t_start = [], time.time()
    jsonl = os.path.join(args.out, f"bench_step_{stamp}.jsonl")
    os.makedirs(args.out, exist_ok=True)
    failures = {}
    for i, (m, meth, B, S) in enumerate(todo):
        smaller = dominated_by_failure(failures.get((m, meth), []), B, S)
        if smaller:
            rows.append(row_of(m, meth, B, S, "skipped", None))
            print(f"[{i + 1}/{len(todo)}] {m} {meth} B={B} S={S}: not run (B={smaller[0]} S={smaller[1]} did not fit)",
                  flush=True)
            continue
        cmd = method_command(meth, args, m, B, S)
        log = os.path.join(args.out, "logs", f"{stamp}_{m}_{meth}_B{B}_S{S}.txt")
        rc, out, timed_out, secs = run_command(cmd, args.timeout, log)
        status, rec = classify(rc, out, timed_out)
        row = row_of(m, meth, B, S, status, rec if isinstance(rec, dict) else None)
        rows.append(row)
        if status in ("oom", "refused"):
            failures.setdefault((m, meth), []).append((B, S))
        with open(jsonl, "a") as f:
            f.write(json.dumps({"cell": [m, meth, B, S], "status": status, "seconds": round(secs, 1),
                                "record": rec if isinstance(rec, dict) else None,
                                "error": rec if status == "error" else None}) + "\n")
        detail = f"{row['tok_s']:,.0f} tok/s" if status == "ok" else (rec if status == "error" else status.upper())
        print(f"[{i + 1}/{len(todo)}] {m} {meth} B={B} S={S}: {detail} ({secs:.0f} s, log {log})", flush=True)
    add_ratios(rows)
    print()
    print(format_table(rows, COLUMNS, header_lines(argv)))
    if any(r["status"] == "skipped" for r in rows):
        print(SKIPPED_NOTE)
    path = os.path.join(args.out, f"bench_step_{stamp}.csv")
    write_csv(path, rows, ["model", "method", "B", "S", "status", "tok_s", "tflops", "mfu", "peak_gib", "ratio",
                           "ratio_ref", "median_ms", "M", "vocab_chunk", "recompute", "attn_kept_layers", "offload",
                           "device"])
    print(f"\nCSV: {path}\nraw records: {jsonl}\ntotal {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
