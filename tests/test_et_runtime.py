"""qlower's .pte files on the real ExecuTorch Vulkan runtime (opt-in).

Set QLOWER_ET_RUNNER to ExecuTorch's ``executor_runner`` built with the
Vulkan backend (``EXECUTORCH_BUILD_VULKAN=ON``) for the pinned executorch
version, and VK_ICD_FILENAMES to a Vulkan driver (e.g. Mesa lavapipe's
``lvp_icd.x86_64.json``). Each bundled example and transformers recipe is
exported with the default scheme, run by that runtime on its example inputs,
and compared with qlower's golden executor of the same file; a stock-flow
file must abort at load with the message ``qlower inspect`` predicts.

Set QLOWER_VK_OPS_RUNNER to ``pte_runner`` linked with qlower's op library
(tools/pte_runner, ``scripts/build_runtime.sh``; the same command line) to run
files exported with ``--runtime qlower`` too; with QLOWER_ET_RUNNER also set,
the stock runner must refuse them at load as ``qlower inspect`` predicts.
With QLOWER_REQUIRE_RUNTIME=1 a missing QLOWER_VK_OPS_RUNNER fails those tests
instead of skipping them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import qlower
from qlower.golden import GoldenExecutor
from qlower.loader import load_model
from qlower.pte import read_pte
from qlower.runtime_caps import summarize_pte
from qlower.metrics import THRESHOLDS, sqnr_db

from .conftest import EXAMPLES

RUNNER = os.environ.get("QLOWER_ET_RUNNER")
VK_OPS_RUNNER = os.environ.get("QLOWER_VK_OPS_RUNNER")
REQUIRED = os.environ.get("QLOWER_REQUIRE_RUNTIME") == "1"  # CI: a missing QLOWER_VK_OPS_RUNNER fails instead of skipping
stock_runner = pytest.mark.skipif(not RUNNER, reason="set QLOWER_ET_RUNNER to an ExecuTorch executor_runner built with Vulkan")


def vk_ops_runner() -> str:
    if not VK_OPS_RUNNER:
        (pytest.fail if REQUIRED else pytest.skip)("set QLOWER_VK_OPS_RUNNER to pte_runner linked with qlower's op library")
    return VK_OPS_RUNNER

MODELS = ["mlp", "cnn", "llama", "hf_llama", "hf_qwen2", "hf_gpt2"]


def run_on_runtime(pte: Path, inputs: tuple, workdir: Path, data: Path | None = None,
                   runner: str | None = None) -> tuple[subprocess.CompletedProcess, list[Path]]:
    """Runs ``forward`` once; raw input files in, raw output files (``out-<i>.bin``) back; ``data``: the .ptd;
    ``runner``: another runner with executor_runner's command line (default QLOWER_ET_RUNNER)."""
    files = []
    for i, t in enumerate(inputs):
        files.append(workdir / f"input{i}.bin")
        t.contiguous().numpy().tofile(files[-1])
    out = workdir / "out"
    proc = subprocess.run(
        [runner or RUNNER, "--model_path", str(pte), "--inputs", ",".join(map(str, files)), "--output_file", str(out), "--print_output", "none",
         *(["--data_path", str(data)] if data else [])],
        capture_output=True, text=True, timeout=900,
    )
    return proc, sorted(workdir.glob("out-*.bin"), key=lambda f: int(f.stem.removeprefix("out-")))


@stock_runner
@pytest.mark.parametrize("name", MODELS)
def test_qlower_file_runs_and_matches_golden(name, tmp_path):
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    path = EXAMPLES / f"{name}.py"
    pte = tmp_path / f"{name}.pte"
    summary = qlower.export(path, pte)
    torch.manual_seed(0)
    inputs = tuple(load_model(path).example_inputs)
    golden = GoldenExecutor(read_pte(pte)).run(inputs)
    proc, outputs = run_on_runtime(pte, inputs, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(outputs) == len(golden)
    bar = THRESHOLDS[summary["scheme"]].vs_quantized  # what verify asks of the .pte's outputs
    for want, got_file in zip(golden, outputs):
        got = torch.from_numpy(np.fromfile(got_file, dtype=np.float32)).reshape(want.shape)
        assert sqnr_db(want.float(), got) >= bar, got_file.name


@stock_runner
def test_external_weights_file_runs_like_the_single_file(tmp_path):
    """--external-weights: the .pte and its .ptd give the runtime the same outputs as the one-file export."""
    path = EXAMPLES / "llama.py"
    qlower.export(path, tmp_path / "one.pte")
    qlower.export(path, tmp_path / "split.pte", external_weights=True)
    torch.manual_seed(0)
    inputs = tuple(load_model(path).example_inputs)
    results = []
    for name, data in (("one", None), ("split", tmp_path / "split.ptd")):
        workdir = tmp_path / name
        workdir.mkdir()
        proc, outputs = run_on_runtime(tmp_path / f"{name}.pte", inputs, workdir, data)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        results.append([f.read_bytes() for f in outputs])
    assert results[0] == results[1]


@stock_runner
def test_stock_file_aborts_at_load_as_inspect_predicts(tmp_path):
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    loaded = load_model(EXAMPLES / "llama.py")
    quantize_(loaded.module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    ep = torch.export.export(loaded.module, tuple(loaded.example_inputs))
    buffer = to_edge_transform_and_lower(ep, partitioner=[VulkanPartitioner()]).to_executorch().buffer
    pte = tmp_path / "stock.pte"
    pte.write_bytes(buffer)
    predicted = {p.message for p in summarize_pte(buffer).problems}
    assert predicted
    proc, _ = run_on_runtime(pte, tuple(loaded.example_inputs), tmp_path)
    assert proc.returncode != 0
    assert any(message in proc.stdout + proc.stderr for message in predicted), proc.stderr[-2000:]


VISION = ["resnet", "mobilenet_v2"]
# The bar: qlower's static int8 file is, vs the float model, at least
# as close as the stock flow's file on the same runtime, within this margin.
VS_STOCK_MARGIN_DB = 1.0


def _runtime_outputs(pte: Path, inputs: tuple, workdir: Path, like: list[torch.Tensor]) -> list[torch.Tensor]:
    workdir.mkdir(exist_ok=True)
    proc, outputs = run_on_runtime(pte, inputs, workdir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(outputs) == len(like)
    return [torch.from_numpy(np.fromfile(f, dtype=np.float32)).reshape(w.shape) for w, f in zip(like, outputs)]


@stock_runner
@pytest.mark.parametrize("name", VISION)
def test_static_int8_vision_file_runs_and_matches_golden_and_stock(name, tmp_path):
    from .test_conv import stock_pte

    path = EXAMPLES / f"{name}.py"
    pte = tmp_path / f"{name}.pte"
    qlower.export(path, pte, config=str(EXAMPLES.parent / "configs" / "vision.toml"))
    loaded = load_model(path)
    inputs = tuple(loaded.example_inputs)
    with torch.no_grad():
        want_float = loaded.module(*inputs)
    golden = GoldenExecutor(read_pte(pte)).run(inputs)
    got = _runtime_outputs(pte, inputs, tmp_path / "qlower", golden)
    assert sqnr_db(golden[0].float(), got[0]) >= THRESHOLDS["q8ta_q8csw"].vs_quantized
    stock = tmp_path / "stock.pte"
    stock.write_bytes(stock_pte(path))
    got_stock = _runtime_outputs(stock, inputs, tmp_path / "stock", golden)
    assert sqnr_db(want_float, got[0]) >= sqnr_db(want_float, got_stock[0]) - VS_STOCK_MARGIN_DB


# Transposed convs (et_vk.q8ta_conv2d_transposed) between int8 convs: the seg-style CNN, and odd
# channels (3, 5, 7), kernels 3 and 2, output padding, no bias, an odd input size.
TRANSPOSED = [EXAMPLES.parent / "tests" / "models" / "tiny_segnet.py", EXAMPLES.parent / "tests" / "models" / "odd_upsample.py"]


@stock_runner
@pytest.mark.parametrize("path", TRANSPOSED, ids=lambda p: p.stem)
def test_transposed_conv_file_runs_and_matches_golden(path, tmp_path):
    pte = tmp_path / f"{path.stem}.pte"
    summary = qlower.export(path, pte, config=str(EXAMPLES.parent / "configs" / "vision.toml"))
    assert summary["fused_ops"].get("q8ta_conv2d_transposed")
    inputs = tuple(load_model(path).example_inputs)
    golden = GoldenExecutor(read_pte(pte)).run(inputs)
    got = _runtime_outputs(pte, inputs, tmp_path / "run", golden)
    assert sqnr_db(golden[0].float(), got[0]) >= THRESHOLDS["q8ta_q8csw"].vs_quantized


# Files exported with --runtime qlower (qlower.* ops) on pte_runner linked with qlower's op library: the
# bundled decoder and MLP, and a transformers decoder (residuals, a SiLU MLP). Whole sequences, no KV cache.
QLOWER_RUNTIME_MODELS = ["llama", "mlp", "hf_llama"]


def _qlower_runtime_file(name: str, tmp_path: Path) -> tuple[Path, dict, tuple]:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    path = EXAMPLES / f"{name}.py"
    pte = tmp_path / f"{name}.pte"
    summary = qlower.export(path, pte, runtime="qlower")
    assert summary["vulkan_partitions"] == 1 and summary["cpu_ops"] == {} and summary["runtime_problems"] == []
    ops = {op.name for d in read_pte(pte.read_bytes()).vulkan_delegates for op in d.ops}
    assert any(op.startswith("qlower.") for op in ops), sorted(ops)
    torch.manual_seed(0)
    return pte, summary, tuple(load_model(path).example_inputs)


@pytest.mark.parametrize("name", QLOWER_RUNTIME_MODELS)
def test_qlower_runtime_file_runs_on_the_library_runner_and_matches_golden(name, tmp_path):
    runner = vk_ops_runner()
    pte, summary, inputs = _qlower_runtime_file(name, tmp_path)
    golden = GoldenExecutor(read_pte(pte)).run(inputs)
    proc, outputs = run_on_runtime(pte, inputs, tmp_path, runner=runner)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(outputs) == len(golden)
    bar = THRESHOLDS[summary["scheme"]].vs_quantized
    for want, got_file in zip(golden, outputs):
        got = torch.from_numpy(np.fromfile(got_file, dtype=np.float32)).reshape(want.shape)
        assert torch.isfinite(got).all(), got_file.name
        assert sqnr_db(want.float(), got) >= bar, f"{got_file.name}: {sqnr_db(want.float(), got):.1f} dB < {bar}"


@stock_runner
@pytest.mark.parametrize("name", QLOWER_RUNTIME_MODELS)
def test_qlower_runtime_file_is_refused_by_the_stock_runner_as_inspect_predicts(name, tmp_path):
    pte, _, inputs = _qlower_runtime_file(name, tmp_path)
    predicted = {p.message for p in summarize_pte(pte.read_bytes()).problems}
    assert predicted and all(m.startswith("Missing operator: qlower.") for m in predicted), predicted
    proc, outputs = run_on_runtime(pte, inputs, tmp_path)
    assert proc.returncode != 0 and outputs == []
    assert any(message in proc.stdout + proc.stderr for message in predicted), proc.stderr[-2000:]
