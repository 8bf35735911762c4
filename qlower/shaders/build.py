"""Compile every shader variant to SPIR-V and write spv/manifest.json.

    python -m qlower.shaders.build            # rebuild spv/ (needs glslc)
    python -m qlower.shaders.build --check    # exit 1 if spv/ is stale

Variants come from ``<kernel>.yaml`` beside each ``<kernel>.glsl``::

    <kernel>:
      bindings: <number of storage buffers>
      defines: {KEY: value, ...}          # shared by all variants
      variants:
        - name: <kernel>[_<tile>]_<storage>_<dtype>
          defines: {KEY: value, ...}      # per variant, overriding
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from qlower.shaders import GLSLC_FLAGS, MANIFEST, SHADER_DIR, SPV_DIR, source_hash


def variants() -> list[dict]:
    """Every variant of every kernel, with its merged defines and source hash."""
    out = []
    for vfile in sorted(SHADER_DIR.glob("*.yaml")):
        for kernel, spec in yaml.safe_load(vfile.read_text()).items():
            source = SHADER_DIR / f"{kernel}.glsl"
            for var in spec["variants"]:
                defines = {**spec.get("defines", {}), **var.get("defines", {})}
                local = (
                    int(defines.get("WG", defines.get("LX", 1))),
                    int(defines.get("LY", 1)),
                    1,
                )
                out.append({
                    "name": var["name"],
                    "kernel": kernel,
                    "source": source.name,
                    "bindings": int(spec["bindings"]),
                    "local_size": local,
                    "defines": {str(k): str(v) for k, v in defines.items()},
                    "source_sha256": source_hash(source, defines),
                })
    names = [v["name"] for v in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"duplicate variant names: {sorted(dup)}")
    return out


def compile_variant(var: dict, out: Path, glslc: str = "glslc") -> None:
    cmd = [glslc, *GLSLC_FLAGS, f"-I{SHADER_DIR}"]
    cmd += [f"-D{k}={v}" for k, v in var["defines"].items()]
    cmd += ["-o", str(out), str(SHADER_DIR / var["source"])]
    subprocess.run(cmd, check=True)


def build(glslc: str = "glslc") -> dict:
    SPV_DIR.mkdir(exist_ok=True)
    shaders = {}
    for var in variants():
        path = SPV_DIR / f"{var['name']}.spv"
        compile_variant(var, path, glslc)
        var["spv_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        shaders[var.pop("name")] = var
    wanted = {f"{n}.spv" for n in shaders}
    for stale in SPV_DIR.glob("*.spv"):
        if stale.name not in wanted:
            stale.unlink()
    manifest = {"glslc_flags": GLSLC_FLAGS, "shaders": shaders}
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def stale() -> list[str]:
    """Variants whose shipped SPIR-V was not built from the current sources."""
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"shaders": {}}
    bad = []
    for var in variants():
        entry = manifest["shaders"].get(var["name"])
        path = SPV_DIR / f"{var['name']}.spv"
        if (
            entry is None
            or entry["source_sha256"] != var["source_sha256"]
            or not path.exists()
            or hashlib.sha256(path.read_bytes()).hexdigest() != entry["spv_sha256"]
        ):
            bad.append(var["name"])
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report stale SPIR-V")
    ap.add_argument("--glslc", default="glslc")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for name in bad:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if bad else 0
    if shutil.which(args.glslc) is None:
        print(f"error: {args.glslc} not found (Debian: apt install glslc)", file=sys.stderr)
        return 1
    manifest = build(args.glslc)
    print(f"built {len(manifest['shaders'])} variants into {SPV_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
