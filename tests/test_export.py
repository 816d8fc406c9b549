"""Tests of scripts/export_hf.py and scripts/modelbin.py (python3 + numpy + pytest; no torch).

Run: python3 -m pytest -q tests/test_export.py
"""
import contextlib
import glob
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export_hf  # noqa: E402
import modelbin as mb  # noqa: E402

EXPORTER = os.path.join(ROOT, "scripts", "export_hf.py")
REF_MODELS = sorted(glob.glob(os.path.join(ROOT, "tests", "ref", "*.model.bin")))
CASES = [os.path.basename(p).replace(".model.bin", "") for p in REF_MODELS]


def run_exporter(*args):
    """Runs export_hf.main() in this process (fast); an uncaught exception fails the test, as a
    traceback would. test_command_line_exit_code runs the real command line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export_hf.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def export_ok(*args):
    r = run_exporter(*args)
    assert r.returncode == 0, r.stderr
    return r


def expect_error(message, *args):
    """The exporter exits 1 with 'error: ...<message>...' and no traceback."""
    r = run_exporter(*args)
    assert r.returncode == 1, f"exit {r.returncode}, stdout {r.stdout!r}, stderr {r.stderr!r}"
    assert r.stderr.startswith("error: "), r.stderr
    assert message in r.stderr, f"expected {message!r} in {r.stderr!r}"
    assert "Traceback" not in r.stderr, r.stderr


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def write_safetensors(path, tensors):
    """Writes {name: (dtype string, shape, raw bytes)} as a safetensors file."""
    header, blobs, at = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
    """{name: (dtype, shape, raw bytes)} of a safetensors file, in file order."""
    out = {}
    for name, (p, dtype, shape, offset, nbytes) in export_hf.read_safetensors_header(path).items():
        with open(p, "rb") as f:
            f.seek(offset)
            out[name] = (dtype, shape, f.read(nbytes))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A HF checkpoint of the committed qwen2 model (has biases and tied embeddings)."""
    d = tmp_path_factory.mktemp("hf") / "qwen2"
    export_ok("--to-hf", os.path.join(ROOT, "tests", "ref", "qwen2.model.bin"), d)
    return d


def copy_hf(src, dst, config_edit=None, tensors_edit=None):
    """Copies a HF dir, optionally editing config.json (a dict function) or the tensors."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if config_edit:
        config_edit(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = read_safetensors(os.path.join(src, "model.safetensors"))
    if tensors_edit:
        tensors_edit(tensors)
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    return dst


# ----------------------------------------------------------------------------------------------
# Round trips

def test_reference_models_exist():
    assert len(REF_MODELS) >= 6, f"expected the committed tiny models in tests/ref, found {CASES}"


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_byte_identical(case, tmp_path):
    src = os.path.join(ROOT, "tests", "ref", f"{case}.model.bin")
    export_ok("--to-hf", src, tmp_path / "hf")
    export_ok(tmp_path / "hf", tmp_path / "back.bin")
    assert read_bytes(tmp_path / "back.bin") == read_bytes(src)


def test_output_directory_gets_model_bin(hf_dir, tmp_path):
    export_ok(hf_dir, tmp_path / "out")
    assert read_bytes(tmp_path / "out" / "model.bin") == read_bytes(os.path.join(ROOT, "tests", "ref", "qwen2.model.bin"))


def test_sharded_checkpoint(hf_dir, tmp_path):
    tensors = read_safetensors(hf_dir / "model.safetensors")
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, members in halves.items():
        write_safetensors(tmp_path / shard, {n: tensors[n] for n in members})
        weight_map.update({n: shard for n in members})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    os.link(hf_dir / "config.json", tmp_path / "config.json")
    export_ok(tmp_path, tmp_path / "model.bin")
    assert read_bytes(tmp_path / "model.bin") == read_bytes(os.path.join(ROOT, "tests", "ref", "qwen2.model.bin"))


def test_sharded_index_naming_a_missing_tensor(hf_dir, tmp_path):
    copy_hf(hf_dir, tmp_path)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"model.ghost.weight": "model.safetensors"}}, f)
    expect_error("'model.ghost.weight' is listed in shard", tmp_path, tmp_path / "m.bin")


def test_f32_input_rounds_to_nearest_even(hf_dir, tmp_path):
    """bf16 bits b with random low bits appended: the exporter must round as an independent
    round-to-nearest-even does (below half an ulp: b; above: b + 1; exactly half: to even)."""
    rng = np.random.default_rng(0)
    expected = {}

    def to_f32(tensors):
        for name, (_, shape, raw) in tensors.items():
            hi = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
            lo = rng.integers(0, 0x10000, size=hi.shape, dtype=np.uint32)
            lo[::7] = 0x8000  # ties
            up = (lo > 0x8000) | ((lo == 0x8000) & (hi & 1 == 1))
            expected[name] = (hi + up).astype(np.uint16)
            tensors[name] = ("F32", shape, ((hi << 16) | lo).astype("<u4").tobytes())

    copy_hf(hf_dir, tmp_path / "f32", tensors_edit=to_f32)
    export_ok(tmp_path / "f32", tmp_path / "m.bin")
    c, tensors = mb.read_model(str(tmp_path / "m.bin"))
    names = export_hf.hf_names(c)
    assert sorted(names.values()) == sorted(expected)
    for ours, hf in names.items():
        assert np.array_equal(tensors[ours].reshape(-1), expected[hf]), ours
    assert any(not np.array_equal(expected[hf], np.frombuffer(read_safetensors(hf_dir / "model.safetensors")[hf][2], dtype="<u2"))
               for hf in expected), "the test data never rounds up"


def test_hf_name_mapping():
    """Gemma-2's post_attention_layernorm is the post-attention norm and pre_feedforward_layernorm
    the MLP input norm; in Llama/Mistral/Qwen2 post_attention_layernorm is the MLP input norm."""
    gemma = export_hf.hf_config_to_model(base_config("gemma2", head_dim=16, num_key_value_heads=2), "t")
    g = export_hf.hf_names(gemma)
    assert g["layers.1.post_attn_norm"] == "model.layers.1.post_attention_layernorm.weight"
    assert g["layers.1.mlp_norm"] == "model.layers.1.pre_feedforward_layernorm.weight"
    assert g["layers.1.post_mlp_norm"] == "model.layers.1.post_feedforward_layernorm.weight"
    assert "lm_head" not in g and g["embed"] == "model.embed_tokens.weight"
    q = export_hf.hf_names(export_hf.hf_config_to_model(base_config("qwen2", num_key_value_heads=2), "t"))
    assert q["layers.0.mlp_norm"] == "model.layers.0.post_attention_layernorm.weight"
    assert q["layers.0.bk"] == "model.layers.0.self_attn.k_proj.bias" and q["lm_head"] == "lm_head.weight"
    assert list(q)[:6] == ["embed", "layers.0.attn_norm", "layers.0.wq", "layers.0.wk", "layers.0.wv", "layers.0.bq"]


def test_f16_input_converts_exactly(hf_dir, tmp_path):
    """Norm weights (near 1) are exact in float16; converting them back gives the same bf16 bits."""
    def norms_to_f16(tensors):
        for name, (_, shape, raw) in tensors.items():
            if name.endswith("norm.weight"):
                x = mb.bf16_bits_to_f32(np.frombuffer(raw, dtype="<u2"))
                tensors[name] = ("F16", shape, x.astype("<f2").tobytes())

    copy_hf(hf_dir, tmp_path / "f16", tensors_edit=norms_to_f16)
    export_ok(tmp_path / "f16", tmp_path / "m.bin")
    assert read_bytes(tmp_path / "m.bin") == read_bytes(os.path.join(ROOT, "tests", "ref", "qwen2.model.bin"))


def test_bf16_rounding_ties_nan_and_overflow():
    def ref_round(x):
        u = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return (u >> 16) | 0x40
        hi, lo = u >> 16, u & 0xFFFF
        return (hi + (lo > 0x8000 or (lo == 0x8000 and hi & 1))) & 0xFFFF

    specials = np.array([1.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8), 3.0e38,
                         np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45], dtype=np.float32)
    randoms = np.random.default_rng(1).standard_normal(2000).astype(np.float32)
    for x in np.concatenate([specials, randoms]):
        assert int(mb.f32_to_bf16_bits(np.array([x]))[0]) == ref_round(x), x
    assert mb.f32_to_bf16_bits(np.array([1.0 + 2.0 ** -8], dtype=np.float32))[0] == 0x3F80  # tie to even
    assert mb.f32_to_bf16_bits(np.array([1.0 + 3 * 2.0 ** -8], dtype=np.float32))[0] == 0x3F82


# ----------------------------------------------------------------------------------------------
# Config mapping (in process)

def base_config(model_type, **extra):
    cfg = {"model_type": model_type, "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 4, "num_attention_heads": 4}
    cfg.update(extra)
    return cfg


def test_family_defaults():
    llama = export_hf.hf_config_to_model(base_config("llama"), "t")
    assert (llama.tied_embeddings, llama.n_kv_heads, llama.head_dim, llama.sliding_window) == (0, 4, 8, 0)
    assert llama.query_scale == mb.f32(8 ** -0.5) and llama.rope_theta == 10000.0 and llama.embed_scale == 1.0
    mistral = export_hf.hf_config_to_model(base_config("mistral", num_key_value_heads=2), "t")
    assert (mistral.tied_embeddings, mistral.sliding_window, mistral.sliding_period) == (0, 4096, 1)
    assert export_hf.hf_config_to_model(base_config("mistral", sliding_window=None, num_key_value_heads=2), "t").sliding_window == 0
    with pytest.raises(mb.FormatError, match="n_kv_heads 8 must be in"):  # Mistral's default is 8 kv heads
        export_hf.hf_config_to_model(base_config("mistral"), "t")
    qwen = export_hf.hf_config_to_model(base_config("qwen2", num_key_value_heads=2), "t")
    assert (qwen.qkv_bias, qwen.tied_embeddings) == (1, 0)
    gemma = export_hf.hf_config_to_model(base_config("gemma2", head_dim=16, num_key_value_heads=2), "t")
    assert (gemma.tied_embeddings, gemma.norm_offset, gemma.post_norms, gemma.activation) == (1, 1, 1, mb.ACT_GELU_TANH)
    assert (gemma.sliding_window, gemma.sliding_period) == (4096, 2)
    assert (gemma.attn_softcap, gemma.final_softcap) == (50.0, 30.0)
    assert gemma.query_scale == mb.f32(256 ** -0.5) and gemma.embed_scale == mb.f32(32 ** 0.5)


def test_rope_forms():
    legacy = base_config("llama", rope_theta=500000.0, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    v5 = base_config("llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    a, b = (export_hf.hf_config_to_model(c, "t") for c in (legacy, v5))
    assert a == b and a.rope_scaling == mb.ROPE_SCALING_LLAMA3 and a.rope_theta == 500000.0
    assert a.rope_orig_max_pos == 8192 and a.rope_high_freq_factor == 4.0


def test_gemma2_layer_types():
    every_third = ["sliding_attention" if l % 3 == 0 else "full_attention" for l in range(4)]
    c = export_hf.hf_config_to_model(base_config("gemma2", head_dim=16, layer_types=every_third), "t")
    assert (c.sliding_period, [c.layer_is_sliding(l) for l in range(4)]) == (3, [True, False, False, True])
    full = export_hf.hf_config_to_model(base_config("gemma2", head_dim=16, layer_types=["full_attention"] * 4), "t")
    assert full.sliding_window == 0
    odd = ["full_attention", "sliding_attention"] * 2
    with pytest.raises(mb.FormatError, match="not 'every layer l with l % p == 0'"):
        export_hf.hf_config_to_model(base_config("gemma2", head_dim=16, layer_types=odd), "t")


@pytest.mark.parametrize("model_type,extra,message", [
    ("llama", {"attention_bias": True}, "attention_bias=true is not supported"),
    ("llama", {"mlp_bias": True}, "mlp_bias=true is not supported"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'"),
    ("llama", {"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ("llama", {"num_key_value_heads": 3}, "n_kv_heads 3 must be in"),
    ("llama", {"vocab_size": "big"}, "'vocab_size' must be an integer"),
    ("gpt2", {}, "unsupported model_type 'gpt2'"),
    ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 0}, "query_pre_attn_scalar 0 must be positive"),
    ("gemma2", {"head_dim": None}, "gemma2 needs head_dim"),
])
def test_unsupported_configs(model_type, extra, message):
    with pytest.raises(mb.FormatError) as e:
        export_hf.hf_config_to_model(base_config(model_type, **extra), "t")
    assert message in str(e.value)


# ----------------------------------------------------------------------------------------------
# Bad inputs through the command line: exit 1, one clear line, no traceback

def tokenizer_model_dir(tmp_path, vocab_size):
    """A HF dir of a tiny random llama with the byte-level test tokenizer (657 ids)."""
    c = export_hf.hf_config_to_model(base_config("llama", vocab_size=vocab_size, num_hidden_layers=1), "t")
    rng = np.random.default_rng(2)
    mb.write_model(str(tmp_path / "m.bin"), c, {p.name: rng.standard_normal(p.numel) for p in mb.param_layout(c)})
    export_ok("--to-hf", tmp_path / "m.bin", tmp_path / "hf", "--tokenizer-from",
              os.path.join(ROOT, "tests", "tokenizer", "bytelevel"))
    return tmp_path / "hf"


def test_tokenizer_bin_written_next_to_model(tmp_path):
    hf = tokenizer_model_dir(tmp_path, 700)
    assert os.path.exists(hf / "tokenizer.json")
    export_ok(hf, tmp_path / "out")
    assert read_bytes(tmp_path / "out" / "model.bin") == read_bytes(tmp_path / "m.bin")
    import tokenizer_export
    tokenizer_export.export_tokenizer(str(hf / "tokenizer.json"), None, str(tmp_path / "direct.bin"), 700)
    assert read_bytes(tmp_path / "out" / "tokenizer.bin") == read_bytes(tmp_path / "direct.bin")


def test_tokenizer_larger_than_model_vocab(tmp_path):
    hf = tokenizer_model_dir(tmp_path, 300)
    expect_error("but the model's vocab_size is 300", hf, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "model.bin") and not os.path.exists(tmp_path / "out" / "tokenizer.bin")


def test_missing_config_json(hf_dir, tmp_path):
    copy_hf(hf_dir, tmp_path)
    os.remove(tmp_path / "config.json")
    expect_error("config.json: not found", tmp_path, tmp_path / "m.bin")


def test_unknown_model_type(hf_dir, tmp_path):
    copy_hf(hf_dir, tmp_path, config_edit=lambda c: c.update(model_type="falcon"))
    expect_error("unsupported model_type 'falcon'", tmp_path, tmp_path / "m.bin")


def test_missing_tensor(hf_dir, tmp_path):
    copy_hf(hf_dir, tmp_path, tensors_edit=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error("'model.layers.1.mlp.up_proj.weight' (our 'layers.1.w_up') is missing", tmp_path, tmp_path / "m.bin")
    assert not os.path.exists(tmp_path / "m.bin") and not os.path.exists(tmp_path / "m.bin.tmp")


def test_wrong_tensor_shape(hf_dir, tmp_path):
    def transpose_wk(t):
        dtype, shape, raw = t["model.layers.0.self_attn.k_proj.weight"]
        t["model.layers.0.self_attn.k_proj.weight"] = (dtype, shape[::-1], raw)
    copy_hf(hf_dir, tmp_path, tensors_edit=transpose_wk)
    expect_error("'model.layers.0.self_attn.k_proj.weight' has shape [32, 16], the config implies [16, 32]",
                 tmp_path, tmp_path / "m.bin")


def test_unexpected_tensor(hf_dir, tmp_path):
    def add_bias(t):
        t["model.layers.0.mlp.down_proj.bias"] = ("BF16", [32], bytes(64))
    copy_hf(hf_dir, tmp_path, tensors_edit=add_bias)
    expect_error("unexpected tensors for this qwen2 config: model.layers.0.mlp.down_proj.bias", tmp_path, tmp_path / "m.bin")


def test_unsupported_dtype(hf_dir, tmp_path):
    def to_int(t):
        dtype, shape, raw = t["model.norm.weight"]
        t["model.norm.weight"] = ("I16", shape, raw)
    copy_hf(hf_dir, tmp_path, tensors_edit=to_int)
    expect_error("'model.norm.weight' has unsupported dtype I16", tmp_path, tmp_path / "m.bin")


@pytest.mark.parametrize("cut", [4, 100, 5000])
def test_truncated_safetensors(hf_dir, tmp_path, cut):
    copy_hf(hf_dir, tmp_path)
    raw = read_bytes(tmp_path / "model.safetensors")
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(raw[:cut] if cut < 100 else raw[:-cut])
    expect_error("truncated", tmp_path, tmp_path / "m.bin")


def test_corrupt_safetensors_header(hf_dir, tmp_path):
    copy_hf(hf_dir, tmp_path)
    raw = bytearray(read_bytes(tmp_path / "model.safetensors"))
    raw[8] = ord("!")
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(raw)
    expect_error("corrupt safetensors header", tmp_path, tmp_path / "m.bin")


def test_no_safetensors(hf_dir, tmp_path):
    copy_hf(hf_dir, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    expect_error("no *.safetensors files", tmp_path, tmp_path / "m.bin")


def corrupt_model(tmp_path, edit):
    raw = bytearray(read_bytes(os.path.join(ROOT, "tests", "ref", "llama2_mha.model.bin")))
    raw = edit(raw)
    path = tmp_path / "bad.bin"
    with open(path, "wb") as f:
        f.write(raw)
    return path


def set_slot(slot, value):
    def edit(raw):
        raw[4 * slot:4 * slot + 4] = struct.pack("<i", value)
        return raw
    return edit


@pytest.mark.parametrize("edit,message", [
    (set_slot(0, 0x12345678), "bad magic 0x12345678"),
    (set_slot(1, 7), "unsupported model.bin version 7"),
    (lambda raw: raw[:-2], "truncated"),
    (lambda raw: raw[:100], "smaller than the 1024-byte header"),
    (lambda raw: raw + b"\0\0", "trailing bytes"),
    (set_slot(7, 3), "n_kv_heads 3 must be in"),
])
def test_bad_model_bin_for_to_hf(tmp_path, edit, message):
    expect_error(message, "--to-hf", corrupt_model(tmp_path, edit), tmp_path / "hf")


def test_model_bin_not_expressible_in_hf(tmp_path):
    """A llama header with Gemma's embedding scale has no HF equivalent: refused, not silently lost."""
    def edit(raw):
        raw[4 * 40:4 * 40 + 4] = struct.pack("<f", 2.0)
        return raw
    expect_error("embed_scale = 2.0 (a llama config gives 1.0)", "--to-hf", corrupt_model(tmp_path, edit), tmp_path / "hf")


def test_command_line_exit_code(tmp_path):
    """The real command line: exit status 1 and one error line, no traceback."""
    r = subprocess.run([sys.executable, EXPORTER, "--to-hf", str(corrupt_model(tmp_path, set_slot(1, 9))),
                        str(tmp_path / "hf")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "unsupported model.bin version 9" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_model_bin(tmp_path):
    expect_error("cannot read", "--to-hf", tmp_path / "nope.bin", tmp_path / "hf")


# ----------------------------------------------------------------------------------------------
# Tensor bundles

def test_bundle_round_trip_and_truncation(tmp_path):
    tensors = {"tokens": np.arange(6, dtype=np.int32).reshape(2, 3),
               "loss": np.array([1.5], dtype=np.float32), "x": np.ones((2, 1, 3, 2), dtype=np.float32)}
    mb.write_bundle(str(tmp_path / "b.bin"), tensors)
    back = mb.read_bundle(str(tmp_path / "b.bin"))
    assert list(back) == list(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and np.array_equal(back[k], tensors[k])
    raw = read_bytes(tmp_path / "b.bin")
    with open(tmp_path / "t.bin", "wb") as f:
        f.write(raw[:-1])
    with pytest.raises(mb.FormatError, match="truncated while reading 'x' data"):
        mb.read_bundle(str(tmp_path / "t.bin"))


@pytest.mark.parametrize("case", CASES)
def test_reference_bundle_matches_its_model(case):
    """Every reference has tokens, targets, logits, loss, and a grad/param for each layout tensor."""
    c = mb.read_model_config(os.path.join(ROOT, "tests", "ref", f"{case}.model.bin"))
    ref = mb.read_bundle(os.path.join(ROOT, "tests", "ref", f"{case}.ref.bin"))
    B, S = ref["tokens"].shape
    assert ref["tokens"].dtype == np.int32 and ref["targets"].shape == (B, S)
    assert ref["logits"].shape == (B, S, c.vocab_size) and ref["loss"].shape == (1,)
    assert ((ref["targets"] >= -1) & (ref["targets"] < c.vocab_size)).all() and (ref["targets"] == -1).any()
    assert ref["adamw.loss"].shape == (3,) and ref["adamw.hparams"].shape == (5,)
    assert ref["adamw.loss"][0] == ref["loss"][0]
    for p in mb.param_layout(c):
        assert ref[f"grad.{p.name}"].shape == (p.rows, p.cols)
        assert ref[f"adamw.param.{p.name}"].shape == (p.rows, p.cols)


# ----------------------------------------------------------------------------------------------
# LoRA adapters (lora.bin): --merge-lora and --peft-out

LORA_CASES = ["llama3_gqa", "qwen2", "gemma2"]


def ref_path(name):
    return os.path.join(ROOT, "tests", "ref", name)


@pytest.mark.parametrize("case", LORA_CASES)
def test_merge_lora(case, tmp_path):
    """Adapted projections hold bf16(W + (alpha / r) B A) (float64 sum, one rounding); every other
    tensor is byte-identical to the plain export."""
    model, lora = ref_path(f"{case}.model.bin"), ref_path(f"{case}.lora.bin")
    export_ok("--to-hf", model, tmp_path / "plain")
    export_ok("--to-hf", model, tmp_path / "merged", "--lora", lora, "--merge-lora")
    plain = read_safetensors(tmp_path / "plain" / "model.safetensors")
    merged = read_safetensors(tmp_path / "merged" / "model.safetensors")
    lc, c, adapters = mb.read_lora(lora)
    assert list(plain) == list(merged)
    modules = {f"{mb.LORA_HF_MODULE[t]}.weight": t for t in lc.targets}
    changed = 0
    for name, (dtype, shape, raw) in plain.items():
        parts = name.split(".")
        target = modules.get(".".join(parts[3:])) if name.startswith("model.layers.") else None
        if target is None:
            assert merged[name] == plain[name], name
            continue
        l = parts[2]
        w = mb.bf16_bits_to_f32(np.frombuffer(raw, dtype="<u2")).reshape(shape).astype(np.float64)
        a, b = adapters[f"layers.{l}.{target}.lora_A"], adapters[f"layers.{l}.{target}.lora_B"]
        want = mb.f32_to_bf16_bits((w + lc.alpha / lc.rank * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32))
        got = np.frombuffer(merged[name][2], dtype="<u2").reshape(shape)
        assert np.array_equal(got, want), name
        changed += int(not np.array_equal(got, np.frombuffer(raw, dtype="<u2").reshape(shape)))
    assert changed == c.n_layers * len(lc.targets)


@pytest.mark.parametrize("case", LORA_CASES)
def test_peft_out(case, tmp_path):
    """The PEFT directory: adapter_config.json (r, alpha, target modules) and every A, B in fp32
    under PEFT's names, equal to lora.bin's values; the HF dir holds the unmerged base."""
    model, lora = ref_path(f"{case}.model.bin"), ref_path(f"{case}.lora.bin")
    export_ok("--to-hf", model, tmp_path / "plain")
    export_ok("--to-hf", model, tmp_path / "base", "--lora", lora, "--peft-out", tmp_path / "peft")
    assert read_bytes(tmp_path / "plain" / "model.safetensors") == read_bytes(tmp_path / "base" / "model.safetensors")
    lc, c, adapters = mb.read_lora(lora)
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == lc.rank and cfg["lora_alpha"] == lc.alpha
    assert sorted(cfg["target_modules"]) == sorted(mb.LORA_HF_MODULE[t].split(".")[1] for t in lc.targets)
    assert cfg["base_model_name_or_path"] == os.path.abspath(tmp_path / "base")
    tensors = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert len(tensors) == len(adapters)
    for name, value in adapters.items():
        _, l, t, ab = name.split(".")
        dtype, shape, raw = tensors[f"base_model.model.model.layers.{l}.{mb.LORA_HF_MODULE[t]}.{ab}.weight"]
        assert dtype == "F32" and list(shape) == list(value.shape)
        assert np.array_equal(np.frombuffer(raw, dtype="<f4").reshape(shape), value)


def test_lora_bin_round_trip_and_errors(tmp_path):
    lc, c, adapters = mb.read_lora(ref_path("qwen2.lora.bin"))
    path = str(tmp_path / "copy.lora.bin")
    mb.write_lora(path, c, lc, adapters)
    assert read_bytes(path) == read_bytes(ref_path("qwen2.lora.bin"))
    data = read_bytes(path)
    with open(path, "wb") as f:
        f.write(data[:-4])
    with pytest.raises(mb.FormatError, match="disagrees"):
        mb.read_lora(path)
    with open(path, "wb") as f:
        f.write(b"XXXX" + data[4:])
    with pytest.raises(mb.FormatError, match="bad magic"):
        mb.read_lora(path)


def test_lora_export_errors(tmp_path):
    model, lora = ref_path("qwen2.model.bin"), ref_path("qwen2.lora.bin")
    expect_error("belong to another base model", "--to-hf", ref_path("gemma2.model.bin"), tmp_path / "x", "--lora", lora,
                 "--merge-lora")
    expect_error("need the adapters: --lora", "--to-hf", model, tmp_path / "x", "--merge-lora")
    expect_error("say what to do with the adapters", "--to-hf", model, tmp_path / "x", "--lora", lora)
    expect_error("drop --merge-lora", "--to-hf", model, tmp_path / "x", "--lora", lora, "--merge-lora", "--peft-out",
                 tmp_path / "p")
    expect_error("only apply with --to-hf", "hf_dir", tmp_path / "x.bin", "--lora", lora, "--merge-lora")
