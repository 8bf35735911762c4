"""qlower inspect: reports on qlower's, stock-flow, XNNPACK and undelegated .pte files,
expectations, and clean one-line errors on files that are not valid .pte."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from qlower import inspect as qinspect
from qlower.cli import main
from qlower.errors import ConfigError, PteError
from qlower.inspect import Expectation, evaluate, inspect_pte, parse_expectation
from qlower.pte import SIZE_PARTS

ROOT = Path(__file__).resolve().parents[1]


# --- .pte factories ----------------------------------------------------------


class TwoLinears(nn.Module):
    """Two linears with an optional operator between them (one the Vulkan partitioner
    leaves on the CPU splits the graph into two partitions)."""

    def __init__(self, between=None, k: int = 64, hidden: int = 96, n: int = 32):
        super().__init__()
        self.a = nn.Linear(k, hidden)
        self.b = nn.Linear(hidden, n)
        self.between = between

    def forward(self, x):
        y = self.a(x)
        y = self.between(y) if self.between is not None else torch.relu(y)
        return self.b(y)


def lower(model: nn.Module, inputs, backend: str, quantize: bool = False) -> bytes:
    from qlower.console import import_heavy_libraries

    import_heavy_libraries()
    from executorch.exir import to_edge, to_edge_transform_and_lower

    torch.manual_seed(0)
    model = model.eval()
    if quantize:  # the stock 8da4w flow
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    ep = torch.export.export(model, inputs)
    if backend == "none":
        return to_edge(ep).to_executorch().buffer
    if backend == "vulkan":
        from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

        partitioner = VulkanPartitioner()
    else:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioner = XnnpackPartitioner()
    return to_edge_transform_and_lower(ep, partitioner=[partitioner]).to_executorch().buffer


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pte")
    return d


@pytest.fixture(scope="session")
def exported(files):
    """examples/mlp.py through qlower.export: the file and export's own summary."""
    import qlower

    path = files / "mlp.pte"
    summary = qlower.export(ROOT / "examples" / "mlp.py", path)
    return path, summary


@pytest.fixture(scope="session")
def stock_split(files):
    """Stock flow (8da4w → VulkanPartitioner), with erf between the linears: two Vulkan partitions."""
    path = files / "split.pte"
    path.write_bytes(lower(TwoLinears(torch.erf), (torch.randn(3, 64),), "vulkan", quantize=True))
    return path


@pytest.fixture(scope="session")
def xnnpack(files):
    path = files / "xnnpack.pte"
    path.write_bytes(lower(TwoLinears(), (torch.randn(3, 64),), "xnnpack"))
    return path


@pytest.fixture(scope="session")
def undelegated(files):
    path = files / "plain.pte"
    path.write_bytes(lower(TwoLinears(), (torch.randn(3, 64),), "none"))
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stock_histogram(path: Path) -> Counter:
    """Op names per ExecuTorch's own decoder, independent of qlower.pte."""
    from executorch.backends.vulkan.serialization.vulkan_graph_serialize import extract_vk_flatbuffer, flatbuffer_to_vk_graph
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(path.read_bytes())
    ops = Counter()
    for plan in pte.program.execution_plan:
        for d in plan.delegates:
            if d.id == "VulkanBackend":
                blob = bytes(pte.program.backend_delegate_data[d.processed.index].data)
                graph = flatbuffer_to_vk_graph(extract_vk_flatbuffer(blob))
                ops.update(c.name.split(".")[1] for c in graph.chain if c.name.startswith("et_vk."))
    return ops


# --- expectations ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("partitions==1", Expectation("partitions", "==", 1)),
        (" fused.linear_dq8ca_q4gsw >= 4 ", Expectation("fused.linear_dq8ca_q4gsw", ">=", 4)),
        ("cpu_ops.aten::mul.Scalar<3", Expectation("cpu_ops.aten::mul.Scalar", "<", 3)),
        ("delegates.XnnpackBackend!=0", Expectation("delegates.XnnpackBackend", "!=", 0)),
        ("runtime_problems==0", Expectation("runtime_problems", "==", 0)),
        ("size<=1000000", Expectation("size", "<=", 1000000)),
    ],
)
def test_parse_expectation(text, parsed):
    assert parse_expectation(text) == parsed


@pytest.mark.parametrize("text", ["", "partitions", "partitions=1", "partitions=>1", "partitions==x", "partitions==-1", "partition==1", "fused.==1", "size==1.5", "gpu_memory.x==1"])
def test_parse_expectation_rejects(text):
    with pytest.raises(ConfigError):
        parse_expectation(text)


def test_evaluate_reports_each_violation():
    report = {"summary": {"vulkan_partitions": 2, "fused_ops": {"linear_q4gsw": 3}, "cpu_ops": {}, "delegate_calls": {}, "vk_ops": {}, "gpu_memory_bytes": 0}, "methods": [], "size": 10, "runtime_problems": None}
    results = evaluate(report, [parse_expectation(t) for t in ("partitions==1", "fused.linear_q4gsw>=3", "fused>5", "cpu_ops==0", "runtime_problems==0")])
    assert [r["ok"] for r in results] == [False, True, False, True, False]
    assert results[0]["message"] == "expected partitions==1, got 2"
    assert "not installed" in results[4]["message"]


# --- reports -----------------------------------------------------------------


def test_counts_match_export(exported):
    path, summary = exported
    report = inspect_pte(path)
    s = report["summary"]
    assert s["fused_ops"] == summary["fused_ops"] == {"linear_dq8ca_q4gsw": 2}
    assert s["vulkan_partitions"] == summary["vulkan_partitions"] == 1
    assert s["cpu_ops"] == summary["cpu_ops"] == {}
    assert s["size"] == summary["size"]
    assert Counter(s["fused_ops"]) == stock_histogram(path)


def test_fused_parameters(exported):
    path, summary = exported
    (vk,) = inspect_pte(path)["vulkan"]
    nodes = vk["fused"]["linear_dq8ca_q4gsw"]
    got = [(p["n"], p["k"], p["group_size"], p["packed_weight_bytes"], p["scale_dtype"], p["bias"]) for p in nodes]
    plans = [p for p in summary["layer_report"] if p["kind"] == "linear"]
    assert got == [(p["n"], p["k"], summary["group_size"], p["n"] * p["k"] // 2, "float32", True) for p in plans]
    assert vk["non_fused_ops"] == {"choose_qparams_affine": 2, "relu": 1}
    weights = {u for c in vk["constants"] for u in c["users"] if u.endswith(".weights")}
    assert len(weights) == 2
    memory = vk["memory"]
    assert memory["constants_bytes"] == sum(c["bytes"] for c in vk["constants"])
    assert memory["total_bytes"] >= memory["constants_bytes"] + memory["shared_bytes"] > memory["constants_bytes"]


def test_program_level(exported):
    path, _ = exported
    report = inspect_pte(path)
    (method,) = report["methods"]
    assert method["name"] == "forward"
    assert method["inputs"] == [{"kind": "tensor", "dtype": "float32", "shape": [4, 256]}]
    assert method["outputs"] == [{"kind": "tensor", "dtype": "float32", "shape": [4, 128]}]
    assert [s["kind"] for s in method["plan"]] == ["delegate"]
    assert report["delegates"][0]["backend"] == "VulkanBackend"
    assert report["size"] == path.stat().st_size
    # the delegate's constants, and qlower's record of the int4 weight algorithm
    assert report["program"]["named_data"]["count"] == len(report["vulkan"][0]["constants"]) + 1
    assert report["quantization"]["weight_algorithm"] == "rtn" and set(report["quantization"]["layers"].values()) == {"rtn"}


def assert_parts_add_up(size: dict, path: Path) -> None:
    assert size["total"] == path.stat().st_size == sum(size[k] for k in SIZE_PARTS), size
    assert all(size[k] >= 0 for k in SIZE_PARTS) and size["program_and_headers"] > 0


def test_size_parts_add_up_to_the_file(exported, stock_split, xnnpack, undelegated):
    path, summary = exported
    size = inspect_pte(path)["summary"]["size"]
    assert_parts_add_up(size, path)
    linears = [r for r in summary["layer_report"] if r["kind"] == "linear"]
    assert size["packed_weights"] == sum(r["n"] * r["k"] // 2 for r in linears)  # int4, K even
    assert size["shared"] == 0 and size["shared_constants"] == [] and size["external"] == 0
    assert_parts_add_up(inspect_pte(stock_split)["summary"]["size"], stock_split)
    # Weights outside any Vulkan graph: the CPU operators' constants and XNNPACK's named data.
    float_bytes = 4 * sum(p.numel() for p in TwoLinears().parameters())
    plain = inspect_pte(undelegated)["summary"]["size"]
    assert_parts_add_up(plain, undelegated)
    assert plain["float_weights"] == float_bytes
    other = inspect_pte(xnnpack)["summary"]["size"]
    assert_parts_add_up(other, xnnpack)
    assert other["other_constants"] == float_bytes


def test_several_vulkan_partitions_stock_flow(stock_split, capsys):
    report = inspect_pte(stock_split)
    s = report["summary"]
    assert s["vulkan_partitions"] == 2 == len(report["vulkan"])
    assert s["cpu_ops"] == {"aten::erf.out": 1}
    assert [st["kind"] for st in report["methods"][0]["plan"]] == ["delegate", "kernel", "delegate"]
    assert Counter(s["fused_ops"]) == stock_histogram(stock_split)
    assert s["fused_ops"] == {"linear_dq8ca_q4gsw": 2}
    code, out, err = cli(capsys, stock_split, "--expect", "partitions==2", "--expect", "cpu_ops.aten::erf.out==1", "--expect", "fused==2")
    assert code == 0 and err == ""
    assert "Vulkan partitions: 2" in out and "aten::erf.out ×1" in out


def test_xnnpack_delegate(xnnpack, capsys):
    report = inspect_pte(xnnpack)
    assert report["vulkan"] == []
    assert {d["backend"] for d in report["delegates"]} == {"XnnpackBackend"}
    assert all(d["blob_bytes"] > 0 for d in report["delegates"])
    assert report["summary"]["other_delegates"] == ["XnnpackBackend"]
    code, out, _ = cli(capsys, xnnpack, "--expect", "delegates.XnnpackBackend>=1", "--expect", "partitions==0")
    assert code == 0 and "XnnpackBackend#0" in out


def test_no_delegate(undelegated, capsys):
    report = inspect_pte(undelegated)
    s = report["summary"]
    assert report["delegates"] == [] and s["vulkan_partitions"] == 0
    assert s["cpu_op_calls"] >= 3 and any("addmm" in op or "linear" in op for op in s["cpu_ops"])
    code, out, _ = cli(capsys, undelegated)
    assert code == 0 and "Vulkan partitions: 0" in out


# --- the command -------------------------------------------------------------


def test_cli_views(exported, capsys):
    path, _ = exported
    code, out, _ = cli(capsys, path)
    assert code == 0
    assert "fused ops: linear_dq8ca_q4gsw ×2" in out and "CPU operators: none" in out and "GPU memory" in out
    code, out, _ = cli(capsys, path, "--ops", "--tensors", "--constants")
    assert code == 0
    assert "linear_dq8ca_q4gsw(input=f32[4, 256] texture3d/width_packed" in out
    assert "group_size=128" in out and "weights=const#" in out
    assert "mem_obj 0" in out and "named_data" in out


def test_cli_json_is_one_document(exported, capsys):
    path, _ = exported
    code, out, _ = cli(capsys, path, "--json", "--ops", "--expect", "fused.linear_dq8ca_q4gsw==2")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["expectations"][0]["actual"] == 2
    assert {"program", "methods", "delegates", "summary", "vulkan", "runtime_problems"} <= set(report)
    assert report["vulkan"][0]["ops"][1]["args"][0]["name"] == "input"


def test_cli_expectations(exported, capsys):
    path, _ = exported
    code, _, err = cli(capsys, path, "--expect", "fused.linear_dq8ca_q4gsw>=4", "--expect", "partitions==1", "--expect", "cpu_ops!=0")
    assert code == 1
    lines = err.strip().splitlines()
    assert lines == ["expectation failed: expected fused.linear_dq8ca_q4gsw>=4, got 2", "expectation failed: expected cpu_ops!=0, got 0"]
    code, _, err = cli(capsys, path, "--expect", "fused=>1")
    assert code == 2 and "cannot parse expectation" in err
    code, _, err = cli(capsys, path, "--expect", "partition==1")
    assert code == 2 and "unknown expectation key" in err


def test_shell_pipeline(exported):
    path, _ = exported
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = f"{sys.executable} -m qlower.cli inspect {path} --json --expect 'fused>=3' > report.json || echo failed: $?"
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, cwd=path.parent, timeout=300)
    assert result.stdout.strip() == "failed: 1"
    assert "expected fused>=3, got 2" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((path.parent / "report.json").read_text())["ok"] is False


# --- runtime compatibility ---------------------------------------------------


def test_runtime_problems_from_runtime_caps(exported, monkeypatch, capsys):
    path, _ = exported
    seen = []

    def load_problems(graph):
        seen.append(graph)
        return [types.SimpleNamespace(node_id=2, op="aten.relu.default", message="Missing operator: aten.relu.default")]

    monkeypatch.setattr(qinspect, "_runtime_caps", lambda: types.SimpleNamespace(load_problems=load_problems))
    report = inspect_pte(path, expect=["runtime_problems==0"])
    assert len(seen) == 1 and type(seen[0]).__name__ == "VkGraph"
    assert report["runtime_problems"] == [{"delegate": 0, "node_id": 2, "op": "aten.relu.default", "message": "Missing operator: aten.relu.default"}]
    assert report["ok"] is False
    code, out, err = cli(capsys, path, "--expect", "runtime_problems==0")
    assert code == 1 and "Missing operator: aten.relu.default" in out and "expected runtime_problems==0, got 1" in err


def test_runtime_check_unavailable(exported, monkeypatch):
    path, _ = exported
    monkeypatch.setattr(qinspect, "_runtime_caps", lambda: None)
    report = inspect_pte(path, expect=["runtime_problems==0", "partitions==1"])
    assert report["runtime_problems"] is None and report["runtime_check"] == "unavailable"
    assert [r["ok"] for r in report["expectations"]] == [False, True]


# --- untrusted input ---------------------------------------------------------


def _set_u64(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("<Q", value) + data[offset + 8:]


def bad_files(good: bytes, d: Path) -> dict[str, Path]:
    cases = {
        "empty": b"",
        "text": b"def forward(x):\n    return x\n" * 10,
        "wrong_magic": good[:4] + b"XX00" + good[8:],
        "truncated_header": good[:20],
        "truncated": good[: len(good) // 2],
        "program_cut": good[:1000],
        "absurd_program_size": _set_u64(good, 16, 1 << 62),
        "absurd_segment_base": _set_u64(good, 24, 1 << 50),
        "absurd_segment_size": _set_u64(good, 32, 1 << 60),
        "bad_root": struct.pack("<I", 0x7FFFFFF0) + good[4:],
        "zeros": b"\0" * 4096,
        "garbage_after_magic": good[:8] + os.urandom(4096),
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = d / f"{name}.pte"
        paths[name].write_bytes(data)
    return paths


def test_untrusted_files_fail_cleanly(exported, tmp_path, capsys):
    path, _ = exported
    cases = bad_files(path.read_bytes(), tmp_path)
    cases["directory"] = tmp_path
    cases["missing"] = tmp_path / "nope.pte"
    for name, bad in cases.items():
        with pytest.raises(PteError):
            inspect_pte(bad)
        code, out, err = cli(capsys, bad)
        lines = err.strip().splitlines()
        assert code == 1, name
        assert out == "", name
        assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), (name, err)


def test_declared_sizes_are_checked_before_decoding(exported, tmp_path):
    path, _ = exported
    bad = _set_u64(path.read_bytes(), 16, 1 << 62)
    with pytest.raises(PteError, match="declares a .*-byte program"):
        inspect_pte(bad)


def _allocate_16_gib(data):
    return len(bytearray(1 << 34))


def _segfault(data):
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def _hang(data):
    import time

    time.sleep(60)


def test_decoding_is_bounded(monkeypatch):
    from qlower import pte

    with pytest.raises(PteError, match="needs more than"):
        pte._run_bounded(_allocate_16_gib, b"x")
    with pytest.raises(PteError, match="crashed"):
        pte._run_bounded(_segfault, b"x")
    monkeypatch.setattr(pte, "DECODE_SECONDS_BASE", 0.5)
    with pytest.raises(PteError, match="took longer than"):
        pte._run_bounded(_hang, b"x")
