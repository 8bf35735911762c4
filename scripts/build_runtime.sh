#!/usr/bin/env bash
# Builds qlower's ET-VK operator library (runtime/), its op test and the
# runners linked with it (llm_step_runner, pte_runner: tools/CMakeLists.txt),
# against the prebuilt ET-VK SDK.
#
#   scripts/build_runtime.sh [BUILD_DIR]      (default: <repo>/build/runtime)
#
# QLOWER_ET_VK_SDK: the SDK tarball (default <repo>/../shared/prebuilt/et-vk-sdk.tar.xz).
# It is unpacked once into BUILD_DIR/sdk. Needs cmake >= 3.24, ninja, a C++17
# compiler and python3 with PyYAML (Debian python3-yaml); no network.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$repo/build/runtime}"
sdk_tar="${QLOWER_ET_VK_SDK:-$repo/../shared/prebuilt/et-vk-sdk.tar.xz}"
jobs="${QLOWER_BUILD_JOBS:-2}"

mkdir -p "$build"
build="$(cd "$build" && pwd)"
sdk="$build/sdk"

if [ ! -f "$sdk/.unpacked" ]; then
  if [ ! -f "$sdk_tar" ]; then
    echo "build_runtime: no SDK tarball at $sdk_tar (set QLOWER_ET_VK_SDK)" >&2
    exit 2
  fi
  rm -rf "$sdk"
  mkdir -p "$sdk"
  echo "build_runtime: unpacking $sdk_tar"
  tar -xJf "$sdk_tar" -C "$sdk"
  touch "$sdk/.unpacked"
fi

python="${PYTHON:-$(command -v python3)}"
if ! "$python" -c 'import yaml' 2>/dev/null; then
  echo "build_runtime: $python has no PyYAML (apt install python3-yaml, or pip install pyyaml)" >&2
  exit 2
fi

# The tree was once configured from tools/llm_step_runner alone; CMake keeps a
# tree to the source folder it was made from, so such a tree is started again.
if [ -f "$build/cmake/CMakeCache.txt" ] &&
   ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$repo/tools" "$build/cmake/CMakeCache.txt"; then
  echo "build_runtime: $build/cmake was configured from another source folder; starting it again"
  rm -rf "$build/cmake"
fi

nice -n 10 cmake -S "$repo/tools" -B "$build/cmake" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DEXECUTORCH_INSTALL_DIR="$sdk/prefix" \
  -DQLOWER_VK_OPS=ON \
  -DQLOWER_ET_VK_SDK="$sdk" \
  -DQLOWER_VK_OPS_BUILD_TESTS=ON \
  -DPYTHON_EXECUTABLE="$python"
nice -n 10 cmake --build "$build/cmake" -j "$jobs"

echo "build_runtime: op library   $build/cmake/qlower_vk_ops/libqlower_vk_ops.a"
echo "build_runtime: shader lib   $build/cmake/qlower_vk_ops/libqlower_vk_shaders.a"
echo "build_runtime: op test      $build/cmake/qlower_vk_ops/qlower_vk_op_test"
echo "build_runtime: step runner  $build/cmake/llm_step_runner"
echo "build_runtime: pte runner   $build/cmake/pte_runner"
