#!/usr/bin/env python3
"""Compares two train_llama runs for dev/multi_gpu_check.sh: one GPU against several.

  compare_runs.py grads REF GOT [--tol 1e-2]
      gradient dumps of --dump-grads: per tensor ||got - ref|| / max(||ref||, 1e-3 ||ref_all||) <= tol
      (test_llama's measure; the floor keeps tensors whose gradient is zero up to noise from failing).
  compare_runs.py losses REF.jsonl GOT.jsonl [--tol 2e-2] [--steps N]
      --log files: the training loss of every step both have (at least N of them), relative to REF's.
  compare_runs.py weights BASE REF GOT [--tol 0.25]
      model.bin files: ||GOT - REF|| / ||REF - BASE|| <= tol (the difference relative to what training
      moved the weights from BASE).

Prints one row per compared quantity (the worst ten tensors for grads) and exits 0 when all pass, 1
when any fails, 2 on unreadable or mismatched inputs (with an error message).
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import modelbin  # noqa: E402

DUMP_MAGIC = 0x4447544D  # bytes 'M','T','G','D'
DUMP_HEADER = 8 * 8


def read_dump(path):
    """(header dict, ModelConfig, float32 gradient) of a --dump-grads file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < DUMP_HEADER + modelbin.MODEL_HEADER_BYTES:
        raise modelbin.FormatError(f"{path}: {len(data)} bytes, too short for a gradient dump")
    magic, version, n, step, gpus, sp = struct.unpack_from("<6q", data, 0)
    if magic != DUMP_MAGIC or version != 1:
        raise modelbin.FormatError(f"{path}: not a gradient dump (magic {magic:#x}, version {version})")
    c = modelbin.config_from_header(data[DUMP_HEADER:DUMP_HEADER + modelbin.MODEL_HEADER_BYTES], path)
    body = DUMP_HEADER + modelbin.MODEL_HEADER_BYTES
    if len(data) != body + 4 * n or n != modelbin.param_total(c):
        raise modelbin.FormatError(f"{path}: {len(data) - body} bytes of gradient, expected {4 * n} for {modelbin.param_total(c)} parameters")
    g = np.frombuffer(data, dtype="<f4", count=n, offset=body)
    return {"step": step, "gpus": gpus, "seq_parallel": sp}, c, g


def compare_grads(ref_path, got_path, tol):
    hr, cr, gr = read_dump(ref_path)
    hg, cg, gg = read_dump(got_path)
    if cr != cg:
        raise modelbin.FormatError(f"{ref_path} and {got_path} are gradients of different models")
    print(f"reference: {ref_path} (step {hr['step']}, {hr['gpus']} GPU(s), sequence parallel {hr['seq_parallel']})")
    print(f"compared:  {got_path} (step {hg['step']}, {hg['gpus']} GPU(s), sequence parallel {hg['seq_parallel']})")
    floor = 1e-3 * float(np.linalg.norm(gr.astype(np.float64)))
    rows = []
    for p in modelbin.param_layout(cr):
        r = gr[p.offset:p.offset + p.numel].astype(np.float64)
        g = gg[p.offset:p.offset + p.numel].astype(np.float64)
        err = float(np.linalg.norm(g - r)) if np.all(np.isfinite(g)) else float("inf")
        rows.append((err / max(float(np.linalg.norm(r)), floor), float(np.max(np.abs(g - r))), p.name))
    rows.sort(reverse=True)
    bad = [r for r in rows if not r[0] <= tol]
    print(f"{'tensor':<32} {'rel err':>10} {'max abs':>10}  tol {tol:.0e}")
    for rel, mx, name in rows[:10]:
        print(f"{name:<32} {rel:10.3e} {mx:10.3e}  {'ok' if rel <= tol else 'FAIL'}")
    print(f"{len(rows)} tensors, {len(bad)} over the tolerance; worst {rows[0][2]} {rows[0][0]:.3e}")
    return not bad


def read_losses(path):
    """step -> training loss of a --log JSONL file (evaluation lines skipped)."""
    out = {}
    with open(path) as f:
        for k, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise modelbin.FormatError(f"{path}:{k}: not JSON ({e})")
            if "loss" in rec and "step" in rec:
                out[int(rec["step"])] = float(rec["loss"])
    return out


def compare_losses(ref_path, got_path, tol, min_steps):
    ref, got = read_losses(ref_path), read_losses(got_path)
    steps = sorted(set(ref) & set(got))
    if len(steps) < min_steps:
        raise modelbin.FormatError(f"{ref_path} and {got_path} share {len(steps)} steps, expected at least {min_steps}")
    ok = True
    print(f"{'step':>6} {'reference':>12} {'compared':>12} {'rel err':>10}  tol {tol:.0e}")
    for s in steps:
        rel = abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12)
        ok &= rel <= tol
        print(f"{s:6d} {ref[s]:12.6f} {got[s]:12.6f} {rel:10.3e}  {'ok' if rel <= tol else 'FAIL'}")
    return ok


def compare_weights(base_path, ref_path, got_path, tol):
    _, base = modelbin.read_model(base_path)
    cr, ref = modelbin.read_model(ref_path)
    cg, got = modelbin.read_model(got_path)
    if cr != cg:
        raise modelbin.FormatError(f"{ref_path} and {got_path} are different models")
    num = den = 0.0
    for name in ref:
        r, g, b = (modelbin.bf16_bits_to_f32(x[name]).astype(np.float64) for x in (ref, got, base))
        num += float(np.sum((g - r) ** 2))
        den += float(np.sum((r - b) ** 2))
    rel = (num ** 0.5) / max(den ** 0.5, 1e-30)
    print(f"weights: ||got - ref|| / ||ref - base|| = {rel:.3e} (tol {tol})  {'ok' if rel <= tol else 'FAIL'}")
    return rel <= tol


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grads")
    g.add_argument("ref")
    g.add_argument("got")
    g.add_argument("--tol", type=float, default=1e-2)
    lo = sub.add_parser("losses")
    lo.add_argument("ref")
    lo.add_argument("got")
    lo.add_argument("--tol", type=float, default=2e-2)
    lo.add_argument("--steps", type=int, default=1)
    w = sub.add_parser("weights")
    w.add_argument("base")
    w.add_argument("ref")
    w.add_argument("got")
    w.add_argument("--tol", type=float, default=0.25)
    a = ap.parse_args(argv)
    try:
        if a.what == "grads":
            ok = compare_grads(a.ref, a.got, a.tol)
        elif a.what == "losses":
            ok = compare_losses(a.ref, a.got, a.tol, a.steps)
        else:
            ok = compare_weights(a.base, a.ref, a.got, a.tol)
    except (OSError, modelbin.FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
