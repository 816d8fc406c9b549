"""Python mirror of model_config.h (model.bin) and tensor_file.h (tensor bundles).

model.bin: MODEL_HEADER_INTS little-endian int32 slots (float fields hold float32 bits), then every
parameter as bf16, row-major, in the order of param_layout() (the same order and names as
param_layout_visit() in model_config.h). Tensor bundle: see tensor_file.h.

Every reader validates what it reads and raises FormatError with a message that names the file;
command-line scripts turn that into "error: ..." and exit code 1.
Needs numpy only.
"""
import math
import os
import struct
from dataclasses import dataclass, fields

import numpy as np

MODEL_MAGIC = 0x4D53544D  # bytes 'M','T','S','M'
MODEL_VERSION = 1
MODEL_HEADER_INTS = 256
MODEL_HEADER_BYTES = MODEL_HEADER_INTS * 4

FAMILY_LLAMA, FAMILY_MISTRAL, FAMILY_QWEN2, FAMILY_GEMMA2 = 0, 1, 2, 3
FAMILY_NAMES = ("llama", "mistral", "qwen2", "gemma2")
ACT_SILU, ACT_GELU_TANH = 0, 1
ROPE_SCALING_NONE, ROPE_SCALING_LLAMA3 = 0, 1

# (ModelConfig field, header slot, kind) in slot order; kind "i" = int32, "f" = float32 bits.
HEADER_FIELDS = (
    ("family", 2, "i"), ("vocab_size", 3, "i"), ("d_model", 4, "i"), ("n_layers", 5, "i"),
    ("n_heads", 6, "i"), ("n_kv_heads", 7, "i"), ("head_dim", 8, "i"), ("d_ff", 9, "i"),
    ("max_pos", 10, "i"), ("tied_embeddings", 11, "i"), ("qkv_bias", 12, "i"),
    ("norm_offset", 13, "i"), ("post_norms", 14, "i"), ("activation", 15, "i"),
    ("sliding_window", 16, "i"), ("sliding_period", 17, "i"), ("rope_scaling", 18, "i"),
    ("rope_orig_max_pos", 19, "i"),
    ("norm_eps", 32, "f"), ("rope_theta", 33, "f"), ("rope_factor", 34, "f"),
    ("rope_low_freq_factor", 35, "f"), ("rope_high_freq_factor", 36, "f"),
    ("attn_softcap", 37, "f"), ("final_softcap", 38, "f"), ("query_scale", 39, "f"),
    ("embed_scale", 40, "f"),
)

# Per-layer tensors in file order (model_config.h LayerTensor).
LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "post_attn_norm",
                 "mlp_norm", "w_gate", "w_up", "w_down", "post_mlp_norm")


class FormatError(Exception):
    """A file or a config that cannot be read or expressed; the message is for the user."""


@dataclass
class ModelConfig:
    """Mirror of ModelConfig in model_config.h. Float fields hold float32-representable values."""
    family: int = 0
    vocab_size: int = 0
    d_model: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    d_ff: int = 0
    max_pos: int = 0
    tied_embeddings: int = 0
    qkv_bias: int = 0
    norm_offset: int = 0
    post_norms: int = 0
    activation: int = 0
    sliding_window: int = 0
    sliding_period: int = 1
    rope_scaling: int = 0
    rope_orig_max_pos: int = 0
    norm_eps: float = 0.0
    rope_theta: float = 0.0
    rope_factor: float = 0.0
    rope_low_freq_factor: float = 0.0
    rope_high_freq_factor: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    query_scale: float = 0.0
    embed_scale: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            if f.type is float or f.type == "float":
                setattr(self, f.name, f32(getattr(self, f.name)))

    def layer_is_sliding(self, layer):
        return self.sliding_window > 0 and layer % self.sliding_period == 0


def f32(x):
    """The float32 value nearest to x, as a Python float."""
    return float(np.float32(x))


def f32_str(x):
    """Shortest decimal text that reads back as the same float32 (e.g. 1e-06, not 9.99e-07)."""
    return float(str(np.float32(x)))


def config_validate(c):
    """Mirror of config_validate(): returns None when valid, else a message naming the field."""
    if not 0 <= c.family < len(FAMILY_NAMES):
        return f"family {c.family} is not one of 0..{len(FAMILY_NAMES) - 1}"
    if not 2 <= c.vocab_size <= (1 << 24):
        return f"vocab_size {c.vocab_size} out of range [2, 16777216]"
    if not 1 <= c.d_model <= 65536:
        return f"d_model {c.d_model} out of range [1, 65536]"
    if not 1 <= c.n_layers <= 1024:
        return f"n_layers {c.n_layers} out of range [1, 1024]"
    if not 1 <= c.n_heads <= 1024:
        return f"n_heads {c.n_heads} out of range [1, 1024]"
    if not (1 <= c.n_kv_heads <= c.n_heads and c.n_heads % c.n_kv_heads == 0):
        return f"n_kv_heads {c.n_kv_heads} must be in [1, n_heads={c.n_heads}] and divide it"
    if not (2 <= c.head_dim <= 1024 and c.head_dim % 2 == 0):
        return f"head_dim {c.head_dim} must be even and in [2, 1024]"
    if not 1 <= c.d_ff <= (1 << 20):
        return f"d_ff {c.d_ff} out of range [1, 1048576]"
    if c.max_pos < 1:
        return f"max_position_embeddings {c.max_pos} must be positive"
    for name in ("tied_embeddings", "qkv_bias", "norm_offset", "post_norms"):
        if getattr(c, name) not in (0, 1):
            return f"flag {name} = {getattr(c, name)} must be 0 or 1"
    if c.activation not in (ACT_SILU, ACT_GELU_TANH):
        return f"activation {c.activation} is not 0 (silu) or 1 (gelu_tanh)"
    if c.sliding_window < 0:
        return f"sliding_window {c.sliding_window} is negative"
    if not 1 <= c.sliding_period <= c.n_layers + 1:
        return f"sliding_period {c.sliding_period} out of range [1, n_layers+1]"
    if c.rope_scaling not in (ROPE_SCALING_NONE, ROPE_SCALING_LLAMA3):
        return f"rope_scaling {c.rope_scaling} is not 0 (none) or 1 (llama3)"
    if not 0.0 < c.norm_eps < 1.0:
        return f"norm_eps {c.norm_eps:g} out of range (0, 1)"
    if not (c.rope_theta > 1.0 and math.isfinite(c.rope_theta)):
        return f"rope_theta {c.rope_theta:g} must be finite and > 1"
    if c.rope_scaling == ROPE_SCALING_LLAMA3 and not (
            c.rope_factor >= 1.0 and c.rope_low_freq_factor > 0.0
            and c.rope_high_freq_factor > c.rope_low_freq_factor and c.rope_orig_max_pos >= 1):
        return ("llama3 rope scaling needs factor >= 1, 0 < low_freq_factor < high_freq_factor, "
                f"original_max_position_embeddings >= 1 (got {c.rope_factor:g}, {c.rope_low_freq_factor:g}, "
                f"{c.rope_high_freq_factor:g}, {c.rope_orig_max_pos})")
    if not (c.attn_softcap >= 0.0 and math.isfinite(c.attn_softcap)):
        return f"attention soft-cap {c.attn_softcap:g} must be >= 0"
    if not (c.final_softcap >= 0.0 and math.isfinite(c.final_softcap)):
        return f"final logit soft-cap {c.final_softcap:g} must be >= 0"
    if not (c.query_scale > 0.0 and math.isfinite(c.query_scale)):
        return f"query_scale {c.query_scale:g} must be > 0"
    if not (c.embed_scale > 0.0 and math.isfinite(c.embed_scale)):
        return f"embed_scale {c.embed_scale:g} must be > 0"
    return None


def config_to_header(c):
    """The MODEL_HEADER_BYTES header of a config, as bytes."""
    h = np.zeros(MODEL_HEADER_INTS, dtype="<i4")
    h[0] = np.uint32(MODEL_MAGIC).astype("<i4")
    h[1] = MODEL_VERSION
    for name, slot, kind in HEADER_FIELDS:
        value = getattr(c, name)
        h[slot] = np.array([value], dtype="<f4").view("<i4")[0] if kind == "f" else value
    return h.tobytes()


def config_from_header(data, what):
    """Parses and validates a header (bytes of at least MODEL_HEADER_BYTES)."""
    h = np.frombuffer(data[:MODEL_HEADER_BYTES], dtype="<i4")
    magic = int(h[0].astype("<u4"))
    if magic != MODEL_MAGIC:
        raise FormatError(f"{what}: bad magic 0x{magic:08x} (expected 0x{MODEL_MAGIC:08x}): not a model.bin file")
    if int(h[1]) != MODEL_VERSION:
        raise FormatError(f"{what}: unsupported model.bin version {int(h[1])} (this script reads version {MODEL_VERSION})")
    values = {}
    for name, slot, kind in HEADER_FIELDS:
        values[name] = float(h[slot:slot + 1].view("<f4")[0]) if kind == "f" else int(h[slot])
    c = ModelConfig(**values)
    err = config_validate(c)
    if err:
        raise FormatError(f"{what}: {err}")
    return c


@dataclass
class ParamInfo:
    name: str     # "embed", "layers.<l>.<tensor>", "final_norm", "lm_head"
    offset: int   # element offset in the flat parameter array
    rows: int
    cols: int

    @property
    def numel(self):
        return self.rows * self.cols


def layer_tensor_present(c, t):
    if t in ("bq", "bk", "bv"):
        return bool(c.qkv_bias)
    if t in ("post_attn_norm", "post_mlp_norm"):
        return bool(c.post_norms)
    return True


def layer_tensor_shape(c, t):
    d, q, kv, f = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.d_ff
    return {"attn_norm": (1, d), "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "bq": (1, q),
            "bk": (1, kv), "bv": (1, kv), "wo": (d, q), "post_attn_norm": (1, d), "mlp_norm": (1, d),
            "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f), "post_mlp_norm": (1, d)}[t]


def param_layout(c):
    """Every parameter tensor in file order (param_layout_visit() in model_config.h)."""
    out, at = [], 0

    def add(name, rows, cols):
        nonlocal at
        out.append(ParamInfo(name, at, rows, cols))
        at += rows * cols

    add("embed", c.vocab_size, c.d_model)
    for l in range(c.n_layers):
        for t in LAYER_TENSORS:
            if layer_tensor_present(c, t):
                add(f"layers.{l}.{t}", *layer_tensor_shape(c, t))
    add("final_norm", 1, c.d_model)
    if not c.tied_embeddings:
        add("lm_head", c.vocab_size, c.d_model)
    return out


def param_total(c):
    return sum(p.numel for p in param_layout(c))


def model_file_size(c):
    return MODEL_HEADER_BYTES + 2 * param_total(c)


def read_model_config(path):
    """Reads and validates the header of a model.bin and checks the file size against it."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(MODEL_HEADER_BYTES)
    except OSError as e:
        raise FormatError(f"cannot read '{path}': {e.strerror}") from None
    if size < MODEL_HEADER_BYTES:
        raise FormatError(f"{path}: truncated: {size} bytes, smaller than the {MODEL_HEADER_BYTES}-byte header")
    c = config_from_header(head, path)
    expected = model_file_size(c)
    if size != expected:
        raise FormatError(
            f"{path}: size {size} bytes disagrees with its header: {FAMILY_NAMES[c.family]} config with "
            f"{param_total(c)} parameters needs {expected} bytes ({'truncated' if size < expected else 'trailing bytes'})")
    return c


def iter_model_tensors(path, c):
    """Yields (ParamInfo, uint16 array (rows, cols) of bf16 bits) one tensor at a time."""
    with open(path, "rb") as f:
        f.seek(MODEL_HEADER_BYTES)
        for p in param_layout(c):
            data = f.read(2 * p.numel)
            if len(data) != 2 * p.numel:
                raise FormatError(f"{path}: truncated inside tensor '{p.name}'")
            yield p, np.frombuffer(data, dtype="<u2").reshape(p.rows, p.cols)


def read_model(path):
    """Reads a whole (small) model.bin: (config, {name: uint16 bf16 bits (rows, cols)})."""
    c = read_model_config(path)
    return c, {p.name: t for p, t in iter_model_tensors(path, c)}


class ModelWriter:
    """Writes a model.bin tensor by tensor, in layout order, through a temporary file and a rename."""

    def __init__(self, path, c):
        err = config_validate(c)
        if err:
            raise FormatError(f"{path}: refusing to write an invalid config: {err}")
        self.path, self.tmp, self.layout, self.next = path, path + ".tmp", param_layout(c), 0
        self.f = open(self.tmp, "wb")
        self.f.write(config_to_header(c))

    def expect(self):
        """The ParamInfo of the next tensor to write."""
        return self.layout[self.next]

    def write(self, bits):
        """Appends bf16 bits (uint16, any shape with the next tensor's element count), or a chunk of them."""
        self.f.write(np.ascontiguousarray(bits, dtype="<u2").tobytes())

    def end_tensor(self):
        self.next += 1

    def close(self):
        written = self.f.tell()
        self.f.close()
        expected = MODEL_HEADER_BYTES + 2 * sum(p.numel for p in self.layout)
        if self.next != len(self.layout) or written != expected:
            os.remove(self.tmp)
            raise FormatError(f"{self.path}: internal error: wrote {written} bytes, expected {expected}")
        os.replace(self.tmp, self.path)

    def abort(self):
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_model(path, c, tensors):
    """Writes a model.bin from {name: array of bf16 bits or floats} (floats are rounded to bf16)."""
    w = ModelWriter(path, c)
    try:
        for p in w.layout:
            t = np.asarray(tensors[p.name])
            if t.size != p.numel:
                raise FormatError(f"{path}: tensor '{p.name}' has {t.size} elements, layout needs {p.numel}")
            w.write(t if t.dtype == np.uint16 else f32_to_bf16_bits(t))
            w.end_tensor()
    except BaseException:
        w.abort()
        raise
    w.close()


# ----------------------------------------------------------------------------------------------
# bf16 <-> float32 bits (same rounding as float_to_bf16_bits() in utils.h)

def f32_to_bf16_bits(x):
    """float array -> uint16 bf16 bits, round to nearest even; NaN stays NaN (quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def f16_to_bf16_bits(x):
    """float16 array -> bf16 bits (exactly through float32, then rounded)."""
    return f32_to_bf16_bits(np.asarray(x, dtype=np.float16).astype(np.float32))


def bf16_bits_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# ----------------------------------------------------------------------------------------------
# Tensor bundles (tensor_file.h)

TENSOR_FILE_MAGIC = 0x4E53544D  # bytes 'M','T','S','N'
TENSOR_FILE_VERSION = 1
TENSOR_MAX_DIMS = 4
_BUNDLE_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<i4")}


def write_atomically(path, data):
    """Writes bytes to path through a temporary file and a rename."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_whole(path):
    """The bytes of a (small) file; FormatError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FormatError(f"cannot read '{path}': {e.strerror}") from None


def write_bundle(path, tensors):
    """Writes {name: array} (float arrays as float32, integer arrays as int32), in dict order."""
    parts = [struct.pack("<III", TENSOR_FILE_MAGIC, TENSOR_FILE_VERSION, len(tensors))]
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.integer):
            code, data = 1, arr.astype("<i4")
        elif np.issubdtype(arr.dtype, np.floating):
            code, data = 0, arr.astype("<f4")
        else:
            raise FormatError(f"{path}: tensor '{name}' has unsupported dtype {arr.dtype}")
        raw = name.encode()
        if not 0 < len(raw) < 128 or arr.ndim > TENSOR_MAX_DIMS:
            raise FormatError(f"{path}: tensor '{name}': bad name length or more than {TENSOR_MAX_DIMS} dims")
        parts.append(struct.pack("<I", len(raw)) + raw + struct.pack("<II", code, arr.ndim))
        parts.append(struct.pack(f"<{arr.ndim}I", *arr.shape) + data.tobytes())
    write_atomically(path, b"".join(parts))


def read_bundle(path):
    """Reads a bundle into {name: array}; raises FormatError on a malformed or truncated file."""
    data = read_whole(path)
    pos = 0

    def take(n, what):
        nonlocal pos
        if pos + n > len(data):
            raise FormatError(f"{path}: truncated while reading {what}")
        pos += n
        return data[pos - n:pos]

    def u32(what):
        return struct.unpack("<I", take(4, what))[0]

    if u32("magic") != TENSOR_FILE_MAGIC:
        raise FormatError(f"{path}: bad magic: not a tensor bundle")
    version = u32("version")
    if version != TENSOR_FILE_VERSION:
        raise FormatError(f"{path}: unsupported tensor bundle version {version}")
    count = u32("count")
    out = {}
    for i in range(count):
        n = u32(f"tensor {i} name length")
        if not 0 < n < 128:
            raise FormatError(f"{path}: tensor {i} has a bad name length {n}")
        name = take(n, f"tensor {i} name").decode()
        code, ndim = u32(f"'{name}' dtype"), u32(f"'{name}' ndim")
        if code not in _BUNDLE_DTYPES:
            raise FormatError(f"{path}: tensor '{name}' has unknown dtype {code}")
        if ndim > TENSOR_MAX_DIMS:
            raise FormatError(f"{path}: tensor '{name}' has {ndim} dims (max {TENSOR_MAX_DIMS})")
        dims = struct.unpack(f"<{ndim}I", take(4 * ndim, f"'{name}' dims"))
        numel = int(np.prod(dims, dtype=np.int64))
        arr = np.frombuffer(take(4 * numel, f"'{name}' data"), dtype=_BUNDLE_DTYPES[code])
        out[name] = arr.reshape(dims)
    if pos != len(data):
        raise FormatError(f"{path}: {len(data) - pos} trailing bytes after the last tensor")
    return out


# ----------------------------------------------------------------------------------------------
# LoRA adapters (lora.h): layout and lora.bin

LORA_MAGIC = 0x4C53544D  # bytes 'M','T','S','L'
LORA_VERSION = 1
LORA_HEADER_INTS = 64
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
LORA_BASE_TENSOR = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
LORA_HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
BASE_QUANT_NAMES = ("none", "int8", "nf4")


@dataclass
class LoraConfig:
    """Mirror of LoraConfig in lora.h; targets: a subset of LORA_TARGETS (any order)."""
    rank: int
    alpha: float
    targets: tuple
    base_quant: int = 0

    @property
    def mask(self):
        return sum(1 << LORA_TARGETS.index(t) for t in self.targets)

    @property
    def scale(self):
        return f32(f32(self.alpha) / self.rank)


def lora_layout(c, lc):
    """Every adapter tensor in file order (lora_layout_visit() in lora.h): ParamInfo with names
    'layers.<l>.<target>.lora_A' (r, in) and '...lora_B' (out, r)."""
    bad = set(lc.targets) - set(LORA_TARGETS)
    if bad or not lc.targets:
        raise FormatError(f"LoRA targets {sorted(bad) or '(none)'} are not a non-empty subset of {LORA_TARGETS}")
    out, at = [], 0
    for l in range(c.n_layers):
        for group in LORA_GROUPS:
            members = [t for t in group if t in lc.targets]
            for is_b in (False, True):
                for t in members:
                    rows, cols = layer_tensor_shape(c, LORA_BASE_TENSOR[t])
                    shape = (rows, lc.rank) if is_b else (lc.rank, cols)
                    out.append(ParamInfo(f"layers.{l}.{t}.lora_{'B' if is_b else 'A'}", at, *shape))
                    at += shape[0] * shape[1]
    return out


def write_lora(path, c, lc, tensors):
    """Writes lora.bin for base config c from {name: float array} (stored as float32)."""
    layout = lora_layout(c, lc)
    h = np.zeros(LORA_HEADER_INTS, dtype="<i4")
    h[0] = np.uint32(LORA_MAGIC).astype("<i4")
    h[1] = LORA_VERSION
    h[2] = lc.rank
    h[3] = np.array([lc.alpha], dtype="<f4").view("<i4")[0]
    h[4] = lc.mask
    h[5] = lc.base_quant
    h[6] = c.n_layers
    h[7] = sum(p.numel for p in layout)
    parts = [h.tobytes(), config_to_header(c)]
    for p in layout:
        t = np.asarray(tensors[p.name], dtype="<f4")
        if t.shape != (p.rows, p.cols):
            raise FormatError(f"{path}: adapter '{p.name}' has shape {t.shape}, the layout needs {(p.rows, p.cols)}")
        parts.append(t.tobytes())
    write_atomically(path, b"".join(parts))


def read_lora(path):
    """Reads lora.bin: (LoraConfig, base ModelConfig from its copy of the header, {name: float32 (rows, cols)})."""
    data = read_whole(path)
    head = (LORA_HEADER_INTS + MODEL_HEADER_INTS) * 4
    if len(data) < head:
        raise FormatError(f"{path}: truncated: {len(data)} bytes, smaller than the {head}-byte lora.bin header")
    h = np.frombuffer(data[:LORA_HEADER_INTS * 4], dtype="<i4")
    if int(h[0].astype("<u4")) != LORA_MAGIC:
        raise FormatError(f"{path}: bad magic 0x{int(h[0].astype('<u4')):08x}: not a lora.bin file")
    if int(h[1]) != LORA_VERSION:
        raise FormatError(f"{path}: unsupported lora.bin version {int(h[1])} (this script reads {LORA_VERSION})")
    mask, quant = int(h[4]), int(h[5])
    if int(h[2]) < 1 or mask <= 0 or mask >= (1 << len(LORA_TARGETS)) or not 0 <= quant < len(BASE_QUANT_NAMES):
        raise FormatError(f"{path}: bad LoRA settings (rank {int(h[2])}, target mask {mask}, base quantization {quant})")
    lc = LoraConfig(rank=int(h[2]), alpha=float(h[3:4].view("<f4")[0]),
                    targets=tuple(t for i, t in enumerate(LORA_TARGETS) if mask >> i & 1), base_quant=quant)
    c = config_from_header(data[LORA_HEADER_INTS * 4:head], f"{path} (base model header)")
    layout = lora_layout(c, lc)
    total = sum(p.numel for p in layout)
    if int(h[7]) != total or len(data) != head + 4 * total:
        raise FormatError(f"{path}: size {len(data)} bytes disagrees with rank {lc.rank} on targets {','.join(lc.targets)}: "
                          f"{head + 4 * total} bytes expected")
    flat = np.frombuffer(data[head:], dtype="<f4")
    return lc, c, {p.name: flat[p.offset:p.offset + p.numel].reshape(p.rows, p.cols) for p in layout}
