"""qlower's ET-VK op library (runtime/): its op test on a Vulkan device (opt-in).

Set QLOWER_VK_OP_TEST to ``qlower_vk_op_test`` (``scripts/build_runtime.sh`` builds it) and
VK_ICD_FILENAMES to a Vulkan driver. Every op runs on one ComputeGraph through prefill and
decode shapes (T > 1, then 1, then > 1 again) and is compared with a CPU reference: odd and
aligned sizes, group sizes, bias, residual, SiLU·mul, splits, GQA, positions up to the cache
end, and each op's stock fallback. QLOWER_REQUIRE_RUNTIME=1 (CI sets it) fails instead of
skipping when the binary is not given.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

OP_TEST = os.environ.get("QLOWER_VK_OP_TEST")


@pytest.mark.parametrize("op", ["rms", "linear", "split", "sdpa"])
def test_library_op_matches_its_reference_on_vulkan(op):
    if not OP_TEST:
        if os.environ.get("QLOWER_REQUIRE_RUNTIME") == "1":
            pytest.fail("QLOWER_REQUIRE_RUNTIME=1 but QLOWER_VK_OP_TEST is not set")
        pytest.skip("set QLOWER_VK_OP_TEST to qlower_vk_op_test (scripts/build_runtime.sh)")
    proc = subprocess.run([OP_TEST, op], capture_output=True, text=True, timeout=1800)
    summary = re.search(r"^(\d+) passed, (\d+) failed", proc.stdout, re.M)
    assert proc.returncode == 0 and summary, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert int(summary.group(1)) > 0 and int(summary.group(2)) == 0, proc.stdout[-3000:]
