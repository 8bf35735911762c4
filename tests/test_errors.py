"""Every user error: one `error:` line and a hint, exit 1 (2 for usage), no traceback."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from qlower.cli import app, main
from qlower.config import ExportOptions, LayerOverride, parse_config
from qlower.errors import ConfigError

from .conftest import EXAMPLES, write_model

runner = CliRunner()
MLP = str(EXAMPLES / "mlp.py")


def run(args, code):
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.stderr


def assert_one_error(stderr: str, *fragments: str):
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "hint:" in stderr


def test_missing_model_file(tmp_path):
    assert_one_error(run(["export", str(tmp_path / "nope.py")], 1), "model file not found")


def test_model_file_is_a_directory(tmp_path):
    assert_one_error(run(["export", str(tmp_path)], 1), "folder without config.json")


def test_exception_inside_model_file_names_file_and_line(tmp_path):
    path = write_model(tmp_path, "x = 1\nraise ValueError('bad config value')\n")
    assert_one_error(run(["export", str(path)], 1), f"{path}:4", "ValueError: bad config value")


def test_syntax_error_in_model_file(tmp_path):
    path = write_model(tmp_path, "def broken(:\n")
    assert_one_error(run(["export", str(path)], 1), "syntax error", str(path))


def test_no_model(tmp_path):
    path = write_model(tmp_path, "example_inputs = (torch.randn(1),)\n")
    assert_one_error(run(["export", str(path)], 1), "defines no model")


def test_several_candidates_then_entry_picks_one(tmp_path):
    path = write_model(tmp_path, "enc = nn.Linear(8, 8)\ndec = nn.Linear(8, 8)\nexample_inputs = (torch.randn(1, 8),)\n")
    assert_one_error(run(["export", str(path), "-o", str(tmp_path / "o.pte")], 1), "several models: dec, enc")
    run(["export", str(path), "--entry", "dec", "--scheme", "fp32", "-o", str(tmp_path / "o.pte")], 0)


def test_unknown_entry(tmp_path):
    path = write_model(tmp_path, "enc = nn.Linear(8, 8)\nexample_inputs = (torch.randn(1, 8),)\n")
    assert_one_error(run(["export", str(path), "--entry", "nope"], 1), "no attribute 'nope'")


def test_example_inputs_rejected(tmp_path):
    path = write_model(tmp_path, "model = nn.Linear(8, 8)\nexample_inputs = (torch.randn(1, 9),)\n")
    assert_one_error(run(["export", str(path)], 1), "rejects its example inputs")


def test_missing_example_inputs(tmp_path):
    path = write_model(tmp_path, "model = nn.Linear(8, 8)\n")
    assert_one_error(run(["export", str(path)], 1), "no example inputs")


def test_unknown_scheme_is_usage_error():
    assert_one_error(run(["export", MLP, "--scheme", "int3"], 2), "'int3' is not one of", "qta8a_qga4w")


@pytest.mark.parametrize("size", ["0", "-4"])
def test_non_positive_group_size_is_usage_error(size):
    assert_one_error(run(["export", MLP, "--group-size", size], 2), "--group-size")


def test_bad_config_unknown_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("scheme = 'qga4w'\ngroupsize = 32\n")
    stderr = run(["export", MLP, "--config", str(config)], 1)
    assert_one_error(stderr, "unknown key 'groupsize'")
    assert "legal keys: scheme, group_size" in stderr


def test_bad_config_value(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("scheme = 'int2'\n")
    assert_one_error(run(["export", MLP, "--config", str(config)], 1), "unknown scheme 'int2'")


def test_bad_config_syntax(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("scheme = \n")
    assert_one_error(run(["export", MLP, "--config", str(config)], 1), "invalid TOML")


def test_missing_config(tmp_path):
    assert_one_error(run(["export", MLP, "--config", str(tmp_path / "none.toml")], 1), "config file not found")


def test_calibration_wrong_shape(tmp_path):
    calib = tmp_path / "calib.pt"
    torch.save([(torch.randn(4, 255),)], calib)
    assert_one_error(run(["export", MLP, "--scheme", "q8ta_q8csw", "--calibration", str(calib), "-o", str(tmp_path / "o.pte")], 1),
                     "calibration batch 0 input 0 is float32[4, 255], expected float32[4, 256]")


def test_calibration_wrong_dtype(tmp_path):
    calib = tmp_path / "calib.pt"
    torch.save([(torch.randn(4, 256).double(),)], calib)
    assert_one_error(run(["export", MLP, "--scheme", "q8ta_q8csw", "--calibration", str(calib), "-o", str(tmp_path / "o.pte")], 1), "float64")


def test_calibration_unreadable(tmp_path):
    calib = tmp_path / "calib.pt"
    calib.write_text("not a tensor file")
    assert_one_error(run(["export", MLP, "--scheme", "q8ta_q8csw", "--calibration", str(calib), "-o", str(tmp_path / "o.pte")], 1), "cannot read calibration")


def test_output_directory_missing(tmp_path):
    assert_one_error(run(["export", MLP, "-o", str(tmp_path / "no" / "such" / "o.pte")], 1), "does not exist")


def test_output_is_directory(tmp_path):
    assert_one_error(run(["export", MLP, "-o", str(tmp_path)], 1), "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_error(run(["export", MLP, "-o", str(locked / "o.pte")], 1), "permission denied")


def test_debug_shows_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QLOWER_DEBUG", "1")
    with pytest.raises(Exception, match="model file not found"):
        main(["export", str(tmp_path / "nope.py")])


def test_main_returns_exit_codes(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.py")]) == 1
    assert main(["export", MLP, "--scheme", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2


# --- config parsing (no export needed) ----------------------------------------


def test_parse_layers_and_choice():
    values = parse_config({"scheme": "qga4w", "group_size": 64, "layers": {"lm_head": "skip", "re:blocks\\.\\d+\\.mlp\\..*": {"group_size": 32}}})
    options = ExportOptions(**values)
    assert options.layer_choice("lm_head") == ("skip", 64)
    assert options.layer_choice("blocks.3.mlp.up") == ("qga4w", 32)
    assert options.layer_choice("blocks.3.attn.q") == ("qga4w", 64)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"group_size": "big"}, "group_size must be int"),
        ({"strict": 1}, "strict must be bool"),
        ({"layers": {"x": "int3"}}, "unknown scheme 'int3'"),
        ({"layers": {"x": {"bits": 4}}}, "unknown key 'bits'"),
        ({"layers": {"re:(": "skip"}}, "bad regex"),
        ({"layers": {"x": {"group_size": 0}}}, "positive integer"),
    ],
)
def test_parse_config_errors_name_the_key(data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", "\\(")):
        parse_config(data)


def test_override_exact_name_does_not_match_prefix():
    assert not LayerOverride("layers.1").matches("layers.10")


@pytest.mark.parametrize("preset", sorted((EXAMPLES.parent / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_bundled_presets_are_valid(preset):
    from qlower.config import make_options

    options = make_options(preset)
    assert options.scheme in ("qta8a_qga4w", "qga4w", "q8ta_q8csw")  # every preset quantizes


def test_exception_inside_factory_names_file_and_line(tmp_path):
    path = write_model(tmp_path, "def make_model():\n    raise RuntimeError('weights missing')\nexample_inputs = (torch.randn(1),)\n")
    assert_one_error(run(["export", str(path)], 1), f"{path}:4", "RuntimeError: weights missing")


def test_exception_inside_example_inputs_function(tmp_path):
    path = write_model(tmp_path, "model = nn.Linear(2, 2)\ndef example_inputs():\n    return 1 / 0\n")
    assert_one_error(run(["export", str(path)], 1), f"{path}:5", "ZeroDivisionError")


def test_json_errors_print_one_document(tmp_path, capsys):
    """CI parses stdout under --json: an error is a document too, next to the stderr lines."""
    import json

    assert main(["export", str(tmp_path / "nope.py"), "--json"]) == 1
    assert main(["export", MLP, "--scheme", "nope", "--json"]) == 2
    out, err = capsys.readouterr()
    decoder, documents, rest = json.JSONDecoder(), [], out.strip()
    while rest:
        doc, end = decoder.raw_decode(rest)
        documents.append(doc)
        rest = rest[end:].strip()
    assert [(d["ok"], d["exit_code"]) for d in documents] == [(False, 1), (False, 2)]
    assert "model file not found" in documents[0]["error"] and documents[0]["hint"]
    assert "--scheme" in documents[1]["error"]
    assert err.count("error:") == 2
