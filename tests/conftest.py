"""Shared fixtures: .pte files exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mlp": ROOT / "examples" / "mlp.py",
    "cnn": ROOT / "examples" / "cnn.py",
    # examples/llama.py at test size (1 layer): still several Vulkan
    # partitions with CPU kernels between them.
    "llama": ROOT / "tests" / "models" / "tiny_llama.py",
}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(example, scheme) -> (model path, .pte path); exports once per session."""
    from qlower.console import import_heavy_libraries

    import_heavy_libraries()
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}
    errors: dict[tuple[str, str], Exception] = {}
    directory = tmp_path_factory.mktemp("pte")

    def get(example: str, scheme: str) -> tuple[Path, Path]:
        from qlower.api import export

        key = (example, scheme)
        if key in errors:
            raise errors[key]
        if key not in cache:
            out = directory / f"{example}_{scheme}.pte"
            try:
                export(MODELS[example], out, scheme=scheme)
            except Exception as exc:
                errors[key] = exc
                raise
            cache[key] = (MODELS[example], out)
        return cache[key]

    return get
