"""Mutated .pte bytes (bit flips, overwritten words, truncation, splices) give either a
valid report or one clean PteError: never another exception, a hang or a crash."""

from __future__ import annotations

import contextlib
import io
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlower.errors import PteError
from qlower.inspect import inspect_pte
from qlower.pte import read_pte
from qlower.render import render_inspect

EXAMPLES = 120  # each decodes in a forked child (~0.1 s); keeps the test well under a minute
INTERESTING_WORDS = [0, 1, 4, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@pytest.fixture(scope="module")
def seed():
    """A stock-flow Vulkan .pte with two partitions and a CPU kernel between them,
    and the byte ranges worth mutating: the program flatbuffer and the delegate blobs."""
    data = stock_vulkan_pte()
    pte = read_pte(data)
    regions = [(0, pte.program_size)]
    blob_sizes = {d.blob_size for d in pte.delegates}
    for offset, size in pte.segments:
        if size in blob_sizes:
            regions.append((pte.segment_base + offset, pte.segment_base + offset + size))
    regions.append((0, len(data)))
    return data, regions


def stock_vulkan_pte() -> bytes:
    """The stock flow: torchao 8da4w → VulkanPartitioner → to_executorch, with erf
    (which stays on the CPU) between two linears."""
    from qlower.console import import_heavy_libraries

    import_heavy_libraries()
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), Erf(), torch.nn.Linear(32, 16)).eval()
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    ep = torch.export.export(model, (torch.randn(2, 32),))
    return to_edge_transform_and_lower(ep, partitioner=[VulkanPartitioner()]).to_executorch().buffer


class Erf(torch.nn.Module):
    def forward(self, x):
        return torch.erf(x)


def mutate(data: bytes, regions, draw) -> bytes:
    lo, hi = draw(st.sampled_from(regions))
    b = bytearray(data)
    kind = draw(st.sampled_from(["flip", "word", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(lo, hi - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "word":
        i = draw(st.integers(lo, max(lo, hi - 4)))
        b[i:i + 4] = struct.pack("<I", draw(st.sampled_from(INTERESTING_WORDS + [len(data), hi - i])))
    elif kind == "truncate":
        b = b[: draw(st.integers(0, len(b) - 1))]
    else:
        i = draw(st.integers(lo, hi - 1))
        j = draw(st.integers(0, len(data) - 1))
        n = draw(st.integers(1, 64))
        b[i:i + n] = data[j:j + n]
    return bytes(b)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_pte_gives_report_or_clean_error(seed, data):
    good, regions = seed
    mutated = mutate(good, regions, data.draw)
    try:
        report = inspect_pte(mutated, expect=["partitions>=0"])
    except PteError as exc:
        assert exc.message and "\n" not in exc.message
        return
    assert report["size"] == len(mutated)
    with contextlib.redirect_stdout(io.StringIO()):
        render_inspect(report, ops=True, tensors=True, constants=True)


def test_seed_is_valid(seed):
    data, _ = seed
    report = inspect_pte(data)
    assert report["summary"]["vulkan_partitions"] == 2
