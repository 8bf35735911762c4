"""qlower's GLSL compute kernels and their shipped SPIR-V.

Each ``<kernel>.glsl`` has one variants file ``<kernel>.yaml``; every variant
is compiled to ``spv/<name>.spv`` with names following
``<kernel>[_<tile>]_<storage>_<dtype>``. ``spv/manifest.json`` records, per
variant, the binding count, workgroup size, defines and a hash of the sources
it was built from (see ``build.py``; ``tests/test_shaders.py`` checks it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

SHADER_DIR = Path(__file__).resolve().parent
SPV_DIR = SHADER_DIR / "spv"
MANIFEST = SPV_DIR / "manifest.json"
GLSLC_FLAGS = ["-fshader-stage=compute", "--target-env=vulkan1.1", "-O"]


@functools.lru_cache(maxsize=1)
def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def spv_path(name: str) -> Path:
    return SPV_DIR / f"{name}.spv"


def includes(source: Path) -> list[Path]:
    """Headers a shader includes, transitively, in a stable order."""
    seen: list[Path] = []
    todo = [source]
    while todo:
        text = todo.pop().read_text()
        for inc in re.findall(r'^\s*#include\s+"([^"]+)"', text, flags=re.M):
            path = SHADER_DIR / inc
            if path not in seen:
                seen.append(path)
                todo.append(path)
    return sorted(seen)


def source_hash(source: Path, defines: dict) -> str:
    """Hash of everything a variant's SPIR-V is built from."""
    h = hashlib.sha256()
    for path in [source, *includes(source)]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(json.dumps(sorted((str(k), str(v)) for k, v in defines.items())).encode())
    h.update(" ".join(GLSLC_FLAGS).encode())
    return h.hexdigest()
