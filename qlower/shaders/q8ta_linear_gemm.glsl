#version 450
// q8ta_linear for many tokens (GEMM); layouts and arithmetic as in
// q8ta_linear_gemv.glsl. Each thread owns TM tokens x 4 rows (one output word
// per token) and walks all of K.
#extension GL_GOOGLE_include_directive : require
#include "common.h"

layout(local_size_x = LX, local_size_y = LY, local_size_z = 1) in;

layout(std430, binding = 0) writeonly buffer Out { uint out_q[]; };
layout(std430, binding = 1) readonly buffer X { uint x[]; };
layout(std430, binding = 2) readonly buffer W { uint w[]; };
layout(std430, binding = 3) readonly buffer WSum { int wsum[]; };
layout(std430, binding = 4) readonly buffer WScale { float wscale[]; };
layout(std430, binding = 5) readonly buffer Bias { float bias[]; };

layout(push_constant) uniform P {
  uint M;
  uint N;
  uint KW;
  uint HAS_BIAS;
  int X_ZP;
  float X_SCALE;
  float INV_OUT_SCALE;
  int OUT_ZP;
  uint RELU;
  uint OUT_WORDS;
} p;

#include "q8ta.h"

void main() {
  const uint ow = gl_GlobalInvocationID.x;
  const uint m0 = gl_GlobalInvocationID.y * TM;
  if (4u * ow >= p.N || m0 >= p.M) return;
  uint rows[4];
  uint toks[TM];
  int acc[TM][4];
  [[unroll]] for (uint r = 0u; r < 4u; ++r) rows[r] = min(4u * ow + r, p.N - 1u);
  [[unroll]] for (uint t = 0u; t < TM; ++t) {
    toks[t] = min(m0 + t, p.M - 1u);
    [[unroll]] for (uint r = 0u; r < 4u; ++r) acc[t][r] = 0;
  }
  for (uint k = 0u; k < p.KW; ++k) {
    uint wv[4];
    [[unroll]] for (uint r = 0u; r < 4u; ++r) wv[r] = w[rows[r] * p.KW + k];
    [[unroll]] for (uint t = 0u; t < TM; ++t) {
      const uint xv = x[toks[t] * p.KW + k];
      [[unroll]] for (uint r = 0u; r < 4u; ++r) acc[t][r] += dot4_i8(xv, wv[r]);
    }
  }
  [[unroll]] for (uint t = 0u; t < TM; ++t) {
    if (m0 + t >= p.M) break;
    ivec4 q;
    [[unroll]] for (uint r = 0u; r < 4u; ++r) {
      const uint n = rows[r];
      q[r] = q8ta_requant(acc[t][r], wsum[n], wscale[n], p.HAS_BIAS != 0u ? bias[n] : 0.0);
    }
    out_q[(m0 + t) * p.OUT_WORDS + ow] = pack_i8x4(q);
  }
}
