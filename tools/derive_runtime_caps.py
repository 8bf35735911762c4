"""Derive qlower/data/et_vk_runtime_{ops,shaders}.txt from ExecuTorch sources.

Shader variants come from the shader template YAML files that the pinned
executorch wheel ships (backends/vulkan/runtime/graph/ops/glsl/*.yaml),
expanded with the wheel's own variant generator, so the names are exactly the
ones the runtime build of that version compiles. Operators come from the
``VK_REGISTER_OP(name, fn)`` lines of the C++ runtime, which the wheel does
not ship: pass a git checkout of the public ExecuTorch source and a commit.

    python tools/derive_runtime_caps.py --src /path/to/executorch.git --commit cff6f4dd
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import subprocess
import sys

import executorch.backends.vulkan as vulkan_backend
from executorch.backends.vulkan.runtime import gen_vulkan_spv

OPS_DIR = "backends/vulkan/runtime/graph/ops"
REGISTER_RE = re.compile(r"VK_REGISTER_OP\(\s*([A-Za-z0-9_.]+)\s*,")
DATA = os.path.join(os.path.dirname(__file__), "..", "qlower", "data")


def wheel_shader_variants() -> tuple[list[str], str]:
    yaml_dir = os.path.join(os.path.dirname(vulkan_backend.__file__), "runtime/graph/ops/glsl")
    # Only the YAML parsing half of the generator is used; no GLSL is compiled.
    gen = gen_vulkan_spv.SPVGenerator.__new__(gen_vulkan_spv.SPVGenerator)
    gen.shader_template_params = {}
    for path in sorted(glob.glob(os.path.join(yaml_dir, "*.yaml"))):
        gen.parseTemplateYaml(path)
    names = set()
    for template, variants in gen.shader_template_params.items():
        for params in variants:
            names.add(params.get("NAME", template))
    return sorted(names), yaml_dir


def source_registered_ops(src: str, commit: str) -> list[str]:
    files = subprocess.run(
        ["git", "-C", src, "ls-tree", "-r", "--name-only", commit, OPS_DIR],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    ops = set()
    for f in files:
        if f.endswith(".cpp"):
            text = subprocess.run(
                ["git", "-C", src, "show", f"{commit}:{f}"],
                check=True, capture_output=True, text=True,
            ).stdout
            ops.update(REGISTER_RE.findall(text))
    return sorted(ops)


def write(path: str, header: list[str], names: list[str]) -> None:
    with open(path, "w") as f:
        for line in header:
            f.write(f"# {line}\n")
        f.write("\n".join(names) + "\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="git directory of the ExecuTorch source")
    ap.add_argument("--commit", required=True)
    args = ap.parse_args(argv)
    full = subprocess.run(
        ["git", "-C", args.src, "rev-parse", args.commit],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    date = subprocess.run(
        ["git", "-C", args.src, "show", "-s", "--format=%cs", full],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    today = datetime.date.today().isoformat()
    from executorch.version import __version__, git_version

    ops = source_registered_ops(args.src, full)
    write(
        os.path.join(DATA, "et_vk_runtime_ops.txt"),
        [
            "Operators the ExecuTorch Vulkan runtime registers (VK_REGISTER_OP).",
            f"source: github.com/pytorch/executorch {OPS_DIR}/impl/*.cpp at {full} ({date})",
            f"pinned wheel: executorch {__version__} (built from {git_version}, not public);",
            "  the snapshot above is the closest public one.",
            f"derived {today} by tools/derive_runtime_caps.py",
        ],
        ops,
    )
    shaders, _ = wheel_shader_variants()
    write(
        os.path.join(DATA, "et_vk_runtime_shaders.txt"),
        [
            "Compute-shader variants compiled into the ExecuTorch Vulkan runtime.",
            f"source: the shader template YAML files in the executorch {__version__} wheel",
            f"  ({OPS_DIR}/glsl/*.yaml, built from {git_version}),",
            "  expanded with the wheel's gen_vulkan_spv.SPVGenerator.parseTemplateYaml.",
            f"derived {today} by tools/derive_runtime_caps.py",
        ],
        shaders,
    )
    print(f"{len(ops)} operators, {len(shaders)} shader variants", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
