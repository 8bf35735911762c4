"""Load a model file or a Hugging Face folder; wrap a causal LM for KV-cache decode."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..config import ExportOptions
from ..errors import ModelLoadError
from ..loader import LoadedModel, load_model
from .hf_folder import HfFolder, example_tokens, family_check_model, hf_skeleton, is_hf_folder, load_hf_model, read_hf_folder

# A model file may define these for KV-cache export (see docs/llm.md, "LLM decode").
METADATA_NAME = "metadata"


def load_any(path: str | Path, options: ExportOptions, entry: str | None = None,
             checkpoint: str | Path | None = None, stream: bool = False,
             warn: Callable[[str], None] = lambda message: None) -> tuple[LoadedModel, HfFolder | None, bool]:
    """(the loaded model, the HF folder if it is one, whether to export with a KV cache).

    ``stream``: a folder, or a model file with a ``.safetensors`` checkpoint, loads as a skeleton
    whose weights the quantize stage reads layer by layer (``LoadedModel.weights``).
    """
    path = Path(path)
    if path.is_dir():
        if not is_hf_folder(path):
            raise ModelLoadError(f"{path} is a folder without config.json",
                                 "pass a model file, or a folder written by transformers' save_pretrained")
        if entry is not None or checkpoint is not None:
            raise ModelLoadError("--entry and --checkpoint apply to model files, not to a Hugging Face folder",
                                 "drop them: the folder's config.json and safetensors say everything")
        folder = read_hf_folder(path)
        kv_cache = options.kv_cache if options.kv_cache is not None else True
        skeleton = hf_skeleton(folder) if stream else None
        if stream and skeleton is None:
            warn(f"{folder.architecture}: the checkpoint's tensors are not the model's own (renamed or converted on load); "
                 "loading the whole float model")
        model, weights = skeleton if skeleton is not None else (load_hf_model(folder), None)
        if not kv_cache:
            from ..hf import CausalLMLogits

            model = CausalLMLogits(model)
            weights = weights.under("lm.") if weights is not None else None
        loaded = LoadedModel(model, (example_tokens(folder.config),), None, path, folder.architecture, weights=weights,
                             unexpected_weights=lambda names: None)
        # The family check runs on float weights: a small model of the family when streaming.
        _check_decodable(loaded, kv_cache, options, family_check_model(folder) if weights is not None else None)
        return loaded, folder, kv_cache
    loaded = load_model(path, entry=entry, checkpoint=checkpoint, stream=stream)
    kv_cache = bool(options.kv_cache)
    _check_decodable(loaded, kv_cache, options)
    return loaded, None, kv_cache


def _check_decodable(loaded: LoadedModel, kv_cache: bool, options: ExportOptions, float_model: nn.Module | None = None) -> None:
    """--kv-cache: a scheme that can decode, a forward that takes tokens, and a cache that reproduces the model."""
    from .decoder import check_cache_matches

    if not kv_cache:
        return
    if len(loaded.example_inputs) != 1:
        raise ModelLoadError(f"--kv-cache needs a decoder whose forward takes the tokens; {loaded.source} takes "
                             f"{len(loaded.example_inputs)} inputs", "export it without --kv-cache")
    if options.scheme == "q8ta_q8csw":
        raise ModelLoadError("--kv-cache decode takes dynamic or weight-only schemes, not static q8ta_q8csw "
                             "(its calibrated scales would be fixed for one sequence length)",
                             "use --scheme qta8a_qga4w (or qga4w, fp16, fp32), or --no-kv-cache")
    if loaded.weights is None:
        check_cache_matches(loaded.module)
    elif float_model is not None:
        check_cache_matches(float_model)
    # else a model file streamed from its checkpoint: checked on the quantized model (pipeline.stage_kv_cache)


def decoder_for(quantized: nn.Module, loaded: LoadedModel, folder: HfFolder | None, options: ExportOptions,
                warn: Callable[[str], None]):
    """(KVCacheLM around ``quantized``, runner metadata)."""
    from .decoder import make_decoder, runner_metadata

    max_positions, config, token_ids = (folder.max_positions, folder.config, folder.token_ids()) if folder else (None, None, None)
    lm = make_decoder(quantized, options, max_positions, config)
    return lm, runner_metadata(lm, options, token_ids, loaded.metadata, warn)
