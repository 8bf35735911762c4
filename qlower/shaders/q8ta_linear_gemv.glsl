#version 450
// q8ta_linear for few tokens (GEMV): int8 activations (per-tensor scale and
// zero point) x int8 per-channel symmetric weights, exact int32 accumulation,
// int8 output requantized per tensor, optional relu (q8ta.h).
// Buffers as serialized: x int8 [M, K], weights int8 [N, K] (K % 4 == 0, so
// rows are whole words), weight sums int32 [N4], scales [N4], bias [N4].
// Output int8 [M, N4] (rows padded to whole words).
// One workgroup computes 4 rows (one output word) of one token; threads split K.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_KHR_shader_subgroup_basic : require
#include "common.h"

layout(local_size_x = WG, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) writeonly buffer Out { uint out_q[]; };
layout(std430, binding = 1) readonly buffer X { uint x[]; };
layout(std430, binding = 2) readonly buffer W { uint w[]; };
layout(std430, binding = 3) readonly buffer WSum { int wsum[]; };
layout(std430, binding = 4) readonly buffer WScale { float wscale[]; };
layout(std430, binding = 5) readonly buffer Bias { float bias[]; };

layout(push_constant) uniform P {
  uint M;
  uint N;
  uint KW;  // K / 4
  uint HAS_BIAS;
  int X_ZP;
  float X_SCALE;
  float INV_OUT_SCALE;
  int OUT_ZP;
  uint RELU;
  uint OUT_WORDS;  // N4 / 4
} p;

#include "q8ta.h"

shared int partial[4][WG];

void main() {
  const uint tid = gl_LocalInvocationID.x;
  const uint ow = gl_WorkGroupID.x;  // output word: rows 4 * ow .. 4 * ow + 3
  const uint m = gl_WorkGroupID.y;
  uint rows[4];
  int acc[4];
  [[unroll]] for (uint r = 0u; r < 4u; ++r) { rows[r] = min(4u * ow + r, p.N - 1u); acc[r] = 0; }

  for (uint k = tid; k < p.KW; k += WG) {
    const uint xv = x[m * p.KW + k];
    [[unroll]] for (uint r = 0u; r < 4u; ++r) acc[r] += dot4_i8(xv, w[rows[r] * p.KW + k]);
  }
  [[unroll]] for (uint r = 0u; r < 4u; ++r) {
    const int t = subgroupAdd(acc[r]);
    if (subgroupElect()) partial[r][gl_SubgroupID] = t;
  }
  barrier();
  if (tid == 0u) {
    ivec4 q;
    [[unroll]] for (uint r = 0u; r < 4u; ++r) {
      int a = 0;
      for (uint i = 0u; i < gl_NumSubgroups; ++i) a += partial[r][i];
      const uint n = rows[r];
      q[r] = q8ta_requant(a, wsum[n], wscale[n], p.HAS_BIAS != 0u ? bias[n] : 0.0);
    }
    out_q[m * p.OUT_WORDS + ow] = pack_i8x4(q);
  }
}
