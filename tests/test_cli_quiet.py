"""The command line's front door: what each command imports, and that stderr carries only qlower's lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlower.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
# Modules that cost seconds to import: the compiler side of ExecuTorch, torchao, transformers.
HEAVY = ("torchao", "executorch.exir.program", "executorch.exir.capture", "executorch.backends.vulkan.partitioner", "transformers")
# Lines that are not qlower's: ExecuTorch's C++ logs ("[kernel_runtime_context.h:91] ..."), torch's
# logging ("W1203 07:33:38.627000 9639 .../_pytree.py:630] ..."), transformers' progress bars.
FOREIGN = re.compile(r"^\[[\w./-]+\.(cpp|h|hpp|cc):\d+\]|^[IWE]\d{4} \d\d:\d\d|Loading weights|it/s\]|%\|")
# What qlower itself writes on stderr: stage lines, per-block progress, warnings, errors and hints.
OWN = re.compile(r"^(✓ |  \S|warning: |error: |hint: )")


def _python(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "QLOWER_DEBUG": "0", **(env or {})})


def _imported_after(args: list[str]) -> tuple[int, list[str]]:
    """(exit code, HEAVY modules imported) of ``qlower ARGS`` in a fresh interpreter."""
    code = ("import sys\nfrom qlower.cli import main\nrc = main(%r)\n"
            "print('\\n' + repr((rc, [m for m in %r if m in sys.modules])))" % (args, HEAVY))
    done = _python(code)
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip().splitlines()[-1])


def test_help_imports_neither_torch_nor_executorch():
    code = "import sys\nfrom qlower.cli import main\nmain(['--help'])\nprint(sorted(m for m in ('torch', 'executorch', 'torchao') if m in sys.modules))"
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"


def test_inspect_imports_no_compiler(exported):
    _, pte = exported("mlp", "qta8a_qga4w")
    for args in (["inspect", str(pte)], ["inspect", str(pte), "--ops", "--json"]):
        rc, heavy = _imported_after(args)
        assert rc == 0 and heavy == [], (args, heavy)


def test_public_api_loads_lazily():
    code = ("import sys\nimport qlower\nassert 'torch' not in sys.modules\n"
            "assert issubclass(qlower.QlowerError, Exception) and callable(qlower.export)\n"
            "from qlower import export\nprint(export is qlower.export, 'executorch.exir.program' in sys.modules)")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_op_schemas_match_the_installed_libraries():
    """data/op_schemas.txt (what inspect labels arguments with) is what the libraries register."""
    from qlower.inspect import OP_SCHEMAS_FILE, registered_schemas
    from qlower.llm.kv_cache import load_llm_custom_ops

    load_llm_custom_ops()
    stored = [line for line in (ROOT / "qlower" / "data" / OP_SCHEMAS_FILE).read_text().splitlines() if line and not line.startswith("#")]
    assert stored == registered_schemas(), "regenerate with `python -m qlower.inspect`"


def test_native_output_is_hidden_and_its_last_line_names_a_failure(capfd):
    """A library call that fails after printing on fd 2: the print stays hidden, its last meaningful
    line joins the one error line; known per-call noise is never that line."""
    from qlower import console
    from qlower.cli import _with_native_line

    with pytest.raises(ModelLoadError) as caught, console.native_output_hidden() as native:
        os.write(2, b"[op_update_cache.cpp:41] Check failed (pos < max_seq_len)\n")
        os.write(2, b"[kernel_runtime_context.h:91] No temp allocator provided\n")
        try:
            raise RuntimeError("update_cache failed")
        except RuntimeError as exc:
            raise ModelLoadError("the call failed", "hint") from exc
    try:
        assert "Check failed" not in capfd.readouterr().err
        message = _with_native_line(caught.value, native)
        assert message == "the call failed [[op_update_cache.cpp:41] Check failed (pos < max_seq_len)]"
        assert _with_native_line(ModelLoadError("ours alone"), native) == "ours alone"  # not a library call's failure
    finally:
        native.close()


@pytest.fixture(scope="module")
def small_hf_folder(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_quiet")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def test_export_and_generate_print_only_qlower_lines(small_hf_folder, tmp_path):
    """Run as a user runs them (a fresh process, fd 2 read as is): no ExecuTorch, torch or transformers line."""
    out = tmp_path / "m.pte"
    for args in (["export", str(small_hf_folder), "-o", str(out), "--group-size", "32", "--max-seq-len", "32"],
                 ["generate", str(small_hf_folder), str(out), "--prompt-ids", "3,17,42", "--max-new-tokens", "6", "--json"]):
        done = subprocess.run([sys.executable, "-m", "qlower", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "QLOWER_DEBUG": "0"})
        assert done.returncode == 0, done.stderr[-2000:]
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert not [line for line in lines if FOREIGN.search(line)], lines
        assert all(OWN.match(line) for line in lines), lines
    assert json.loads(done.stdout)["ok"] is True
