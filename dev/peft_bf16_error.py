"""How far Hugging Face PEFT + transformers lands from the float64 LoRA references when it runs in bf16.

The LoRA tolerances in test_llama.cu are set from this, as the base tolerances are from
dev/hf_bf16_error.py. For each case of scripts/make_lora_reference.py it rebuilds the same PEFT model
(base + random bf16-valued adapters), runs make_reference's batch once in bf16 (base weights, adapters
and activations; eager attention) and compares with the committed float64 reference
tests/ref/<case>.lora_ref.bin, with test_llama's metrics:
  grad:   ||bf16 - ref|| / max(||ref||, 1e-3 * ||all adapter grads of ref||), per adapter tensor;
  logits: ||bf16 - ref|| / ||ref|| over the vocabulary at the positions test_llama checks
          (sequence 0's last, sequence 1's 20th), and the worst position of the batch;
  loss:   |bf16 - ref| / |ref|.
The tiny cases are sensitive to their inputs, so one bf16 run is one sample of where bf16 lands:
the script also runs --seeds draws with every input embedding moved by -1, 0 or +1 bf16 ulp (an input
as close to the exact one as bf16 rounding puts it), in bf16 ("bf16 pert", worst over the draws) and
in float64 ("f64 pert": the conditioning of the case alone, no rounding after the input).

  /opt/hfref/bin/python dev/peft_bf16_error.py [--cases llama3_gqa,gemma2] [--seeds 8]
"""
import argparse
import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import make_lora_reference as mlr  # noqa: E402
import make_reference as mr  # noqa: E402
import modelbin as mb  # noqa: E402

REF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref")
GRAD_FLOOR = 1e-3  # test_llama.cu TOL_GRAD_FLOOR


def rel(got, ref, floor=0.0):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), floor, 1e-30))


def run(model, layout, tokens, targets, embed_noise):
    """Logits, loss and adapter gradients of the model (bf16 or float64); embed_noise: a generator
    that moves each token embedding by -1, 0 or +1 bf16 ulp (None: the exact weights)."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(tokens)
    if embed_noise is not None:
        e = embeds.double()
        ulp = torch.ldexp(torch.ones_like(e), torch.frexp(e)[1] - 8)
        step = torch.randint(-1, 2, embeds.shape, generator=embed_noise).double()
        embeds = (e + step * ulp).to(embeds.dtype)
    logits = model(inputs_embeds=embeds).logits
    loss = mr.masked_loss(logits.double(), targets)
    loss.backward()
    params = dict(model.named_parameters())
    grads = {p.name: params[mlr.peft_name(p.name)].grad.float().numpy() for p in layout}
    return logits.detach().float().numpy(), loss.item(), grads


def errors(ref, layout, floor, out):
    """test_llama's metrics of one run's (logits, loss, grads) against the reference bundle."""
    logits, loss, grads = out
    B, S = ref["tokens"].shape
    ref_logits = ref["logits"]
    e = {"loss": abs(loss - float(ref["loss"][0])) / abs(float(ref["loss"][0])),
         f"logits seq 0 pos {S - 1}": rel(logits[0, S - 1], ref_logits[0, S - 1]),
         "logits seq 1 pos 19": rel(logits[1, 19], ref_logits[1, 19]),
         "logits, worst position": max(rel(logits[b, s], ref_logits[b, s]) for b in range(B) for s in range(S))}
    e.update({f"grad {p.name}": rel(grads[p.name], ref[f"grad.{p.name}"], floor) for p in layout})
    return e


def measure(case, seeds):
    """{row: (bf16 exact inputs, worst bf16 over the perturbed draws, worst float64 over them)}."""
    seed, config = mr.case_configs()[case]
    rank, alpha, targets_ = mlr.CASES[case]
    lc = mb.LoraConfig(rank=rank, alpha=alpha, targets=targets_)
    base_path = os.path.join(REF_DIR, f"{case}.model.bin")
    layout = mb.lora_layout(mb.read_model_config(base_path), lc)
    ref = mb.read_bundle(os.path.join(REF_DIR, f"{case}.lora_ref.bin"))
    model = mlr.build_peft_model(base_path, seed, config, lc)
    model.train()
    models = {torch.bfloat16: model.to(torch.bfloat16), torch.float64: copy.deepcopy(model).double()}
    tokens = torch.from_numpy(ref["tokens"].astype(np.int64))
    targets = torch.from_numpy(ref["targets"].astype(np.int64))
    floor = GRAD_FLOOR * float(np.sqrt(sum(np.sum(ref[f"grad.{p.name}"].astype(np.float64) ** 2) for p in layout)))
    exact = errors(ref, layout, floor, run(models[torch.bfloat16], layout, tokens, targets, None))
    worst = {dt: dict.fromkeys(exact, 0.0) for dt in models}
    for d in range(1, seeds + 1):
        for dt, m in models.items():
            e = errors(ref, layout, floor, run(m, layout, tokens, targets, torch.Generator().manual_seed(seed * 100 + d)))
            worst[dt] = {k: max(v, e[k]) for k, v in worst[dt].items()}
    return {k: (exact[k], worst[torch.bfloat16][k], worst[torch.float64][k]) for k in exact}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="", help="comma list of cases (default all LoRA cases)")
    ap.add_argument("--seeds", type=int, default=8, help="draws of one-ulp embedding perturbations")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    names = [c for c in args.cases.split(",") if c] or list(mlr.CASES)
    for case in names:
        rows = measure(case, args.seeds)
        print(f"== {case}: relative error vs the float64 reference ({args.seeds} perturbed draws)")
        print(f"  {'':34s} {'bf16':>9s} {'bf16 pert':>10s} {'f64 pert':>9s}")
        for k, (a, b, c) in rows.items():
            print(f"  {k:34s} {a:9.2e} {b:10.2e} {c:9.2e}")
        grads = [k for k in rows if k.startswith("grad ")]
        for col, label in enumerate(("bf16", "bf16 pert", "f64 pert")):
            k = max(grads, key=lambda g: rows[g][col])
            print(f"  worst grad, {label:9s}: {rows[k][col]:.2e} ({k[5:]}); median {np.median([rows[g][col] for g in grads]):.2e}")


if __name__ == "__main__":
    main()
