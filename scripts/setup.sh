#!/usr/bin/env bash
# Install everything qlower and its tests need on a fresh Debian/Ubuntu machine:
# the Vulkan loader and its headers (benchmarks/vkprof), Mesa's CPU Vulkan device (lavapipe), glslc, and the
# C++ toolchain that builds qlower's ET-VK op library (cmake, ninja, g++; scripts/build_runtime.sh) from apt,
# then the package with its pinned PyTorch/ExecuTorch/torchao from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="libvulkan1 libvulkan-dev mesa-vulkan-drivers glslc cmake ninja-build g++ xz-utils"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing apt packages:$missing" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PYTHON="${PYTHON:-python3}"
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
"$PYTHON" -m pip install -q "torch==2.13.0"
"$PYTHON" -m pip install -q -e ".[test,vulkan,hf,plot]"
echo "qlower is installed: $(command -v qlower)" >&2
