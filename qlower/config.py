"""Export options: schemes, group sizes, per-layer overrides, TOML presets.

A config file is TOML with the same keys as the command-line flags; flags given
on the command line override it. Per-layer overrides live in ``[layers]`` and
map an exact module name, or ``re:<regex>`` matched against the full name, to a
scheme name, ``"skip"``, or a table ``{ scheme = ..., group_size = ... }``::

    scheme = "qta8a_qga4w"
    group_size = 128
    quantize_embeddings = true

    [layers]
    "output" = "skip"
    "re:layers\\.0\\..*" = { group_size = 64 }
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .vkops import RUNTIME_STOCK, RUNTIMES

# scheme name -> what it means; the fused op is documented in docs/quantization.md.
SCHEMES = {
    "qta8a_qga4w": "dynamic per-token int8 activations, group-wise int4 weights",
    "qga4w": "float activations, group-wise int4 weights",
    "q8ta_q8csw": "static per-tensor int8 activations (calibrated), per-channel int8 weights",
    "fp16": "float16 baseline, no quantization",
    "fp32": "float32 baseline, no quantization",
}
# --weight-algorithm: how the int4 values and scales are chosen (same stored format for all).
WEIGHT_ALGORITHMS = {
    "rtn": "round to nearest, scale max|w|/7.5 per group (data-free)",
    "hqq": "HQQ scale-only: least-squares scale per group (data-free, torchao)",
    "gptq": "GPTQ: error feedback through the layer's calibration Hessian (needs calibration text or inputs)",
    "auto": "per layer, the one of rtn/hqq/gptq with the least output error on held-out calibration windows (rtn unless another beats it)",
}
CALIBRATED_ALGORITHMS = ("gptq", "auto")
DEFAULT_WEIGHT_ALGORITHM = "rtn"
# --gptq-device: where GPTQ's column loop runs; the bits are the same on each (weight_quant.gptq).
GPTQ_DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CALIBRATION_TOKENS = 4096
GROUPED_SCHEMES = ("qta8a_qga4w", "qga4w")
FLOAT_SCHEMES = ("fp16", "fp32")
SKIP = "skip"
DEFAULT_GROUP_SIZE = 128
DEFAULT_CALIBRATION_BATCHES = 8


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer choice: an exact module name or ``re:`` pattern → scheme/group size/skip."""

    pattern: str
    scheme: str | None = None  # None keeps the global scheme; "skip" leaves the layer float
    group_size: int | None = None

    def __post_init__(self):
        if self.scheme is not None and self.scheme != SKIP:
            _check_scheme(self.scheme, f"layers.{self.pattern!r}")
        if self.group_size is not None:
            _check_group_size(self.group_size, f"layers.{self.pattern!r}.group_size")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as exc:
                raise ConfigError(f"layers: bad regex {self.pattern!r}: {exc}", "write a Python regular expression after 're:'")

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return self.pattern == name


@dataclass(frozen=True)
class ExportOptions:
    scheme: str = "qta8a_qga4w"
    group_size: int = DEFAULT_GROUP_SIZE
    quantize_embeddings: bool = False
    calibration: str | None = None
    calibration_batches: int = DEFAULT_CALIBRATION_BATCHES
    strict: bool = False
    seed: int = 0
    kv_cache: bool | None = None  # None: on for a Hugging Face causal-LM folder, off for a model file
    max_seq_len: int | None = None  # None: min(the model's max positions, DEFAULT_MAX_SEQ_LEN)
    metadata: str | None = None  # JSON object of runner metadata values overriding the derived ones
    layers: tuple[LayerOverride, ...] = field(default_factory=tuple)
    # WEIGHT_ALGORITHMS: how int4 values are chosen. None: "auto" when calibration_text is given (it has
    # the data to judge by), else DEFAULT_WEIGHT_ALGORITHM ("rtn")
    weight_algorithm: str | None = None
    calibration_text: str | None = None  # text file whose tokens calibrate gptq (a Hugging Face folder's tokenizer)
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS  # how many of its tokens gptq calibrates on
    runtime: str = RUNTIME_STOCK  # RUNTIMES: "qlower" writes qlower's own runtime ops (vkops/), for a linked runtime
    gptq_device: str = "auto"  # GPTQ_DEVICES: "auto" runs GPTQ on a CUDA GPU when torch sees one

    def __post_init__(self):
        if self.weight_algorithm is None:
            object.__setattr__(self, "weight_algorithm", "auto" if self.calibration_text is not None and self.scheme in GROUPED_SCHEMES
                               else DEFAULT_WEIGHT_ALGORITHM)
        _check_scheme(self.scheme, "scheme")
        _check_group_size(self.group_size, "group_size")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len must be at least 2, got {self.max_seq_len}", "use e.g. 2048")
        if self.metadata is not None:
            parse_metadata(self.metadata)
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime: unknown runtime {self.runtime!r}", f"legal runtimes: {', '.join(RUNTIMES)}")
        if self.calibration_batches <= 0:
            raise ConfigError(f"calibration_batches must be positive, got {self.calibration_batches}", "use e.g. 8")
        if self.weight_algorithm not in WEIGHT_ALGORITHMS:
            raise ConfigError(f"weight_algorithm: unknown algorithm {self.weight_algorithm!r}",
                              f"legal algorithms: {', '.join(WEIGHT_ALGORITHMS)}")
        if self.weight_algorithm != DEFAULT_WEIGHT_ALGORITHM and self.scheme not in GROUPED_SCHEMES:
            raise ConfigError(f"weight_algorithm {self.weight_algorithm} applies to the int4 schemes, not {self.scheme}",
                              f"use --scheme {' or '.join(GROUPED_SCHEMES)}, or drop --weight-algorithm")
        if self.gptq_device not in GPTQ_DEVICES:
            raise ConfigError(f"gptq_device: unknown device {self.gptq_device!r}", f"legal devices: {', '.join(GPTQ_DEVICES)}")
        if not isinstance(self.calibration_tokens, int) or isinstance(self.calibration_tokens, bool) or self.calibration_tokens <= 0:
            raise ConfigError(f"calibration_tokens must be a positive integer, got {self.calibration_tokens!r}", "use e.g. 4096")
        if self.calibration_text is not None and self.weight_algorithm not in CALIBRATED_ALGORITHMS:
            raise ConfigError(f"calibration_text calibrates {', '.join(CALIBRATED_ALGORITHMS)}; "
                              f"weight_algorithm {self.weight_algorithm} is data-free",
                              "add --weight-algorithm gptq (or auto), or drop --calibration-text")

    def layer_choice(self, name: str) -> tuple[str, int]:
        """(scheme or "skip", group size) for one module; the first matching override wins."""
        for override in self.layers:
            if override.matches(name):
                return (override.scheme or self.scheme, override.group_size or self.group_size)
        return self.scheme, self.group_size


OPTION_KEYS = tuple(f.name for f in fields(ExportOptions))
DEFAULT_MAX_SEQ_LEN = 2048


def parse_metadata(text: str) -> dict[str, Any]:
    """``--metadata '{"get_bos_id": 1, "get_eos_ids": [2]}'`` → dict of int/bool/float/list values."""
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"metadata is not valid JSON: {exc.msg}", 'e.g. --metadata \'{"get_bos_id": 1, "get_eos_ids": [2]}\'') from exc
    if not isinstance(data, dict):
        raise ConfigError("metadata must be a JSON object of method name → value", 'e.g. {"get_bos_id": 1}')
    for key, value in data.items():
        items = value if isinstance(value, list) else [value]
        if not key.isidentifier() or not items and isinstance(value, list) or not all(isinstance(v, (int, float, bool)) for v in items):
            raise ConfigError(f"metadata {key!r}: values must be numbers, booleans or non-empty lists of them, got {value!r}",
                              'e.g. {"get_eos_ids": [2, 32000]}')
    return data


def _check_scheme(scheme: Any, key: str) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"{key}: unknown scheme {scheme!r}", f"legal schemes: {', '.join(SCHEMES)}")


def _check_group_size(value: Any, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}: group size must be a positive integer, got {value!r}", "use a power of two such as 32, 64 or 128")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML preset into ExportOptions keyword arguments (validated)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", "see configs/ for presets") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}", "check the path and permissions") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", "fix the syntax") from exc
    return parse_config(data, str(path))


def parse_config(data: dict[str, Any], origin: str = "config") -> dict[str, Any]:
    legal = [k for k in OPTION_KEYS if k != "layers"] + ["layers"]
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in legal:
            raise ConfigError(f"{origin}: unknown key {key!r}", f"legal keys: {', '.join(legal)}")
        if key == "layers":
            out["layers"] = _parse_layers(value, origin)
            continue
        expected = {"strict": bool, "quantize_embeddings": bool, "kv_cache": bool, "calibration": str,
                    "metadata": str, "scheme": str, "weight_algorithm": str,
                    "calibration_text": str, "gptq_device": str}.get(key, int)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{origin}: {key} must be {expected.__name__}, got {value!r}", f"e.g. {key} = {_example(key)}")
        out[key] = value
    ExportOptions(**out)  # validate values early, naming the key
    return out


def _parse_layers(table: Any, origin: str) -> tuple[LayerOverride, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"{origin}: [layers] must be a table", 'e.g. [layers] "output" = "skip"')
    overrides = []
    for pattern, spec in table.items():
        if isinstance(spec, str):
            overrides.append(LayerOverride(pattern, scheme=spec))
        elif isinstance(spec, dict):
            unknown = set(spec) - {"scheme", "group_size"}
            if unknown:
                raise ConfigError(f"{origin}: layers.{pattern!r}: unknown key {sorted(unknown)[0]!r}", "legal keys: scheme, group_size")
            overrides.append(LayerOverride(pattern, scheme=spec.get("scheme"), group_size=spec.get("group_size")))
        else:
            raise ConfigError(f"{origin}: layers.{pattern!r} must be a scheme name, 'skip', or a table", f"legal schemes: {', '.join(SCHEMES)}, skip")
    return tuple(overrides)


def _example(key: str) -> str:
    return {"scheme": '"qta8a_qga4w"', "group_size": "128", "strict": "true", "quantize_embeddings": "true",
            "calibration": '"calib.pt"', "calibration_batches": "8", "seed": "0", "kv_cache": "true",
            "max_seq_len": "2048", "weight_algorithm": '"gptq"',
            "calibration_text": '"calibration.txt"', "calibration_tokens": "4096", "gptq_device": '"auto"', "metadata": "'{\"get_bos_id\": 1}'"}.get(key, "...")


def make_options(config: str | Path | None = None, **flags: Any) -> ExportOptions:
    """Options from an optional config file, with non-None flags overriding it."""
    values: dict[str, Any] = load_config(config) if config else {}
    for key, value in flags.items():
        if key not in OPTION_KEYS:
            raise ConfigError(f"unknown option {key!r}", f"legal options: {', '.join(OPTION_KEYS)}")
        if value is not None:
            values[key] = value
    return ExportOptions(**values)
