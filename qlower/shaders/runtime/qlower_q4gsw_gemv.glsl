/*
 * qlower one-row linear with 4-bit group-quantized weights (float math).
 *
 *   y[n] = sum_k x[k] * q[n, k] * scale[k / group_size, n] (+ bias[n])
 *
 * Weights: the raw packed bytes, uint8 [N, K/2], byte i of a row holding
 * q[2i] + 8 (low nibble) and q[2i+1] + 8 (high nibble); read as 32-bit words
 * (8 values, nibble m = value m of the word), or as 16-byte words (32 values)
 * in the _w4 variant (K % 32 == 0 and group_size % 32 == 0).
 * Scales: [num_groups, SCALE_STRIDE] (transposed, row n in column n).
 *
 * Each workgroup computes ROWS output units; its threads split K, and the
 * partial sums are reduced with subgroupAdd and shared memory.
 * Epilogues (MODE): 0 plain, 1 silu_mul (unit j: silu(y[j]) * y[UP_OFF + j]),
 * 2 split (unit j goes to output s with SPLIT_s <= j < SPLIT_{s+1}).
 * HAS_RES adds residual[j] at the end.
 */
#version 450 core

#extension GL_KHR_shader_subgroup_arithmetic : enable
#extension GL_EXT_control_flow_attributes : require

#define PRECISION ${PRECISION}

layout(std430) buffer;

${layout_declare_tensor(B, "w", "t_out0", DTYPE, "buffer")}
${layout_declare_tensor(B, "w", "t_out1", DTYPE, "buffer")}
${layout_declare_tensor(B, "w", "t_out2", DTYPE, "buffer")}
${layout_declare_tensor(B, "w", "t_out3", DTYPE, "buffer")}
${layout_declare_tensor(B, "r", "t_x", DTYPE, "buffer", is_scalar_array=False)}
$if W4:
  ${layout_declare_tensor(B, "r", "t_w", "uint", "buffer", is_scalar_array=False)}
$else:
  ${layout_declare_tensor(B, "r", "t_w", "uint", "buffer")}
${layout_declare_tensor(B, "r", "t_scales", DTYPE, "buffer")}
${layout_declare_tensor(B, "r", "t_bias", DTYPE, "buffer")}
${layout_declare_tensor(B, "r", "t_res", DTYPE, "buffer")}

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z_id = 2) in;

${layout_declare_spec_const(C, "int", "K8", "1")}
${layout_declare_spec_const(C, "int", "GS8", "1")}
${layout_declare_spec_const(C, "int", "SCALE_STRIDE", "1")}
${layout_declare_spec_const(C, "int", "N_OUT", "1")}
${layout_declare_spec_const(C, "int", "UP_OFF", "0")}
${layout_declare_spec_const(C, "int", "MODE", "0")}
${layout_declare_spec_const(C, "int", "HAS_BIAS", "0")}
${layout_declare_spec_const(C, "int", "HAS_RES", "0")}
${layout_declare_spec_const(C, "int", "SPLIT1", "1")}
${layout_declare_spec_const(C, "int", "SPLIT2", "1")}
${layout_declare_spec_const(C, "int", "SPLIT3", "1")}

#define ROWS 4
#define MAX_SUBGROUPS 64

shared float red[2 * ROWS][MAX_SUBGROUPS];

vec4 lo4(const uint w) {
  return vec4((uvec4(w) >> uvec4(0, 4, 8, 12)) & 15u);
}
vec4 hi4(const uint w) {
  return vec4((uvec4(w) >> uvec4(16, 20, 24, 28)) & 15u);
}

// sum_m x[m] * (nibble_m(w) - 8) for one 32-bit word, given sx = sum_m x[m].
float dot8(const uint w, const vec4 xa, const vec4 xb, const float sx) {
  return dot(xa, lo4(w)) + dot(xb, hi4(w)) - 8.0 * sx;
}

float wg_reduce(const float v, const uint slot) {
  const float s = subgroupAdd(v);
  if (subgroupElect()) {
    red[slot][gl_SubgroupID] = s;
  }
  return s;
}

void store_unit(const int j, const float v) {
  if (MODE != 2 || j < SPLIT1) {
    t_out0[j] = v;
  } else if (j < SPLIT2) {
    t_out1[j - SPLIT1] = v;
  } else if (j < SPLIT3) {
    t_out2[j - SPLIT2] = v;
  } else {
    t_out3[j - SPLIT3] = v;
  }
}

void main() {
  const uint tid = gl_LocalInvocationID.x;
  const uint nthreads = gl_WorkGroupSize.x;
  const int j0 = int(gl_WorkGroupID.x) * ROWS;
  const bool two = MODE == 1;

  float acc[2 * ROWS];
  [[unroll]] for (int r = 0; r < 2 * ROWS; ++r) {
    acc[r] = 0.0;
  }

  $if W4:
    // One 16-byte word = 32 values of one group.
    const uint K32 = uint(K8) / 4u;
    for (uint u = tid; u < K32; u += nthreads) {
      const vec4 x0 = t_x[8u * u];
      const vec4 x1 = t_x[8u * u + 1u];
      const vec4 x2 = t_x[8u * u + 2u];
      const vec4 x3 = t_x[8u * u + 3u];
      const vec4 x4 = t_x[8u * u + 4u];
      const vec4 x5 = t_x[8u * u + 5u];
      const vec4 x6 = t_x[8u * u + 6u];
      const vec4 x7 = t_x[8u * u + 7u];
      const vec4 one = vec4(1.0);
      const float s0 = dot(x0, one) + dot(x1, one);
      const float s1 = dot(x2, one) + dot(x3, one);
      const float s2 = dot(x4, one) + dot(x5, one);
      const float s3 = dot(x6, one) + dot(x7, one);
      const uint g = (4u * u) / uint(GS8);
      [[unroll]] for (int r = 0; r < ROWS; ++r) {
        const int j = j0 + r;
        if (j < N_OUT) {
          [[unroll]] for (int h = 0; h < 2; ++h) {
            if (h == 0 || two) {
              const uint n = uint(j + h * UP_OFF);
              const uvec4 w = t_w[n * K32 + u];
              const float d = dot8(w.x, x0, x1, s0) + dot8(w.y, x2, x3, s1) +
                  dot8(w.z, x4, x5, s2) + dot8(w.w, x6, x7, s3);
              acc[2 * r + h] += d * t_scales[g * uint(SCALE_STRIDE) + n];
            }
          }
        }
      }
    }
  $else:
    for (uint u = tid; u < uint(K8); u += nthreads) {
      const vec4 xa = t_x[2u * u];
      const vec4 xb = t_x[2u * u + 1u];
      const float sx = dot(xa, vec4(1.0)) + dot(xb, vec4(1.0));
      const uint g = u / uint(GS8);
      [[unroll]] for (int r = 0; r < ROWS; ++r) {
        const int j = j0 + r;
        if (j < N_OUT) {
          [[unroll]] for (int h = 0; h < 2; ++h) {
            if (h == 0 || two) {
              const uint n = uint(j + h * UP_OFF);
              const uint w = t_w[n * uint(K8) + u];
              acc[2 * r + h] +=
                  dot8(w, xa, xb, sx) * t_scales[g * uint(SCALE_STRIDE) + n];
            }
          }
        }
      }
    }

  [[unroll]] for (int r = 0; r < 2 * ROWS; ++r) {
    wg_reduce(acc[r], uint(r));
  }
  memoryBarrierShared();
  barrier();

  if (tid < uint(ROWS)) {
    const int r = int(tid);
    const int j = j0 + r;
    if (j < N_OUT) {
      float y[2];
      [[unroll]] for (int h = 0; h < 2; ++h) {
        float s = 0.0;
        for (uint i = 0; i < gl_NumSubgroups; ++i) {
          s += red[2 * r + h][i];
        }
        if (HAS_BIAS != 0) {
          s += t_bias[j + h * UP_OFF];
        }
        y[h] = s;
      }
      float v = y[0];
      if (two) {
        v = v / (1.0 + exp(-v)) * y[1];
      }
      if (HAS_RES != 0) {
        v += t_res[j];
      }
      store_unit(j, v);
    }
  }
}
