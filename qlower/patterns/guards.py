"""Shape guards of the fused ops, shared by the quantize stage (which layers to quantize, and why not)
and the pattern families (which nodes to fuse). Plain arithmetic on shapes and values: importing this
needs neither ExecuTorch nor torchao, so the quantize stage runs where ExecuTorch is not installed."""

from __future__ import annotations

import torch

from qlower import pack

# The kernels read activations in vec4 texels along K.
K_ALIGN = 4
# The 4-bit ops pad scales along N to 4; ExecuTorch 1.5.1's CPU reference kernel
# (run on fake tensors while lowering) cannot read padded scales, so its own
# lowering of such a layer fails. Say so instead of failing.
Q4_N_ALIGN = 4

# Weights and bias are packed in texels of 4 output channels.
C_ALIGN = 4

# The aten targets of a convolution in the graph that PT2E annotates (before
# the edge dialect turns them all into ``aten.convolution``).
PT2E_CONV_TARGETS = frozenset({
    torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
    torch.ops.aten.conv1d.padding, torch.ops.aten.conv2d.padding, torch.ops.aten.conv3d.padding,
    torch.ops.aten.conv_transpose1d.default, torch.ops.aten.conv_transpose2d.input,
    torch.ops.aten.conv_transpose3d.input, torch.ops.aten.convolution.default,
})


def q4_weight_problem(n: int, k: int, group_size: int | None, w_int: torch.Tensor | None) -> str | None:
    """The first guard a per-group int4 weight [N, K] fails for the 4-bit fused ops, or None
    (``w_int`` None: its values are not checked)."""
    if not group_size or k % group_size != 0:
        return f"group size {group_size} does not divide K={k}"
    if w_int is not None and not pack.is_int4_range(w_int):
        return "weights outside the int4 range"
    if n % Q4_N_ALIGN:
        return q4_n_reason(n)
    return None


def q4_fusion_problem(w_int: torch.Tensor, group_size: int, rows: int | None = None) -> str | None:
    """The first guard a per-group int4 weight [N, K] fails, K alignment included, or None.

    ``rows``: the layer's N when ``w_int`` is a chunk of its rows."""
    n, k = (int(d) for d in w_int.shape)
    n = rows if rows is not None else n
    if k % K_ALIGN:
        return f"K={k} is not a multiple of {K_ALIGN}"
    return q4_weight_problem(n, k, group_size, w_int)


def q4_shape_fusable(n: int, k: int, group_size: int | None) -> bool:
    """Do a per-group int4 weight's shape and group size pass the fused ops' guards (its values aside)?"""
    return k % K_ALIGN == 0 and q4_weight_problem(n, k, group_size, None) is None


def q4_fusable(w_int: torch.Tensor, block_size, rows: int | None = None) -> bool:
    """Will a per-group int4 weight [N, K] (a chunk of ``rows`` rows) with this block size fuse?"""
    return q4_fusion_problem(w_int, int(block_size[-1]), rows) is None


def q4_n_reason(n: int) -> str:
    return f"N={n} is not a multiple of {Q4_N_ALIGN} (ExecuTorch 1.5.1 cannot lower padded 4-bit scales)"


def is_depthwise(c_out: int, c_in: int, groups: int) -> bool:
    return groups > 1 and groups == c_out == c_in


def conv_shape_problem(c_out: int, c_in: int, groups: int, *, dims: int = 2, transposed: bool = False,
                       dilation=None) -> str | None:
    """The first guard a conv of this shape fails for the q8ta family, or None."""
    if dims != 2:
        kind = "transposed convolution" if transposed else "convolution"
        return f"{dims}-D {kind}: the q8ta family has 2-D convolutions only"
    if transposed:
        if groups != 1:
            return (f"grouped transposed convolution (groups={groups}): its per-channel weight scales cover one "
                    "group's output channels; q8ta_conv2d_transposed is fused for groups=1")
        if dilation is not None and any(int(d) != 1 for d in dilation):
            return f"transposed convolution with dilation {list(dilation)}: q8ta_conv2d_transposed takes dilation 1 only"
        return None
    if is_depthwise(c_out, c_in, groups):
        if c_out % C_ALIGN:
            return f"depthwise conv with {c_out} channels, not a multiple of {C_ALIGN}"
        return None
    if groups > 1:
        if (c_in // groups) % C_ALIGN:
            return f"grouped conv with {c_in // groups} input channels per group, not a multiple of {C_ALIGN}"
        if (c_out // groups) % C_ALIGN:
            return f"grouped conv with {c_out // groups} output channels per group, not a multiple of {C_ALIGN}"
    return None
