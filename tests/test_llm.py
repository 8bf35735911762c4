"""LLM decode: Hugging Face folders, KV-cache export, runner metadata, generate, inspect and verify of decode files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import qlower
from qlower.cli import app
from qlower.errors import ConfigError, ModelLoadError, VerifyError
from qlower.inspect import inspect_pte
from qlower.llm.generate import generate
from qlower.pte import SIZE_PARTS

from .conftest import MODELS, write_model

transformers = pytest.importorskip("transformers")
runner = CliRunner()

MAX_SEQ_LEN = 32
PROMPT = [3, 17, 42, 99, 5, 8, 120, 7]
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
# Families beyond the recipes': each with what makes it different (QK norm, fused projections,
# scaled embeddings and a custom attention scale, learned positions with Conv1D projections).
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=32)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, pad_token_id=0)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **COMMON, head_dim=32, sliding_window=MAX_SEQ_LEN, query_pre_attn_scalar=24)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
}


def save_tokenizer(folder: Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer over words w0..w{n-1}, saved as transformers does (tokenizer.json + config)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")
    fast.save_pretrained(str(folder))


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """hf_folder(family) -> a save_pretrained folder with random weights (and a tokenizer for llama)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(f"hf_{family}")
            FAMILIES[family]().save_pretrained(str(folder))
            if family == "llama":
                save_tokenizer(folder)
            cache[family] = folder
        return cache[family]

    return get


@pytest.fixture(scope="session")
def decode_file(hf_folder, tmp_path_factory):
    """decode_file(family, scheme) -> (.pte, export summary), exported once per session."""
    cache: dict[tuple[str, str], tuple[Path, dict]] = {}
    directory = tmp_path_factory.mktemp("decode")

    def get(family: str, scheme: str = "qta8a_qga4w") -> tuple[Path, dict]:
        key = (family, scheme)
        if key not in cache:
            out = directory / f"{family}_{scheme}.pte"
            summary = qlower.export(hf_folder(family), out, scheme=scheme, group_size=32, max_seq_len=MAX_SEQ_LEN)
            cache[key] = (out, summary)
        return cache[key]

    return get


def test_hf_folder_exports_one_partition_with_kv_cache_and_metadata(hf_folder, decode_file):
    out, summary = decode_file("llama")
    assert summary["vulkan_partitions"] == 1
    assert summary["cpu_ops"] == {}
    assert summary["runtime_problems"] == []
    assert summary["fused_ops"]["sdpa_with_kv_cache"] == 2
    assert summary["fused_ops"]["linear_dq8ca_q4gsw"] == 11  # 2 blocks of 5 (Q/K/V one op) + LM head
    # The per-layer report names layers as the folder's model does, each one fused.
    assert summary["layers"]["linear"] == summary["layers"]["fused"] == 15 and summary["layers"]["unfused"] == 0
    assert any(r["name"] == "model.layers.0.self_attn.q_proj" and r["fused_op"] for r in summary["layer_report"])
    decode = summary["decode"]
    assert decode["max_seq_len"] == MAX_SEQ_LEN and decode["layers"] == 2
    assert decode["kv_cache_bytes"] == 2 * 2 * MAX_SEQ_LEN * 2 * 16 * 4  # layers × K/V × S × kv heads × head dim × fp32
    assert decode["metadata"] == {
        "get_max_seq_len": MAX_SEQ_LEN, "get_max_context_len": MAX_SEQ_LEN, "get_vocab_size": 256, "get_n_layers": 2,
        "use_kv_cache": True, "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True,
        "get_bos_id": 1, "get_eos_ids": [2],
    }
    # The tokenizer travels with the file, under its stem, as a folder whose config names the file's BOS/EOS.
    folder = out.parent / f"{out.stem}.tokenizer"
    written = json.loads((folder / "tokenizer.json").read_text())
    assert written["model"] == json.loads((hf_folder("llama") / "tokenizer.json").read_text())["model"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("w1", "w2")
    tokenizer = decode["tokenizer"]
    assert tokenizer["path"] == str(folder) and (tokenizer["bos"], tokenizer["eos"]) == (1, 2)
    assert any("WordLevel" in p for p in tokenizer["problems"])  # ExecuTorch's loader reads BPE only
    assert decode["runner_command"][:5] == ["llama_main", "--model_path", str(out), "--tokenizer_path", f"{folder}/"]


def test_inspect_reads_decode_file(decode_file):
    out, _ = decode_file("llama")
    report = inspect_pte(out, ["partitions==1", "cpu_ops==0", "fused.sdpa_with_kv_cache==2", "runtime_problems==0"])
    assert report["ok"], report["expectations"]
    decode = report["decode"]
    assert decode["metadata"]["get_vocab_size"] == 256 and decode["metadata"]["get_eos_ids"] == [2]
    assert decode["kv_cache_layers"] == 2
    assert {c["kind"] for c in decode["kv_cache"]} == {"K", "V"}
    assert all(c["shape"] == [1, MAX_SEQ_LEN, 2, 16] for c in decode["kv_cache"])
    forward = next(m for m in report["methods"] if m["name"] == "forward")
    assert forward["inputs"][0]["dynamic"] and forward["inputs"][0]["shape"] == [1, MAX_SEQ_LEN]
    # Every op is named by its qualified name, none as a bare overload.
    names = {op["op"] for v in report["vulkan"] for op in v["ops"]}
    assert "llama.sdpa_with_kv_cache.default" in names and "aten.sym_size.int" in names
    assert all(n.count(".") >= 2 for n in names), names


def test_generate_fp32_matches_eager_every_token(decode_file, hf_folder):
    out, _ = decode_file("llama", "fp32")
    report = generate(hf_folder("llama"), out, PROMPT, max_new_tokens=8)
    assert report["ok"], report["failures"]
    assert report["tokens"] == report["eager_tokens"] == report["float_tokens"]
    assert report["agree"] == len(report["tokens"]) == 8
    assert all(s["sqnr_vs_float"] > 80 for s in report["steps"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_decodes_like_eager(decode_file, hf_folder, family):
    out, summary = decode_file(family)
    assert summary["vulkan_partitions"] == 1 and summary["cpu_ops"] == {} and summary["runtime_problems"] == []
    assert summary["fused_ops"]["sdpa_with_kv_cache"] == 2
    # What int4 costs against float on tiny random models (down to ~7 dB for QK-norm families) is not
    # the point here; the file against the quantized eager model is (and export's own check has
    # already matched each family's float model behind the cache with its uncached forward).
    report = generate(hf_folder(family), out, PROMPT, max_new_tokens=8, min_sqnr_float=0)
    assert report["ok"], report["failures"]
    assert all(s["sqnr_vs_quantized"] >= 30 for s in report["steps"])
    assert report["agree"] >= 4


def test_generate_cli_with_prompt_text(decode_file, hf_folder):
    out, _ = decode_file("llama")
    result = runner.invoke(app, ["generate", str(hf_folder("llama")), str(out), "--prompt", "w5 w9 w33 w4", "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["prompt_ids"] == [5, 9, 33, 4]
    assert set(doc) >= {"tokens", "eager_tokens", "float_tokens", "agree", "steps", "text"}
    assert doc["text"] == " ".join(f"w{t}" for t in doc["tokens"])
    assert [set(s) for s in doc["steps"]] == [{"pos", "sqnr_vs_quantized", "sqnr_vs_float"}] * len(doc["tokens"])


UNREACHABLE_SQNR_DB = 400.0  # above SQNR_IDENTICAL_DB: no file meets it


def test_generate_names_quality_apart_from_defects(decode_file, hf_folder, monkeypatch):
    """A faithful int4 file whose quantization is lossy against float warns (exit 0); a float bar the
    user sets fails with exit 3; a vs-quantized bar missed is a defect (exit 1)."""
    import dataclasses

    from qlower import metrics

    out, summary = decode_file("llama")
    scheme = summary["scheme"]
    args = ["generate", str(hf_folder("llama")), str(out), "--prompt-ids", "3,17,42", "--max-new-tokens", "3", "--json"]
    monkeypatch.setitem(metrics.THRESHOLDS, scheme, dataclasses.replace(metrics.THRESHOLDS[scheme], vs_float=UNREACHABLE_SQNR_DB))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["defects"] == [] and doc["quality"]["below"] and not doc["quality"]["enforced"]
    assert "warning: quantization costs" in result.stderr
    result = runner.invoke(app, args + ["--min-sqnr-float", str(UNREACHABLE_SQNR_DB)])
    assert result.exit_code == 3 and "error: quantization costs" in result.stderr
    assert json.loads(result.stdout)["defects"] == []
    result = runner.invoke(app, args + ["--min-sqnr-quantized", str(UNREACHABLE_SQNR_DB)])
    assert result.exit_code == 1 and "does not decode as the model does" in result.stderr
    assert json.loads(result.stdout)["defects"]


def test_verify_runs_decode_steps(decode_file, hf_folder):
    out, _ = decode_file("llama")
    result = runner.invoke(app, ["verify", str(hf_folder("llama")), str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "decode" and doc["passed"] and len(doc["steps"]) >= 4


def test_metadata_override_and_cli_flags(hf_folder, tmp_path):
    out = tmp_path / "m.pte"
    result = runner.invoke(app, ["export", str(hf_folder("llama")), "-o", str(out), "--scheme", "fp32", "--max-seq-len", "16",
                                 "--metadata", '{"get_bos_id": 7, "get_eos_ids": [8, 9]}', "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)["decode"]["metadata"]
    assert meta["get_bos_id"] == 7 and meta["get_eos_ids"] == [8, 9] and meta["get_max_seq_len"] == 16
    assert inspect_pte(out)["decode"]["metadata"]["get_eos_ids"] == [8, 9]


def test_model_file_decoder_with_kv_cache(tmp_path):
    out = tmp_path / "llama.pte"
    summary = qlower.export(MODELS["llama"], out, scheme="fp32", kv_cache=True, max_seq_len=24)
    assert summary["vulkan_partitions"] == 1 and summary["cpu_ops"] == {}
    assert "get_bos_id" not in summary["decode"]["metadata"]  # a model file says nothing of its tokenizer
    report = generate(MODELS["llama"], out, PROMPT[:5], max_new_tokens=6)
    assert report["ok"] and report["tokens"] == report["float_tokens"]


def test_positions_taken_from_the_chunk_are_refused(tmp_path):
    """A decoder that numbers positions 0..T-1 inside each call cannot decode with a cache: caught at export."""
    path = write_model(tmp_path, """
        import torch.nn.functional as F
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.tok = nn.Embedding(64, 32)
                self.pos = nn.Embedding(64, 32)
                self.qkv = nn.Linear(32, 96)
                self.out = nn.Linear(32, 64)
            def forward(self, tokens):
                t = tokens.shape[1]
                x = self.tok(tokens) + self.pos(torch.arange(t))
                q, k, v = self.qkv(x).view(1, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return self.out(y.transpose(1, 2).reshape(1, t, 32))
        model = M()
        example_inputs = (torch.randint(0, 64, (1, 8)),)
        metadata = {"get_bos_id": 0, "get_eos_ids": [1]}
    """)
    with pytest.raises(ModelLoadError, match="differ from its own forward"):
        qlower.export(path, tmp_path / "m.pte", scheme="fp32", kv_cache=True, max_seq_len=16)


def test_decode_errors(hf_folder, tmp_path, decode_file):
    with pytest.raises(ModelLoadError, match="static q8ta_q8csw"):
        qlower.export(hf_folder("llama"), tmp_path / "a.pte", scheme="q8ta_q8csw")
    with pytest.raises(ModelLoadError, match="exceeds the model's 128 positions"):
        qlower.export(hf_folder("llama"), tmp_path / "a.pte", max_seq_len=4096)
    with pytest.raises(ConfigError, match="metadata"):
        qlower.export(hf_folder("llama"), tmp_path / "a.pte", metadata="[1, 2]")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        qlower.export(empty, tmp_path / "a.pte")
    out, _ = decode_file("llama")
    with pytest.raises(VerifyError, match="exceed the file's max_seq_len"):
        generate(hf_folder("llama"), out, list(range(30)), max_new_tokens=8)
    with pytest.raises(VerifyError, match="token ids must be in"):
        generate(hf_folder("llama"), out, [300], max_new_tokens=2)
    assert not (tmp_path / "a.pte").exists()


def test_not_a_causal_lm_folder(tmp_path):
    folder = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64)).save_pretrained(str(folder))
    result = runner.invoke(app, ["export", str(folder), "-o", str(tmp_path / "b.pte")])
    assert result.exit_code == 1
    assert "BertModel model, not a causal LM" in result.output


def _drop_architectures(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(config))


def test_folder_without_architectures_loads_by_model_type(hf_folder, tmp_path):
    """A config.json saved on its own (no "architectures"): the class AutoModelForCausalLM picks for its model_type."""
    from qlower.llm.hf_folder import load_hf_model, read_hf_folder

    import shutil

    folder = tmp_path / "llama"
    shutil.copytree(hf_folder("llama"), folder)
    _drop_architectures(folder)
    read = read_hf_folder(folder)
    assert read.architecture == "LlamaForCausalLM"
    model = load_hf_model(read)
    want = transformers.LlamaForCausalLM.from_pretrained(str(hf_folder("llama")), dtype=torch.float32)
    assert type(model) is transformers.LlamaForCausalLM
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))


def test_encoder_folder_without_architectures_is_not_a_causal_lm(tmp_path):
    folder = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64)).save_pretrained(str(folder))
    _drop_architectures(folder)
    result = runner.invoke(app, ["export", str(folder), "-o", str(tmp_path / "b.pte")])
    assert result.exit_code == 1
    assert "holds a bert model, not a causal LM" in result.output and not (tmp_path / "b.pte").exists()


def test_generate_rejects_a_file_without_kv_cache(tmp_path, exported):
    model, pte = exported("llama", "fp32")
    result = runner.invoke(app, ["generate", str(model), str(pte), "--prompt-ids", "1,2,3"])
    assert result.exit_code == 1 and "not a KV-cache decoder" in result.output
    result = runner.invoke(app, ["generate", str(model), str(pte), "--prompt-ids", "1,x"])
    assert result.exit_code == 2


def test_sdpa_reference_matches_executorch_kernels():
    """qlower's sdpa_with_kv_cache reference = ExecuTorch's update_cache + custom_sdpa CPU kernels, across calls."""
    from qlower.llm.kv_cache import load_llm_custom_ops
    from qlower.references import sdpa_with_kv_cache

    load_llm_custom_ops()
    gen = torch.Generator().manual_seed(0)
    for hq, hkv, d in ((4, 2, 16), (6, 6, 8), (8, 1, 12)):
        ours = [torch.zeros(1, 20, hkv, d) for _ in range(2)]
        theirs = [torch.zeros(1, 20, hkv, d) for _ in range(2)]
        start = 0
        for t in (7, 1, 1, 3, 1):
            q = torch.randn(1, t, hq, d, generator=gen)
            k, v = torch.randn(1, t, hkv, d, generator=gen), torch.randn(1, t, hkv, d, generator=gen)
            got = sdpa_with_kv_cache(q, k, v, ours[0], ours[1], start, 1, None, 0.0, True, None)
            torch.ops.llama.update_cache(k, theirs[0], start)
            torch.ops.llama.update_cache(v, theirs[1], start)
            want = torch.ops.llama.custom_sdpa(q, theirs[0], theirs[1], start, None, 0, True)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            start += t
        torch.testing.assert_close(ours[0], theirs[0])


def test_golden_rejects_tokens_beyond_the_bound(decode_file):
    from qlower.golden import GoldenExecutor

    out, _ = decode_file("llama")
    with pytest.raises(VerifyError, match="at most"):
        GoldenExecutor.from_file(out).run((torch.zeros(1, MAX_SEQ_LEN + 1, dtype=torch.long), torch.tensor([0])))


def test_verify_gpt2_inside_a_user_wrapper(tmp_path):
    """verify's quantized reference comes from export's quantize stage: GPT-2's Conv1D swap included."""
    path = write_model(tmp_path, """
        from transformers import GPT2Config, GPT2LMHeadModel
        class Wrapper(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.gpt = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=32))
            def forward(self, ids):
                return self.gpt(input_ids=ids, use_cache=False).logits
        model = Wrapper().eval()
        example_inputs = (torch.randint(0, 128, (1, 8)),)
    """)
    out = tmp_path / "gpt2.pte"
    qlower.export(path, out, group_size=32)
    result = runner.invoke(app, ["verify", str(path), str(out), "--samples", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["passed"]
    assert doc["layers"] and all(layer.get("eager_index") is not None or layer.get("matched", True) for layer in doc["layers"])


# --- what a user sees at real sizes -------------------------------------------

# The export summary of a 32-layer decoder fits on one screen.
SUMMARY_MAX_LINES = 50
DEEP_LAYERS = 32
DEEP = dict(COMMON, num_hidden_layers=DEEP_LAYERS)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def rendered_export(summary: dict, capsys, all_layers: bool = False) -> list[str]:
    from qlower.render import render_export

    capsys.readouterr()
    render_export(summary, all_layers=all_layers)
    return capsys.readouterr().out.splitlines()


def test_deep_decoder_summary_fits_on_a_screen(decode_file, capsys):
    """A 32-layer decoder's layer plans (one layer left float and one at another group size by
    overrides) in an export summary: repeated layers share a row, the odd ones stay visible."""
    from qlower.config import ExportOptions, LayerOverride
    from qlower.quantize import plan_layers
    from qlower.summary import layer_groups, layer_rows

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DEEP))
    options = ExportOptions(group_size=32, layers=(LayerOverride("model.layers.5.mlp.down_proj", scheme="skip"),
                                                    LayerOverride("model.layers.9.mlp.up_proj", group_size=64)))
    rows = layer_rows(plan_layers(model, options), [], {})
    assert len(rows) == DEEP_LAYERS * len(PROJECTIONS) + 2  # + embedding, lm_head
    _, summary = decode_file("llama")
    summary = dict(summary, layer_report=rows, layer_groups=layer_groups(rows))
    lines = rendered_export(summary, capsys)
    assert len(lines) <= SUMMARY_MAX_LINES, "\n".join(lines)
    text = "\n".join(lines)
    assert "model.layers.{0..31}.self_attn.q_proj ×32" in text
    assert "model.layers.{0..4,6..31}.mlp.down_proj ×31" in text and "model.layers.5.mlp.down_proj " in text
    assert "model.layers.{0..8,10..31}.mlp.up_proj ×31" in text and "model.layers.9.mlp.up_proj " in text
    assert "skipped by a per-layer override" in text
    full = rendered_export(summary, capsys, all_layers=True)
    assert "--all-layers lists each" in text
    assert len(full) - len(lines) == len(rows) - len(summary["layer_groups"]) - 1  # one row per layer, no note
    assert all(f"model.layers.{i}.{p} " in "\n".join(full) for i in range(DEEP_LAYERS) for p in PROJECTIONS)


@pytest.mark.skipif(os.environ.get("QLOWER_BIG_TESTS") != "1", reason="set QLOWER_BIG_TESTS=1 (minutes: a 32-layer decoder export)")
def test_deep_decoder_export_cli(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "deep"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**DEEP)).save_pretrained(str(folder))
    out = tmp_path / "deep.pte"
    result = runner.invoke(app, ["export", str(folder), "-o", str(out), "--group-size", "32", "--max-seq-len", "16", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    names = {r["name"] for r in doc["layer_report"]}
    assert {f"model.layers.{i}.{p}" for i in range(DEEP_LAYERS) for p in PROJECTIONS} <= names
    assert sum(g["count"] for g in doc["layer_groups"]) == len(doc["layer_report"])
    assert sum(doc["size"][k] for k in SIZE_PARTS) == out.stat().st_size
    from qlower.render import render_export
    from qlower.console import out as console

    with console.capture() as captured:
        render_export(doc)
    lines = captured.get().splitlines()
    assert len(lines) <= SUMMARY_MAX_LINES, "\n".join(lines)
    assert all(f"model.layers.{{0..31}}.{p} ×32" in captured.get() for p in PROJECTIONS)
    inspected = runner.invoke(app, ["inspect", str(out)])
    assert inspected.exit_code == 0 and len(inspected.stdout.splitlines()) <= 2 * SUMMARY_MAX_LINES, inspected.stdout


def test_kv_cache_stored_once_and_sizes_add_up(decode_file):
    """The layers' zero KV caches are one stored constant: counted once, with its users; the parts are the file."""
    out, summary = decode_file("llama")
    size = summary["size"]
    assert size["total"] == out.stat().st_size == sum(size[k] for k in SIZE_PARTS)
    assert all(size[k] >= 0 for k in SIZE_PARTS) and size["program_and_headers"] > 0
    (cache,) = [c for c in size["shared_constants"] if c["role"] == "kv_cache"]
    layers, kv_heads, head_dim = 2, 2, 16
    assert cache["shape"] == [1, MAX_SEQ_LEN, kv_heads, head_dim] and cache["dtype"] == "float32"
    assert cache["bytes"] == MAX_SEQ_LEN * kv_heads * head_dim * 4
    assert cache["users"] == layers * 2  # K and V of every layer
    assert size["kv_cache"] == 0 and size["shared"] == sum(c["bytes"] for c in size["shared_constants"])
    report = inspect_pte(out)
    assert report["summary"]["size"] == size
    # Every packed weight is its own: the fused nodes' weights add up to the packed part.
    assert size["packed_weights"] == sum(p["packed_weight_bytes"] for v in report["vulkan"] for nodes in v["fused"].values()
                                         for p in nodes if "packed_weight_bytes" in p)
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert f"KV cache f32[1, {MAX_SEQ_LEN}, {kv_heads}, {head_dim}] 4.0 KiB ×{layers * 2} users" in result.stdout
    assert "program and headers" in result.stdout


def test_inspect_groups_repeated_fused_nodes(decode_file):
    out, _ = decode_file("llama")
    (vk,) = inspect_pte(out)["vulkan"]
    groups = vk["fused_groups"]
    assert sorted(i for g in groups for i in g["node_ids"]) == sorted(p["node_id"] for nodes in vk["fused"].values() for p in nodes)
    linears = {(g["n"], g["k"]): len(g["node_ids"]) for g in groups if g["op"] == "linear_dq8ca_q4gsw"}
    # q+k+v (one op), gate, up: 128x64; o: 64x64; down: 64x128; lm_head: 256x64 (2 layers)
    assert linears == {(128, 64): 6, (64, 64): 2, (64, 128): 2, (256, 64): 1}
    grouped = runner.invoke(app, ["inspect", str(out)]).stdout
    full = runner.invoke(app, ["inspect", str(out), "--all-layers"]).stdout
    assert len(full.splitlines()) - len(grouped.splitlines()) == sum(len(g["node_ids"]) - 1 for g in groups)
    assert "×6" in grouped and "×6" not in full.split("fused nodes")[1]
