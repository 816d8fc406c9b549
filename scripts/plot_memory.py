"""Pictures of train_llama's memory plan (--plan-json FILE) and of a measured step (--mem-trace FILE).

usage:
  python3 scripts/plot_memory.py breakdown PLAN.json [PLAN.json ...] -o breakdown.png
  python3 scripts/plot_memory.py timeline PLAN.json [PLAN.json ...] [--trace TRACE.jsonl ...] -o timeline.png

breakdown: one stacked bar per plan: the device bytes it plans by category (weights, optimizer state,
  gradients, saved activations, intermediates = the shared working regions and scratch, workspaces),
  the GPU budget as a line, the pinned host bytes written above the bar.
timeline: the device bytes holding live data in each phase of one training step (the plan's
  "timeline": embedding, attention and MLP forward per layer, LM head + loss, then the layers in
  reverse), one line per plan, x = position in the step. Each plan's arena (what is allocated for the
  whole step) is a dotted line of the same colour. --trace adds what cudaMemGetInfo measured at each
  region boundary of one step (train_llama --mem-trace), as points over the same x (the last traced
  step; --trace-step N picks another).

Plans are labelled by method from their settings (vanilla, recompute, MsT, MsT + offload) and S, or by
--label (once per plan). Needs matplotlib.
"""
import argparse
import json
import sys

from plot_log import read_jsonl

CATEGORIES = ["weights", "optimizer", "gradients", "activations", "intermediates", "workspace"]
COLORS = {"weights": "#4c72b0", "optimizer": "#dd8452", "gradients": "#c44e52", "activations": "#55a868",
          "intermediates": "#8172b3", "workspace": "#937860"}
GIB = float(1 << 30)


def fail(msg):
    sys.exit(f"error: {msg}")


def read_plan(path):
    """The plan object of one --plan-json file; exits with a message on a file that is not one."""
    try:
        with open(path) as f:
            plan = json.load(f)
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    except json.JSONDecodeError as e:
        fail(f"{path}: not JSON: {e}")
    if not isinstance(plan, dict) or plan.get("format") != "mst-memory-plan":
        fail(f"{path}: not a train_llama --plan-json file (no \"format\": \"mst-memory-plan\")")
    for key in ("settings", "categories", "timeline", "device_total", "device_budget"):
        if key not in plan:
            fail(f"{path}: no \"{key}\"")
    return plan


def read_trace(path, step=None):
    """Samples [(region, used bytes)] of one step of a --mem-trace JSONL file: the last step, or `step`."""
    steps = {}
    for n, rec in read_jsonl(path):
        try:
            steps.setdefault(int(rec["step"]), []).append((rec["region"], int(rec["used"])))
        except (KeyError, TypeError, ValueError) as e:
            fail(f"{path}:{n}: not a --mem-trace line ({{\"step\", \"region\", \"used\"}}): {e!r}")
    if not steps:
        fail(f"{path}: no samples")
    if step is None:
        step = max(steps)
    if step not in steps:
        fail(f"{path}: no step {step} (steps {min(steps)}..{max(steps)})")
    return steps[step]


def fmt_seq(s):
    return f"{s:,}"


def method_name(settings, vocab):
    """vanilla / recompute / MsT / MsT + offload, from the plan's settings."""
    chunked = settings["M"] > 1 or settings["vocab_chunk"] < vocab
    if settings["host_layers"] > 0:
        return "MsT + offload" if chunked else "recompute + offload"
    if chunked:
        return "MsT" if settings["recompute"] else "MsT, no recompute"
    return "recompute" if settings["recompute"] else "vanilla"


def plan_label(plan):
    s = plan["settings"]
    return f"{method_name(s, plan['config']['vocab'])}\nS={fmt_seq(s['S'])}"


def device_bytes(plan):
    """Device bytes by category: the arena's categories plus the cuBLASLt workspace (outside the arena)."""
    b = {k: int(plan["categories"].get(k, 0)) for k in CATEGORIES}
    b["workspace"] += int(plan.get("device_external", 0))
    return b


def labels_for(plans, labels):
    if labels is None:
        return [plan_label(p) for p in plans]
    if len(labels) != len(plans):
        fail(f"{len(labels)} --label for {len(plans)} plans: give one per plan or none")
    return labels


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is not installed: install it with `python3 -m pip install matplotlib` "
             "(or `apt-get install python3-matplotlib`)")
    return plt


def model_title(plan):
    return f"{plan['model']} ({plan['family']}, {plan['config']['n_layers']} layers)"


def plot_breakdown(plans, labels, out, title=None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 1.9 * len(plans) + 4.0), 6))
    x = range(len(plans))
    bottom = [0.0] * len(plans)
    for k in CATEGORIES:
        h = [device_bytes(p)[k] / GIB for p in plans]
        if not any(h):
            continue
        ax.bar(x, h, 0.6, bottom=bottom, color=COLORS[k], label=k, edgecolor="white", linewidth=0.5)
        bottom = [b + v for b, v in zip(bottom, h)]
    budget = plans[0]["device_budget"] / GIB
    ax.axhline(budget, color="black", linestyle="--", linewidth=1, label=f"GPU budget {budget:.0f} GiB")
    for i, p in enumerate(plans):
        note = f"{bottom[i]:.1f} GiB"
        if p["host_total"] > 0:
            note += f"\n+ {p['host_total'] / GIB:.1f} GiB host"
        if not p["fits"]:
            note += "\ndoes not fit"
        ax.annotate(note, (i, max(bottom[i], budget)), textcoords="offset points", xytext=(0, 3), ha="center",
                    va="bottom", fontsize=9,
                    color="black" if p["fits"] else "#b00000")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels)
    ax.set_ylabel("device memory (GiB)")
    ax.set_ylim(0, max(max(bottom), budget) * 1.2)
    ax.set_title(title or f"Planned memory by category: {model_title(plans[0])}, batch 1")
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def phase_positions(n):
    """x of n evenly spaced phases over [0, 1]."""
    return [i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def plot_timeline(plans, labels, traces, out, title=None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = plans[0]["device_budget"] / GIB
    for i, (p, label) in enumerate(zip(plans, labels)):
        c = colors[i % len(colors)]
        tl = p["timeline"]
        xs = phase_positions(len(tl))
        ys = [ph["device"] / GIB for ph in tl]
        name = label.replace("\n", ", ")
        ax.step(xs, ys, where="mid", color=c, linewidth=2, label=f"{name}: live (planned)")
        ax.fill_between(xs, ys, step="mid", color=c, alpha=0.12)
        ax.axhline(p["device_total"] / GIB, color=c, linestyle=":", linewidth=1.2,
                   label=f"{name}: arena {p['device_total'] / GIB:.1f} GiB")
        head = next(j for j, ph in enumerate(tl) if ph["phase"] == "lm_head")
        ax.annotate("LM head", (xs[head], ys[head]), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8, color=c)
        top = max(top, max(ys), p["device_total"] / GIB)
    for k, (path, samples) in enumerate(traces):
        xs = phase_positions(len(samples))
        ys = [u / GIB for _, u in samples]
        ax.plot(xs, ys, "x", color="black" if k == 0 else colors[(len(plans) + k) % len(colors)], markersize=4,
                label=f"measured (cudaMemGetInfo, {path.split('/')[-1]})")
        top = max(top, max(ys))
    budget = plans[0]["device_budget"] / GIB
    ax.axhline(budget, color="black", linestyle="--", linewidth=1, label=f"GPU budget {budget:.0f} GiB")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(0, top * 1.12)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["embedding", "optimizer"])
    ax.set_xlabel("one training step (layer by layer: forward, LM head + loss, backward)")
    ax.set_ylabel("device memory holding live data (GiB)")
    ax.set_title(title or f"Memory over one training step: {model_title(plans[0])}, batch 1")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["breakdown", "timeline"])
    ap.add_argument("plans", nargs="+", help="train_llama --plan-json files")
    ap.add_argument("-o", "--out", required=True, help="PNG to write")
    ap.add_argument("--label", action="append", help="label of a plan (once per plan, in order)")
    ap.add_argument("--title")
    ap.add_argument("--trace", action="append", default=[], help="train_llama --mem-trace file (timeline only)")
    ap.add_argument("--trace-step", type=int, help="step of the traces to draw (default: the last)")
    a = ap.parse_args(argv)
    plans = [read_plan(p) for p in a.plans]
    labels = labels_for(plans, a.label)
    if a.kind == "breakdown":
        if a.trace:
            fail("--trace goes with timeline, not breakdown")
        plot_breakdown(plans, labels, a.out, a.title)
    else:
        traces = [(t, read_trace(t, a.trace_step)) for t in a.trace]
        plot_timeline(plans, labels, traces, a.out, a.title)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
