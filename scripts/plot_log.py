"""Plots train_llama JSONL logs (--log FILE): loss (and validation loss), learning rate, tokens/s and
memory, in four panels, to one PNG.

usage: python3 scripts/plot_log.py run.jsonl [more.jsonl ...] [-o plot.png]

Each log is one line per step ({"step", "loss", "lr", "grad_norm", "ms", "tok_per_s", "tflops", "mfu",
"mem_gib", "mem_plan_gib", "peak_gib", "backend"}) and one per evaluation ({"step", "val_loss",
"val_ppl"}). Several logs are drawn over each other, labelled by file name. Needs matplotlib.
"""
import argparse
import json
import os
import sys


def read_jsonl(path):
    """[(line number, record)] of the non-blank lines of a JSONL file; exits with a message on a line
    that is not JSON or a file that cannot be read."""
    records = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    sys.exit(f"error: {path}:{n}: not a JSON object: {e}")
    except OSError as e:
        sys.exit(f"error: cannot read {path}: {e}")
    return records


def read_log(path):
    """Returns (step records, eval records) of one JSONL log; exits with a message on bad lines."""
    steps, evals = [], []
    for n, rec in read_jsonl(path):
        if "val_loss" in rec:
            evals.append(rec)
        elif "loss" in rec:
            steps.append(rec)
        else:
            sys.exit(f"error: {path}:{n}: neither a step line (loss) nor an eval line (val_loss)")
    if not steps and not evals:
        sys.exit(f"error: {path}: no step or eval lines")
    return steps, evals


def plot(logs, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: matplotlib is not installed: install it with `python3 -m pip install matplotlib` "
                 "(or `apt-get install python3-matplotlib`)")
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for path, (steps, evals) in logs.items():
        name = os.path.basename(path)
        x = [r["step"] for r in steps]
        line, = ax[0, 0].plot(x, [r["loss"] for r in steps], label=f"{name} train")
        if evals:
            ax[0, 0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--",
                          color=line.get_color(), label=f"{name} val")
        ax[0, 1].plot(x, [r["lr"] for r in steps], label=name)
        ax[1, 0].plot(x, [r["tok_per_s"] for r in steps], label=name)
        backend = steps[0].get("backend", "?") if steps else "?"
        ax[1, 1].plot(x, [r["mem_gib"] for r in steps], label=f"{name} used ({backend})")
        if steps and backend == "gpu":
            ax[1, 1].plot(x, [r["mem_plan_gib"] for r in steps], "--", label=f"{name} plan")
            ax[1, 1].plot(x, [r["peak_gib"] for r in steps], ":", label=f"{name} peak")
    titles = [("loss", "cross-entropy"), ("learning rate", "lr"), ("throughput", "tokens / s"), ("memory", "GiB")]
    for a, (title, ylabel) in zip(ax.flat, titles):
        a.set_title(title)
        a.set_xlabel("step")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="JSONL logs written by train_llama --log")
    ap.add_argument("-o", "--out", default="train_log.png", help="PNG to write (default train_log.png)")
    args = ap.parse_args()
    plot({p: read_log(p) for p in args.logs}, args.out)


if __name__ == "__main__":
    main()
