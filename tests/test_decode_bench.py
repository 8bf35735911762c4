"""benchmarks/llm_decode_bench.py's decode-step breakdown, on a stand-in runner and recorded vkprof output,
and benchmarks/vkprof itself where a C compiler and the Vulkan headers are at hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import llm_decode_bench as bench  # noqa: E402


@pytest.mark.parametrize("tensors, kind", [
    ("t_inputBuffer t_packed_int4_weight t_weight_scalesBuffer t_outputBuffer", "linear int4"),
    ("t_fp_inputBuffer t_scalesBuffer t_q4_weightsBuffer t_outputBuffer", "linear int4"),
    ("t_inputBuffer t_scales t_zps", "choose qparams"),
    ("t_inBuffer t_weightBuffer t_outBuffer", "rms norm"),
    ("t_in t_weight t_out", "rms norm"),
    ("t_qBuffer t_kBuffer t_attn_weightsBuffer", "attention q·k"),
    ("t_attn_weightsBuffer t_attn_weights_softmaxBuffer", "attention softmax"),
    ("t_attn_weightsBuffer t_v_cacheBuffer t_outputBuffer", "attention ·v"),
    ("t_projectedBuffer t_cacheBuffer", "kv-cache write"),
    ("t_xqoutBuffer t_xqBuffer t_xkoutBuffer t_xkBuffer t_freqs_cosBuffer", "rotary embedding"),
    ("t_outBuffer t_inBuffer t_otherBuffer", "binary elementwise"),
    ("t_outpBuffer t_inpBuffer", "unary / copy / view"),
    ("t_in t_out", "unary / copy / view"),
    ("t_weight t_indicesBuffer t_scalesBuffer t_outBuffer", "embedding"),
    ("t_inpBuffer", "other"),
    ("t_out0Buffer t_out1Buffer t_out2Buffer t_out3Buffer t_xBuffer t_wBuffer t_scalesBuffer t_biasBuffer t_resBuffer",
     "linear int4"),
    ("t_outBuffer t_inBuffer t_weightBuffer", "rms norm"),
    ("t_partBuffer t_kcacheBuffer t_vcacheBuffer t_qBuffer t_kBuffer t_vBuffer", "attention decode (split-K)"),
    ("t_kcacheBuffer t_kBuffer t_vcacheBuffer t_vBuffer t_partBuffer t_qBuffer", "attention decode (split-K)"),
    ("t_outBuffer t_partBuffer", "attention decode combine"),
    ("t_partBuffer t_outBuffer", "attention decode combine"),
    ("t_inBuffer t_outBuffer t_weightBuffer", "rms norm"),
])
def test_kernel_kind(tensors, kind):
    assert bench.kernel_kind(tensors) == kind


FAKE_RUNNER = textwrap.dedent('''\
    #!{python}
    """Stands in for llm_step_runner: prints its JSON and writes what vkprof would have recorded."""
    import json, os, sys
    args = sys.argv[1:]
    steps = int(args[args.index("--steps") + 1])
    warmup = int(args[args.index("--warmup") + 1])
    stamps = os.environ.get("VKPROF_TIMESTAMPS") == "1"
    pipelines = [{{"words": 10, "hash": "aaaa", "spec": [64, 1, 1], "tensors": "t_inBuffer t_weightBuffer t_outBuffer"}},
                 {{"words": 10, "hash": "bbbb", "spec": [64, 1, 1], "tensors": "t_inputBuffer t_packed_int4_weight t_output"}}]
    records = []
    for run in range(warmup + 1):
        records.append({{"host_gap_us": 5.0, "encode_us": 900.0, "submit_us": 3.0, "wait_us": 4000.0, "submits": 1,
                        "cmdbufs": 1, "dispatches": 30, "barriers": 30, "push_constants": 2, "reencoded": 1,
                        "encoded_dispatches": 30, "gpu_span_us": 3900.0 if stamps else 0.0,
                        "dispatch": [[0, 1, 1, 1, 20.0], [1, 8, 1, 1, 100.0]] if stamps else []}})  # prefill
        for i in range(steps):
            re = int(i % 4 == 0)
            records.append({{"host_gap_us": 600.0, "encode_us": 1000.0 * re, "submit_us": 40.0,
                            "wait_us": 4000.0 - 500 * re, "submits": 2, "cmdbufs": 2, "dispatches": 3,
                            "barriers": 3, "push_constants": 1, "reencoded": re, "encoded_dispatches": 3 * re,
                            "gpu_span_us": 50.0 if stamps else 0.0,
                            "dispatch": [[0, 1, 1, 1, 21.0], [1, 256, 1, 1, 13.0], [1, 64, 1, 1, 12.0]] if stamps else []}})
    if os.environ.get("VKPROF_OUT"):   # run under vkprof
        json.dump({{"timestamps": int(stamps), "ns_per_tick": 1.0, "pipelines": pipelines, "steps": records,
                   "samples": [["host", "libc.so.6", "ioctl", 0, 7], ["wait", "libc.so.6", "", 9, 3],
                               ["host", "libc.so.6", "", 22, 2]]}}, open(os.environ["VKPROF_OUT"], "w"))
    print(json.dumps({{"tokens": [1] * (steps + 1), "prefill_ms": 60.0, "decode_ms": [5.0] * steps, "vocab": 10,
                      "load_ms": 1.0}}))
''')


@pytest.fixture
def fake_runner(tmp_path):
    runner = tmp_path / "llm_step_runner"
    runner.write_text(FAKE_RUNNER.format(python=sys.executable))
    runner.chmod(0o755)
    return runner


def test_profile_once_summarises_the_decode_steps(fake_runner, tmp_path):
    pte = tmp_path / "m.pte"
    pte.write_bytes(b"")
    cpu = bench.profile_once(str(fake_runner), pte, 4, 8, tmp_path, "/nowhere/libvulkan.so.1", timestamps=False)
    assert cpu["dispatches_per_token"] == 3
    assert cpu["reencodes_per_100_tokens"] == 25.0          # steps 0 and 4 of 8, the warm-up run left out
    assert cpu["encode_us_mean"] == pytest.approx(250.0)
    assert cpu["encode_us_when_reencoding"] == 1000.0
    assert cpu["wait_us_median"] == 4000.0
    assert len(cpu["per_step"]["reencoded"]) == 8
    assert cpu["cpu_samples"]["host"]["libc.so.6:ioctl"] == 7
    assert cpu["cpu_samples"]["host"]["libc.so.6+1408K"] == 2
    gpu = bench.profile_once(str(fake_runner), pte, 4, 8, tmp_path, "/nowhere/libvulkan.so.1", timestamps=True)
    assert gpu["gpu_span_us_median"] == 50.0
    assert gpu["gpu_by_kind"]["rms norm"] == {"calls_per_token": pytest.approx(1.0), "us_per_token": pytest.approx(21.0)}
    assert gpu["gpu_by_kind"]["linear int4"]["calls_per_token"] == pytest.approx(2.0)
    assert gpu["gpu_by_kind"]["linear int4"]["us_per_token"] == pytest.approx(25.0)
    assert list(gpu["gpu_by_kind"]) == ["linear int4", "rms norm"]   # largest first
    assert gpu["gpu_us_per_token"] == pytest.approx(46.0)
    assert gpu["gpu_by_kernel"]["linear int4 [bbbb]"]["grids"] == ["256x1x1", "64x1x1"]
    bench.print_breakdown("m.pte", {"cpu": cpu, "gpu": gpu})


def test_main_adds_the_breakdown(fake_runner, tmp_path, capsys):
    a, b = tmp_path / "a.pte", tmp_path / "b.pte"
    a.write_bytes(b"")
    b.write_bytes(b"")
    assert bench.main(["--runner", str(fake_runner), "--prompt-len", "4", "--steps", "4", "--rounds", "1",
                       "--vkprof", str(tmp_path), "--profile-steps", "8", str(a), str(b), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["decode_speedup"] for r in results] == [1.0, 1.0]
    assert "bytes_per_token" not in results[0]["breakdown"]   # an empty file: inspect cannot read it
    assert results[1]["breakdown"]["cpu"]["reencodes_per_100_tokens"] == 25.0


FAKE_LLAMA_BENCH = textwrap.dedent('''\
    #!{python}
    """Stands in for llama.cpp's llama-bench -o json: a prefill row and a decode row after the context."""
    import json, sys
    args = sys.argv[1:]
    value = lambda flag: int(args[args.index(flag) + 1])
    assert args[args.index("-dev") + 1] == "Vulkan0" and args[args.index("-o") + 1] == "json"
    print(json.dumps([
        {{"n_prompt": value("-p"), "n_gen": 0, "n_depth": value("-d"), "avg_ts": 16000.0, "gpu_info": "GPU"}},
        {{"n_prompt": 0, "n_gen": value("-n"), "n_depth": value("-d"), "avg_ts": 625.0, "gpu_info": "GPU"}},
    ]))
''')


def test_llama_bench_runs_beside_the_files(fake_runner, tmp_path, capsys):
    tool = tmp_path / "llama-bench"
    tool.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    tool.chmod(0o755)
    a = tmp_path / "a.pte"
    a.write_bytes(b"")
    assert bench.main(["--runner", str(fake_runner), "--prompt-len", "512", "--steps", "4", "--rounds", "1", str(a),
                       "--llama-bench", str(tool), "--gguf", str(tmp_path / "m.gguf"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    peer = results[-1]
    assert peer["file"] == "llama.cpp m.gguf" and peer["tokens_per_s"] == 625.0
    assert peer["decode_ms_median"] == pytest.approx(1.6) and peer["prefill_ms_median"] == pytest.approx(32.0)
    assert peer["decode_speedup"] == pytest.approx(results[0]["decode_ms_median"] / 1.6)
    with pytest.raises(SystemExit):
        bench.main(["--runner", str(fake_runner), str(a), "--llama-bench", str(tool)])


def test_bytes_per_token_counts_each_reading_op(tmp_path, monkeypatch):
    import qlower.inspect as inspect_mod

    report = {"vulkan": [{"constants": [
        {"bytes": 4096, "shape": [64, 32], "users": ["linear_dq8ca_q4gsw#3.weights"]},
        {"bytes": 1000 * 16, "shape": [1000, 16], "users": ["embedding_q4gsw#1.weight", "linear_dq8ca_q4gsw#9.weights"]},
        {"bytes": 8 * 64 * 4 * 128, "shape": [1, 128, 8, 64], "users": ["sdpa_with_kv_cache#5.k_cache"]},
        # qlower's runtime ops keep their namespace in the short name
        {"bytes": 8 * 64 * 4 * 128, "shape": [1, 128, 8, 64], "users": ["qlower.sdpa_with_kv_cache#7.key_cache"]},
        {"bytes": 2048, "shape": [64, 32], "users": ["qlower.linear_q4gsw#8.weights"]},
    ]}]}
    monkeypatch.setattr(inspect_mod, "inspect_pte", lambda path: report)
    got = bench.bytes_per_token(tmp_path / "m.pte", position=9)     # the runtime reads 12 of 128 positions
    assert got == {"position": 9, "weights": 4096 + 16000 + 2048, "kv_cache": 2 * 8 * 64 * 4 * 12, "embedding_row": 16,
                   "total": 4096 + 16000 + 2048 + 2 * 8 * 64 * 4 * 12 + 16}


@pytest.mark.skipif(not shutil.which("gcc") or not Path("/usr/include/vulkan/vulkan.h").is_file(),
                    reason="needs gcc and the Vulkan headers (libvulkan-dev)")
def test_vkprof_builds_and_exports_only_the_loader_entry_points(tmp_path):
    lib = tmp_path / "libvulkan.so.1"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Werror", "-o", str(lib),
                    str(ROOT / "benchmarks" / "vkprof" / "vkprof.c"), "-ldl"], check=True)
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    exported = sorted(line.split()[-1] for line in syms.splitlines() if " T " in line)
    assert exported == ["vkGetDeviceProcAddr", "vkGetInstanceProcAddr"]
