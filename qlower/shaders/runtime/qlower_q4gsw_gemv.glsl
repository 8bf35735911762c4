/*
 * qlower one-row linear with 4-bit group-quantized weights (float math).
 *
 *   y[n] = sum_k x[k] * q[n, k] * scale[k / group_size, n] (+ bias[n])
 *
 * Weights: the blocked layout written by qlower_prepack_q4_blocks. A "quad"
 * is 4 consecutive values (16 bits, value 4q + c in nibble c, stored as
 * q + 8). Row n holds NW 16-byte words; word wi = 32 * b + l (block b, lane
 * l) packs the quads 256 * b + 32 * k + l, k = 0..7 (quad k in the 16-bit
 * half k % 2 of component k / 2). Quads past K4 hold the value 0. So a team
 * of 32 lanes reading 32 consecutive words reads x as 8 coalesced vec4 loads.
 * Scales: [num_groups, SCALE_STRIDE] (transposed, row n in column n).
 *
 * A workgroup holds WG / 32 teams (nominally one subgroup each; a subgroup
 * of another size loops over teams or idles). KSPLIT consecutive teams share
 * RPS output units, team kp taking the chunks kp, kp + KSPLIT, ... of S * UK
 * words (S = subgroup size), each lane UK words at a time. Reduction:
 * subgroupAdd, then (KSPLIT > 1) shared memory across the KSPLIT teams.
 * Nibbles become floats exactly through the exponent trick, x being scaled
 * by 16^-c to match the nibble's position.
 * Epilogues (MODE): 0 plain, 1 silu_mul (unit j: silu(y[j]) * y[UP_OFF + j]),
 * 2 split (unit j goes to output s with SPLIT_s <= j < SPLIT_{s+1}).
 * HAS_RES adds residual[j] at the end.
 */
#version 450 core

#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_arithmetic : enable
#extension GL_EXT_control_flow_attributes : require

#define PRECISION ${PRECISION}

layout(std430) buffer;

${layout_declare_tensor(B, "w", "t_out0", DTYPE, "buffer")}
${layout_declare_tensor(B, "w", "t_out1", DTYPE, "buffer")}
${layout_declare_tensor(B, "w", "t_out2", DTYPE, "buffer")}
${layout_declare_tensor(B, "w", "t_out3", DTYPE, "buffer")}
${layout_declare_tensor(B, "r", "t_x", DTYPE, "buffer", is_scalar_array=False)}
${layout_declare_tensor(B, "r", "t_w", "uint", "buffer", is_scalar_array=False)}
${layout_declare_tensor(B, "r", "t_scales", DTYPE, "buffer")}
${layout_declare_tensor(B, "r", "t_bias", DTYPE, "buffer")}
${layout_declare_tensor(B, "r", "t_res", DTYPE, "buffer")}

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z_id = 2) in;

${layout_declare_spec_const(C, "int", "K4", "1")}
${layout_declare_spec_const(C, "int", "NW", "32")}
${layout_declare_spec_const(C, "int", "GS4", "1")}
${layout_declare_spec_const(C, "int", "SCALE_STRIDE", "1")}
${layout_declare_spec_const(C, "int", "N_OUT", "1")}
${layout_declare_spec_const(C, "int", "UP_OFF", "0")}
${layout_declare_spec_const(C, "int", "MODE", "0")}
${layout_declare_spec_const(C, "int", "HAS_BIAS", "0")}
${layout_declare_spec_const(C, "int", "HAS_RES", "0")}
${layout_declare_spec_const(C, "int", "SPLIT1", "1")}
${layout_declare_spec_const(C, "int", "SPLIT2", "1")}
${layout_declare_spec_const(C, "int", "SPLIT3", "1")}
${layout_declare_spec_const(C, "int", "RPS", "1")}
${layout_declare_spec_const(C, "int", "UK", "1")}
${layout_declare_spec_const(C, "int", "KSPLIT", "1")}

#define MAX_RPS 2
#define MAX_UK 4
#define MAX_TEAMS 8

shared float team_sums[MAX_TEAMS][2 * MAX_RPS];

// nibble c of a quad, as float: 2^23 + n * 16^c, minus 2^23 + 8 * 16^c.
const uvec4 NIB_MASK = uvec4(0xFu, 0xF0u, 0xF00u, 0xF000u);
const vec4 NIB_OFF = vec4(8388616.0, 8388736.0, 8390656.0, 8421376.0);
const vec4 X_SCALE = vec4(1.0, 0.0625, 0.00390625, 0.000244140625);

vec4 quad_values(const uint bits) {
  return uintBitsToFloat((uvec4(bits) & NIB_MASK) | 0x4B000000u) - NIB_OFF;
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

void finish_unit(const int j, float y0, float y1) {
  if (HAS_BIAS != 0) {
    y0 += t_bias[j];
    if (MODE == 1) {
      y1 += t_bias[j + UP_OFF];
    }
  }
  float v = y0;
  if (MODE == 1) {
    v = v / (1.0 + exp(-v)) * y1;
  }
  if (HAS_RES != 0) {
    v += t_res[j];
  }
  store_unit(j, v);
}

void main() {
  const uint teams = gl_WorkGroupSize.x / 32u;
  const uint lane = gl_SubgroupInvocationID;
  const uint sg_size = gl_SubgroupSize;
  const bool two = MODE == 1;
  const uint nw = uint(NW);
  const uint k4_last = uint(K4) - 1u;

  const uint ksplit = uint(KSPLIT);
  const uint groups = teams / ksplit;
  const uint chunk = sg_size * uint(UK);

  for (uint team = gl_SubgroupID; team < teams; team += gl_NumSubgroups) {
    const uint kp = team % ksplit;
    const int j0 = int((gl_WorkGroupID.x * groups + team / ksplit) * uint(RPS));

    // Weight rows of this team (units past N_OUT read the last row).
    uint rows[2 * MAX_RPS];
    [[unroll]] for (int r = 0; r < MAX_RPS; ++r) {
      const uint j = uint(min(j0 + r, N_OUT - 1));
      rows[2 * r] = j;
      rows[2 * r + 1] = j + uint(UP_OFF);
    }

    float acc[2 * MAX_RPS];
    [[unroll]] for (int i = 0; i < 2 * MAX_RPS; ++i) {
      acc[i] = 0.0;
    }

    for (uint w0 = kp * chunk + lane; w0 < nw; w0 += ksplit * chunk) {
      [[unroll]] for (int u = 0; u < MAX_UK; ++u) {
        if (u < UK) {
          const uint wu = w0 + uint(u) * sg_size;
          const uint wi = min(wu, nw - 1u);
          const float valid = wu < nw ? 1.0 : 0.0;
          const uint qb = (wi / 32u) * 256u + (wi % 32u);

          vec4 xs[8];
          uint gi[8];
          [[unroll]] for (int k = 0; k < 8; ++k) {
            const uint q = min(qb + 32u * uint(k), k4_last);
            xs[k] = t_x[q] * X_SCALE;
            gi[k] = (q / uint(GS4)) * uint(SCALE_STRIDE);
          }
          uvec4 w[2 * MAX_RPS];
          [[unroll]] for (int r = 0; r < MAX_RPS; ++r) {
            [[unroll]] for (int h = 0; h < 2; ++h) {
              if (r < RPS && (h == 0 || two)) {
                w[2 * r + h] = t_w[rows[2 * r + h] * nw + wi];
              }
            }
          }

          [[unroll]] for (int r = 0; r < MAX_RPS; ++r) {
            [[unroll]] for (int h = 0; h < 2; ++h) {
              if (r < RPS && (h == 0 || two)) {
                const uvec4 ww = w[2 * r + h];
                const uint n = rows[2 * r + h];
                float d = 0.0;
                [[unroll]] for (int c = 0; c < 4; ++c) {
                  d = fma(dot(xs[2 * c], quad_values(ww[c])),
                          t_scales[gi[2 * c] + n], d);
                  d = fma(dot(xs[2 * c + 1], quad_values(ww[c] >> 16u)),
                          t_scales[gi[2 * c + 1] + n], d);
                }
                acc[2 * r + h] = fma(d, valid, acc[2 * r + h]);
              }
            }
          }
        }
      }
    }

    [[unroll]] for (int r = 0; r < MAX_RPS; ++r) {
      if (r < RPS) {
        const float y0 = subgroupAdd(acc[2 * r]);
        const float y1 = two ? subgroupAdd(acc[2 * r + 1]) : 0.0;
        if (KSPLIT == 1) {
          const int j = j0 + r;
          if (subgroupElect() && j < N_OUT) {
            finish_unit(j, y0, y1);
          }
        } else if (subgroupElect()) {
          team_sums[team][2 * r] = y0;
          team_sums[team][2 * r + 1] = y1;
        }
      }
    }
  }

  if (KSPLIT > 1) {
    memoryBarrierShared();
    barrier();
    const uint tid = gl_LocalInvocationID.x;
    if (tid < groups * uint(RPS)) {
      const uint g = tid / uint(RPS);
      const int j = int((gl_WorkGroupID.x * groups + g) * uint(RPS) + tid % uint(RPS));
      const uint r = tid % uint(RPS);
      if (j < N_OUT) {
        float y0 = 0.0;
        float y1 = 0.0;
        for (uint kp = 0u; kp < ksplit; ++kp) {
          y0 += team_sums[g * ksplit + kp][2u * r];
          y1 += team_sums[g * ksplit + kp][2u * r + 1u];
        }
        finish_unit(j, y0, y1);
      }
    }
  }
}
