"""Hugging Face checkpoint <-> model.bin.

  export_hf.py HF_DIR OUT                  HF dir (config.json + *.safetensors) -> model.bin
                                           (OUT is a .bin path or a directory that gets model.bin;
                                           tokenizer.bin is written next to it when HF_DIR has
                                           tokenizer.json)
  export_hf.py --to-hf model.bin OUT_DIR [--tokenizer-from HF_DIR]
                                           model.bin -> config.json + model.safetensors (bf16)
  export_hf.py --to-hf model.bin OUT_DIR --lora lora.bin --merge-lora
                                           the same with LoRA adapters (train_llama's lora_<step>.bin,
                                           lora.h) merged: W + (alpha / r) B A, computed in float64 from
                                           the bf16 base and the fp32 adapters, rounded to bf16
  export_hf.py --to-hf model.bin OUT_DIR --lora lora.bin --peft-out PEFT_DIR
                                           the base in OUT_DIR, the adapters as a PEFT LoRA adapter in
                                           PEFT_DIR (adapter_config.json + adapter_model.safetensors,
                                           fp32), for peft.PeftModel.from_pretrained(model, PEFT_DIR)

Families: llama, mistral, qwen2, gemma2. Safetensors are parsed here (numpy only, no torch):
tensors are streamed in chunks of CHUNK_ELEMS elements, so a model of any size exports in about
100 MB of memory (measured: 122 MB peak RSS for an 888 MB F32 checkpoint). F32/F16/F64 tensors
are rounded to bf16 (round to nearest even); BF16 is copied bit for bit.
The round trip model.bin -> HF -> model.bin is byte-identical: --to-hf refuses a model.bin whose
header a HF config cannot express (it re-derives the header from the config it wrote and compares).
Bad input: "error: ..." on stderr and exit code 1.
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelbin as mb  # noqa: E402
from modelbin import FormatError  # noqa: E402

CHUNK_ELEMS = 1 << 22  # elements converted at a time (16 MB of float32)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM"}

# transformers' defaults for keys a config.json may omit (transformers 5.17 config classes).
HF_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 2048, "hidden_act": "silu"},
    "mistral": {"num_key_value_heads": 8, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 4096 * 32, "hidden_act": "silu", "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 32768, "hidden_act": "silu"},
    "gemma2": {"num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True,
               "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
}
DEFAULT_ROPE_THETA = 10000.0
ACTIVATIONS = {"silu": mb.ACT_SILU, "swish": mb.ACT_SILU, "gelu_pytorch_tanh": mb.ACT_GELU_TANH,
               "gelu_tanh": mb.ACT_GELU_TANH, "gelu_python_tanh": mb.ACT_GELU_TANH}
SAFETENSORS_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
                      "F64": np.dtype("<f8")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


def fail(msg):
    raise FormatError(msg)


# ----------------------------------------------------------------------------------------------
# HF config.json -> ModelConfig

class ConfigReader:
    """Typed access to config.json keys, with the family's transformers defaults."""

    def __init__(self, cfg, family, path):
        self.cfg, self.defaults, self.path = cfg, HF_DEFAULTS[family], path

    def has(self, key):
        return key in self.cfg or key in self.defaults

    def get(self, key):
        """The value, the family default when absent, or an error when neither exists."""
        if key in self.cfg:
            return self.cfg[key]
        if key in self.defaults:
            return self.defaults[key]
        fail(f"{self.path}: required key '{key}' is missing")

    def int(self, key, allow_none=False):
        v = self.get(key)
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            fail(f"{self.path}: '{key}' must be an integer, got {v!r}")
        return v

    def float(self, key, allow_none=False):
        v = self.get(key)
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            fail(f"{self.path}: '{key}' must be a finite number, got {v!r}")
        return float(v)

    def bool(self, key):
        v = self.get(key)
        if not isinstance(v, bool):
            fail(f"{self.path}: '{key}' must be true or false, got {v!r}")
        return v


def number(v, what, path):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        fail(f"{path}: {what} must be a finite number, got {v!r}")
    return float(v)


def read_rope(cfg, max_pos, path):
    """RoPE theta and scaling, from legacy rope_theta/rope_scaling or transformers-5 rope_parameters
    (rope_scaling wins when both are set, as in transformers)."""
    rp = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        fail(f"{path}: rope_scaling / rope_parameters must be an object, got {rp!r}")
    if rp and set(rp) <= {"full_attention", "sliding_attention"}:
        variants = [v for v in rp.values() if v is not None]
        if any(v != variants[0] for v in variants):
            fail(f"{path}: different RoPE parameters per layer type are not supported: {rp}")
        rp = variants[0] if variants else {}
    theta = number(rp.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA)), "rope_theta", path)
    partial = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        fail(f"{path}: partial_rotary_factor {partial} is not supported (only full-width RoPE)")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    out = {"rope_theta": theta, "rope_scaling": mb.ROPE_SCALING_NONE, "rope_factor": 0.0,
           "rope_low_freq_factor": 0.0, "rope_high_freq_factor": 0.0, "rope_orig_max_pos": 0}
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        fail(f"{path}: RoPE scaling type '{rope_type}' is not supported (only none or 'llama3')")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key not in rp:
            fail(f"{path}: llama3 RoPE scaling lacks '{key}'")
    orig = cfg.get("original_max_position_embeddings", rp.get("original_max_position_embeddings", max_pos))
    if isinstance(orig, bool) or not isinstance(orig, int):
        fail(f"{path}: original_max_position_embeddings must be an integer, got {orig!r}")
    out.update(rope_scaling=mb.ROPE_SCALING_LLAMA3, rope_orig_max_pos=orig,
               rope_factor=number(rp["factor"], "rope factor", path),
               rope_low_freq_factor=number(rp["low_freq_factor"], "low_freq_factor", path),
               rope_high_freq_factor=number(rp["high_freq_factor"], "high_freq_factor", path))
    return out


def sliding_pattern(layer_types, n_layers, path):
    """(uses_window, period) such that layer l slides iff l % period == 0, from a layer_types list."""
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        fail(f"{path}: layer_types must be a list of {n_layers} entries, got {layer_types!r}")
    bad = set(layer_types) - {"sliding_attention", "full_attention"}
    if bad:
        fail(f"{path}: unsupported layer types {sorted(bad)}")
    sliding = [t == "sliding_attention" for t in layer_types]
    if not any(sliding):
        return False, 1
    for period in range(1, n_layers + 2):
        if all(s == (l % period == 0) for l, s in enumerate(sliding)):
            return True, period
    fail(f"{path}: sliding-window layer pattern {layer_types} is not 'every layer l with l % p == 0'")


def read_sliding(cfg, r, family, n_layers, path):
    """(sliding_window, sliding_period) with transformers' semantics for each family."""
    if family == "llama":
        return 0, 1
    if family == "qwen2":
        if cfg.get("use_sliding_window", False):
            fail(f"{path}: qwen2 with use_sliding_window=true is not supported "
                 "(its per-layer window pattern via max_window_layers is not implemented)")
        if "sliding_attention" in (cfg.get("layer_types") or []):
            fail(f"{path}: qwen2 layer_types with sliding_attention is not supported")
        return 0, 1
    window = r.int("sliding_window", allow_none=True)
    if family == "mistral":  # every layer uses the window when it is set (layer_types is ignored)
        return (window or 0), 1
    # gemma2: layer_types, default: layers 0, 2, 4, ... slide ((i + 1) % 2 in Gemma2Config)
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    uses, period = sliding_pattern(layer_types, n_layers, path)
    if not uses:
        return 0, 2
    if not window:
        fail(f"{path}: gemma2 has sliding layers but sliding_window is {window!r}")
    return window, period


def hf_config_to_model(cfg, path):
    """ModelConfig of a config.json dict; FormatError for anything we cannot represent."""
    if not isinstance(cfg, dict):
        fail(f"{path}: not a JSON object")
    family = cfg.get("model_type")
    if family not in mb.FAMILY_NAMES:
        fail(f"{path}: unsupported model_type {family!r} (supported: {', '.join(mb.FAMILY_NAMES)})")
    r = ConfigReader(cfg, family, path)
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if cfg.get(key) and not (key == "attention_bias" and family == "qwen2"):
            fail(f"{path}: {family} with {key}=true is not supported")
    heads = r.int("num_attention_heads")
    hidden = r.int("hidden_size")
    if heads < 1 or hidden < 1:
        fail(f"{path}: hidden_size {hidden} and num_attention_heads {heads} must be positive")
    kv = r.int("num_key_value_heads", allow_none=True)
    head_dim = r.int("head_dim", allow_none=True) if r.has("head_dim") else None
    if head_dim is None:
        if family == "gemma2":
            fail(f"{path}: gemma2 needs head_dim")
        head_dim = hidden // heads
    act_key = "hidden_activation" if family == "gemma2" else "hidden_act"
    act = r.get(act_key)
    if act not in ACTIVATIONS:
        fail(f"{path}: {act_key} {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    max_pos = r.int("max_position_embeddings")
    n_layers = r.int("num_hidden_layers")
    window, period = read_sliding(cfg, r, family, n_layers, path)
    gemma = family == "gemma2"
    if gemma:
        scalar = r.float("query_pre_attn_scalar")
        if scalar <= 0:
            fail(f"{path}: query_pre_attn_scalar {scalar:g} must be positive")
        query_scale = scalar ** -0.5
        embed_scale = math.sqrt(hidden)  # Gemma2 keeps float32(hidden ** 0.5) as a buffer
        attn_cap = r.float("attn_logit_softcapping", allow_none=True) or 0.0
        final_cap = r.float("final_logit_softcapping", allow_none=True) or 0.0
    else:
        query_scale, embed_scale, attn_cap, final_cap = head_dim ** -0.5, 1.0, 0.0, 0.0
    c = mb.ModelConfig(
        family=mb.FAMILY_NAMES.index(family), vocab_size=r.int("vocab_size"), d_model=hidden,
        n_layers=n_layers, n_heads=heads, n_kv_heads=heads if kv is None else kv, head_dim=head_dim,
        d_ff=r.int("intermediate_size"), max_pos=max_pos,
        tied_embeddings=int(r.bool("tie_word_embeddings")), qkv_bias=int(family == "qwen2"),
        norm_offset=int(gemma), post_norms=int(gemma), activation=ACTIVATIONS[act],
        sliding_window=window, sliding_period=period, norm_eps=r.float("rms_norm_eps"),
        attn_softcap=attn_cap, final_softcap=final_cap, query_scale=query_scale,
        embed_scale=embed_scale, **read_rope(cfg, max_pos, path))
    err = mb.config_validate(c)
    if err:
        fail(f"{path}: {err}")
    return c


def hf_names(c):
    """{our parameter name: HF tensor name} for every parameter of the layout."""
    gemma = c.family == mb.FAMILY_GEMMA2
    per_layer = {
        "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
        "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
        "wo": "self_attn.o_proj.weight", "post_attn_norm": "post_attention_layernorm.weight",
        # Gemma-2's post_attention_layernorm normalizes the attention output; elsewhere it is the
        # norm in front of the MLP.
        "mlp_norm": "pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight",
        "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
        "w_down": "mlp.down_proj.weight", "post_mlp_norm": "post_feedforward_layernorm.weight"}
    out = {}
    for p in mb.param_layout(c):
        if p.name.startswith("layers."):
            _, l, t = p.name.split(".")
            out[p.name] = f"model.layers.{l}.{per_layer[t]}"
        else:
            out[p.name] = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                           "lm_head": "lm_head.weight"}[p.name]
    return out


def hf_shape(p):
    """HF's shape of a parameter: 1-D for norms and biases, (out, in) for matrices."""
    return [p.cols] if p.rows == 1 and p.name not in ("embed", "lm_head") else [p.rows, p.cols]


# ----------------------------------------------------------------------------------------------
# safetensors reading (header JSON parsed here)

def read_safetensors_header(path):
    """{name: (path, dtype, shape, absolute byte offset, nbytes)} of one .safetensors file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                fail(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8 or n > (100 << 20):
                fail(f"{path}: truncated or corrupt safetensors file: header length {n} but file has {size} bytes")
            raw = f.read(n)
    except OSError as e:
        fail(f"cannot read '{path}': {e.strerror}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{path}: corrupt safetensors header: {e}")
    if not isinstance(header, dict):
        fail(f"{path}: corrupt safetensors header: not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            fail(f"{path}: tensor '{name}' has a malformed header entry {info!r}")
        if not all(isinstance(s, int) and s >= 0 for s in shape) or not isinstance(begin, int) or not isinstance(end, int):
            fail(f"{path}: tensor '{name}' has a malformed shape or offsets {info!r}")
        numel = int(np.prod(shape, dtype=np.int64))
        if dtype in SAFETENSORS_DTYPES and end - begin != numel * SAFETENSORS_DTYPES[dtype].itemsize:
            fail(f"{path}: tensor '{name}' ({dtype} {shape}) spans {end - begin} bytes, expected "
                 f"{numel * SAFETENSORS_DTYPES[dtype].itemsize}")
        if not 0 <= begin <= end <= data_len:
            fail(f"{path}: truncated safetensors file: tensor '{name}' ends at byte {end} of the data, "
                 f"but the file holds only {data_len} data bytes")
        out[name] = (path, dtype, shape, data_start + begin, end - begin)
    return out


def read_checkpoint_index(hf_dir):
    """{name: header entry} over all shards (model.safetensors.index.json, or every *.safetensors)."""
    index_path = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path, "r", encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            fail(f"{index_path}: unreadable or malformed shard index ({e})")
    else:
        weight_map = None
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        if not files:
            fail(f"{hf_dir}: no *.safetensors files (only safetensors checkpoints are supported)")
    tensors = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            fail(f"{index_path}: shard '{name}' does not exist")
        for t, entry in read_safetensors_header(path).items():
            if t in tensors:
                fail(f"{hf_dir}: tensor '{t}' appears in two shards ({tensors[t][0]} and {path})")
            tensors[t] = entry
    if weight_map is not None:
        for t, shard in weight_map.items():
            if t not in tensors or os.path.basename(tensors[t][0]) != shard:
                fail(f"{index_path}: tensor '{t}' is listed in shard '{shard}' but is not there")
    return tensors


def stream_bf16(entry, what):
    """Yields the bf16 bits of a tensor in chunks of at most CHUNK_ELEMS elements."""
    path, dtype, _, offset, nbytes = entry
    src = SAFETENSORS_DTYPES[dtype]
    with open(path, "rb") as f:
        f.seek(offset)
        left = nbytes // src.itemsize
        while left > 0:
            n = min(left, CHUNK_ELEMS)
            raw = f.read(n * src.itemsize)
            if len(raw) != n * src.itemsize:
                fail(f"{path}: truncated inside tensor '{what}'")
            x = np.frombuffer(raw, dtype=src)
            if dtype == "BF16":
                yield x
            elif dtype == "F16":
                yield mb.f16_to_bf16_bits(x)
            else:
                yield mb.f32_to_bf16_bits(x.astype(np.float32))
            left -= n


# ----------------------------------------------------------------------------------------------
# HF -> model.bin

def load_json(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        fail(f"{path}: not found")
    except (OSError, ValueError) as e:
        fail(f"{path}: unreadable JSON ({e})")


def plan_tensors(c, tensors, hf_dir):
    """[(ParamInfo, safetensors entry)] in model.bin order; checks names, shapes, dtypes, leftovers."""
    names = hf_names(c)
    plan, used = [], set()
    for p in mb.param_layout(c):
        hf = names[p.name]
        if hf not in tensors:
            fail(f"{hf_dir}: tensor '{hf}' (our '{p.name}') is missing from the checkpoint")
        entry = tensors[hf]
        if entry[1] not in SAFETENSORS_DTYPES:
            fail(f"{hf_dir}: tensor '{hf}' has unsupported dtype {entry[1]} (supported: BF16, F16, F32, F64)")
        if entry[2] != hf_shape(p):
            fail(f"{hf_dir}: tensor '{hf}' has shape {entry[2]}, the config implies {hf_shape(p)}")
        plan.append((p, entry))
        used.add(hf)
    ignorable = {"lm_head.weight"} if c.tied_embeddings else set()
    extra = sorted(t for t in tensors if t not in used and t not in ignorable
                   and not t.endswith("rotary_emb.inv_freq"))
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        fail(f"{hf_dir}: unexpected tensors for this {mb.FAMILY_NAMES[c.family]} config: {shown}")
    return plan


def export_tokenizer_if_present(hf_dir, out_path, vocab_size):
    """Writes tokenizer.bin when the checkpoint has tokenizer.json; returns its path or None."""
    tj = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(tj):
        print(f"note: {hf_dir} has no tokenizer.json; no tokenizer.bin written")
        return None
    try:
        import tokenizer_export
    except ModuleNotFoundError as e:
        if e.name != "tokenizer_export":
            raise
        print("note: scripts/tokenizer_export.py is missing; no tokenizer.bin written")
        return None
    tc = os.path.join(hf_dir, "tokenizer_config.json")
    try:
        tokenizer_export.export_tokenizer(tj, tc if os.path.exists(tc) else None, out_path, vocab_size)
    except (tokenizer_export.ExportError, OSError, ValueError, KeyError) as e:
        fail(f"{tj}: {e}")
    print(f"wrote {out_path}")
    return out_path


def hf_to_modelbin(hf_dir, out):
    """Exports the checkpoint (and its tokenizer, first: it is quick and may refuse) to model.bin."""
    if not os.path.isdir(hf_dir):
        fail(f"{hf_dir}: not a directory")
    c = hf_config_to_model(load_json(os.path.join(hf_dir, "config.json")), os.path.join(hf_dir, "config.json"))
    plan = plan_tensors(c, read_checkpoint_index(hf_dir), hf_dir)
    if out.endswith(".bin"):
        out_path = out
    else:
        os.makedirs(out, exist_ok=True)
        out_path = os.path.join(out, "model.bin")
    tokenizer_path = export_tokenizer_if_present(
        hf_dir, os.path.join(os.path.dirname(out_path) or ".", "tokenizer.bin"), c.vocab_size)
    w = mb.ModelWriter(out_path, c)
    try:
        for p, entry in plan:
            for chunk in stream_bf16(entry, p.name):
                w.write(chunk)
            w.end_tensor()
    except BaseException:
        w.abort()
        if tokenizer_path:
            os.remove(tokenizer_path)
        raise
    w.close()
    print(f"wrote {out_path}: {mb.FAMILY_NAMES[c.family]}, {mb.param_total(c):,} parameters, "
          f"{os.path.getsize(out_path):,} bytes")
    return out_path


# ----------------------------------------------------------------------------------------------
# model.bin -> HF

def rope_dict(c):
    if c.rope_scaling == mb.ROPE_SCALING_NONE:
        return None
    return {"rope_type": "llama3", "factor": mb.f32_str(c.rope_factor),
            "low_freq_factor": mb.f32_str(c.rope_low_freq_factor),
            "high_freq_factor": mb.f32_str(c.rope_high_freq_factor),
            "original_max_position_embeddings": c.rope_orig_max_pos}


def query_pre_attn_scalar(c):
    """The query_pre_attn_scalar s with float32(s ** -0.5) == query_scale (an integer when one fits)."""
    s = 1.0 / (float(c.query_scale) ** 2)
    for candidate in (round(s), s):
        if mb.f32(candidate ** -0.5) == c.query_scale:
            return candidate
    return s


def model_to_hf_config(c):
    """config.json dict for transformers (legacy rope_theta/rope_scaling keys and rope_parameters)."""
    family = mb.FAMILY_NAMES[c.family]
    act = "gelu_pytorch_tanh" if c.activation == mb.ACT_GELU_TANH else "silu"
    scaling = rope_dict(c)
    rope_parameters = dict(scaling or {"rope_type": "default"}, rope_theta=mb.f32_str(c.rope_theta))
    cfg = {"architectures": [ARCHITECTURES[family]], "model_type": family,
           "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
           "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
           "max_position_embeddings": c.max_pos, "rms_norm_eps": mb.f32_str(c.norm_eps),
           "rope_theta": mb.f32_str(c.rope_theta), "rope_scaling": scaling,
           "rope_parameters": rope_parameters, "tie_word_embeddings": bool(c.tied_embeddings),
           "hidden_act": act, "dtype": "bfloat16"}
    if family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif family == "mistral":
        cfg["sliding_window"] = c.sliding_window or None
    elif family == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layers)
    else:
        cfg.update(hidden_activation=act, query_pre_attn_scalar=query_pre_attn_scalar(c),
                   attn_logit_softcapping=mb.f32_str(c.attn_softcap) or None,
                   final_logit_softcapping=mb.f32_str(c.final_softcap) or None,
                   sliding_window=c.sliding_window or None, attention_bias=False,
                   layer_types=["sliding_attention" if c.layer_is_sliding(l) else "full_attention"
                                for l in range(c.n_layers)])
    return cfg


def check_expressible(c, cfg, path):
    """Refuses a model.bin whose header the HF config cannot reproduce (so round trips are exact)."""
    back = hf_config_to_model(json.loads(json.dumps(cfg)), "the generated config.json")
    diffs = [f"{f} = {getattr(c, f)} (a {cfg['model_type']} config gives {getattr(back, f)})"
             for f, _, _ in mb.HEADER_FIELDS if getattr(back, f) != getattr(c, f)]
    if diffs:
        fail(f"{path}: cannot be expressed as a Hugging Face {cfg['model_type']} checkpoint: " + "; ".join(diffs))


def safetensors_header(entries):
    """The length-prefixed header of a safetensors file for [(name, dtype, shape, nbytes)] in order."""
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + nbytes]}
        at += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def merged_bits(bits, adapters, lc, name):
    """bf16 bits of W + scale B A for a projection with an adapter (float64, rounded once to bf16)."""
    _, l, t = name.split(".")
    target = {v: k for k, v in mb.LORA_BASE_TENSOR.items()}.get(t)
    if target is None or target not in lc.targets:
        return bits
    a, b = adapters[f"layers.{l}.{target}.lora_A"], adapters[f"layers.{l}.{target}.lora_B"]
    w = mb.bf16_bits_to_f32(bits).astype(np.float64) + float(lc.alpha) / lc.rank * (b.astype(np.float64) @ a.astype(np.float64))
    return mb.f32_to_bf16_bits(w.astype(np.float32)).reshape(bits.shape)


def write_safetensors(path, model_path, c, merge=None):
    """model.safetensors with every tensor in bf16, streamed from model.bin; merge = (LoraConfig,
    adapters) adds the adapters to their projections."""
    names = hf_names(c)
    entries = [(names[p.name], "BF16", hf_shape(p), 2 * p.numel) for p in mb.param_layout(c)]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(safetensors_header(entries))
        for p, bits in mb.iter_model_tensors(model_path, c):
            if merge is not None and p.name.startswith("layers."):
                bits = merged_bits(bits, merge[1], merge[0], p.name)
            f.write(bits.tobytes())
    os.replace(tmp, path)


def read_adapters(lora_path, c, model_path):
    """(LoraConfig, {name: float32 array}) of a lora.bin that belongs to the base config c."""
    lc, base, adapters = mb.read_lora(lora_path)
    if mb.config_to_header(base) != mb.config_to_header(c):
        fail(f"{lora_path}: the adapters belong to another base model than {model_path} (the configs differ)")
    return lc, adapters


def write_peft(peft_dir, c, lc, adapters, base_dir):
    """A PEFT LoRA adapter directory: adapter_config.json and adapter_model.safetensors (fp32 A, B)."""
    os.makedirs(peft_dir, exist_ok=True)
    entries, blobs = [], []
    for p in mb.lora_layout(c, lc):
        _, l, t, ab = p.name.split(".")
        arr = np.ascontiguousarray(adapters[p.name], dtype="<f4")
        entries.append((f"base_model.model.model.layers.{l}.{mb.LORA_HF_MODULE[t]}.{ab}.weight", "F32", arr.shape, arr.nbytes))
        blobs.append(arr.tobytes())
    path = os.path.join(peft_dir, "adapter_model.safetensors")
    mb.write_atomically(path, safetensors_header(entries) + b"".join(blobs))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.path.abspath(base_dir),
           "r": lc.rank, "lora_alpha": mb.f32_str(lc.alpha), "lora_dropout": 0.0, "bias": "none",
           "target_modules": sorted(mb.LORA_HF_MODULE[t].split(".")[1] for t in lc.targets),
           "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
           "modules_to_save": None, "inference_mode": True}
    with open(os.path.join(peft_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def copy_tokenizer_files(src_dir, out_dir, cfg):
    """Copies the tokenizer files of src_dir, and its config's special token ids into cfg."""
    present = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(src_dir, n))]
    if "tokenizer.json" not in present and "tokenizer.model" not in present:
        fail(f"{src_dir}: no tokenizer.json or tokenizer.model to copy")
    for name in present:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    src_cfg = os.path.join(src_dir, "config.json")
    if os.path.exists(src_cfg):
        original = load_json(src_cfg)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in original:
                cfg[key] = original[key]
    return present


def modelbin_to_hf(model_path, out_dir, tokenizer_from, lora_path=None, merge_lora=False, peft_out=None):
    c = mb.read_model_config(model_path)
    cfg = model_to_hf_config(c)
    check_expressible(c, cfg, model_path)
    if tokenizer_from is not None and not os.path.isdir(tokenizer_from):
        fail(f"{tokenizer_from}: not a directory")
    lc, adapters = read_adapters(lora_path, c, model_path) if lora_path else (None, None)
    os.makedirs(out_dir, exist_ok=True)
    copied = copy_tokenizer_files(tokenizer_from, out_dir, cfg) if tokenizer_from else []
    write_safetensors(os.path.join(out_dir, "model.safetensors"), model_path, c, (lc, adapters) if merge_lora else None)
    if peft_out:
        write_peft(peft_out, c, lc, adapters, out_dir)
        print(f"wrote {peft_out}: PEFT LoRA adapter (r {lc.rank}, alpha {lc.alpha:g}, {', '.join(lc.targets)})")
    if merge_lora:
        print(f"merged {lora_path} (r {lc.rank}, alpha {lc.alpha:g}, {', '.join(lc.targets)}) into the weights")
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    print(f"wrote {out_dir}: config.json ({cfg['model_type']}), model.safetensors "
          f"({mb.param_total(c):,} bf16 parameters)" + (f", {', '.join(copied)}" if copied else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert Hugging Face checkpoints to model.bin and back.")
    ap.add_argument("src", help="HF checkpoint dir (or model.bin with --to-hf)")
    ap.add_argument("dst", help="model.bin path or output dir (or HF output dir with --to-hf)")
    ap.add_argument("--to-hf", action="store_true", help="convert model.bin to a HF checkpoint dir")
    ap.add_argument("--tokenizer-from", default=None, help="with --to-hf: copy tokenizer files from this HF dir")
    ap.add_argument("--lora", default=None, help="with --to-hf: LoRA adapters (lora.bin) of this base model")
    ap.add_argument("--merge-lora", action="store_true", help="with --lora: merge the adapters into the HF weights")
    ap.add_argument("--peft-out", default=None, help="with --lora: write the adapters as a PEFT adapter directory")
    args = ap.parse_args(argv)
    try:
        if (args.merge_lora or args.peft_out) and not args.lora:
            fail("--merge-lora and --peft-out need the adapters: --lora lora.bin")
        if args.lora and not (args.merge_lora or args.peft_out):
            fail("--lora: say what to do with the adapters: --merge-lora or --peft-out DIR")
        if args.merge_lora and args.peft_out:
            fail("--peft-out writes adapters for the unmerged base: drop --merge-lora (or write the two separately)")
        if args.to_hf:
            modelbin_to_hf(args.src, args.dst, args.tokenizer_from, args.lora, args.merge_lora, args.peft_out)
        else:
            if args.tokenizer_from or args.lora:
                fail("--tokenizer-from and --lora only apply with --to-hf")
            hf_to_modelbin(args.src, args.dst)
    except FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
