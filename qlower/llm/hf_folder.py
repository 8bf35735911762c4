"""A Hugging Face model folder (as ``save_pretrained`` writes it) → a causal LM, offline.

The folder holds ``config.json``, the weights as ``model.safetensors`` or
sharded ``*.safetensors`` with ``model.safetensors.index.json``, and optionally
``generation_config.json`` and tokenizer files. Nothing is ever fetched from a
hub: transformers runs with ``HF_HUB_OFFLINE=1`` and ``local_files_only``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, first_line

# Written next to the .pte when the folder has them (ExecuTorch's runners take
# tokenizer.json, tokenizer.model or a tiktoken file as --tokenizer_path).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
PROMPT_TOKENS = 16  # example prompt length when exporting without a KV cache


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


@dataclass
class HfFolder:
    path: Path
    config: Any
    architecture: str
    generation: dict[str, Any] = field(default_factory=dict)
    tokenizer_files: list[Path] = field(default_factory=list)

    @property
    def max_positions(self) -> int | None:
        text = getattr(self.config, "get_text_config", lambda: self.config)()
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(text, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def token_ids(self) -> dict[str, Any]:
        """bos and eos ids from generation_config.json, else config.json."""
        text = getattr(self.config, "get_text_config", lambda: self.config)()
        bos = self.generation.get("bos_token_id", getattr(text, "bos_token_id", None))
        eos = self.generation.get("eos_token_id", getattr(text, "eos_token_id", None))
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        if eos is not None and not isinstance(eos, list):
            eos = [eos]
        return {"bos": bos, "eos": [int(e) for e in eos] if eos else None}


def read_hf_folder(path: str | Path) -> HfFolder:
    path = Path(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise ModelLoadError("a Hugging Face folder needs the transformers package", "pip install 'transformers>=5'") from exc
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {first_line(exc)}",
                             "the folder must be written by save_pretrained of a transformers model") from exc
    architectures = getattr(config, "architectures", None) or []
    causal = [a for a in architectures if a.endswith("ForCausalLM") or a.endswith("LMHeadModel")]
    if not architectures:  # a config saved on its own or written by hand: by model_type, as AutoModelForCausalLM does
        causal = [name] if (name := causal_lm_class_name(config)) else []
    if not causal:
        raise ModelLoadError(f"{path} holds a {architectures[0] if architectures else config.model_type} model, not a causal LM",
                             "qlower exports decoders: config.json names a *ForCausalLM architecture, or a model_type "
                             "that transformers loads as a causal LM")
    generation = {}
    if (path / "generation_config.json").is_file():
        try:
            generation = json.loads((path / "generation_config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {path / 'generation_config.json'}: {exc}", "fix or remove the file") from exc
    tokenizers = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    return HfFolder(path, config, causal[0], generation, tokenizers)


def causal_lm_class_name(config) -> str | None:
    """The class AutoModelForCausalLM builds for ``config.model_type``, or None.

    Encoder families that transformers can also run as a decoder (BERT, RoBERTa: their
    model_type has a masked-LM class too) count only when the config says ``is_decoder``.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if isinstance(name, (tuple, list)):
        name = name[0] if name else None
    if name is None or (model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)):
        return None
    return name


def _model_class(folder: HfFolder):
    import transformers

    if not list(folder.path.glob("*.safetensors")):
        raise ModelLoadError(f"{folder.path} has no .safetensors weights",
                             "save the model with save_pretrained(..., safe_serialization=True)")
    cls = getattr(transformers, folder.architecture, None)
    if cls is None:
        raise ModelLoadError(f"transformers {transformers.__version__} has no architecture {folder.architecture}",
                             "upgrade transformers, or export a model file that builds the model")
    return cls


def hf_skeleton(folder: HfFolder):
    """(the folder's ``*ForCausalLM`` without weights, its checkpoint), or None when the checkpoint's
    names or shapes are not the model's own (a family whose loading renames or converts tensors):
    then only ``from_pretrained`` can load it.

    The parameters are on the meta device and the buffers real (RoPE's ``inv_freq`` computed as
    ``from_pretrained`` computes it); the quantize stage fills the weights (qlower.stream).
    """
    from ..stream import SafetensorsWeights, check_fits, empty_weights

    cls = _model_class(folder)
    weights = SafetensorsWeights.open(folder.path)
    try:
        with empty_weights():
            model = cls(folder.config)
    except Exception as exc:
        raise ModelLoadError(f"cannot build {folder.architecture} from {folder.path / 'config.json'}: {type(exc).__name__}: {first_line(exc)}",
                             "QLOWER_DEBUG=1 shows the traceback") from exc
    model.eval()
    if check_fits(model, weights) is not None:
        return None
    return model, weights


def family_check_model(folder: HfFolder) -> torch.nn.Module:
    """A small float model of the folder's family (its config with one layer and a small vocabulary,
    random weights): what the KV-cache self-check runs when the real model is never whole in float."""
    import copy

    cls = _model_class(folder)
    config = copy.deepcopy(folder.config)
    text = getattr(config, "get_text_config", lambda: config)()
    layers = 1
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]
    text.vocab_size = min(int(text.vocab_size), 512)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value >= text.vocab_size:
            setattr(text, key, None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls(config).eval()


def load_hf_model(folder: HfFolder) -> torch.nn.Module:
    """The folder's ``*ForCausalLM`` in float32, weights from its safetensors files."""
    cls = _model_class(folder)
    try:
        model = cls.from_pretrained(str(folder.path), local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {folder.architecture} from {folder.path}: {type(exc).__name__}: {first_line(exc)}",
                             "check that the weights match config.json; QLOWER_DEBUG=1 shows the traceback") from exc
    return model.eval()


def load_tokenizer(folder: HfFolder | None, hint: str):
    """The folder's tokenizer (transformers' ``AutoTokenizer``, offline), or None when it has none."""
    if folder is None or not folder.tokenizer_files:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder.path), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {folder.path}: {first_line(exc)}", hint) from exc


def example_tokens(config, length: int = PROMPT_TOKENS) -> torch.Tensor:
    text = getattr(config, "get_text_config", lambda: config)()
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, int(text.vocab_size), (1, length), generator=gen)
