"""--weight-algorithm: GPTQ against a hand-computed case and RTN, HQQ as torchao's, streaming, the stored format, options."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from qlower import calibrate, weight_quant as wq
from qlower.config import make_options
from qlower.errors import CalibrationError, ConfigError

from .conftest import ROOT

# GPTQ's layer output error ‖XWᵀ − XŴᵀ‖² must be at most this share of RTN's (calibration and held-out inputs).
GPTQ_MAX_ERROR_RATIO = 0.95
TOY = wq.GptqSettings(damp=0.0, act_order=False, scales="absmax")


def test_gptq_hand_computed_two_columns():
    """W = [0.75, 0.13], one group, s = 0.75 / 7.5 = 0.1; H = [[1, .5], [.5, 1]] (no dampening).
    Column 0: 7.5 rounds to 8, clamps to 7, error 0.05; through H⁻¹'s Cholesky factor the second weight
    takes -err · U01 / U00 = 0.05 · 0.5 = +0.025 → 0.155 → 2 (RTN: round(1.3) = 1)."""
    w = torch.tensor([[0.75, 0.13]])
    h = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    q, s = wq.gptq(w, h, 2, TOY)
    assert q.tolist() == [[7, 2]]
    assert s.item() == pytest.approx(0.1)
    assert wq.rtn(w, 2)[0].tolist() == [[7, 1]]
    # and GPTQ's choice has the smaller quadratic error ΔᵀHΔ
    err = lambda q: (w - wq.dequantize(q, s, 2)) @ h @ (w - wq.dequantize(q, s, 2)).T  # noqa: E731
    assert float(err(q)) < float(err(wq.rtn(w, 2)[0]))


def test_gptq_with_a_diagonal_hessian_is_rtn():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 96, generator=gen)
    h = torch.diag(torch.rand(96, generator=gen) + 0.5)
    q, s = wq.gptq(w, h, 32, TOY)
    rq, rs = wq.rtn(w, 32)
    assert torch.equal(q, rq) and torch.allclose(s, rs)


def _inputs(t: int, k: int, gen, samples: int = 1) -> list[torch.Tensor]:
    """``samples`` sets of correlated activations (one distribution) with a few outlier channels, as in trained LMs."""
    mix = torch.randn(k, k, generator=gen) * 0.3 + torch.eye(k)
    out = []
    for _ in range(samples):
        x = torch.randn(t, k, generator=gen) @ mix
        x[:, :3] *= 6
        out.append(x)
    return out


@pytest.mark.parametrize("n,k,group", [(12, 96, 32), (7, 64, 64), (16, 128, 128)])
@pytest.mark.parametrize("settings", [wq.GptqSettings(), TOY, wq.GptqSettings(act_order=True, scales="hqq")])
def test_gptq_beats_rtn_on_layer_output_error(n, k, group, settings):
    gen = torch.Generator().manual_seed(n * k)
    calib, heldout = _inputs(512, k, gen, samples=2)
    w = torch.randn(n, k, generator=gen) * 0.05
    q, s = wq.gptq(w, 2 * calib.T @ calib / len(calib), group, settings)
    assert q.dtype == torch.int8 and int(q.min()) >= wq.QMIN and int(q.max()) <= wq.QMAX and s.shape == (n, k // group)
    rq, rs = wq.rtn(w, group)
    for x in (calib, heldout):
        assert wq.layer_error(x, w, q, s, group) < GPTQ_MAX_ERROR_RATIO * wq.layer_error(x, w, rq, rs, group)


def test_gptq_row_chunks_give_the_same_bits():
    gen = torch.Generator().manual_seed(3)
    x, = _inputs(256, 64, gen)
    w = torch.randn(10, 64, generator=gen)
    h = 2 * x.T @ x / len(x)
    prepared = wq.prepare(h, wq.DEFAULT_GPTQ)
    whole = wq.gptq(w, h, 32)
    parts = [wq.gptq(w[a:b], None, 32, prepared=prepared) for a, b in ((0, 3), (3, 10))]
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts])) and torch.equal(whole[1], torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_lazy_update_by_slabs_of_rows_gives_the_same_bits_and_leaves_w_alone(monkeypatch, act_order):
    gen = torch.Generator().manual_seed(5)
    x, = _inputs(1024, 320, gen)  # three lazy blocks, the last one short
    x[:, 7] = 0  # a dead column
    w = torch.randn(45, 320, generator=gen)
    h = 2 * x.T @ x / len(x)
    settings = wq.GptqSettings(act_order=act_order)
    original = w.clone()
    whole = wq.gptq(w, h, 32, settings)
    monkeypatch.setattr(wq, "_UPDATE_BYTES", 8 * 320 * 4)  # slabs of 4 rows: 12 slabs, the last one short
    slabs = wq.gptq(w, h, 32, settings)
    assert torch.equal(whole[0], slabs[0]) and torch.equal(whole[1], slabs[1])
    assert torch.equal(w, original) and int(whole[0][:, 7].abs().max()) == 0


def test_dead_input_columns_are_quantized_without_nan():
    gen = torch.Generator().manual_seed(4)
    x, = _inputs(128, 32, gen)
    x[:, 5] = 0
    q, s = wq.gptq(torch.randn(4, 32, generator=gen), 2 * x.T @ x, 32)
    assert torch.isfinite(s).all() and int(q[:, 5].abs().max()) == 0


@pytest.mark.parametrize("scheme", ["qta8a_qga4w", "qga4w"])
def test_hqq_is_torchaos_own(scheme):
    """quantize_linear(hqq) and weight_quant.hqq give torchao's HQQ_SCALE_ONLY values and scales."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

    from qlower import pack
    from qlower.quantize import quantize_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 12, bias=False)
    hqq = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY
    config = (Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32), intx_choose_qparams_algorithm=hqq)
              if scheme == "qta8a_qga4w" else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32), intx_choose_qparams_algorithm=hqq))
    reference = torch.nn.Linear(96, 12, bias=False)
    reference.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    quantize_(reference, config)
    ours = quantize_linear(layer, scheme, 32, algorithm="hqq")
    assert torch.equal(pack.unpack_int4(ours.weight, 96), reference.weight.qdata)
    assert torch.equal(ours.weight_scale, reference.weight.scale)
    assert not ours.weight_zero_point.any()
    q, s = wq.hqq(layer.weight.detach(), 32)
    assert torch.equal(q, reference.weight.qdata) and torch.equal(s, reference.weight.scale)
    assert not torch.equal(q, wq.rtn(layer.weight.detach(), 32)[0])  # it chose other values than RTN


# --- a small decoder folder: whole vs streamed, the stored format --------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from .test_stream import llama_config, write_folder

    root = tmp_path_factory.mktemp("algo")
    return {tied: write_folder(root / f"tied{tied}", llama_config(tie_word_embeddings=tied)) for tied in (True, False)}


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory, folders):
    from qlower.llm.load import load_any

    loaded, _, _ = load_any(folders[True], make_options(kv_cache=False))
    t = loaded.example_inputs[0].shape[1]
    gen = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("cal") / "cal.pt"
    torch.save([(torch.randint(0, 256, (1, t), generator=gen),) for _ in range(4)], path)
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_gptq_is_the_whole_load_bit_for_bit(folders, calibration_file, tied):
    from .test_stream import TOKENS, both_ways

    options = make_options(group_size=32, kv_cache=False, weight_algorithm="gptq", calibration=str(calibration_file),
                           quantize_embeddings=True)
    (whole, plans_w), (streamed, plans_s) = both_ways(folders[tied], options)
    assert [p.to_dict() for p in plans_w] == [p.to_dict() for p in plans_s]
    algorithms = {p.name: p.algorithm for p in plans_s if p.quantized}
    assert algorithms.pop("lm.model.embed_tokens") == "rtn"  # no inputs to calibrate an embedding on
    assert set(algorithms.values()) == {"gptq"} and "lm.lm_head" in algorithms
    for (name, a), (_, b) in zip(whole.state_dict().items(), streamed.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(whole(TOKENS), streamed(TOKENS))


@pytest.mark.parametrize("family,algorithm", [("gpt2", "gptq"), ("qwen2", "auto")])
def test_streamed_calibration_reads_each_linear_once_its_hessian_is_known_with_the_whole_loads_bits(tmp_path, family, algorithm):
    """Streaming, a block's calibrated linears are read only when their Hessian is known (stand-ins run in
    their place until then): the same bits as the whole load, whose float linears run in the passes. GPT-2:
    one fused q/k/v projection stored transposed, biases; Qwen2: q/k/v biases, GQA."""
    import transformers

    from .test_stream import TOKENS, both_ways

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "model"))
    gen = torch.Generator().manual_seed(1)
    calibration = tmp_path / "cal.pt"
    torch.save([(torch.randint(0, 256, (1, 24), generator=gen),) for _ in range(4)], calibration)
    options = make_options(group_size=32, kv_cache=False, weight_algorithm=algorithm, calibration=str(calibration),
                           quantize_embeddings=True)
    (whole, plans_w), (streamed, plans_s) = both_ways(tmp_path / "model", options)
    assert [p.to_dict() for p in plans_w] == [p.to_dict() for p in plans_s]
    assert sum(p.quantized for p in plans_s) >= 9
    assert list(whole.state_dict()) == list(streamed.state_dict())
    for (name, a), b in zip(whole.state_dict().items(), streamed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(isinstance(m, calibrate._Pending) for m in streamed.modules())
    with torch.no_grad():
        assert torch.equal(whole(TOKENS), streamed(TOKENS))


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_gptq_progress_counts_the_whole_checkpoint(folders, calibration_file, tied):
    """Filled a decoder block at a time, the progress is the whole checkpoint's: one total, a fraction that
    never goes back and ends at 1 (a tied tensor, read for the embedding and again for the head, counts once)."""
    from qlower.llm.load import load_any
    from qlower.quantize import quantize_model
    from qlower.stream import SafetensorsWeights

    options = make_options(group_size=32, kv_cache=False, weight_algorithm="gptq", calibration=str(calibration_file),
                           quantize_embeddings=True)
    loaded, _, _ = load_any(folders[tied], options, stream=True)
    seen = []
    quantize_model(loaded, options, lambda m: None, on_layer=seen.append)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] < 0.5
    assert {p.total_bytes for p in seen} == {SafetensorsWeights.open(folders[tied]).nbytes}


def test_gptq_file_fuses_as_rtn_and_records_the_algorithm(folders, calibration_file, tmp_path):
    from qlower.api import export
    from qlower.inspect import inspect_pte

    reports = {}
    for algorithm in ("rtn", "gptq"):
        out = tmp_path / f"{algorithm}.pte"
        export(folders[True], out, scheme="qta8a_qga4w", group_size=32, kv_cache=False, weight_algorithm=algorithm,
               calibration=str(calibration_file) if algorithm == "gptq" else None)
        reports[algorithm] = inspect_pte(out)
    rtn, gptq = reports["rtn"], reports["gptq"]
    assert rtn["summary"]["fused_ops"] == gptq["summary"]["fused_ops"] and gptq["summary"]["cpu_op_calls"] == 0
    assert rtn["summary"]["vk_ops"] == gptq["summary"]["vk_ops"]
    shapes = lambda r: sorted((c["dtype"], tuple(c["shape"])) for v in r["vulkan"] for c in v["constants"])  # noqa: E731
    assert shapes(rtn) == shapes(gptq)
    assert rtn["quantization"]["weight_algorithm"] == "rtn"
    record = gptq["quantization"]
    assert record["weight_algorithm"] == "gptq" and record["calibration"] == {"inputs": "cal.pt"}
    assert set(record["layers"].values()) == {"gptq"} and len(record["layers"]) == 15


def test_gptq_calibrates_on_token_windows_longer_than_the_example(folders, tmp_path):
    """A decoder's --calibration file may hold token windows of any length (not the traced example's);
    static int8 calibration still needs the traced shapes."""
    from qlower.calibrate import calibration_batches
    from qlower.llm.load import load_any
    from qlower.quantize import quantize_model

    loaded, _, _ = load_any(folders[True], make_options(kv_cache=False))
    t = loaded.example_inputs[0].shape[1]
    path = tmp_path / "long.pt"
    gen = torch.Generator().manual_seed(2)
    torch.save([(torch.randint(0, 256, (1, 3 * t + 1), generator=gen),) for _ in range(2)], path)
    options = make_options(group_size=32, kv_cache=False, weight_algorithm="gptq", calibration=str(path))
    quantized, plans = quantize_model(loaded, options, lambda message: None)
    assert {p.algorithm for p in plans if p.quantized} == {"gptq"}
    with pytest.raises(CalibrationError, match="calibration batch 0 input 0"):
        calibration_batches(loaded.example_inputs, make_options(calibration=str(path)), None, lambda message: None)


def test_option_errors():
    with pytest.raises(ConfigError, match="unknown algorithm 'awq'") as error:
        make_options(weight_algorithm="awq")
    assert error.value.hint == "legal algorithms: rtn, hqq, gptq, auto"
    with pytest.raises(ConfigError, match="applies to the int4 schemes"):
        make_options(scheme="fp32", weight_algorithm="hqq")
    with pytest.raises(ConfigError, match="data-free"):
        make_options(weight_algorithm="hqq", calibration_text="x.txt")
    with pytest.raises(ConfigError, match="positive integer"):
        make_options(weight_algorithm="gptq", calibration_tokens=0)
    assert make_options().weight_algorithm == "rtn"
    # calibration text without an algorithm: auto, the one that judges by it
    assert make_options(calibration_text="x.txt").weight_algorithm == "auto"
    assert make_options(calibration_text="x.txt", weight_algorithm="gptq").weight_algorithm == "gptq"
    with pytest.raises(ConfigError, match="data-free"):
        make_options(scheme="fp32", calibration_text="x.txt")


def test_gptq_without_calibration_data_is_an_error(folders):
    from qlower.llm.load import load_any
    from qlower.quantize import quantize_model

    options = make_options(weight_algorithm="gptq", kv_cache=False, group_size=32)
    loaded, _, _ = load_any(folders[True], options, stream=True)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        quantize_model(loaded, options, lambda m: None)


def test_cli_rejects_an_unknown_algorithm(tmp_path):
    from typer.testing import CliRunner

    from qlower.cli import app

    result = CliRunner().invoke(app, ["export", str(ROOT / "tests" / "models" / "tiny_llama.py"), "--weight-algorithm", "awq",
                                      "-o", str(tmp_path / "x.pte")])
    assert result.exit_code == 2 and not (tmp_path / "x.pte").exists()


# --- a trained model: GPTQ with its calibration text beats RTN on held-out text ---------------------------

TRAINED = ROOT / "examples" / "trained" / "py-llama"
WINDOW, WINDOWS, CALIBRATION_TOKENS = 256, 6, 2048


@pytest.mark.skipif(not (TRAINED / "config.json").is_file(), reason="the trained example model is not in the checkout")
def test_gptq_beats_rtn_on_a_trained_model():
    from transformers import AutoTokenizer

    from qlower.llm.load import load_any
    from qlower.quantize import quantize_model

    ids = AutoTokenizer.from_pretrained(str(TRAINED)).encode((TRAINED / "heldout.txt").read_text(), add_special_tokens=False)
    windows = [torch.tensor([ids[i * WINDOW:(i + 1) * WINDOW]]) for i in range(WINDOWS)]

    def ppl(algorithm: str) -> float:
        options = make_options(group_size=128, kv_cache=False, weight_algorithm=algorithm, calibration_tokens=CALIBRATION_TOKENS,
                               calibration_text=str(TRAINED / "calibration.txt") if algorithm == "gptq" else None)
        model, _ = quantize_model(load_any(TRAINED, options, stream=True)[0], options, lambda m: None)
        with torch.no_grad():
            nll = [torch.nn.functional.cross_entropy(model(w)[0, :-1], w[0, 1:]) for w in windows]
        return math.exp(float(torch.stack(nll).mean()))

    assert ppl("gptq") < ppl("rtn")


# --- auto: per layer, another algorithm only where it beats RTN on held-out calibration windows ----------


def _auto_pick(w: torch.Tensor, hessians: wq.Hessians, group: int) -> tuple[str, torch.Tensor]:
    from qlower.quantize import _int4_chunk_quantizer

    picks = []
    q, scales, _, _ = _int4_chunk_quantizer("qga4w", group, "auto", hessians, picks.append)(w)
    return picks[0], wq.dequantize(q, scales.reshape(w.shape[0], -1), group)


def test_auto_keeps_rtn_unless_another_is_better_on_the_held_out_windows(monkeypatch):
    from qlower import quantize
    from qlower.quantize import _int4_chunk_quantizer

    gen = torch.Generator().manual_seed(5)
    monkeypatch.setattr(quantize, "AUTO_REFIT_GPTQ", False)  # the pick as judged; the refit is tested below
    for trial in range(4):
        fit, held = _inputs(512, 64, gen, samples=2)
        w = torch.randn(16, 64, generator=gen) * 0.05
        h_fit, h_held = 2 * fit.T @ fit / len(fit), 2 * held.T @ held / len(held)
        if trial % 2:  # held-out inputs unlike the fitted ones: the fit may not carry over
            h_held = torch.diag(torch.rand(64, generator=gen))
        rtn_q, rtn_s, _, _ = _int4_chunk_quantizer("qga4w", 32, "rtn")(w)
        w_rtn = wq.dequantize(rtn_q, rtn_s.reshape(16, -1), 32)
        rtn_error = float(wq.output_error(w, w_rtn, h_held).sum())
        pick, deq = _auto_pick(w, wq.Hessians(h_fit, h_held, h_fit), 32)
        assert float(wq.output_error(w, deq, h_held).sum()) <= rtn_error
        if trial == 0:  # the same distribution held out: GPTQ's error feedback wins
            assert pick == "gptq" and float(wq.output_error(w, deq, h_held).sum()) < 0.9 * rtn_error
        monkeypatch.setattr(quantize, "AUTO_MIN_GAIN", 1.0)  # nothing beats RTN by 100%: RTN's own bits
        pick, deq = _auto_pick(w, wq.Hessians(h_fit, h_held, h_fit), 32)
        assert pick == "rtn" and torch.equal(deq, w_rtn)
        monkeypatch.setattr(quantize, "AUTO_MIN_GAIN", 0.0)


def test_auto_refits_gptq_on_every_window():
    gen = torch.Generator().manual_seed(6)
    fit, held = _inputs(512, 64, gen, samples=2)
    w = torch.randn(16, 64, generator=gen) * 0.05
    h_fit, h_held = 2 * fit.T @ fit / len(fit), 2 * held.T @ held / len(held)
    h_whole = (h_fit + h_held) / 2
    pick, deq = _auto_pick(w, wq.Hessians(h_fit, h_held, h_whole), 32)
    q, s = wq.gptq(w, h_whole, 32)
    assert pick == "gptq" and torch.equal(deq, wq.dequantize(q, s, 32))


def test_auto_holds_out_every_fourth_window():
    from qlower.calibrate import held_out_windows

    assert held_out_windows(8) == {3, 7}
    assert held_out_windows(2) == {1} and held_out_windows(3) == {2}
    with pytest.raises(CalibrationError, match="at least 2 calibration windows"):
        held_out_windows(1)


def test_auto_records_what_each_layer_picked(folders, calibration_file):
    from qlower.llm.load import load_any
    from qlower.quantize import quantize_model, quantization_record

    options = make_options(group_size=32, kv_cache=False, weight_algorithm="auto", calibration=str(calibration_file))
    _, plans = quantize_model(load_any(folders[False], options)[0], options, lambda m: None)
    picks = {p.name: p.algorithm for p in plans if p.quantized}
    assert picks and set(picks.values()) <= {"rtn", "hqq", "gptq"}
    record = __import__("json").loads(quantization_record(plans, options))
    assert record["weight_algorithm"] == "auto" and record["layers"] == picks


# auto may be worse than RTN on a model's held-out text by at most this share of RTN's perplexity
AUTO_MAX_LOSS_VS_RTN = 0.002
SHIPPED = [ROOT / "examples" / "trained" / name for name in ("py-llama", "c-qwen3")]


@pytest.mark.parametrize("model", SHIPPED, ids=lambda p: p.name)
def test_auto_is_never_worse_than_rtn_on_the_shipped_models(model):
    """Eager, weight-only int4 at g128 (the math of a decode step's linears), 8 windows of 256 held-out tokens."""
    if not (model / "config.json").is_file():
        pytest.skip("the trained example model is not in the checkout")
    from transformers import AutoTokenizer

    from qlower.llm.load import load_any
    from qlower.quantize import quantize_model

    ids = AutoTokenizer.from_pretrained(str(model)).encode((model / "heldout.txt").read_text(), add_special_tokens=False)
    windows = [torch.tensor([ids[i * WINDOW:(i + 1) * WINDOW]]) for i in range(8)]

    def ppl(algorithm: str) -> float:
        options = make_options(scheme="qga4w", group_size=128, kv_cache=False, weight_algorithm=algorithm,
                               calibration_tokens=CALIBRATION_TOKENS,
                               calibration_text=str(model / "calibration.txt") if algorithm == "auto" else None)
        quantized, _ = quantize_model(load_any(model, options, stream=True)[0], options, lambda m: None)
        with torch.no_grad():
            nll = [torch.nn.functional.cross_entropy(quantized(w)[0, :-1], w[0, 1:]) for w in windows]
        return math.exp(float(torch.stack(nll).mean()))

    assert ppl("auto") <= ppl("rtn") * (1 + AUTO_MAX_LOSS_VS_RTN)


# --- GPTQ on a CUDA GPU: the CPU's bits -------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("settings", [wq.GptqSettings(), TOY])
def test_gptq_on_cuda_gives_the_cpus_bits(settings):
    gen = torch.Generator().manual_seed(11)
    x, = _inputs(1024, 256, gen)
    w = torch.randn(96, 256, generator=gen) * 0.05
    h = 2 * x.T @ x / len(x)
    cpu = wq.gptq(w, h, 64, settings, device="cpu")
    cuda = wq.gptq(w, h, 64, settings, device="cuda")
    assert torch.equal(cpu[0], cuda[0]) and torch.equal(cpu[1], cuda[1])


def test_gptq_device_option(folders, calibration_file):
    from qlower.errors import ExportError
    from qlower.llm.load import load_any
    from qlower.quantize import quantize_model

    assert wq.gptq_device("cpu") == torch.device("cpu")
    assert wq.gptq_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        make_options(gptq_device="tpu")
    assert make_options().gptq_device == "auto"
    if not torch.cuda.is_available():  # asked for a GPU torch does not see: one error line, not a crash
        options = make_options(group_size=32, kv_cache=False, weight_algorithm="gptq", calibration=str(calibration_file),
                               gptq_device="cuda")
        with pytest.raises(ExportError, match="torch sees no CUDA GPU"):
            quantize_model(load_any(folders[True], options)[0], options, lambda m: None)


def test_calibration_passes_carry_no_kv_cache_from_one_pass_to_the_next():
    """Hugging Face decoders hand each layer a KV cache (``cache=``, ``past_key_values=``): a block run on
    captured inputs once per calibration pass would append to it every time (memory growing with every pass
    of every block, queries attending to earlier passes' keys)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlower.calibrate import capture_block_inputs, run_block
    from .test_stream import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in llama_config().items() if k != "torch_dtype"})).eval()
    batches = [(torch.randint(0, 256, (1, 9)),), (torch.randint(0, 256, (1, 5)),)]
    with torch.no_grad():
        states = capture_block_inputs(model, model.model.layers[0], batches)
        for _, kwargs in states:
            assert not any(type(v).__name__.endswith("Cache") for v in kwargs.values()), kwargs
        first = [run_block(model.model.layers[0], s) for s in states]
        again = [run_block(model.model.layers[0], s) for s in states]
        # the state the model would have made itself, without a cache: the layer's output in a cache-free pass
        seen = []
        handle = model.model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        for batch in batches:
            model(*batch, use_cache=False)
        handle.remove()
    for a, b, c in zip(first, again, seen):
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)


@pytest.mark.parametrize("k", [37, 64, 300])
@pytest.mark.parametrize("act_order", [True, False])
def test_a_hessian_factored_in_its_own_storage_gives_the_same_bits(k, act_order):
    """prepare(consume=True) grows H's storage into the float64 working copy and leaves the factor there:
    the same factor as from a separate copy, for odd and aligned widths, with dead columns and with a
    Hessian that needs more dampening (refilled from its temporary file)."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2 * k, k, generator=gen) * torch.linspace(0.1, 3, k)
    x[:, 3] = 0  # a dead column
    h = 2 * x.T @ x / (2 * k)
    settings = wq.GptqSettings(act_order=act_order)
    cases = [h]
    indefinite = h.clone()
    indefinite[5, 5] = -0.05 * float(torch.diagonal(h).mean())  # not positive definite at the first dampening
    cases.append(indefinite)
    for case in cases:
        kept = wq.prepare(case, settings)
        owned = case.clone()
        given = wq.prepare(owned, settings, consume=True)
        assert given.u.untyped_storage().data_ptr() == owned.untyped_storage().data_ptr()  # factored in place
        assert torch.equal(kept.u, given.u) and torch.equal(kept.perm, given.perm) and torch.equal(kept.dead, given.dead)
        assert torch.equal(kept.diag, given.diag)


def test_hessians_are_factored_once_per_input_group():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    h = 2 * x.T @ x / 64
    shared = wq.Hessians(h.clone(), owned=True)
    first = shared.prepared()
    assert shared.prepared() is first and shared.prepared("whole") is first  # whole is fit when nothing is held out
    assert shared.fit is None  # given up to its factor
    assert torch.equal(first.u, wq.prepare(h, wq.DEFAULT_GPTQ).u)
    not_owned = wq.Hessians(h, h, h)
    not_owned.prepared("fit"), not_owned.prepared("whole")
    assert not_owned.fit is h and not_owned.whole is h  # a caller's tensors stay as they were


def test_a_hessian_whose_storage_is_pinned_is_factored_from_a_copy():
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    h = 2 * x.T @ x / 40
    pinned = h.clone()
    pinned.numpy()  # a NumPy view pins the storage's size
    given = wq.prepare(pinned, wq.DEFAULT_GPTQ, consume=True)
    assert torch.equal(given.u, wq.prepare(h, wq.DEFAULT_GPTQ).u) and torch.equal(pinned, h)


def _reference_factor(h: torch.Tensor, settings: wq.GptqSettings) -> torch.Tensor:
    """GPTQ's factor the plain way (torch's whole-matrix calls, float64): the upper Cholesky factor of the
    inverse of the permuted, dampened H, from the permuted H's upper triangle (the reversed order's lower)."""
    diag = torch.diagonal(h)
    order = torch.argsort(diag, descending=True, stable=True) if settings.act_order else torch.arange(h.shape[0])
    w = h.double()[order][:, order]
    d = torch.diagonal(w).clone()
    dead = d == 0
    d[dead] = 1.0
    on_diag = torch.diagonal(w)
    on_diag[dead] = 1.0
    on_diag += settings.damp * d.mean()
    lower = torch.linalg.cholesky(torch.triu(w) + torch.triu(w, 1).T)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@pytest.mark.parametrize("k", [37, 300, 600])
@pytest.mark.parametrize("act_order", [True, False])
def test_the_factor_made_in_place_is_the_plain_one(k, act_order):
    """prepare_hessian factors its working copy in place a tile at a time (tiles of _PREPARE_ROWS: 600 spans
    three, the last one short), through the reversed order's Cholesky factor and its inverse: the plain
    calls' factor to float32's rounding, read from one triangle of an H that is not exactly symmetric;
    the same bits from hessian_sum's roomy storage, a consumed plain one and a kept one."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(3 * k, k, generator=gen) * torch.linspace(0.2, 2, k)
    x[:, 4] = 0  # a dead column
    summed = wq.hessian_sum(k)
    wq.add_gram(summed, x)
    wq.true_divide(summed, 3 * k)
    h = summed.clone()
    h += torch.triu(torch.full((k, k), 1e-7), 1)  # not exactly symmetric (neither is a float sum, always)
    settings = wq.GptqSettings(act_order=act_order)
    want = _reference_factor(h, settings)
    kept = wq.prepare(h, settings).u
    assert torch.equal(kept, torch.triu(kept)) and kept.dtype == torch.float32
    assert float((kept.double() - want).abs().max()) <= 1e-6 * float(want.abs().max())
    assert torch.equal(wq.prepare(h.clone(), settings, consume=True).u, kept)
    storage, want = summed.untyped_storage(), wq.prepare(summed, settings).u
    factor = wq.prepare(summed, settings, consume=True).u
    assert torch.equal(factor, want) and factor.untyped_storage().data_ptr() == storage.data_ptr()
    if sys.platform.startswith("linux") and storage.nbytes() > 2 * 4096 + k * k * 4:
        tail = torch.empty(0, dtype=torch.uint8).set_(storage, k * k * 4 + 4096, (storage.nbytes() - k * k * 4 - 2 * 4096,))
        assert int(tail.max()) == 0  # the float64 copy's back half was given back (reads as zeros)


@pytest.mark.parametrize("k", [1, 5, 256, 257, 600])
def test_the_tiled_factor_steps_are_the_plain_ones(k):
    """The factor's tile steps against torch's whole-matrix calls, for one tile, a tile and one more column,
    and a short last tile: Cholesky (from the lower triangle, scratch above), lower-triangular inverse, and
    the order reversal of rows and columns; an indefinite matrix is reported, not factored."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2 * k + 3, k, generator=gen, dtype=torch.float64)
    a = x.T @ x + 0.1 * torch.eye(k, dtype=torch.float64)
    work = torch.tril(a) + torch.triu(torch.randn(k, k, generator=gen, dtype=torch.float64), 1)  # the upper half unread
    assert wq._cholesky_in_place(work)
    lower = torch.linalg.cholesky(a)
    assert torch.allclose(torch.tril(work), lower, rtol=0, atol=1e-10 * float(lower.abs().max()))
    wq._zero_upper_in_place(work)
    assert torch.equal(work, torch.tril(work))
    wq._invert_lower_in_place(work)
    inverse = torch.linalg.inv(lower)
    assert torch.allclose(work, inverse, rtol=0, atol=1e-9 * float(inverse.abs().max()))
    rotated = work.clone()
    wq._rotate_in_place(rotated)
    assert torch.equal(rotated, work.flip(0, 1))
    indefinite = a.clone()
    indefinite[k // 2, k // 2] = -1.0
    assert not wq._cholesky_in_place(indefinite)


def test_gram_slabs_sum_the_whole_product(monkeypatch):
    """add_gram makes 2xᵀx a slab of rows at a time (one slab at this size, seven when they are small)."""
    x = torch.randn(50, 13, generator=torch.Generator().manual_seed(3))
    whole = torch.zeros(13, 13)
    wq.add_gram(whole, x)
    assert torch.allclose(whole, 2 * x.T @ x, atol=1e-5)
    monkeypatch.setattr(wq, "_GRAM_BYTES", 2 * 4 * 13)  # two rows a slab
    slabs = torch.ones(13, 13)
    wq.add_gram(slabs, x)
    assert torch.allclose(slabs, 1 + 2 * x.T @ x, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("k", [300, 600])
def test_a_hessian_kept_on_cuda_gives_the_cpus_bits(k):
    """Summed, divided and factored in a GPU's memory (the arithmetic on CPU copies of its tiles): the same
    sums and factor as in host memory, with and without act-order, consumed or kept."""
    gen = torch.Generator().manual_seed(k)
    xs = [torch.randn(128, k, generator=gen) * torch.linspace(0.2, 2, k) for _ in range(3)]
    sums = {}
    for device in ("cpu", "cuda"):
        total = wq.hessian_sum(k, device)
        for x in xs:
            wq.add_gram(total, x)
        sums[device] = wq.true_divide(total, 3 * 128)
    assert sums["cuda"].device.type == "cuda" and torch.equal(sums["cpu"], sums["cuda"].cpu())
    for settings in (wq.GptqSettings(), wq.GptqSettings(act_order=False)):
        cpu = wq.prepare(sums["cpu"], settings)
        kept = wq.prepare(sums["cuda"], settings)
        assert kept.u.device.type == "cuda" and torch.equal(cpu.u, kept.u.cpu()) and torch.equal(cpu.perm, kept.perm)
    consumed = wq.prepare(sums["cuda"], wq.DEFAULT_GPTQ, consume=True)
    assert torch.equal(consumed.u.cpu(), wq.prepare(sums["cpu"], wq.DEFAULT_GPTQ).u)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("k", [300, 600])
def test_a_host_hessian_factored_for_cuda_leaves_host_memory_with_the_cpus_bits(k):
    """The calibration hooks' sum (host memory, owned) factored for a GPU column loop: moved to the GPU
    first, so its host copy is gone, and the factor has the CPU's bits."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(512, k, generator=gen) * torch.linspace(0.2, 2, k)
    h = wq.true_divide(2 * x.T @ x, 512)
    on_cpu = wq.Hessians(h.clone(), owned=True).prepared(device="cpu")
    hessians = wq.Hessians(h.clone(), owned=True)
    on_cuda = hessians.prepared(device="cuda")
    assert hessians.fit is None and on_cuda.u.device.type == "cuda"
    assert torch.equal(on_cuda.u.cpu(), on_cpu.u) and torch.equal(on_cuda.dead.cpu(), on_cpu.dead)


@pytest.mark.parametrize("k", [5, 300])
def test_a_moved_hessian_has_room_for_its_factor(k):
    h = torch.randn(k, k)
    moved = wq.moved_hessian(h, "cpu")
    assert torch.equal(moved, h) and moved.untyped_storage().nbytes() == k * k * 8


def test_hessian_hooks_sum_the_first_input_group_only():
    """A pass over a block sums the Hessian of the linears that run first (those quantized next), not the
    later ones' (their inputs change once the first group is quantized)."""
    block = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 8), "b": torch.nn.Linear(8, 8), "c": torch.nn.Linear(8, 4)})
    hooks = calibrate.HessianHooks(block, ["a", "b", "c"])
    x = torch.randn(5, 8)
    for _ in range(2):
        hooks.new_pass()
        y = block["a"](x) + block["b"](x)
        block["c"](y)
    hooks.remove()
    assert hooks.groups() == [["a", "b"], ["c"]] and list(hooks.sums) == [(False, 0)]
    assert torch.allclose(hooks.hessian("a").fit, 2 * x.T @ x / 5) and hooks.hessian("b") is hooks.hessian("a")


def test_hessian_hooks_for_the_first_group_stop_the_pass_at_the_next_group():
    """A block pass for the first group ends when a later group's linear is called: its layers never run,
    and the first group's Hessian is the same as a whole pass's."""
    block = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 8), "b": torch.nn.Linear(8, 8), "c": torch.nn.Linear(8, 4)})
    ran_c = []
    block["c"].register_forward_hook(lambda *_: ran_c.append(1))
    x = torch.randn(5, 8)
    sums = {}
    for first_only in (False, True):
        hooks = calibrate.HessianHooks(block, ["a", "b", "c"], first_group_only=first_only)
        for _ in range(2):
            hooks.new_pass()
            try:
                block["c"](block["a"](x) + block["b"](x))
            except calibrate._Stop:
                assert first_only
        hooks.remove()
        assert hooks.groups()[0] == ["a", "b"]
        sums[first_only] = hooks.hessian("a").fit
    assert len(ran_c) == 2 and torch.equal(sums[False], sums[True])  # c ran on the two whole passes only


def test_the_quantize_stage_runs_gptq_without_executorch(tmp_path):
    """Export's load and quantize stages (benchmarks/quantize_stage_bench.py calls them) need torch,
    transformers and torchao (its quantize/dequantize ops run the quantized layers) for a calibrated int4
    algorithm, not ExecuTorch: what a GPU host without ExecuTorch runs."""
    out = tmp_path / "stage.json"
    code = ("import runpy, sys\n"
            "sys.modules.update(executorch=None)  # as if not installed\n"
            f"sys.argv = ['bench', '--shape', 'small', '--layers', '1', '--dir', {str(tmp_path)!r}, "
            f"'--calibration-tokens', '1024', '--breakdown', '--json', {str(out)!r}]\n"
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'quantize_stage_bench.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["algorithms"] == ["gptq", "rtn"] and len(result["state_sha256"]) == 64  # the embedding takes rtn
    assert [name for name, _ in result["layers_done_at_s"]].count("lm.model.layers.0.mlp.down_proj") == 1
    # --breakdown: where the memory went, sampled while the stages ran
    memory = result["host_memory"]
    assert memory["peak"]["VmRSS"] > memory["baseline"]["before_stages"]["VmRSS"] > 0
    assert set(memory["at_each_stage_peak"]) <= {"start", "after lm.model.embed_tokens", "after lm.model.norm",
                                                 "after lm.model.layers.0", "after lm.lm_head"}
    first = memory["at_each_stage_peak"]["start"]
    assert dict(first["by_mapping_mb"]).get("[anon]", 0) > 0 and first["rss_mb"] >= sum(mb for _, mb in first["by_mapping_mb"])


def test_the_quantize_stage_bench_stopped_by_sigterm_writes_what_it_measured(tmp_path):
    """A run stopped by SIGTERM (``timeout`` on a lent machine) still writes its JSON: the layers done and
    the peak so far, marked stopped, no hash; exit code 1 with one error line."""
    import signal

    out = tmp_path / "stopped.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "quantize_stage_bench.py"), "--shape", "small",
                             "--layers", "4", "--dir", str(tmp_path), "--calibration-tokens", "1024", "--gptq-device", "cpu",
                             "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # stopped once the first block is done: three blocks and the head are left
        lines.append(line)
        if "lm.model.layers.0.mlp.down_proj:" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=600) == 1, "".join(lines)[-2000:] + rest[-2000:]
    assert rest.strip().splitlines()[-1].startswith("error: stopped (SIGTERM after ")
    result = json.loads(out.read_text())
    assert result["stopped"].startswith("SIGTERM") and "state_sha256" not in result and "load_and_quantize_s" not in result
    done = [name for name, _ in result["layers_done_at_s"]]
    assert "lm.model.layers.0.mlp.down_proj" in done and "lm.lm_head" not in done
    assert result["peak_host_rss_mb"] > 0


def test_host_memory_sees_a_large_cpu_tensor_and_where_it_lives():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import host_memory

    before = host_memory.status_mb()
    big = torch.ones(64 << 18)  # 64 MB, touched
    held = host_memory.live_cpu_tensors(top=50)
    assert [64, [64 << 18], "float32"] in [list(row) for row in held["top"]] and held["total_mb"] >= 64
    assert host_memory.status_mb()["RssAnon"] >= before["RssAnon"] + 60
    malloc = host_memory.mallinfo_mb()
    assert malloc is None or (malloc["mapped"] >= 64 and malloc["in_use"] > 0)  # a large buffer is a mapped chunk of its own
    del big


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("algorithm", ["gptq", "auto"])
def test_the_quantize_stage_on_cuda_makes_the_cpus_bytes(tmp_path, algorithm):
    """Export's load and quantize stages of a small Llama folder, GPTQ on the GPU (Hessians summed and
    factored in its memory) and on the CPU: every quantized tensor the same, block by block."""
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantize_stage_bench.py"), "--shape", "small",
                               "--layers", "2", "--dir", str(tmp_path), "--calibration-tokens", "1024",
                               "--weight-algorithm", algorithm, "--gptq-device", device, "--json", str(out)],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[device] = json.loads(out.read_text())
    assert results["cuda"]["block_sha256"] == results["cpu"]["block_sha256"]
    assert results["cuda"]["state_sha256"] == results["cpu"]["state_sha256"]


def test_gptq_host_memory_steps_measures_each_step(tmp_path):
    """benchmarks/gptq_host_memory_steps.py: RSS and malloc's in-use bytes after each of GPTQ's steps (here on the
    CPU; on a GPU host with --device cuda), and one error line for a GPU torch does not see."""
    script = str(ROOT / "benchmarks" / "gptq_host_memory_steps.py")
    out = tmp_path / "steps.json"
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--k", "256", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = json.loads(out.read_text())["steps"]
    assert [s["step"] for s in steps][-5:] == ["its factor", "gptq #1 (2048 x 256)", "gptq #2 (2048 x 256)",
                                               "gptq #3 (8192 x 256)", "all freed"]
    assert all(s["VmRSS"] >= s["RssAnon"] > 0 for s in steps) and steps[1]["VmRSS"] > steps[0]["VmRSS"]  # the imports
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "error: torch sees no CUDA GPU; run with --device cpu"


@pytest.mark.parametrize("settings", [wq.GptqSettings(), wq.GptqSettings(act_order=False, block=48), TOY])
def test_gptq_with_every_host_read_a_copy_gives_the_same_bits(monkeypatch, settings):
    """On a GPU every read of the matrices into host memory (masks, permutations, tiles, a group's columns
    for its scale search) is a copy, where on the CPU it is the tensor itself: made copies here too, dead
    columns, odd widths and consumed Hessians give the same factor and the same values and scales."""
    gen = torch.Generator().manual_seed(5)
    for n, k, group in ((40, 192, 64), (9, 96, 32)):
        x, = _inputs(256, k, gen)
        x[:, 3] = 0  # a column the calibration never saw
        h = 2 * x.T @ x / len(x)
        w = torch.randn(n, k, generator=gen) * 0.05
        results = []
        for copies in (False, True):
            if copies:
                monkeypatch.setattr(wq, "on_cpu", wq.to_cpu)
            owned = wq.hessian_sum(k)
            owned.copy_(h)
            prepared = wq.Hessians(owned, owned=True).prepared(settings=settings)
            results.append((prepared.u, *wq.gptq(w, None, group, settings, prepared)))
        for a, b in zip(*results):
            assert torch.equal(a, b)


@pytest.mark.parametrize("how", wq.GPTQ_SCALE_CHOICES)
def test_static_scales_are_each_groups_own_search(monkeypatch, how):
    """act-order's scales, searched a slab of rows' groups at once, are what each group's own search picks
    (dead columns as zeros), for slabs that split the rows unevenly and for one slab of all rows; the mse
    search of [N, G, g] is G searches of [N, g]."""
    gen = torch.Generator().manual_seed(11)
    for n, k, group, slab_values in ((37, 320, 64, 5 * 320), (8, 96, 32, 1 << 18), (300, 128, 128, 7 * 128)):
        monkeypatch.setattr(wq, "_SEARCH_VALUES", slab_values)
        w = torch.randn(n, k, generator=gen) * torch.rand(1, k, generator=gen)
        w[3, : group // 2] *= 40  # an outlier the clip search has to weigh
        weight = torch.rand(k, generator=gen) + 0.05
        dead = torch.zeros(k, dtype=torch.bool)
        dead[[1, k - 2]] = True
        got = wq.static_scales(w, group, how, weight, dead)
        for g in range(k // group):
            cols = slice(g * group, (g + 1) * group)
            want = wq.group_scales(w[:, cols].masked_fill(dead[cols], 0.0), how, weight[cols])
            assert torch.equal(got[:, g], want), (n, k, group, g)
        if how == "mse":
            grouped = wq.mse_scales(w.reshape(n, -1, group), weight.reshape(-1, group))
            assert torch.equal(grouped, torch.stack([wq.mse_scales(w[:, c:c + group], weight[c:c + group])
                                                      for c in range(0, k, group)], dim=1))


def test_cuda_kernel_host_memory_runs_its_operations_and_needs_a_gpu():
    """benchmarks/cuda_kernel_host_memory.py: every operation it times runs (here on the CPU), and without a
    GPU it says so in one line (exit 1)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cuda_kernel_host_memory as bench

    ops = bench.operations(torch, "cpu")
    assert len({name for name, _ in ops}) == len(ops)
    for _, run in ops:
        run()
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_kernel_host_memory.py")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "error: torch sees no CUDA GPU; run this on a GPU host"
