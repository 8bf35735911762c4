#!/usr/bin/env bash
# The 1B decode/prefill comparison on a GPU machine, one run: export_llama's file, qlower's file for the stock
# runtime, qlower's file for its own op library (--runtime qlower), and llama.cpp's Vulkan backend.
#
#   benchmarks/gpu_decode_1b.sh INPUTS OUT
#
# INPUTS holds what the GPU machine cannot make (it needs neither torch nor network):
#   export_llama.pte.xz qlower.pte.xz qlower_vkops.pte.xz   all-zero-weight 1B files (benchmarks/llm_bench.py
#                                  --shape 1b --zero-weights --keep DIR, then `qlower export DIR/hf --runtime qlower`
#                                  with the same options); xz packs them small
#   llm_step_runner.xz             tools/llm_step_runner linked with qlower's op library (scripts/build_runtime.sh);
#                                  it runs stock files as the stock runtime does, so one runner serves all three
#   libvulkan.so.1                 benchmarks/vkprof built as the loader stand-in (its README)
#   libvulkan1_*.deb               Debian's Vulkan loader
#   llama.cpp-vulkan.tar.xz zero-1b-q4_0.gguf.xz   llama.cpp's llama-bench and the zero-weight 1B GGUF
# OUT receives decode.json (llm_decode_bench.py --json, llama.cpp's row last), breakdown.json (the --vkprof
# breakdown of each file) and the logs.
# ROUNDS (default 3) interleaved timing rounds; PROFILE_STEPS (default 100) decode steps of each --vkprof run.
set -euo pipefail
in="$(cd "$1" && pwd)"
out="$2"
mkdir -p "$out"
work=/tmp/qlower_gpu_bench
mkdir -p "$work/vk" "$work/vkprof" "$work/llama"
dpkg -x "$in"/libvulkan1_*.deb "$work/vk"
loader="$work/vk/usr/lib/x86_64-linux-gnu/libvulkan.so.1"
egl=$(ldconfig -p | awk '/libEGL_nvidia.so.0/{print $NF; exit}')
# The driver's own ICD names the GLX library, which fails without a display; the EGL one works headless.
printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "1.3.0"}}\n' \
  "${egl:-libEGL_nvidia.so.0}" > "$work/icd.json"
export VK_ICD_FILENAMES="$work/icd.json" VK_DRIVER_FILES="$work/icd.json"
export LD_LIBRARY_PATH="$work/vk/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
cp "$in/libvulkan.so.1" "$work/vkprof/"
# Python's lzma and tarfile: the machine need not have xz.
for f in "$in"/*.pte.xz "$in"/llm_step_runner.xz "$in"/zero-1b-q4_0.gguf.xz; do
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$f" "$work/$(basename "${f%.xz}")"
done
chmod +x "$work/llm_step_runner"
python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$in/llama.cpp-vulkan.tar.xz" "$work/llama"
chmod +x $(find "$work/llama" -type f -name "llama-*")
bench=$(find "$work/llama" -name llama-bench -type f | head -n 1)
files=("$work/export_llama.pte" "$work/qlower.pte" "$work/qlower_vkops.pte")
# Timing first (with llama.cpp), then the breakdown (dispatches, GPU time per kernel) in a run of its own, so
# the timing is written even if the breakdown does not finish.
python3 "$(dirname "$0")/llm_decode_bench.py" --runner "$work/llm_step_runner" --prompt-len 512 --steps 64 \
  --rounds "${ROUNDS:-3}" --llama-bench "$bench" --gguf "$work/zero-1b-q4_0.gguf" "${files[@]}" --json \
  > "$out/decode.json" 2> "$out/bench.log"
python3 "$(dirname "$0")/llm_decode_bench.py" --runner "$work/llm_step_runner" --prompt-len 512 --steps 8 --rounds 1 \
  --vkprof "$work/vkprof" --real-loader "$loader" --profile-steps "${PROFILE_STEPS:-100}" "${files[@]}" --json \
  > "$out/breakdown.json" 2>> "$out/bench.log"
python3 - "$out/decode.json" "$out/breakdown.json" <<'PY'
import json, sys
breakdown = {r["file"]: r["breakdown"] for r in json.load(open(sys.argv[2]))}
for r in json.load(open(sys.argv[1])):
    b = breakdown.get(r["file"], {}).get("gpu", {})
    print(f"{r['file'].rsplit('/', 1)[-1]:<28} decode {r['decode_ms_median']:.3f} ms ({r['tokens_per_s']:.0f} tok/s, "
          f"x{r['decode_speedup']:.2f})  prefill {r['prefill_ms_median']:.1f} ms (x{r['prefill_speedup']:.2f})  "
          f"dispatches/token {b.get('dispatches_per_token', '-')}")
PY
