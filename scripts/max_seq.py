#!/usr/bin/env python3
"""The longest sequence each method trains (full training steps, batch 1) for a preset shape: the
paper-style table (method, max S, tok/s at max S), a CSV and a PNG bar plot.

Methods
  ours-vanilla   train_llama --mst 1 --vocab-chunk V --recompute 0   (standard transformer)
  ours-rc        train_llama --mst 1 --vocab-chunk V --recompute 1   (activation recomputation only)
  ours-mst       train_llama --mst auto --recompute 1                (MsT + recomputation)
  ours-offload   train_llama --mst auto --recompute 1 --offload 1    (MsT + recomputation + offload)
  ours-rc-adam8, ours-mst-adam8, ours-offload-adam8
                 the same with --optimizer adamw8bit (8-bit AdamW moments; not in the default list)
  hf, hf-gc      scripts/hf_peer.py without / with gradient checkpointing
  lora-Q-mst     LoRA (--lora-rank R on every projection, alpha 2R) over a frozen base stored as Q
                 (bf16, int8 or nf4: --base-quant none/int8/nf4), as ours-mst
  lora-Q-nomst   the same with MsT off (one chunk, one vocabulary tile), as ours-rc
  lora-Q-offload the same as ours-offload (MsT + recomputation + layer inputs in pinned host memory)
The default --methods are the full-parameter AdamW ones (ours-vanilla/rc/mst/offload, hf, hf-gc); the
-adam8 and LoRA rows are asked for by name, or all nine LoRA rows by --methods lora.

A trial at S runs --steps full training steps (default 2; train_llama methods may take 1, as its
memory is allocated once before the first step: the long offload trials need it to fit a 10-minute
call); it passes when it prints a BENCH record that is not OOM. A trial that runs past --timeout
says nothing about memory: it ends that method's search, unfinished, and is not cached. The search over multiples of --granule: for train_llama methods the upper bound
comes from the planner (`train_llama --plan-only` at --s-max: "the longest sequence that fits is
about S=N"; S above it is refused before allocating), and the first trial is that bound, which
usually passes; else bisection. For HF: doubling from --hf-start until a trial fails, then bisection.
Every trial is cached in --cache (JSON), so a call stopped by --time-budget continues in the next.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_step import ROOT, classify, format_table, header_lines, run_command, write_csv  # noqa: E402
from hf_peer import PRESETS, flops_per_token, matmul_params  # noqa: E402

DEFAULT_METHODS = ["ours-vanilla", "ours-rc", "ours-mst", "ours-offload", "hf", "hf-gc"]
ADAM8_SUFFIX = "-adam8"  # a train_llama method with --optimizer adamw8bit
ADAM8_METHODS = [m + ADAM8_SUFFIX for m in ("ours-rc", "ours-mst", "ours-offload")]
LORA_BASES = {"bf16": "none", "int8": "int8", "nf4": "nf4"}
LORA_MODES = {"mst": "ours-mst", "nomst": "ours-rc", "offload": "ours-offload"}  # the full-parameter twin
LORA_METHODS = [f"lora-{b}-{m}" for b in LORA_BASES for m in LORA_MODES]
ALL_METHODS = DEFAULT_METHODS + ADAM8_METHODS + LORA_METHODS


def method_flags(method, vocab, lora_rank=16):
    """train_llama flags of a method (None for the HF methods)."""
    if method in LORA_METHODS:
        _, base, mode = method.split("-")
        return method_flags(LORA_MODES[mode], vocab) + ["--lora-rank", str(lora_rank), "--lora-alpha",
                                                        str(2 * lora_rank), "--base-quant", LORA_BASES[base]]
    base = method[:-len(ADAM8_SUFFIX)] if method.endswith(ADAM8_SUFFIX) else method
    flags = {"ours-vanilla": ["--mst", "1", "--vocab-chunk", str(vocab), "--recompute", "0", "--offload", "0"],
             "ours-rc": ["--mst", "1", "--vocab-chunk", str(vocab), "--recompute", "1", "--offload", "0"],
             "ours-mst": ["--mst", "auto", "--recompute", "1", "--offload", "0"],
             "ours-offload": ["--mst", "auto", "--recompute", "1", "--offload", "1"]}.get(base)
    if flags is None or base == method:
        return flags
    return flags + ["--optimizer", "adamw8bit"]


def is_train_llama(method):
    """Methods that train_llama runs (the planner gives their bound), as against the HF ones."""
    return method_flags(method, 1) is not None


def is_offload(method):
    """train_llama methods that keep layer inputs in pinned host memory (--offload 1)."""
    flags = method_flags(method, 1)
    return flags is not None and flags[flags.index("--offload") + 1] == "1"


def memory_flags(args):
    """--host-mem when given: the pinned host budget of the offload methods (plan and trials alike)."""
    return ["--host-mem", str(args.host_mem)] if args.host_mem is not None else []


def parse_plan_bound(text):
    """Longest S the planner allows from `--plan-only` output: the S of a plan that fits ('memory plan:
    B=1 S=N' with 'fits:'), or 'the longest sequence that fits is about S=N'; 0 if nothing fits; None if
    the output says neither."""
    if re.search(r"^fits: ", text, re.M):
        m = re.search(r"memory plan: B=\d+ S=(\d+)", text)
        if m:
            return int(m.group(1))
    m = re.search(r"longest sequence that fits is about S=(\d+)", text)
    if m:
        return int(m.group(1))
    if "nothing fits" in text:
        return 0
    return None


def search_max(trial, granule, hi=None, start=None, s_max=1 << 20):
    """Largest multiple of granule, <= s_max, for which trial(S) is True, assuming trials pass below
    some threshold and fail above it. hi: a known upper bound (tried first); else doubling from start.
    Returns (best S or 0, number of trials asked)."""
    asked = 0

    def t(S):
        nonlocal asked
        asked += 1
        return trial(S)

    lo_ok, hi_fail = 0, None  # largest passing, smallest failing (in granules)
    top = s_max // granule
    if hi is not None:
        h = min(hi // granule, top)
        if h <= 0:
            return 0, asked
        if t(h * granule):
            return h * granule, asked
        hi_fail = h
    else:
        g = max(1, (start or granule) // granule)
        while g <= top:
            if t(g * granule):
                lo_ok = g
                if g == top:
                    return g * granule, asked
                g = min(2 * g, top)
            else:
                hi_fail = g
                break
    if hi_fail is None:
        return lo_ok * granule, asked
    while hi_fail - lo_ok > 1:
        mid = (lo_ok + hi_fail) // 2
        if t(mid * granule):
            lo_ok = mid
        else:
            hi_fail = mid
    return lo_ok * granule, asked


class OutOfTime(Exception):
    pass


class TrialTimedOut(Exception):
    pass


class Cache:
    """Trials by key 'preset|method|S' -> {"ok": bool, "status": ..., "record": ...}, and planner bounds."""

    def __init__(self, path):
        self.path = path
        self.data = {"trials": {}, "bounds": {}}
        if path and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def save(self):
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


def trial_seconds(preset, S, steps, method):
    """A rough, high trial time for the --time-budget check: start-up (30 s; 90 s with host offload,
    whose pinned buffers take a minute to allocate) plus the steps' model FLOPs at a throughput below
    what the H100 showed: train_llama 450 TFLOP/s (measured 455-693 with recompute, Mistral 455),
    Gemma-2's soft-cap attention 200 (measured 286); HF 300 (measured 350-510), x1.35 with
    checkpointing, its attention counted over the whole causal square (a sliding window is only a mask
    there: Mistral + gc at 49K ran at 1,871 tok/s). LoRA computes no weight gradient of the frozen
    base: 4 FLOPs a matmul parameter and token instead of 6."""
    p = PRESETS[preset]
    if is_train_llama(method):
        rate = 200e12 if p["family"] == "gemma2" else 450e12
        flops = flops_per_token(p, S)
        if method in LORA_METHODS:
            flops -= 2.0 * matmul_params(p)
        step = S * flops / rate
    else:
        step = S * flops_per_token(dict(p, window=0), S) / 300e12 * (1.35 if method == "hf-gc" else 1.0)
    return (90.0 if is_offload(method) else 30.0) + steps * step


def trial_key(preset, method, S, lora_rank, gpus=1):
    """Cache key of a trial; LoRA trials name their rank, runs over several GPUs their count."""
    return (f"{preset}|{method}|{S}" + (f"|r{lora_rank}" if method in LORA_METHODS else "")
            + (f"|g{gpus}" if gpus > 1 else ""))


def multi_gpu_prefix(args):
    """The launcher of a train_llama run over args.gpus GPUs (sequence parallel): mpirun -np N, or []."""
    if args.gpus == 1:
        return []
    return [args.mpirun, "-np", str(args.gpus), "--bind-to", "none", "-x", "NCCL_NVLS_ENABLE", "-x", "OMP_WAIT_POLICY"]


def multi_gpu_flags(args, plan):
    """train_llama flags of a run over args.gpus GPUs: every row's tokens split over them (Ulysses)."""
    if args.gpus == 1:
        return []
    return (["--gpus", str(args.gpus)] if plan else []) + ["--seq-parallel"]


def make_trial(args, preset, method, cache, deadline, log_dir):
    """trial(S) -> True when S trains: from the cache, else a run (raises OutOfTime past the deadline)."""
    def trial(S):
        key = trial_key(preset, method, S, args.lora_rank, args.gpus)
        if key in cache.data["trials"]:
            return cache.data["trials"][key]["ok"]
        if time.time() + trial_seconds(preset, S, args.steps, method) > deadline:
            raise OutOfTime(key)
        flags = method_flags(method, PRESETS[preset]["V"], args.lora_rank)
        if flags is not None:
            cmd = [args.binary, "--preset", preset, "--synthetic-data", "--bench", "--batch", "1", "--seq-len", str(S),
                   "--steps", str(args.steps), "--lr", "1e-5", "--warmup", "0", "--schedule", "constant"] + flags
            cmd = multi_gpu_prefix(args) + cmd + memory_flags(args) + multi_gpu_flags(args, plan=False)
        else:
            cmd = [args.python, os.path.join("scripts", "hf_peer.py"), "--preset", preset, "--batch", "1",
                   "--seq-len", str(S), "--steps", str(args.steps)] + (["--gc"] if method == "hf-gc" else [])
        rc, out, timed_out, secs = run_command(cmd, args.timeout, os.path.join(log_dir, f"{preset}_{method}_S{S}.txt"))
        status, rec = classify(rc, out, timed_out)
        if status == "timeout":
            print(f"  {method} S={S}: ran past --timeout {args.timeout:g} s ({secs:.0f} s)", flush=True)
            raise TrialTimedOut(key)
        ok = status == "ok"
        cache.data["trials"][key] = {"ok": ok, "status": status, "seconds": round(secs, 1),
                                     "record": rec if isinstance(rec, dict) else None,
                                     "error": rec if status == "error" else None}
        cache.save()
        print(f"  {method} S={S}: {status} ({secs:.0f} s)"
              + (f" {rec['tok_s']:,.0f} tok/s" if ok else (f": {rec}" if status == "error" else "")), flush=True)
        return ok
    return trial


def plan_bound(args, preset, method, cache):
    """The planner's longest S for a train_llama method (cached), from `--plan-only` at --s-max. The key
    names --s-max: a plan that fits at a smaller --s-max gives that S, not the bound of a larger one."""
    key = f"{preset}|{method}|{args.gpu_mem}" + (f"|{args.host_mem}" if args.host_mem is not None else "")
    key += f"|s{args.s_max}"
    key += f"|g{args.gpus}" if args.gpus > 1 else ""
    if method in LORA_METHODS:
        key += f"|r{args.lora_rank}"
    if key in cache.data["bounds"]:
        return cache.data["bounds"][key]
    cmd = [args.binary, "--plan-only", "--preset", preset, "--seq-len", str(args.s_max), "--batch", "1",
           "--gpu-mem", str(args.gpu_mem)] + method_flags(method, PRESETS[preset]["V"], args.lora_rank)
    cmd += memory_flags(args) + multi_gpu_flags(args, plan=True)
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    bound = parse_plan_bound(p.stdout)
    if bound is None:
        raise SystemExit(f"error: cannot read the planner's bound from: {' '.join(cmd)}\n{p.stdout[-2000:]}")
    cache.data["bounds"][key] = bound
    cache.save()
    return bound


def result_rows(cache, preset, methods, best, lora_rank=16, gpus=1):
    rows = []
    for m in methods:
        S = best.get(m)
        rec = cache.data["trials"].get(trial_key(preset, m, S, lora_rank, gpus), {}).get("record") if S else None
        rows.append({"model": preset, "method": m, "gpus": gpus, "max_S": S, "done": m in best,
                     "tok_s": rec.get("tok_s") if rec else None, "peak_gib": rec.get("peak_gib") if rec else None})
    return rows


def fmt_row(r, col):
    if col == "method":
        return r["method"]
    if col == "GPUs":
        return str(r["gpus"])
    if col == "max S":
        if not r["done"]:
            return "unfinished"
        return "none" if not r["max_S"] else f"{r['max_S']:,}"
    if col == "tok/s at max S":
        return "-" if r["tok_s"] is None else f"{r['tok_s']:,.0f}"
    if col == "peak GiB":
        return "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    if col == "vs vanilla":
        return "-" if r.get("gain") is None else f"{r['gain']:.1f}x"
    raise KeyError(col)


def add_gain(rows):
    """max S / max S of ours-vanilla (or of hf when ours-vanilla did not run)."""
    ref = next((r["max_S"] for name in ("ours-vanilla", "hf") for r in rows if r["method"] == name and r["max_S"]), None)
    for r in rows:
        r["gain"] = r["max_S"] / ref if ref and r["max_S"] else None
    return rows


def plot(rows, preset, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return None
    done = [r for r in rows if r["done"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    vals = [(r["max_S"] or 0) / 1024 for r in done]
    bars = ax.bar([r["method"] for r in done], vals, color=["#4c72b0" if is_train_llama(r["method"]) else "#dd8452" for r in done])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}K", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("max sequence length (K tokens)")
    ax.set_title(f"{preset}: longest trainable sequence, batch 1")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gpu_free_gib():
    """Free device memory in GiB minus train_llama's 1 GiB margin (nvidia-smi), or None."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)
        return float(p.stdout.split()[0]) / 1024.0 - 1.0 if p.returncode == 0 and p.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Each trial is a run of --steps steps: about 20-30 s of start-up plus the steps (Llama-3-8B on "
               "an H100: ~1.5 s a step at 8K, ~6 s at 32K, ~25-35 s at 64K, ~1.5-2 min at 128K). A method "
               "takes 1-5 trials for train_llama (the planner's bound is tried first) and 4-7 for HF (OOM "
               "trials end in 20-40 s). --time-budget stops before a trial that would not fit in it; rerun the "
               "same command to continue from --cache.")
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma list of {', '.join(ALL_METHODS)}, or 'lora' for all lora-* "
                         f"(default the full-parameter ones: {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--lora-rank", type=int, default=16, help="adapter rank of the lora-* methods (default 16)")
    ap.add_argument("--host-mem", type=float, default=None,
                    help="GiB of pinned host memory the offload methods may use (default: train_llama's, this "
                         "machine's memory less 16 GiB, at least 3/4 of it)")
    ap.add_argument("--plan-only", action="store_true",
                    help="print the planner's longest S of each train_llama method (no GPU runs) and exit")
    ap.add_argument("--granule", type=int, default=2048, help="S is a multiple of this (default 2048)")
    ap.add_argument("--s-max", type=int, default=131072, help="largest S tried (default 131072)")
    ap.add_argument("--hf-start", type=int, default=4096, help="first S of the HF doubling (default 4096)")
    ap.add_argument("--steps", type=int, default=2,
                    help="training steps a trial (default 2; 1 is allowed for train_llama methods only)")
    ap.add_argument("--timeout", type=float, default=540, help="seconds a trial may take (default 540)")
    ap.add_argument("--time-budget", type=float, default=540, help="seconds for this call (default 540)")
    ap.add_argument("--gpu-mem", type=float, default=None,
                    help="GiB the planner bound assumes (default: nvidia-smi free memory minus 1)")
    ap.add_argument("--gpus", type=int, default=1,
                    help="GPUs of the train_llama methods: N > 1 runs them sequence parallel under mpirun -np N "
                         "(the HF methods run on one GPU only; default 1)")
    ap.add_argument("--mpirun", default="mpirun", help="launcher for --gpus N > 1 (default mpirun)")
    ap.add_argument("--binary", default="./train_llama")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", default="bench_results", help="directory of the CSV, PNG, cache and logs")
    ap.add_argument("--cache", default=None, help="trial cache (default OUT/max_seq_<preset>.json)")
    args = ap.parse_args(argv)
    args.methods = [x for m in args.methods.split(",") if m.strip()
                    for x in (LORA_METHODS if m.strip() == "lora" else [m.strip()])]
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {', '.join(ALL_METHODS)}")
    if args.granule < 1 or args.s_max < args.granule or args.steps < 1 or args.lora_rank < 1:
        ap.error("need --granule >= 1, --s-max >= --granule, --steps >= 1 and --lora-rank >= 1")
    if args.steps < 2 and not all(is_train_llama(m) for m in args.methods):
        ap.error("the HF methods need --steps >= 2 (PyTorch allocates the optimizer state in the first step, "
                 "so only the second shows the whole footprint)")
    if args.plan_only and (args.gpu_mem is None or not all(is_train_llama(m) for m in args.methods)):
        ap.error("--plan-only needs --gpu-mem and train_llama methods only (ours-*, lora-*)")
    if args.cache is None:
        args.cache = os.path.join(args.out, f"max_seq_{args.preset}.json")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.gpu_mem is None and any(is_train_llama(m) for m in args.methods):
        args.gpu_mem = gpu_free_gib()
        if args.gpu_mem is None:
            raise SystemExit("error: no GPU found by nvidia-smi: pass --gpu-mem GiB for the planner bound")
    if args.gpus < 1:
        raise SystemExit(f"error: --gpus {args.gpus}: must be at least 1")
    if args.gpus > 1:
        one_gpu_only = [m for m in args.methods if not is_train_llama(m) or m in LORA_METHODS or m.endswith(ADAM8_SUFFIX)]
        if one_gpu_only:
            raise SystemExit(f"error: --gpus {args.gpus}: {', '.join(one_gpu_only)} run on one GPU only "
                             "(HF peers, LoRA and 8-bit moments); leave them out or use --gpus 1")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cache = Cache(args.cache)
    if args.plan_only:
        for m in args.methods:
            print(f"{args.preset} {m}: planner bound S={plan_bound(args, args.preset, m, cache)} (--gpu-mem {args.gpu_mem:g}"
                  + (f", --host-mem {args.host_mem:g}" if args.host_mem is not None else "") + ")")
        return 0
    deadline = time.time() + args.time_budget
    best, stopped, timed_out = {}, None, []
    for m in args.methods:
        print(f"{args.preset} {m}:", flush=True)
        trial = make_trial(args, args.preset, m, cache, deadline, os.path.join(args.out, "logs"))
        try:
            if is_train_llama(m):
                bound = plan_bound(args, args.preset, m, cache)
                print(f"  planner bound S={bound} (--gpu-mem {args.gpu_mem:.1f})", flush=True)
                S, _ = search_max(trial, args.granule, hi=bound, s_max=args.s_max)
            else:
                S, _ = search_max(trial, args.granule, start=args.hf_start, s_max=args.s_max)
            best[m] = S
            print(f"  max S = {S}", flush=True)
        except OutOfTime as e:
            stopped = str(e)
            print(f"  time budget reached before trial {e}: rerun the same command to continue", flush=True)
            break
        except TrialTimedOut as e:
            timed_out.append(str(e))
            print(f"  unfinished: trial {e} ran past --timeout; rerun with a larger --timeout"
                  + (" or --steps 1" if is_train_llama(m) and args.steps > 1 else ""), flush=True)
    rows = add_gain(result_rows(cache, args.preset, args.methods, best, args.lora_rank, args.gpus))
    print()
    print(format_table(rows, ["method", "GPUs", "max S", "tok/s at max S", "peak GiB", "vs vanilla"], header_lines(argv), fmt_row))
    name = f"max_seq_{args.preset}" + (f"_g{args.gpus}" if args.gpus > 1 else "")
    csv_path = os.path.join(args.out, f"{name}.csv")
    write_csv(csv_path, rows, ["model", "method", "gpus", "max_S", "done", "tok_s", "peak_gib", "gain"])
    png = plot(rows, args.preset, os.path.join(args.out, f"{name}.png"))
    print(f"\nCSV: {csv_path}" + (f"\nplot: {png}" if png else "") + f"\ncache: {args.cache}")
    if stopped:
        print("UNFINISHED: rerun to continue")
    if timed_out:
        print(f"UNFINISHED: {', '.join(timed_out)} ran past --timeout {args.timeout:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
