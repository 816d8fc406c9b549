"""NF4 reference from bitsandbytes for the quantizer of quant.h (tests/test_quant.c).

Run with the reference venv (needs bitsandbytes: /opt/hfref/bin/pip install bitsandbytes; its CPU
path is enough):  /opt/hfref/bin/python scripts/make_quant_reference.py [--out tests/ref]

Writes <out>/quant_nf4.ref.bin (tensor bundle, tensor_file.h) for one bf16-valued weight vector w of
N elements (N odd, so the last block of 64 is partial and the last byte half padded), holding normal
values, a block of zeros, an outlier, and values on the NF4 midpoints (times their block's absmax)
and one bf16 step to either side:
  w f32 (N); codes int32 (ceil(N / 2)): bitsandbytes' packed bytes of quantize_4bit(w, blocksize=64,
  quant_type="nf4"); absmax f32 (ceil(N / 64)); dequant f32 (N): dequantize_4bit in float32.
Deterministic: a fixed seed.
"""
import argparse
import os
import sys

import numpy as np
import torch
import bitsandbytes.functional as bnbf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelbin as mb  # noqa: E402

N, BLOCK = 64 * 40 + 17, 64


def make_weights():
    g = torch.Generator().manual_seed(2024)
    w = (0.05 * torch.randn(N, generator=g)).to(torch.bfloat16).to(torch.float32)
    w[BLOCK:2 * BLOCK] = 0.0
    w[2 * BLOCK + 5] = 4.0  # block 2's absmax, exact in bf16
    code = bnbf.get_4bit_type("nf4", device="cpu")
    mids = ((code[:-1] + code[1:]) / 2).to(torch.float32)
    for k, m in enumerate(mids):
        at = 2 * BLOCK + 6 + 3 * k
        b = torch.tensor([float(4.0 * m)], dtype=torch.float32).to(torch.bfloat16)
        bits = b.view(torch.int16)
        w[at] = b.to(torch.float32)[0]
        w[at + 1] = (bits + 1).view(torch.bfloat16).to(torch.float32)[0]
        w[at + 2] = (bits - 1).view(torch.bfloat16).to(torch.float32)[0]
    return w


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref")))
    args = ap.parse_args()
    w = make_weights()
    packed, state = bnbf.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4")
    deq = bnbf.dequantize_4bit(packed, state).to(torch.float32).reshape(-1)
    bundle = {"w": w.numpy(), "codes": packed.reshape(-1).numpy().astype(np.int32),
              "absmax": state.absmax.to(torch.float32).numpy(), "dequant": deq.numpy()}
    if bundle["codes"].size != (N + 1) // 2 or bundle["absmax"].size != (N + BLOCK - 1) // BLOCK:
        raise RuntimeError("unexpected bitsandbytes output sizes")
    path = os.path.join(args.out, "quant_nf4.ref.bin")
    mb.write_bundle(path, bundle)
    err = float((deq - w).abs().max())
    print(f"N={N}: {bundle['codes'].size} code bytes, {bundle['absmax'].size} blocks, max |w - dequant| {err:.4f} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
