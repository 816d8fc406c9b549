"""Reference outputs of LoRA fine-tuning from Hugging Face PEFT, for the correctness tests.

Run with the reference venv (needs peft: /opt/hfref/bin/pip install peft):
  /opt/hfref/bin/python scripts/make_lora_reference.py [--out tests/ref]

For each case it rebuilds the tiny base model of scripts/make_reference.py (same config and seed;
the committed <case>.model.bin must hold exactly its weights), wraps it with peft's LoraConfig(r,
lora_alpha, target_modules, lora_dropout=0) and sets every lora_A / lora_B to random bf16-valued
weights (a fresh PEFT adapter has B = 0, which would leave the adapters' effect and A's gradient
zero: nothing to compare). Then, in float64 with eager attention, on make_reference's batch:
  <out>/<case>.lora.bin      the adapters (lora.h format, fp32) for the base <case>.model.bin
  <out>/<case>.lora_ref.bin  tensor bundle (tensor_file.h): tokens, targets, logits, loss,
      grad.<adapter name> (rows, cols) for every adapter tensor (the base is frozen: no other grads),
      adamw.hparams [lr, beta1, beta2, eps, weight_decay], adamw.loss (3): the loss before AdamW steps
      1, 2, 3 (torch.optim.AdamW over the adapters only, every adapter decayed), and
      adamw.param.<adapter name>: every adapter after 2 steps.
Adapter names follow lora.h: layers.<l>.<q|k|v|o|gate|up|down>.lora_A (r, in) / lora_B (out, r).
Then it checks scripts/export_hf.py on the written files: the base exported with --peft-out loads in
transformers + peft (PeftModel.from_pretrained, float64) and gives the reference logits (within 1e-6
of the largest), and the --merge-lora export gives them within bf16 rounding of the merged weights.
Deterministic: fixed seeds, CPU float64.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch
import peft
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_hf  # noqa: E402
import make_reference as mr  # noqa: E402
import modelbin as mb  # noqa: E402

ADAMW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
ADAPTER_STD = 0.2

# case: (LoRA rank, alpha, targets). Every target appears; the GPU path needs rank % 8 == 0.
CASES = {
    "llama3_gqa": (8, 16.0, ("q", "k", "v", "o", "gate", "up", "down")),
    "qwen2": (8, 8.0, ("q", "v")),
    "gemma2": (8, 32.0, ("k", "o", "up", "down")),
}


def peft_name(name):
    """Our adapter name -> the name of its weight in the PEFT model's named_parameters()."""
    _, l, t, ab = name.split(".")
    return f"base_model.model.model.layers.{l}.{mb.LORA_HF_MODULE[t]}.{ab}.default.weight"


def build_peft_model(base_path, seed, config, lc):
    """The make_reference base model (checked against base_path) with random bf16-valued adapters."""
    model = mr.build_model(config, seed)
    c = mb.read_model_config(base_path)
    mr.check_export(base_path, model, export_hf.hf_names(c))
    cfg = peft.LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=0.0, bias="none",
                          target_modules=[mb.LORA_HF_MODULE[t].split(".")[1] for t in lc.targets])
    model = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed + 1000)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in mb.lora_layout(c, lc):
            w = params[peft_name(p.name)]
            if tuple(w.shape) != (p.rows, p.cols):
                raise RuntimeError(f"{p.name}: PEFT shape {tuple(w.shape)}, ours {(p.rows, p.cols)}")
            w.copy_((ADAPTER_STD * torch.randn(w.shape, generator=g)).to(torch.bfloat16).to(torch.float32))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted(peft_name(p.name) for p in mb.lora_layout(c, lc))
    if trainable != expected:
        raise RuntimeError(f"{base_path}: PEFT trains {trainable[:3]}..., expected only the adapters")
    return model


def adamw_steps(model, lora_params, tokens, targets):
    """Loss before AdamW steps 1..3 over the adapters (float64), every adapter decayed."""
    opt = torch.optim.AdamW(lora_params, lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    return mr.step_losses(model, opt, tokens, targets)


def check_export(base_path, lora_path, tokens, logits, tmp):
    """export_hf's --peft-out adapter on its base, and its --merge-lora model, against the logits."""
    base_dir, peft_dir, merged_dir = (os.path.join(tmp, n) for n in ("base", "peft", "merged"))
    for args in (["--to-hf", base_path, base_dir, "--lora", lora_path, "--peft-out", peft_dir],
                 ["--to-hf", base_path, merged_dir, "--lora", lora_path, "--merge-lora"]):
        if export_hf.main(args) != 0:
            raise RuntimeError(f"export_hf {' '.join(args)} failed")
    load = dict(dtype=torch.float64, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir, **load), peft_dir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, **load)
    scale = float(np.abs(logits).max())
    with torch.no_grad():
        err_peft = float(np.abs(model(input_ids=tokens).logits.numpy() - logits).max()) / scale
        err_merged = float(np.abs(merged(input_ids=tokens).logits.numpy() - logits).max()) / scale
    print(f"            export: --peft-out loaded by peft: max err {err_peft:.1e}; --merge-lora: {err_merged:.1e} "
          f"(of max |logit| {scale:.2f})")
    if not (err_peft <= 1e-6 and err_merged <= 3e-2):
        raise RuntimeError(f"{lora_path}: exported adapters disagree with the reference ({err_peft:g}, {err_merged:g})")


def make_case(case, out_dir):
    seed, config = mr.case_configs()[case]
    rank, alpha, lora_targets = CASES[case]
    lc = mb.LoraConfig(rank=rank, alpha=alpha, targets=lora_targets)
    base_path = os.path.join(out_dir, f"{case}.model.bin")
    c = mb.read_model_config(base_path)
    layout = mb.lora_layout(c, lc)
    model = build_peft_model(base_path, seed, config, lc).double()
    model.train()
    params = dict(model.named_parameters())
    mb.write_lora(os.path.join(out_dir, f"{case}.lora.bin"), c, lc,
                  {p.name: params[peft_name(p.name)].detach().numpy() for p in layout})

    tokens_np, targets_np = mr.make_batch(seed)
    tokens, targets = torch.from_numpy(tokens_np).long(), torch.from_numpy(targets_np).long()
    logits = model(input_ids=tokens).logits
    loss = mr.masked_loss(logits, targets)
    loss.backward()
    bundle = {"tokens": tokens_np, "targets": targets_np,
              "logits": logits.detach().numpy().astype(np.float32),
              "loss": np.array([loss.item()], dtype=np.float32)}
    for p in layout:
        bundle[f"grad.{p.name}"] = params[peft_name(p.name)].grad.numpy().astype(np.float32)
    losses = adamw_steps(model, [params[peft_name(p.name)] for p in layout], tokens, targets)
    bundle["adamw.hparams"] = np.array([ADAMW[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")],
                                       dtype=np.float32)
    bundle["adamw.loss"] = np.array(losses, dtype=np.float32)
    for p in layout:
        bundle[f"adamw.param.{p.name}"] = params[peft_name(p.name)].detach().numpy().astype(np.float32)
    ref_path = os.path.join(out_dir, f"{case}.lora_ref.bin")
    mb.write_bundle(ref_path, bundle)
    print(f"{case:11s} r={rank} alpha={alpha:g} targets={','.join(lora_targets)}  loss {loss.item():.6f}  adamw losses "
          f"{' '.join(f'{x:.6f}' for x in losses)}  -> {ref_path}")
    with tempfile.TemporaryDirectory() as tmp:
        check_export(base_path, os.path.join(out_dir, f"{case}.lora.bin"), tokens, bundle["logits"], tmp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref")))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    for case in CASES:
        base_path = os.path.join(args.out, f"{case}.model.bin")
        if not os.path.exists(base_path):
            print(f"error: {base_path} is missing: run scripts/make_reference.py first", file=sys.stderr)
            return 1
        make_case(case, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
