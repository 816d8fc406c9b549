"""Reference outputs from Hugging Face transformers for the correctness tests.

Run with the reference venv:  /opt/hfref/bin/python scripts/make_reference.py [--out tests/ref]

For each case (one tiny random-init model per family variant) it:
  1. builds the HF model (vocab 263, hidden 32, 2 layers, 4 heads, head_dim 8 (Gemma-2: 16),
     intermediate 72), initializes it with large random weights and rounds every weight to bf16,
  2. saves it as a HF checkpoint (bf16 safetensors) in a temp dir and exports it with
     scripts/export_hf.py to <out>/<case>.model.bin (then checks the exported bits),
  3. runs the model in float64 with eager attention on a fixed batch (B=2, S=37) and writes
     <out>/<case>.ref.bin (tensor bundle, tensor_file.h):
       tokens int32 (B,S); targets int32 (B,S), -1 = ignored; logits f32 (B,S,V); loss f32 (1)
         = mean over valid positions of CE(logits[b,t], targets[b,t]) (no internal shift);
       grad.<name> f32 (rows, cols) for every parameter of model_config.h's layout (tied models:
         the embedding gradient includes the LM-head part);
       adamw.hparams f32 [lr, beta1, beta2, eps, weight_decay]; adamw.loss f32 (3): the loss before
         AdamW steps 1, 2 and 3 (torch.optim.AdamW, float64, same batch, no clipping, weight decay
         only on matrices: embed, lm_head and the projections); adamw.param.<name> f32 (rows, cols):
         every parameter after 2 steps.
Deterministic: fixed seeds, CPU float64.
"""
import argparse
import copy
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
import transformers

transformers.utils.logging.disable_progress_bar()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_hf  # noqa: E402
import modelbin as mb  # noqa: E402

V, D, L, H, F_FF, B, S = 263, 32, 2, 4, 72, 2, 37
ADAMW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
MATRIX_STD, BIAS_STD, NORM_STD = 0.2, 0.2, 0.1
IGNORE_FRACTION = 0.2


def case_configs():
    """{case: (seed, HF config)}."""
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                  intermediate_size=F_FF, max_position_embeddings=128, pad_token_id=None,
                  bos_token_id=None, eos_token_id=None)
    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    llama3_rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 8.0, "original_max_position_embeddings": 64}
    return {
        "llama2_mha": (101, transformers.LlamaConfig(
            **common, num_key_value_heads=4, head_dim=8, rms_norm_eps=1e-5, rope_parameters=default_rope,
            tie_word_embeddings=False)),
        "llama3_gqa": (102, transformers.LlamaConfig(
            **common, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_parameters=llama3_rope,
            tie_word_embeddings=False)),
        "llama_tied": (103, transformers.LlamaConfig(
            **common, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_parameters=default_rope,
            tie_word_embeddings=True)),
        "mistral": (104, transformers.MistralConfig(
            **common, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_parameters=default_rope,
            sliding_window=8, tie_word_embeddings=False)),
        "qwen2": (105, transformers.Qwen2Config(
            **common, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)),
        "gemma2": (106, transformers.Gemma2Config(
            **common, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_parameters=default_rope,
            query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
            sliding_window=8, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")),
    }


def build_model(config, seed):
    """Random-init model whose every weight is exactly a bf16 value (float32 storage)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    gemma = config.model_type == "gemma2"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 2:
                value = MATRIX_STD * noise
            elif name.endswith(".bias"):
                value = BIAS_STD * noise
            else:  # RMSNorm weight: Gemma scales by (1 + w), the others by w
                value = NORM_STD * noise if gemma else 1.0 + NORM_STD * noise
            p.copy_(value.to(torch.bfloat16).to(torch.float32))
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("tied model whose lm_head is not the embedding")
    return model


def make_batch(seed):
    """tokens (B,S) and next-token targets (B,S) with ~20% and one run of 9 positions ignored (-1)."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, V, size=(B, S + 1))
    tokens, targets = seq[:, :S].copy(), seq[:, 1:].copy()
    targets[rng.random((B, S)) < IGNORE_FRACTION] = -1
    targets[1, 11:20] = -1
    return tokens.astype(np.int32), targets.astype(np.int32)


def masked_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)


def check_export(model_path, model, names):
    """The exported model.bin holds exactly the model's (bf16-valued) weights."""
    _, tensors = mb.read_model(model_path)
    params = dict(model.named_parameters(remove_duplicate=False))
    for ours, hf in names.items():
        want = mb.f32_to_bf16_bits(params[hf].detach().float().numpy()).reshape(tensors[ours].shape)
        if not np.array_equal(want, tensors[ours]):
            raise RuntimeError(f"{model_path}: tensor '{ours}' differs from HF '{hf}'")


def our_shape(c):
    return {p.name: (p.rows, p.cols) for p in mb.param_layout(c)}


def adamw_steps(model, tokens, targets):
    """Loss before AdamW steps 1..3 and the parameters after 2 steps (float64)."""
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": ADAMW["weight_decay"]},
                             {"params": vectors, "weight_decay": 0.0}],
                            lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"])
    return step_losses(model, opt, tokens, targets)


def step_losses(model, opt, tokens, targets):
    """Loss before optimizer steps 1..3 (opt steps twice); the model is left after 2 steps."""
    losses = []
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss = masked_loss(model(input_ids=tokens).logits, targets)
        losses.append(loss.item())
        if step < 2:
            loss.backward()
            opt.step()
    return losses


def make_case(case, seed, config, out_dir, tmp_root):
    model = build_model(config, seed)
    hf_dir = os.path.join(tmp_root, case)
    # Save a bf16 copy: converting the model itself would also round its float buffers (RoPE
    # inv_freq, Gemma-2's embed_scale) to bf16.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(hf_dir)
    model_path = os.path.join(out_dir, f"{case}.model.bin")
    export_hf.hf_to_modelbin(hf_dir, model_path)
    c = mb.read_model_config(model_path)
    names = export_hf.hf_names(c)
    check_export(model_path, model, names)

    model = model.double()
    model.train()  # no dropout in these models; train() only matters for the flags
    tokens_np, targets_np = make_batch(seed)
    tokens, targets = torch.from_numpy(tokens_np).long(), torch.from_numpy(targets_np).long()
    logits = model(input_ids=tokens).logits
    loss = masked_loss(logits, targets)
    loss.backward()
    params = dict(model.named_parameters(remove_duplicate=False))
    shapes = our_shape(c)
    bundle = {"tokens": tokens_np, "targets": targets_np,
              "logits": logits.detach().numpy().astype(np.float32),
              "loss": np.array([loss.item()], dtype=np.float32)}
    for ours, hf in names.items():
        bundle[f"grad.{ours}"] = params[hf].grad.numpy().astype(np.float32).reshape(shapes[ours])
    losses = adamw_steps(model, tokens, targets)
    bundle["adamw.hparams"] = np.array([ADAMW[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")],
                                       dtype=np.float32)
    bundle["adamw.loss"] = np.array(losses, dtype=np.float32)
    for ours, hf in names.items():
        bundle[f"adamw.param.{ours}"] = params[hf].detach().numpy().astype(np.float32).reshape(shapes[ours])
    ref_path = os.path.join(out_dir, f"{case}.ref.bin")
    mb.write_bundle(ref_path, bundle)
    n_valid = int((targets_np >= 0).sum())
    print(f"{case:11s} loss {loss.item():.6f} ({n_valid}/{B * S} valid)  adamw losses "
          f"{' '.join(f'{x:.6f}' for x in losses)}  -> {ref_path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref")))
    ap.add_argument("--case", action="append", help="only this case (repeatable)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    cases = case_configs()
    unknown = set(args.case or []) - set(cases)
    if unknown:
        print(f"error: unknown case(s) {sorted(unknown)}; cases: {', '.join(cases)}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        for case, (seed, config) in cases.items():
            if not args.case or case in args.case:
                make_case(case, seed, config, args.out, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
