"""Large constants in files beside the output: mapped, never copied into memory, removed at the end."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

import qlower.weight_store as weight_store
from qlower.config import make_options
from qlower.errors import ExportError
from qlower.pipeline import STAGES, ExportJob, run_stages
from qlower.quantize import Int4Embedding, embedding_int4
from qlower.weight_store import WeightStore

from .conftest import MODELS


def scratch_dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".weights")]


def test_store_maps_large_tensors_and_removes_its_files(tmp_path):
    store = WeightStore(tmp_path, "out.pte", min_bytes=1024)
    small = torch.arange(10, dtype=torch.float32)
    assert store.put(small) is small and store.file_of(small) is None
    big = torch.randn(64, 33)  # 8448 bytes
    mapped = store.put(big)
    assert mapped is not big and torch.equal(mapped, big) and mapped.shape == big.shape
    path, digest = store.file_of(mapped)
    assert path.read_bytes() == big.numpy().tobytes() and len(digest) == 32
    assert store.put(mapped) is mapped  # already a file
    assert store.file_of(mapped[1:]) is None and store.file_of(mapped.t()) is None  # part of a file, or not its layout
    layer = nn.Linear(64, 32)
    packed = torch.randint(0, 255, (40, 40), dtype=torch.uint8)
    layer.register_buffer("packed", packed)
    store.adopt(layer)
    assert isinstance(layer.weight, nn.Parameter) and store.file_of(layer.weight) is not None
    assert store.file_of(layer.packed) is not None and torch.equal(layer.packed, packed)
    assert store.file_of(layer.bias) is None  # 128 bytes: kept in memory
    assert scratch_dirs(tmp_path) == [store.directory]
    store.close()
    assert scratch_dirs(tmp_path) == []


def _resident_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_release_pages_takes_a_read_store_weight_out_of_the_resident_set(tmp_path):
    store = WeightStore(tmp_path, "out.pte")
    layer = store.adopt(nn.Linear(4096, 4096, bias=False))  # 64 MB in a file
    want = layer.weight.detach().sum(dim=1)  # every page read through the mapping
    before = _resident_kb()
    store.release_pages(layer)
    released = before - _resident_kb()
    assert released > 48 * 1024  # most of the 64 MB left
    assert torch.equal(layer.weight.detach().sum(dim=1), want)  # read back from the file, unchanged
    store.close()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_a_tensor_made_in_the_store_is_written_a_piece_at_a_time_and_never_resident(tmp_path):
    store = WeightStore(tmp_path, "out.pte", min_bytes=1024)
    small = store.empty((4, 4), torch.uint8)
    assert store.file_of(small) is None
    store.written(small)  # not a store file: left alone
    rows = 8192
    before = _resident_kb()
    made = store.empty((rows, 8192), torch.uint8)  # 64 MB
    want = torch.randint(0, 256, (1024, 8192), dtype=torch.uint8)
    for start in range(0, rows, 1024):
        made[start:start + 1024] = want
        store.written(made[start:start + 1024])
    assert _resident_kb() - before < 16 * 1024  # each piece left the resident set once written
    path, digest = store.file_of(made)
    whole = want.repeat(rows // 1024, 1)
    assert torch.equal(made, whole) and path.read_bytes() == whole.numpy().tobytes()
    assert digest == __import__("hashlib").sha256(whole.numpy().tobytes()).digest()
    assert store.put(made) is made and store.stored_bytes == rows * 8192
    store.close()


@pytest.mark.parametrize("algorithm", ["rtn", "hqq"])
def test_a_layer_quantized_into_the_store_has_the_bytes_it_has_in_memory(tmp_path, monkeypatch, algorithm):
    """Packed straight into its file a chunk of rows at a time (a large LM head): the same values as in memory."""
    from qlower import quantize

    monkeypatch.setattr(quantize, "CHUNK_BYTES", 96 * 64 * 4)  # 64 rows a chunk: several chunks
    torch.manual_seed(0)
    layer = nn.Linear(96, 200, bias=False)
    store = WeightStore(tmp_path, "out.pte", min_bytes=1024)
    in_memory = quantize.quantize_linear(layer, "qta8a_qga4w", 32, algorithm=algorithm)
    in_store = quantize.quantize_linear(layer, "qta8a_qga4w", 32, algorithm=algorithm, out=store)
    assert store.file_of(in_store.weight) is not None and store.file_of(in_memory.weight) is None
    for name, value in in_memory.state_dict().items():
        assert torch.equal(value, in_store.state_dict()[name]), name
    table = nn.Embedding(200, 96)
    emb = Int4Embedding.from_float(table, 32, out=store)
    assert store.file_of(emb.packed) is not None and store.file_of(emb.scales) is not None
    plain = Int4Embedding.from_float(table, 32)
    assert torch.equal(emb.packed, plain.packed) and torch.equal(emb.scales, plain.scales)
    store.close()


def test_export_never_copies_a_large_constant_into_memory(tmp_path, monkeypatch):
    """Lowering takes every stored constant as its file (none goes through ExecuTorch's bytes copy),
    the fuse stage reads no packed weight, the scratch files are gone after, and the file is byte for
    byte the program an export without a store builds in memory."""
    from executorch.backends.vulkan.serialization.vulkan_graph_builder import VkGraphBuilder

    import qlower.patterns.linear as linear

    monkeypatch.setattr(weight_store, "MIN_STORED_BYTES", 2048)
    copied: list[int] = []
    original = VkGraphBuilder.maybe_add_constant_tensor

    def copying(self, node):
        from executorch.backends.vulkan.utils import is_param_node

        if is_param_node(self.program, node):
            copied.append(self.get_param_tensor(node).nbytes)
        return original(self, node)

    monkeypatch.setattr(VkGraphBuilder, "maybe_add_constant_tensor", copying)
    read_by_fuse: list[torch.dtype] = []
    stacked: list[int] = []
    get_param = linear.get_param_tensor

    def reading(ep, node):
        tensor = get_param(ep, node)
        if any(frame.function == "_stacked_args" for frame in inspect.stack()[1:5]):
            stacked.append(tensor.nbytes)  # Q/K/V stacked into one op: one layer's projections at a time
        else:
            read_by_fuse.append(tensor.dtype)
        return tensor

    monkeypatch.setattr(linear, "get_param_tensor", reading)

    options = make_options(group_size=32, quantize_embeddings=True)
    out = tmp_path / "model.pte"
    job = run_stages(ExportJob.of(model_path=MODELS["llama"], output=out, options=options))
    assert job.made.store.stored_bytes > 0.8 * out.stat().st_size
    assert copied and max(copied) < 2048, f"a {max(copied)}-byte constant was copied by the Vulkan preprocess"
    assert torch.uint8 not in read_by_fuse  # packed weights (and their sums) were made by the quantize stage
    assert stacked and max(stacked) < 64 * 1024
    assert scratch_dirs(tmp_path) == []
    in_memory = run_stages(ExportJob.of(model_path=MODELS["llama"], output=None, options=options))
    assert in_memory.made.store is None and in_memory.made.pte_bytes == out.read_bytes()


def test_failed_export_removes_its_scratch_files(tmp_path, monkeypatch):
    import qlower.pipeline as pipeline

    def failing_lower(job):
        assert scratch_dirs(tmp_path) and any(job.made.store.directory.iterdir())
        raise ExportError("lowering failed", "nothing")

    monkeypatch.setattr(pipeline, "STAGES", [(n, failing_lower if n == "lower" else f) for n, f in STAGES])
    monkeypatch.setattr(weight_store, "MIN_STORED_BYTES", 2048)
    with pytest.raises(ExportError):
        run_stages(ExportJob.of(model_path=MODELS["llama"], output=tmp_path / "m.pte", options=make_options(group_size=32)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("vocab,dim,group_size", [(37, 64, 32), (300, 128, 64), (5, 32, 32)])
def test_int4_embedding_matches_embedding_4bit_and_the_fused_op(vocab, dim, group_size):
    """The table packed as the fused linears pack (even value in the low nibble) gives exactly what
    quantized_decomposed.embedding_4bit gives from its own layout, and what ET-VK's
    embedding_q4gsw (is_linear_weight) computes in the golden executor."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (embedding_4bit)

    from qlower import references

    torch.manual_seed(vocab)
    layer = nn.Embedding(vocab, dim)
    emb = Int4Embedding.from_float(layer, group_size)
    # RTN as torchao rounds a linear's weight: times the scale's reciprocal.
    q = torch.clamp(torch.round(layer.weight.detach().reshape(vocab, -1, group_size) * (1.0 / emb.scales.unsqueeze(-1))),
                    -8, 7).to(torch.int8).reshape(vocab, dim)
    u = (q + 8).to(torch.uint8)
    stock_layout = (u[:, ::2] << 4) | u[:, 1::2]  # embedding_4bit's: even value in the high nibble
    indices = torch.randint(0, vocab, (2, 9))
    ours = emb(indices)
    stock = torch.ops.quantized_decomposed.embedding_4bit.dtype(stock_layout, emb.scales, None, -8, 7, indices, dtype=torch.float32)
    assert torch.equal(ours, stock)
    assert torch.equal(embedding_int4(emb.packed, emb.scales, group_size, indices), ours)
    assert torch.equal(references.embedding_q4gsw(emb.packed, emb.scales, group_size, indices, True), ours)


# --- verify --sample: layers of a big file checked alone -------------------------------------------


def test_spread_takes_first_and_last():
    from qlower.verify_sample import spread

    assert spread(3, 10) == [0, 4, 9] and spread(1, 10) == [9] and spread(20, 4) == [0, 1, 2, 3]
    assert spread(5, 113) == [0, 28, 56, 84, 112]


@pytest.fixture(scope="module")
def sampled_export(tmp_path_factory):
    """A sharded bf16 folder (GQA, tied embeddings) and its KV-cache export with int4 embeddings."""
    from .test_stream import llama_config, write_folder

    root = tmp_path_factory.mktemp("sample")
    folder = write_folder(root / "llama", llama_config())
    pte = root / "llama.pte"
    import qlower

    qlower.export(folder, pte, group_size=32, quantize_embeddings=True, max_seq_len=64)
    return folder, pte


def test_verify_sample_checks_layers_alone(sampled_export):
    from qlower.verify import verify

    folder, pte = sampled_export
    seen = []
    report = verify(folder, pte, sample=4, on_layer=seen.append)
    assert report["passed"] and report["kind"] == "sample" and report["sampled"] == 4 == len(seen)
    layers = report["layers"]
    assert layers[0]["op"] == "embedding_q4gsw" and layers[-1]["name"].endswith("lm_head")
    assert layers[-1]["index"] == report["fused_layers"] - 1
    assert all(layer["sqnr_db"] > 100 for layer in layers)  # the same integers and scales on both sides


def test_verify_sample_catches_a_damaged_layer(sampled_export, tmp_path):
    """Flipping bytes of one packed weight in the file fails the layers that read it and only them: the LM
    head, and the embedding tied to it (their int4 values are equal, so the file stores them once)."""
    from qlower.pte import read_pte
    from qlower.verify import verify
    from qlower.verify_sample import file_layers

    folder, pte = sampled_export
    data = bytearray(pte.read_bytes())
    decoded = read_pte(pte)
    last = file_layers(decoded)[-1]  # the LM head
    graph = last["delegate"].graph
    key = graph.constants[graph.values[last["args"][3]].value.constant_id].named_key
    packed = decoded.named_bytes(key)
    at = bytes(data).find(packed)
    assert at > 0 and bytes(data).find(packed, at + 1) < 0
    readers = [layer for layer in file_layers(decoded) if _packed_key(layer) == key]
    assert sorted(layer["kind"] for layer in readers) == ["embedding", "linear"]  # tied: stored once
    for i in range(at, at + len(packed) // 4, 7):
        data[i] ^= 0x33
    damaged = tmp_path / "damaged.pte"
    damaged.write_bytes(bytes(data))
    report = verify(folder, damaged, sample=3)
    assert not report["passed"] and any("lm_head" in f for f in report["failures"])
    assert all("lm_head" in f or "embed_tokens" in f for f in report["failures"])
    assert len(report["failures"]) < len(report["layers"])  # the other sampled layers pass


def _packed_key(layer) -> str:
    """The named-data key of a fused int4 op's packed weight."""
    from qlower.verify_sample import FUSED_INT4

    graph = layer["delegate"].graph
    weight_at, _ = FUSED_INT4[layer["op"]]
    return graph.constants[graph.values[layer["args"][weight_at]].value.constant_id].named_key


def test_verify_sample_needs_a_checkpoint_it_can_stream(tmp_path):
    from typer.testing import CliRunner

    from qlower.cli import app

    model = MODELS["llama"]
    pte = tmp_path / "m.pte"
    import qlower

    qlower.export(model, pte, group_size=32)
    result = CliRunner().invoke(app, ["verify", str(model), str(pte), "--sample", "2"])
    assert result.exit_code == 1 and "--sample needs weights" in result.output and "Traceback" not in result.output


def test_verify_sample_pairs_layers_registered_out_of_execution_order(tmp_path):
    """Phi-3 registers ``o_proj`` before ``qkv_proj`` but runs it after: layers pair by shape."""
    import qlower
    from qlower.verify import verify

    from .test_llm import FAMILIES

    torch.manual_seed(0)
    folder = tmp_path / "phi3"
    FAMILIES["phi3"]().save_pretrained(str(folder))
    pte = tmp_path / "phi3.pte"
    qlower.export(folder, pte, group_size=32, quantize_embeddings=True, max_seq_len=32)
    report = verify(folder, pte, sample=20)
    assert report["passed"] and report["sampled"] == report["fused_layers"]
    assert all(layer["sqnr_db"] > 100 for layer in report["layers"])
