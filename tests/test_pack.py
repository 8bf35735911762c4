"""Round trips of the pack/unpack pairs, and byte equality with ExecuTorch's packing."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qlower import pack

# Odd sizes next to aligned ones: K not a multiple of 8, N not a multiple of 4 or 8.
DIMS = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 31, 64, 100, 113])
SEEDS = st.integers(0, 2**31 - 1)
SETTINGS = settings(max_examples=60, deadline=None)


def _int4(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(pack.INT4_MIN, pack.INT4_MAX + 1, (n, k), generator=g, dtype=torch.int8)


def _int8(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)


@SETTINGS
@given(n=DIMS, k=DIMS, seed=SEEDS)
def test_int4_round_trip(n, k, seed):
    w = _int4(n, k, seed)
    packed = pack.pack_int4(w)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, pack.ceil_to(k, 8) // 2)
    assert torch.equal(pack.unpack_int4(packed, k), w)


@SETTINGS
@given(n=DIMS, k=DIMS, seed=SEEDS)
def test_int4_padding_is_zero(n, k, seed):
    packed = pack.pack_int4(_int4(n, k, seed))
    full = pack.unpack_int4(packed, packed.shape[1] * 2)
    assert not full[:, k:].any()


def test_int4_bit_layout():
    # Row [-8, 7, 0, 1, 2, -1, 3, -3]: bytes (7+8)<<4|(-8+8), (1+8)<<4|(0+8), ...
    w = torch.tensor([[-8, 7, 0, 1, 2, -1, 3, -3]], dtype=torch.int8)
    assert pack.pack_int4(w).tolist() == [[0xF0, 0x98, 0x7A, 0x5B]]
    # K=3 pads to 8 with zeros, whose nibble is 0x8.
    w = torch.tensor([[1, 2, 3]], dtype=torch.int8)
    assert pack.pack_int4(w).tolist() == [[0xA9, 0x8B, 0x88, 0x88]]


def test_int4_rejects_out_of_range():
    with pytest.raises(ValueError, match="int4 range"):
        pack.pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    assert not pack.is_int4_range(torch.tensor([-9], dtype=torch.int8))
    assert not pack.is_int4_range(torch.tensor([0.0]))


@SETTINGS
@given(n=DIMS, groups=st.sampled_from([1, 2, 3, 4]), gs=st.sampled_from([1, 4, 8, 32]), seed=SEEDS)
def test_group_sums(n, groups, gs, seed):
    w = _int4(n, groups * gs, seed)
    sums = pack.group_sums(w, gs)
    assert sums.dtype == torch.int32
    assert sums.shape == (groups, pack.ceil_to(n, pack.GROUP_SUMS_N_ALIGN))
    for g in range(groups):
        assert torch.equal(sums[g, :n], w[:, g * gs:(g + 1) * gs].to(torch.int32).sum(1))
    assert not sums[:, n:].any()


def test_group_sums_rejects_non_dividing_group():
    with pytest.raises(ValueError, match="does not divide K=96"):
        pack.group_sums(torch.zeros(4, 96, dtype=torch.int8), 128)


@SETTINGS
@given(n=DIMS, groups=st.sampled_from([1, 2, 3, 5]), seed=SEEDS,
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_group_scales_round_trip(n, groups, seed, dtype):
    s = torch.rand(n, groups, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed = pack.pack_group_scales(s)
    assert packed.dtype == dtype
    assert packed.shape == (groups, pack.ceil_to(n, 4))
    assert not packed[:, n:].any()
    assert torch.equal(pack.unpack_group_scales(packed, n), s)


@SETTINGS
@given(n=DIMS, groups=st.sampled_from([1, 2, 3, 5]), factor=st.sampled_from([1, 2, 3, 4, 8]), seed=SEEDS)
def test_split_groups_round_trip_and_same_dequantized_weights(n, groups, factor, seed):
    """Weights stored at group size gs/factor with split scales dequantize exactly as at gs."""
    gs = 8 * factor
    s = torch.rand(n, groups, generator=torch.Generator().manual_seed(seed))
    split = pack.split_groups(s, factor)
    assert split.shape == (n, groups * factor)
    assert torch.equal(pack.merge_groups(split, factor), s)
    w = _int4(n, groups * gs, seed).to(torch.float32)
    at_gs = (w.reshape(n, groups, gs) * s.reshape(n, groups, 1)).reshape(n, -1)
    stored = gs // factor
    at_stored = (w.reshape(n, groups * factor, stored) * split.reshape(n, groups * factor, 1)).reshape(n, -1)
    assert torch.equal(at_gs, at_stored)


def test_merge_groups_rejects_scales_that_differ_within_a_group():
    with pytest.raises(ValueError, match="differ"):
        pack.merge_groups(torch.tensor([[1.0, 2.0]]), 2)
    with pytest.raises(ValueError, match="cannot merge"):
        pack.merge_groups(torch.ones(1, 3), 2)


@SETTINGS
@given(n=DIMS, k=DIMS, seed=SEEDS)
def test_channel_sums(n, k, seed):
    w = _int8(n, k, seed)
    sums = pack.channel_sums(w)
    assert sums.dtype == torch.int32 and sums.shape == (pack.ceil_to(n, 4),)
    assert torch.equal(pack.unpad(sums, n), w.to(torch.int32).sum(1))
    assert not sums[n:].any()


@SETTINGS
@given(n=DIMS, seed=SEEDS)
def test_bias_and_channel_scales_round_trip(n, seed):
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    for padded in (pack.pad_bias(b), pack.pad_channel_scales(b)):
        assert padded.shape == (pack.ceil_to(n, 4),)
        assert torch.equal(pack.unpad(padded, n), b)
        assert not padded[n:].any()
        # Padding is idempotent, as the passes rely on.
        assert torch.equal(pack.pad_bias(padded), padded)


def test_pad_to_any_dim_and_aligned_identity():
    t = torch.ones(3, 5)
    assert pack.pad_to(t, 0, 4).shape == (4, 5)
    assert pack.pad_to(t, 1, 8).shape == (3, 8)
    aligned = torch.ones(4, 8)
    assert pack.pad_to(aligned, 1, 8) is aligned


# -- differential: the same bytes as ExecuTorch's own packing ------------------

@SETTINGS
@given(n=DIMS, k=DIMS, seed=SEEDS)
def test_pack_int4_matches_executorch(n, k, seed):
    from executorch.backends.vulkan.patterns.weight_packing_utils import pack_4bit_weight_tensor

    w = _int4(n, k, seed)
    if n == 1:
        # ET squeezes the weight before packing, which breaks a 1-row matrix; skip.
        return
    ours, theirs = pack.pack_int4(w), pack_4bit_weight_tensor(w)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@SETTINGS
@given(n=DIMS, groups=st.sampled_from([1, 2, 3]), gs=st.sampled_from([4, 8, 32]), seed=SEEDS)
def test_group_sums_matches_executorch(n, groups, gs, seed):
    from executorch.backends.vulkan.patterns.quantized_linear import compute_per_group_sums

    w = _int4(n, groups * gs, seed)
    ours, theirs = pack.group_sums(w, gs), compute_per_group_sums(w, gs)
    assert ours.dtype == theirs.dtype
    # ExecuTorch pads N to 8; the runtime reads a group's row at a stride of ceil4(N),
    # so qlower pads to 4 (pack's docstring): the same values, less padding.
    width = pack.ceil_to(n, pack.GROUP_SUMS_N_ALIGN)
    assert ours.shape[1] == width and torch.equal(ours, theirs[:, :width])
    assert not theirs[:, width:].any()


@SETTINGS
@given(n=DIMS, groups=st.sampled_from([1, 2, 3]), seed=SEEDS)
def test_scales_and_bias_padding_match_executorch_rule(n, groups, seed):
    # ET's align_width_and_update_state_dict: pad the last dim with zeros to 4.
    def et_align(t, align_to=4):
        w = t.shape[-1]
        return F.pad(t, (0, align_to - w % align_to)).contiguous() if w % align_to else t

    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, groups, generator=g)
    assert torch.equal(pack.pack_group_scales(s), et_align(s.transpose(0, 1).contiguous()))
    b = torch.randn(n, generator=g)
    assert torch.equal(pack.pad_bias(b), et_align(b))
    assert torch.equal(pack.pad_channel_scales(b), et_align(b))
