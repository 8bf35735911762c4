"""The ET-VK runtime capability model: data, shader naming, load problems."""

from __future__ import annotations

from importlib import resources

import pytest
from executorch.backends.vulkan.serialization import vulkan_graph_schema as vk

from qlower import runtime_caps as rc

F32, I32, BOOL = vk.VkDataType.FLOAT32, vk.VkDataType.INT32, vk.VkDataType.BOOL
TEX, BUF, DEFAULT = vk.VkStorageType.TEXTURE_3D, vk.VkStorageType.BUFFER, vk.VkStorageType.DEFAULT_STORAGE


def tensor(dtype, storage=DEFAULT, dims=(1, 4, 16, 16)):
    return vk.VkValue(vk.VkTensor(dtype, list(dims), -1, 0, storage))


def graph(values, calls, storage_override=DEFAULT):
    chain = [vk.OperatorCall(i, name, list(args)) for i, (name, args) in enumerate(calls)]
    return vk.VkGraph("0", chain, values, [], [], [], [], storage_override)


@pytest.mark.parametrize("name", ["et_vk_runtime_ops.txt", "et_vk_runtime_shaders.txt"])
def test_data_files_carry_provenance(name):
    text = resources.files("qlower").joinpath("data", name).read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("source:" in line for line in header)
    assert any("derived" in line for line in header)


def test_known_operators_and_shaders():
    assert rc.op_supported("aten.add.Tensor")
    assert rc.op_supported("et_vk.linear_dq8ca_q4gsw.default")
    assert not rc.op_supported("aten.logical_not.default")
    assert not rc.op_supported("aten.any.dim")
    assert rc.shader_exists("binary_eq_int32_texture3d")
    assert rc.shader_exists("binary_eq_texture3d_float")
    assert not rc.shader_exists("binary_eq_texture3d_int32")
    assert len(rc.runtime_shaders()) > 1000


def test_binary_int_eq_predicts_the_missing_variant():
    # eq.Tensor(int32, int32) -> bool, default storage = texture3d
    g = graph([tensor(I32), tensor(I32), tensor(BOOL)], [("aten.eq.Tensor", [0, 1, 2])])
    [lookup] = rc.predict_shaders(g)
    assert lookup.shader == "binary_eq_texture3d_int32"
    assert not lookup.exists
    [problem] = rc.load_problems(g)
    assert str(problem).startswith(
        "will abort at load: Could not find ShaderInfo with name binary_eq_texture3d_int32"
    )


def test_binary_float_and_buffer_variants_exist():
    g = graph(
        [tensor(F32), tensor(F32), tensor(BOOL, BUF), tensor(F32, BUF)],
        [("aten.lt.Tensor", [0, 1, 2]), ("aten.mul.Tensor", [0, 1, 3])],
    )
    assert [s.shader for s in rc.predict_shaders(g)] == [
        "binary_lt_buffer_float",
        "binary_mul_buffer_float",
    ]
    assert rc.load_problems(g) == []


def test_storage_override_applies_to_default_storage():
    g = graph([tensor(F32), tensor(F32)], [("aten.sigmoid.default", [0, 1])], BUF)
    assert [s.shader for s in rc.predict_shaders(g)] == ["sigmoid_float_buffer"]


def test_scalar_comparison_naming():
    values = [tensor(F32), vk.VkValue(vk.Double(float("-inf"))), tensor(BOOL),
              tensor(I32), vk.VkValue(vk.Int(3)), tensor(BOOL)]
    g = graph(values, [("aten.eq.Scalar", [0, 1, 2]), ("aten.ne.Scalar", [3, 4, 5])])
    assert [s.shader for s in rc.predict_shaders(g)] == [
        "eq_scalar_texture3d_float_float",
        "ne_scalar_texture3d_int32_int32",
    ]
    assert rc.load_problems(g) == []


def test_missing_operator_is_a_problem():
    g = graph([tensor(BOOL), tensor(BOOL)], [("aten.logical_not.default", [0, 1])])
    [problem] = rc.load_problems(g)
    assert problem.message == "Missing operator: aten.logical_not.default"


def test_unmodelled_registered_op_is_not_flagged():
    g = graph([tensor(F32), tensor(F32)], [("et_vk.rms_norm.default", [0, 1])])
    assert rc.predict_shaders(g) == []
    assert rc.load_problems(g) == []


# -- group sizes the int4 ops compute right ---------------------------------------

def _prefill_quantize_right(group_size: int) -> bool:
    """quantize_and_pack_4h4w_with_group_sums, simulated: each worker adds its running sum twice."""
    workers = 32 if group_size >= 128 else 16
    blocks = group_size // 4
    for worker in range(workers):
        mine = list(range(worker, blocks, workers))
        doubled = 0
        for block_sum in (1 << i for i in range(len(mine))):  # distinct per-block sums
            doubled += doubled + block_sum  # local_sum += dot(a, ones, local_sum)
        if doubled != sum(1 << i for i in range(len(mine))):
            return False
    return True


def test_dq8ca_prefill_rule_follows_the_shader():
    for g in range(4, 1025, 4):
        assert rc.dq8ca_prefill_group_size_ok(g) == _prefill_quantize_right(g), g
    assert [g for g in range(4, 1025, 4) if rc.dq8ca_prefill_group_size_ok(g)] == [*range(4, 65, 4), 128]


@pytest.mark.parametrize("group_size,stored", [
    (32, 32), (64, 64), (128, 128), (20, 20), (12, 12),   # right as they are
    (256, 128), (512, 128), (1024, 128), (384, 128),      # multiples of 128
    (96, 48), (192, 64), (160, 40), (80, 40), (320, 64),  # others: the largest safe divisor
])
def test_stored_group_size(group_size, stored):
    assert rc.stored_group_size("linear_dq8ca_q4gsw", group_size) == stored
    assert group_size % stored == 0 and rc.dq8ca_prefill_group_size_ok(stored)
    # The other int4 ops read every group size that is a multiple of 4 right.
    assert rc.stored_group_size("linear_q4gsw", group_size) == group_size
    assert rc.stored_group_size("embedding_q4gsw", group_size) == group_size


@pytest.mark.parametrize("group_size", [1, 2, 6, 10, 30, 0])
def test_group_sizes_no_int4_op_computes(group_size):
    assert "not a multiple of 4" in rc.int4_group_problem(group_size)
    for op in rc.INT4_OPS:
        assert rc.stored_group_size(op, group_size) is None
