#!/bin/bash
# Vulkan compute on a headless NVIDIA machine that has the driver but no
# Vulkan loader. Source it from a folder holding:
#   whl/      vulkan, cffi and pycparser wheels for the machine's Python
#   libvulkan1_*.deb   Debian's loader package
# The driver's own ICD file names libGLX_nvidia.so.0, which fails without a
# display (VK_ERROR_INCOMPATIBLE_DRIVER); an ICD naming the EGL library works.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site whl/*.whl
dpkg -x libvulkan1_*.deb /tmp/vk
EGL=$(ldconfig -p | awk '/libEGL_nvidia.so.0/{print $NF; exit}')
cat > /tmp/nvidia_egl_icd.json <<J
{"file_format_version": "1.0.0", "ICD": {"library_path": "${EGL:-libEGL_nvidia.so.0}", "api_version": "1.3.0"}}
J
export VK_ICD_FILENAMES=/tmp/nvidia_egl_icd.json VK_DRIVER_FILES=/tmp/nvidia_egl_icd.json
export LD_LIBRARY_PATH=/tmp/vk/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH
export PYTHONPATH=/tmp/site:$PYTHONPATH
