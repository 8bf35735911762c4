"""Streaming load + quantize: same model as loading whole, bounded memory, progress, checkpoint errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qlower.config import make_options
from qlower.errors import ModelLoadError
from qlower.llm.load import load_any
from qlower.loader import load_model
from qlower.quantize import quantize_model
from qlower.stream import SafetensorsWeights, empty_weights

from .conftest import ROOT, write_model

transformers = pytest.importorskip("transformers")
TOKENS = (torch.arange(7) * 13 % 256).unsqueeze(0)


def llama_config(**overrides) -> dict:
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, hidden_act="silu", torch_dtype="bfloat16")
    config.update(overrides)
    return config


def llama_tensors(config: dict, seed: int = 0):
    """(name, bf16 tensor) of a Llama checkpoint, one at a time (the whole model is never built)."""
    gen = torch.Generator().manual_seed(seed)
    dim, ffn = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * dim // config["num_attention_heads"]

    def rand(*size):
        return (torch.randn(size, generator=gen) * 0.02).to(torch.bfloat16)

    yield "model.embed_tokens.weight", rand(config["vocab_size"], dim)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, size in (("self_attn.q_proj", (dim, dim)), ("self_attn.k_proj", (kv, dim)), ("self_attn.v_proj", (kv, dim)),
                           ("self_attn.o_proj", (dim, dim)), ("mlp.gate_proj", (ffn, dim)), ("mlp.up_proj", (ffn, dim)),
                           ("mlp.down_proj", (dim, ffn))):
            yield p + name + ".weight", rand(*size)
        yield p + "input_layernorm.weight", 1 + rand(dim)
        yield p + "post_attention_layernorm.weight", 1 + rand(dim)
    yield "model.norm.weight", 1 + rand(dim)
    if not config["tie_word_embeddings"]:
        yield "lm_head.weight", rand(config["vocab_size"], dim)


def write_folder(folder: Path, config: dict, shard_bytes: int = 1 << 16) -> Path:
    """A sharded save_pretrained-style folder with an index, written shard by shard."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    index, shard, size = {}, {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for name, t in llama_tensors(config):
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("stream") / "llama", llama_config())


def both_ways(path, options, **kwargs):
    """(whole load, streamed load): each quantized by export's quantize stage."""
    models = []
    for stream in (False, True):
        loaded, _, _ = load_any(path, options, stream=stream, **kwargs)
        assert (loaded.weights is not None) == stream
        models.append(quantize_model(loaded, options, lambda m: None))
    return models


@pytest.mark.parametrize("scheme,rows_read", [("qta8a_qga4w", False), ("qta8a_qga4w", True), ("fp32", False)])
def test_streamed_folder_is_the_loaded_model_bit_for_bit(sharded, scheme, rows_read, monkeypatch):
    """Sharded bf16 folder, tied embeddings: same plans, buffers (RoPE inv_freq) and logits as from_pretrained.

    ``rows_read``: every quantized weight is read from disk a few rows at a time (as a large one is)."""
    if rows_read:
        import qlower.quantize
        import qlower.stream

        monkeypatch.setattr(qlower.stream, "ROWS_READ_BYTES", 0)
        monkeypatch.setattr(qlower.quantize, "CHUNK_BYTES", 1 << 14)
        calls = []
        read_rows = SafetensorsWeights.read_rows
        monkeypatch.setattr(SafetensorsWeights, "read_rows", lambda self, *a: calls.append(a) or read_rows(self, *a))
    options = make_options(scheme=scheme, group_size=32, quantize_embeddings=True, kv_cache=False)
    (whole, plans_w), (streamed, plans_s) = both_ways(sharded, options)
    assert [p.to_dict() for p in plans_w] == [p.to_dict() for p in plans_s]
    assert dict(whole.named_buffers()).keys() == dict(streamed.named_buffers()).keys()
    for (name, a), (_, b) in zip(whole.named_buffers(), streamed.named_buffers()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(whole(TOKENS), streamed(TOKENS))
    if rows_read:  # every quantized weight read in chunks; the tied embedding twice (embedding, LM head)
        names = [c[0] for c in calls]
        tied_head = {"lm.lm_head"}  # read under the embedding's name
        assert {n.rpartition(".")[0] for n in names} == {p.name for p in plans_s if p.quantized} - tied_head
        embedding = [c for c in calls if c[0] == "lm.model.embed_tokens.weight"]
        assert len(embedding) >= 4 and sorted(embedding)[0][1:] == sorted(embedding)[1][1:] == (0, embedding[0][2])
    if scheme == "fp32":  # tied weights stay one tensor
        lm = streamed.lm
        assert lm.lm_head.weight is lm.model.embed_tokens.weight


def test_streamed_gpt2_conv1d_folder(tmp_path):
    """GPT-2's Conv1D weights are stored [in, out]: transposed on arrival, same logits."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
                                 ).to(torch.float16).save_pretrained(str(tmp_path))
    options = make_options(group_size=32, quantize_embeddings=True, kv_cache=False)
    (whole, _), (streamed, _) = both_ways(tmp_path, options)
    with torch.no_grad():
        assert torch.equal(whole(TOKENS), streamed(TOKENS))


MODEL_FILE = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 64)
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 256, bias=False)
        self.register_buffer("scale", torch.full((64,), 0.5))
    def forward(self, ids):
        return self.head(self.body(self.emb(ids) * self.scale))

model = Net()
example_inputs = (torch.arange(7).unsqueeze(0),)
"""


def test_model_file_with_safetensors_checkpoint_streams(tmp_path):
    from safetensors.torch import save_file

    path = write_model(tmp_path, MODEL_FILE)
    torch.manual_seed(1)
    state = {k: v.to(torch.bfloat16) for k, v in load_model(path).module.state_dict().items()}
    save_file(state, str(tmp_path / "ckpt.safetensors"))
    options = make_options(group_size=32, quantize_embeddings=True)
    (whole, _), (streamed, _) = both_ways(path, options, checkpoint=tmp_path / "ckpt.safetensors")
    with torch.no_grad():
        assert torch.equal(whole(*TOKENS.unsqueeze(0)), streamed(*TOKENS.unsqueeze(0)))

    del state["body.0.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="no tensor body.0.bias"):
        load_any(path, options, checkpoint=tmp_path / "missing.safetensors", stream=True)
    state["body.0.bias"] = torch.zeros(5)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ModelLoadError, match=r"body.0.bias is \[5\] in the checkpoint, the model's is \[128\]"):
        load_any(path, options, checkpoint=tmp_path / "shape.safetensors", stream=True)


def test_empty_weights_keeps_buffers_and_ties():
    with empty_weights():
        lin = torch.nn.Linear(4, 4)
        lin.register_buffer("b", torch.ones(2))
    assert lin.weight.device.type == "meta" and lin.b.device.type == "cpu" and lin.b.sum() == 2


def test_truncated_shard_is_an_error(tmp_path, sharded):
    import shutil

    folder = tmp_path / "cut"
    shutil.copytree(sharded, folder)
    last = sorted(folder.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    weights = SafetensorsWeights.open(folder)
    name = next(n for n, e in weights.entries.items() if e.file == last and e.offset + e.nbytes > last.stat().st_size)
    with pytest.raises(ModelLoadError, match="truncated"):
        weights.read(name)


def test_progress_and_peak_memory_in_summary(sharded, tmp_path):
    import qlower

    seen = []
    summary = qlower.export(sharded, tmp_path / "m.pte", group_size=32, quantize_embeddings=True, max_seq_len=16,
                            on_layer=seen.append)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {p.layer for p in seen} >= {"model.embed_tokens", "lm_head", "model.layers.1.mlp.down_proj", "model.norm"}
    assert summary["peak_rss_mb"] >= max(summary["stage_peak_rss_mb"].values()) > 0
    assert set(summary["stage_peak_rss_mb"]) >= {"load", "quantize", "export", "lower", "serialize"}


# --- memory: never a float copy of the whole model -------------------------------------------------

MEASURE = """
import json, sys
from qlower.console import import_heavy_libraries
import_heavy_libraries()
from qlower.config import make_options
from qlower.llm.load import load_any
from qlower.loader import load_model
from qlower.memory import PeakMeter, rss_mb
from qlower.quantize import quantize_model

options = make_options(group_size=64, quantize_embeddings=True, kv_cache=False)
for path in (sys.argv[3], sys.argv[1]):  # the small folder first: imports and first-call costs are not the model's
    before = rss_mb()
    meter = PeakMeter()
    meter.start()
    loaded, _, _ = load_any(path, options, stream=sys.argv[2] == "stream")
    quantize_model(loaded, options, lambda m: None)
    meter.stop("load+quantize")
    del loaded
print(json.dumps({"increase_mb": meter.peaks["load+quantize"] - before}))
"""


def _peak_increase(folder: Path, mode: str, warm_up: Path) -> float:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), mode, str(warm_up)],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["increase_mb"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's per-process RSS high-water mark")
def test_streaming_never_holds_a_float_copy_of_the_model(tmp_path, sharded):
    """A 34M-parameter folder (138 MB in float32, 69 MB as bf16 shards): loading whole costs more than
    the float model; streaming stays well below it (quantized weights + about one layer)."""
    config = llama_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=8192)
    folder = write_folder(tmp_path / "big", config, shard_bytes=16 << 20)
    float_mb = sum(t.numel() for _, t in llama_tensors(config)) * 4 / 2**20
    streamed = _peak_increase(folder, "stream", sharded)
    whole = _peak_increase(folder, "whole", sharded)
    assert whole > float_mb, f"the measure cannot tell: a whole load took {whole:.0f} MB for a {float_mb:.0f} MB model"
    print(f"float model {float_mb:.0f} MB; peak RSS increase: whole load {whole:.0f} MB, streamed {streamed:.0f} MB")
    assert streamed < 0.6 * float_mb, f"streaming peaked {streamed:.0f} MB above its start; the float model is {float_mb:.0f} MB"


def test_external_weights_writes_a_ptd_beside_the_pte(tiny_llama, tmp_path):
    import qlower
    from qlower.errors import OutputError

    one = qlower.export(tiny_llama, tmp_path / "one.pte")
    split = qlower.export(tiny_llama, tmp_path / "split.pte", external_weights=True)
    ptd = tmp_path / "split.ptd"
    assert split["written"] == [str(ptd)] and ptd.stat().st_size > 0
    assert split["vulkan_partitions"] == 1 and split["fused_ops"] == one["fused_ops"]
    # the weights moved out: the .pte shrinks by about the .ptd's size
    shrink = (tmp_path / "one.pte").stat().st_size - (tmp_path / "split.pte").stat().st_size
    assert shrink > 0.9 * ptd.stat().st_size
    # the size split counts what the .pte holds; the weights in the .ptd are apart, as external
    from qlower.pte import SIZE_PARTS

    size = split["size"]
    assert size["total"] == (tmp_path / "split.pte").stat().st_size == sum(size[k] for k in SIZE_PARTS)
    assert size["packed_weights"] == 0 and 0.9 * ptd.stat().st_size < size["external"] <= ptd.stat().st_size
    assert one["size"]["external"] == 0 and one["size"]["packed_weights"] > 0
    with pytest.raises(OutputError, match="--verify"):
        qlower.export(tiny_llama, tmp_path / "v.pte", external_weights=True, verify=2)


def test_cli_prints_layer_progress_and_peak_memory(sharded, tmp_path):
    from typer.testing import CliRunner

    from qlower.cli import app

    runner = CliRunner()
    args = ["export", str(sharded), "-o", str(tmp_path / "c.pte"), "--group-size", "32", "--max-seq-len", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "model.layers.1" in result.stderr and "GiB read" in result.stderr
    assert "peak memory (RSS):" in result.stdout
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0 and "GiB read" not in result.stderr
    assert json.loads(result.stdout)["peak_rss_mb"] > 0


def test_tied_embedding_and_lm_head_are_stored_once(tmp_path):
    """A tied embedding and LM head quantized to int4 round to the same values (the embedding's RTN is
    torchao's): the file stores their packed weight once, with two users."""
    from qlower.api import export
    from qlower.pte import SIZE_PARTS, read_pte, size_breakdown

    folder = write_folder(tmp_path / "tied", llama_config(tie_word_embeddings=True))
    out = tmp_path / "tied.pte"
    export(folder, out, group_size=32, quantize_embeddings=True)
    size = size_breakdown(read_pte(out, constants=False))
    vocab, hidden = llama_config()["vocab_size"], llama_config()["hidden_size"]
    packed = [s for s in size["shared_constants"] if s["role"] == "packed_weights"]
    assert [(s["users"], s["bytes"]) for s in packed] == [(2, vocab * hidden // 2)]
    assert size["total"] == sum(size[k] for k in SIZE_PARTS)
