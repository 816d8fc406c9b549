"""Checks that model.bin -> Hugging Face export gives a checkpoint transformers runs correctly.

Run with the reference venv:  /opt/hfref/bin/python scripts/check_hf_roundtrip.py [--ref-dir tests/ref]

For every <case>.model.bin in the reference dir: export_hf.py --to-hf into a temp dir, load it with
transformers (AutoModelForCausalLM, float32, eager attention), run the reference tokens, and compare
the logits and the masked loss with <case>.ref.bin (computed in float64 from the original HF model).
Prints one line per case and exits 1 if any case fails.
"""
import argparse
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelbin as mb  # noqa: E402

transformers.utils.logging.disable_progress_bar()
# float32 evaluation of a float64 reference: logits are O(1..10) and the models are 2 layers deep,
# so float32 rounding stays near 1e-6; a wrong tensor, norm or mask moves logits by > 1e-2.
LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5
EXPORTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_hf.py")


def check_case(model_path, ref_path, tmp):
    hf_dir = os.path.join(tmp, os.path.basename(model_path).replace(".model.bin", ""))
    run = subprocess.run([sys.executable, EXPORTER, "--to-hf", model_path, hf_dir], capture_output=True, text=True)
    if run.returncode != 0:
        return False, f"export failed: {run.stderr.strip()}"
    ref = mb.read_bundle(ref_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tokens = torch.from_numpy(ref["tokens"].astype(np.int64))
    targets = torch.from_numpy(ref["targets"].astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1).item()
    if tuple(logits.shape) != ref["logits"].shape:
        return False, f"logits shape {tuple(logits.shape)} != reference {ref['logits'].shape}"
    diff = float(np.abs(logits.numpy() - ref["logits"]).max())
    loss_diff = abs(loss - float(ref["loss"][0]))
    ok = diff <= LOGITS_ATOL and loss_diff <= LOSS_ATOL
    return ok, (f"{type(model).__name__:18s} max|dlogits| {diff:.3e} (tol {LOGITS_ATOL:.0e})  "
                f"|dloss| {loss_diff:.3e} (tol {LOSS_ATOL:.0e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-dir", default=os.path.normpath(os.path.join(os.path.dirname(EXPORTER), "..", "tests", "ref")))
    args = ap.parse_args()
    models = sorted(glob.glob(os.path.join(args.ref_dir, "*.model.bin")))
    if not models:
        print(f"error: no *.model.bin in {args.ref_dir}", file=sys.stderr)
        return 1
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for model_path in models:
            case = os.path.basename(model_path).replace(".model.bin", "")
            ref_path = os.path.join(args.ref_dir, f"{case}.ref.bin")
            if not os.path.exists(ref_path):
                ok, msg = False, f"missing {ref_path}"
            else:
                try:
                    ok, msg = check_case(model_path, ref_path, tmp)
                except mb.FormatError as e:
                    ok, msg = False, str(e)
            failed += not ok
            print(f"{case:11s} {msg}  {'PASS' if ok else 'FAIL'}")
    print(f"{len(models) - failed}/{len(models)} cases PASS" + ("" if not failed else f", {failed} FAIL"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
