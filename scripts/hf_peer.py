#!/usr/bin/env python3
"""The Hugging Face peer of `train_llama --bench`: training steps of a transformers model of a
preset shape (the numbers of mst.h's mst_preset), random init in bf16 directly on the GPU, random
tokens, torch.optim.AdamW(fused=True) with bf16 moments (as train_llama's default --moments bf16),
global-norm clip 1.0 (as train_llama's default --clip), optional gradient checkpointing (--gc).
PyTorch's caching allocator runs with expandable segments (PYTORCH_CUDA_ALLOC_CONF, unless already
set), as long-sequence training with PyTorch is normally run: without them, fragmentation made
Llama-3-8B at S=4096 run out of memory on its third step on an H100 (2.3 GiB reserved but unused).

Prints one line `BENCH {json}`: the median step time over the steps after the warm-up, tok/s,
TFLOP/s and MFU with train_llama's FLOP formula (flops_per_token below), peak memory. A CUDA
out-of-memory error anywhere prints `BENCH {... "oom": true}` and exits 0.

  python3 scripts/hf_peer.py --preset llama3-8b --seq-len 4096 --batch 1 --steps 6 [--gc]

torch and transformers are imported only when the benchmark runs, so the helpers here (PRESETS,
flops_per_token) serve bench_step.py / max_seq.py and the tests without them.
"""
import argparse
import json
import os
import statistics
import sys
import time

# The published configs of mst.h (mst_preset); tests/test_bench_scripts.py checks them against it.
# keys: family, V vocab, d model, L layers, H heads, KV heads, hd head dim, F d_ff, max_pos, eps, theta;
# window: sliding-window length of the windowed layers (layers l with l % period == 0), 0 for none
PRESETS = {
    "llama3-8b": dict(family="llama", V=128256, d=4096, L=32, H=32, KV=8, hd=128, F=14336, max_pos=131072,
                      eps=1e-5, theta=500000.0, window=0, period=1),
    "llama2-7b": dict(family="llama", V=32000, d=4096, L=32, H=32, KV=32, hd=128, F=11008, max_pos=4096,
                      eps=1e-5, theta=10000.0, window=0, period=1),
    "mistral-7b": dict(family="mistral", V=32000, d=4096, L=32, H=32, KV=8, hd=128, F=14336, max_pos=32768,
                       eps=1e-5, theta=10000.0, window=4096, period=1),
    "qwen2-7b": dict(family="qwen2", V=152064, d=3584, L=28, H=28, KV=4, hd=128, F=18944, max_pos=131072,
                     eps=1e-6, theta=1000000.0, window=0, period=1),
    "gemma2-9b": dict(family="gemma2", V=256000, d=3584, L=42, H=16, KV=8, hd=256, F=14336, max_pos=8192,
                      eps=1e-6, theta=10000.0, window=4096, period=2),
}

WARMUP = 2  # steps left out of the median, as train_llama --bench


def layer_params(p):
    """Parameters of one layer as model_config.h's param_layout_init counts them (norms, biases included)."""
    d, q, kv, f = p["d"], p["H"] * p["hd"], p["KV"] * p["hd"], p["F"]
    n = d + q * d + 2 * kv * d + d * q + d + 3 * f * d  # attn_norm, wq, wk, wv, wo, mlp_norm, gate, up, down
    if p["family"] == "qwen2":
        n += q + 2 * kv  # q/k/v biases
    if p["family"] == "gemma2":
        n += 2 * d  # post-attention and post-MLP norms
    return n


def matmul_params(p):
    """The parameters flops_per_token counts as matmul weights: the layers' and the LM head's."""
    return p["L"] * layer_params(p) + p["V"] * p["d"]


def flops_per_token(p, S):
    """train_llama.cu's flops_per_token: 6 * (layers + LM head matmul parameters) + 12 K H hd summed
    over layers, K = S, or the sliding window of a windowed layer where that is shorter."""
    matmul = matmul_params(p)
    window, period = p.get("window", 0), p.get("period", 1)
    keys = sum(window if window and l % period == 0 and window < S else S for l in range(p["L"]))
    return 6.0 * matmul + 12.0 * keys * p["H"] * p["hd"]


def peak_flops(major, minor):
    """Dense bf16 peak of a compute capability, as train_llama.cu's gpu_peak_flops (0: unknown)."""
    if major == 9:
        return 989e12
    if major == 8 and minor == 0:
        return 312e12
    if major == 10:
        return 2250e12
    return 0.0


def hf_config(name, p, layers=None):
    """The transformers config of preset `name` (layers: override the layer count for quick checks)."""
    import transformers as tf
    common = dict(vocab_size=p["V"], hidden_size=p["d"], intermediate_size=p["F"],
                  num_hidden_layers=layers or p["L"], num_attention_heads=p["H"], num_key_value_heads=p["KV"],
                  head_dim=p["hd"], max_position_embeddings=p["max_pos"], rms_norm_eps=p["eps"],
                  rope_theta=p["theta"], tie_word_embeddings=False, use_cache=False)
    if name == "llama3-8b":
        return tf.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192})
    if p["family"] == "llama":
        return tf.LlamaConfig(**common)
    if p["family"] == "mistral":
        return tf.MistralConfig(**common, sliding_window=p["window"])
    if p["family"] == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=False)
    if p["family"] == "gemma2":
        common["tie_word_embeddings"] = True
        return tf.Gemma2Config(**common, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=p["hd"],
                               sliding_window=p["window"], attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    raise ValueError(f"no transformers config for family {p['family']}")


def bench_record(args, **fields):
    rec = {"model": args.preset, "backend": "hf", "method": "hf-gc" if args.gc else "hf", "gc": int(args.gc),
           "B": args.batch, "S": args.seq_len, "attn": args.attn,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    rec.update(fields)
    return rec


def run(args):
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    import transformers as tf

    p = dict(PRESETS[args.preset], L=args.layers or PRESETS[args.preset]["L"])
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    props = torch.cuda.get_device_properties(dev) if cuda else None
    device_name = props.name if cuda else "cpu"
    peak = peak_flops(props.major, props.minor) if cuda else 0.0
    fpt = flops_per_token(p, args.seq_len)
    base = dict(device=device_name, flops_per_token=fpt)
    peak_device = [0]

    def device_used():  # bytes in use on the device (all processes), as train_llama's cudaMemGetInfo
        if cuda:
            free, total = torch.cuda.mem_get_info(dev)
            peak_device[0] = max(peak_device[0], total - free)

    try:
        torch.manual_seed(args.seed)
        cfg = hf_config(args.preset, p, args.layers)
        cfg._attn_implementation = args.attn
        t0 = time.perf_counter()
        with torch.device(dev):  # parameters are created and initialized on the device, in bf16
            prev = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=args.attn)
            finally:
                torch.set_default_dtype(prev)
        model.to(dtype=torch.bfloat16)
        model.train()
        if args.gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        init_s = time.perf_counter() - t0
        n_params = sum(t.numel() for t in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                fused=cuda)
        g = torch.Generator(device=dev).manual_seed(args.seed)
        times = []
        loss_v = float("nan")
        for _ in range(args.steps):
            tokens = torch.randint(0, p["V"], (args.batch, args.seq_len), device=dev, generator=g)
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            out = model(input_ids=tokens, labels=tokens, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=cuda)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_v = out.loss.item()
            if cuda:
                torch.cuda.synchronize(dev)
            times.append((time.perf_counter() - t0) * 1e3)
            device_used()
            del out
            print(f"step {len(times)}/{args.steps} | loss {loss_v:.4f} | {times[-1]:.0f} ms", flush=True)
    except torch.OutOfMemoryError as e:
        msg = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        return bench_record(args, **base, oom=True, error=msg[:300])
    timed = times[WARMUP:] if len(times) > WARMUP else times[-1:]
    med = statistics.median(timed)
    tok_s = args.batch * args.seq_len / (med / 1e3)
    gib = 1024.0 ** 3
    return bench_record(
        args, **base, steps_timed=len(timed), warmup=len(times) - len(timed), median_ms=round(med, 3),
        tok_s=round(tok_s, 1), tflops=round(fpt * tok_s / 1e12, 4),
        mfu=round(fpt * tok_s / peak, 6) if peak > 0 else None,
        peak_gib=round(peak_device[0] / gib, 4) if cuda else None,
        alloc_gib=round(torch.cuda.max_memory_allocated(dev) / gib, 4) if cuda else None,
        reserved_gib=round(torch.cuda.max_memory_reserved(dev) / gib, 4) if cuda else None,
        params=n_params, init_s=round(init_s, 2), last_loss=round(loss_v, 4), oom=False)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="One Hugging Face transformers training benchmark of a preset shape; prints 'BENCH {json}'. "
                    "About 15-25 s of start-up (imports, CUDA context, GPU init of 8B parameters) plus the steps "
                    "(Llama-3-8B at 4K tokens: roughly 0.5-1 s a step on an H100).")
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="steps in all; the median leaves out the first 2 "
                                                         "(with 2 or fewer steps: the last step)")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing (non-reentrant)")
    ap.add_argument("--attn", default=None, help="attention implementation (default sdpa; eager for gemma2-9b, "
                                                 "whose logit soft-capping sdpa cannot do)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick checks only)")
    ap.add_argument("--device", default="cuda", help="torch device (cuda; cpu for a smoke test with --layers)")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)
    if args.attn is None:
        args.attn = "eager" if PRESETS[args.preset]["family"] == "gemma2" else "sdpa"
    if args.steps < 1 or args.seq_len < 2 or args.batch < 1:
        ap.error("--steps, --batch must be >= 1 and --seq-len >= 2")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rec = run(args)
    print("BENCH " + json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
