"""Tests of scripts/plot_memory.py on plans written by train_llama --plan-only --plan-json (no GPU) and
on a made-up --mem-trace file."""
import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import plot_memory  # noqa: E402

TRAINER = os.path.join(ROOT, "train_llama")
VOCAB = 128256  # llama3-8b
METHODS = {"vanilla": ["--mst", "1", "--vocab-chunk", str(VOCAB), "--recompute", "0", "--offload", "0"],
           "recompute": ["--mst", "1", "--vocab-chunk", str(VOCAB), "--recompute", "1", "--offload", "0"],
           "MsT": ["--mst", "4", "--vocab-chunk", str(VOCAB // 4), "--recompute", "1", "--offload", "0"],
           "MsT + offload": ["--mst", "4", "--vocab-chunk", str(VOCAB // 4), "--recompute", "1", "--offload", "1",
                             "--host-layers", "32", "--host-mem", "109"]}


def plan_json(tmp_path, name, flags, seq=4096, gpu_mem="80"):
    if not os.path.exists(TRAINER):
        pytest.fail(f"{TRAINER} is missing: run `make all` first")
    out = tmp_path / f"{name}.json".replace(" ", "_")
    cmd = [TRAINER, "--plan-only", "--preset", "llama3-8b", "--gpu-mem", gpu_mem, "--seq-len", str(seq),
           "--plan-json", str(out)] + flags
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return plot_memory.read_plan(str(out)), r.returncode


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_plan_json_is_consistent(tmp_path):
    for name, flags in METHODS.items():
        p, rc = plan_json(tmp_path, name, flags)
        assert rc == 0 and p["fits"] is True
        assert plot_memory.method_name(p["settings"], p["config"]["vocab"]) == name
        cats = {k: v for k, v in p["categories"].items() if k != "host"}
        assert sum(cats.values()) == p["device_total"]
        assert sum(e["bytes"] for e in p["entries"] if e["region"] == "arena" and e["category"] != "host") + \
            p["shared_bytes"] == p["device_total"]
        host = 32 * 4096 * 4096 * 2 if name == "MsT + offload" else 0  # every layer input (S x d bf16)
        assert p["host_total"] == p["categories"]["host"] == host
        assert max(ph["bytes"]["host"] for ph in p["timeline"]) == host
        peak = max(ph["device"] for ph in p["timeline"])
        assert 0 < peak <= p["device_total"]
        for ph in p["timeline"]:
            assert sum(v for k, v in ph["bytes"].items() if k != "host") == ph["device"]
            assert ph["bytes"]["weights"] == p["categories"]["weights"]


def test_mst_peak_below_vanilla_and_vanilla_refused_at_16k(tmp_path):
    van, rc_van = plan_json(tmp_path, "van", METHODS["vanilla"], seq=16384)
    mst, rc_mst = plan_json(tmp_path, "mst", METHODS["MsT"], seq=16384)
    assert rc_van == 1 and van["fits"] is False  # refused for its size: the JSON is still written
    assert rc_mst == 0 and mst["fits"] is True
    assert max(ph["device"] for ph in mst["timeline"]) < max(ph["device"] for ph in van["timeline"])
    assert mst["device_total"] <= mst["device_budget"] < van["device_total"]


def test_bad_settings_write_no_json(tmp_path):
    out = tmp_path / "bad.json"
    r = subprocess.run([TRAINER, "--plan-only", "--preset", "llama3-8b", "--seq-len", "4096", "--mst", "5000",
                        "--plan-json", str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and not out.exists()


def test_breakdown_and_timeline_pngs(tmp_path):
    paths = []
    for i, (name, flags) in enumerate(METHODS.items()):
        plan_json(tmp_path, f"m{i}", flags)
        paths.append(str(tmp_path / f"m{i}.json"))
    out = tmp_path / "bars.png"
    plot_memory.main(["breakdown"] + paths + ["-o", str(out)])
    w, h = png_size(out)
    assert w > 500 and h > 400
    trace = tmp_path / "trace.jsonl"
    with open(trace, "w") as f:
        for step in (0, 1):
            for i, region in enumerate(["embedding fwd+bwd", "mlp fwd", "lm head + loss", "step end"]):
                f.write(json.dumps({"step": step, "mark": i, "region": region, "used": (70 + i) << 30,
                                    "total": 80 << 30}) + "\n")
    out2 = tmp_path / "line.png"
    plot_memory.main(["timeline", paths[0], paths[2], "--trace", str(trace), "-o", str(out2),
                      "--label", "standard", "--label", "MsT"])
    assert png_size(out2)[0] > 500


def test_read_trace_picks_the_last_step_or_the_given_one(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"step": 0, "mark": 0, "region": "a", "used": 5, "total": 9}\n\n'
                     '{"step": 1, "mark": 0, "region": "a", "used": 7, "total": 9}\n'
                     '{"step": 1, "mark": 1, "region": "step end", "used": 8, "total": 9}\n')
    assert plot_memory.read_trace(str(trace)) == [("a", 7), ("step end", 8)]
    assert plot_memory.read_trace(str(trace), 0) == [("a", 5)]
    with pytest.raises(SystemExit, match="no step 4"):
        plot_memory.read_trace(str(trace), 4)
    trace.write_text('{"step": 0, "used": 5}\n')
    with pytest.raises(SystemExit, match="not a --mem-trace line"):
        plot_memory.read_trace(str(trace))


def test_not_a_plan_and_label_count_are_refused(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(SystemExit, match="not a train_llama --plan-json"):
        plot_memory.read_plan(str(bad))
    with pytest.raises(SystemExit, match="2 --label for 1 plans"):
        plot_memory.labels_for([{}], ["a", "b"])


@pytest.mark.parametrize("settings,name", [
    ({"M": 1, "vocab_chunk": 100, "host_layers": 0, "recompute": 0}, "vanilla"),
    ({"M": 1, "vocab_chunk": 100, "host_layers": 0, "recompute": 1}, "recompute"),
    ({"M": 1, "vocab_chunk": 50, "host_layers": 0, "recompute": 1}, "MsT"),
    ({"M": 4, "vocab_chunk": 100, "host_layers": 3, "recompute": 1}, "MsT + offload"),
])
def test_method_name(settings, name):
    assert plot_memory.method_name(settings, 100) == name


@pytest.mark.parametrize("flags,words", [
    (["--plan-only", "--gpu-mem", "80", "--host-layers", "4"], "needs --offload 1"),
    (["--plan-only", "--gpu-mem", "80", "--offload", "1", "--host-layers", "33"], "host layers 33"),
    (["--plan-only", "--gpu-mem", "80", "--host-mem", "0.5"], "--host-mem: 0.5 is out of range"),
])
def test_placement_flags_are_checked(flags, words):
    r = subprocess.run([TRAINER, "--preset", "llama3-8b", "--seq-len", "4096"] + flags, capture_output=True, text=True)
    assert r.returncode != 0 and words in r.stdout + r.stderr, r.stdout + r.stderr
