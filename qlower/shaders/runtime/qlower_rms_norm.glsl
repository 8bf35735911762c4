/*
 * qlower RMSNorm over the last dim of a contiguous fp32 buffer.
 * One workgroup per row; the _vec4 variant (C % 4 == 0) reads vec4s (the
 * first CACHED per thread, and their weights, loaded once and kept in
 * registers across the reduction), accumulates x*x in fp32, reduces with
 * subgroupAdd then shared memory.
 */
#version 450 core

#extension GL_KHR_shader_subgroup_arithmetic : enable
#extension GL_EXT_control_flow_attributes : require

#define PRECISION ${PRECISION}

layout(std430) buffer;

$if VEC4:
  ${layout_declare_tensor(B, "w", "t_out", DTYPE, "buffer", is_scalar_array=False)}
  ${layout_declare_tensor(B, "r", "t_in", DTYPE, "buffer", is_scalar_array=False)}
  ${layout_declare_tensor(B, "r", "t_weight", DTYPE, "buffer", is_scalar_array=False)}
$else:
  ${layout_declare_tensor(B, "w", "t_out", DTYPE, "buffer")}
  ${layout_declare_tensor(B, "r", "t_in", DTYPE, "buffer")}
  ${layout_declare_tensor(B, "r", "t_weight", DTYPE, "buffer")}
${layout_declare_ubo(B, "int", "in_numel")}

layout(push_constant) uniform restrict Block {
  int row_width;
  float epsilon;
};

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z_id = 2) in;

#define CACHED 4

shared float partial_sums[128];

float wg_sum(float v) {
  const float s = subgroupAdd(v);
  if (subgroupElect()) {
    partial_sums[gl_SubgroupID] = s;
  }
  memoryBarrierShared();
  barrier();
  float total = 0.0;
  for (uint i = 0; i < gl_NumSubgroups; ++i) {
    total += partial_sums[i];
  }
  return total;
}

void main() {
  const uint row = gl_WorkGroupID.x;
  const uint tid = gl_LocalInvocationID.x;
  const uint nthreads = gl_WorkGroupSize.x;
  const uint C = uint(row_width);
  const uint num_rows = uint(in_numel) / C;
  // Uniform across the workgroup, so the early exit keeps barriers legal.
  if (row >= num_rows) {
    return;
  }
  float acc = 0.0;
  $if VEC4:
    const uint C4 = C / 4u;
    const uint base4 = row * C4;
    vec4 xv[CACHED];
    vec4 wv[CACHED];
    [[unroll]] for (int c = 0; c < CACHED; ++c) {
      const uint i = tid + uint(c) * nthreads;
      xv[c] = vec4(0.0);
      wv[c] = vec4(0.0);
      if (i < C4) {
        xv[c] = t_in[base4 + i];
        wv[c] = t_weight[i];
      }
    }
    [[unroll]] for (int c = 0; c < CACHED; ++c) {
      acc += dot(xv[c], xv[c]);
    }
    for (uint i = tid + CACHED * nthreads; i < C4; i += nthreads) {
      const vec4 v = t_in[base4 + i];
      acc += dot(v, v);
    }
  $else:
    const uint base = row * C;
    for (uint i = tid; i < C; i += nthreads) {
      const float v = t_in[base + i];
      acc += v * v;
    }
  const float total = wg_sum(acc);
  const float rstd = inversesqrt(total / float(C) + epsilon);

  $if VEC4:
    [[unroll]] for (int c = 0; c < CACHED; ++c) {
      const uint i = tid + uint(c) * nthreads;
      if (i < C4) {
        t_out[base4 + i] = xv[c] * rstd * wv[c];
      }
    }
    for (uint i = tid + CACHED * nthreads; i < C4; i += nthreads) {
      t_out[base4 + i] = t_in[base4 + i] * rstd * t_weight[i];
    }
  $else:
    for (uint i = tid; i < C; i += nthreads) {
      t_out[base + i] = t_in[base + i] * rstd * t_weight[i];
    }
}
