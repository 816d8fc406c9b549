"""How far Hugging Face transformers itself lands from the float64 references when it runs in bf16.

The GPU model's tolerances in test_llama.cu are set from this: a bf16 pipeline cannot be held
closer to float64 than PyTorch's own bf16 path is. For each tiny case of scripts/make_reference.py
it runs the same model and batch once in float64 and once with bf16 weights and activations (eager
attention, as the references), and prints the norm-relative error ||bf16 - f64|| / ||f64|| of the
logits, the loss and every parameter gradient, and of every parameter's change after two AdamW
steps (torch.optim.AdamW as the references, with fp32 moments and fp32 master weights on the bf16
side, so that only the gradients differ): the worst of each kind per case.

  /opt/hfref/bin/python dev/hf_bf16_error.py [--cases llama2_mha,qwen2] [--all-tensors]
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import make_reference as mr  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(model, tokens, targets):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    loss = mr.masked_loss(logits.double(), targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def adamw_change(model, dtype, tokens, targets):
    """Each parameter's change after two AdamW steps: the model in `dtype` computes the gradients,
    float64 master weights take the steps."""
    work = copy.deepcopy(model).to(dtype)
    master = {n: p.detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in master.items()}
    matrices = [p for n, p in master.items() if p.ndim == 2]
    vectors = [p for n, p in master.items() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": mr.ADAMW["weight_decay"]},
                             {"params": vectors, "weight_decay": 0.0}],
                            lr=mr.ADAMW["lr"], betas=(mr.ADAMW["beta1"], mr.ADAMW["beta2"]), eps=mr.ADAMW["eps"])
    for _ in range(2):
        _, _, grads = run(work, tokens, targets)
        for n, p in master.items():
            p.grad = grads[n].double()
        opt.step()
        with torch.no_grad():
            for n, p in work.named_parameters():
                p.copy_(master[n].to(dtype))
    return {n: (p.detach() - start[n]) for n, p in master.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="", help="comma list of cases (default all)")
    ap.add_argument("--all-tensors", action="store_true", help="print every gradient's error")
    args = ap.parse_args()
    configs = mr.case_configs()
    names = [c for c in args.cases.split(",") if c] or list(configs)
    print(f"{'case':12s} {'logits':>9s} {'loss':>9s} {'worst grad':>11s} {'tensor':40s} {'worst step':>11s}  tensor")
    for case in names:
        seed, config = configs[case]
        base = mr.build_model(config, seed)
        tokens_np, targets_np = mr.make_batch(seed)
        tokens, targets = torch.from_numpy(tokens_np).long(), torch.from_numpy(targets_np).long()
        ref = run(copy.deepcopy(base).double(), tokens, targets)
        low = run(copy.deepcopy(base).to(torch.bfloat16), tokens, targets)
        errs = {n: rel(low[2][n], ref[2][n]) for n in ref[2]}
        worst = max(errs, key=errs.get)
        step_ref = adamw_change(base, torch.float64, tokens, targets)
        step_low = adamw_change(base, torch.bfloat16, tokens, targets)
        step_errs = {n: rel(step_low[n], step_ref[n]) for n in step_ref}
        worst_step = max(step_errs, key=step_errs.get)
        print(f"{case:12s} {rel(low[0], ref[0]):9.2e} {rel(low[1], ref[1]):9.2e} {errs[worst]:11.2e} {worst:40s} "
              f"{step_errs[worst_step]:11.2e}  {worst_step}")
        if args.all_tensors:
            for n, e in sorted(errs.items(), key=lambda kv: -kv[1]):
                print(f"    grad {e:9.2e}  step {step_errs[n]:9.2e}  {n}")


if __name__ == "__main__":
    main()
