"""LLM decode: Hugging Face folders, the static KV cache, runner metadata and generation."""
