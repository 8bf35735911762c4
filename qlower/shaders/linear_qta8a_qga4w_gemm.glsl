#version 450
// linear_qta8a_qga4w for many tokens (GEMM); same arithmetic as the GEMV
// (see linear_qta8a_qga4w_gemv.glsl and qga4w.h). Each thread owns a TM x TN
// tile of the output and walks all of K, so one unpacked weight word serves
// TM tokens and one activation word TN rows.
#extension GL_GOOGLE_include_directive : require
#include "common.h"
#include "qga4w.h"

layout(local_size_x = LX, local_size_y = LY, local_size_z = 1) in;

layout(std430, binding = 0) writeonly buffer Out { ACT_T out_y[]; };
layout(std430, binding = 1) readonly buffer XP { uvec4 xp[]; };
layout(std430, binding = 2) readonly buffer XS { ivec4 xs[]; };
layout(std430, binding = 3) readonly buffer W { uvec4 w[]; };
layout(std430, binding = 4) readonly buffer S { float wscale[]; };
layout(std430, binding = 5) readonly buffer Corr { float corr[]; };
layout(std430, binding = 6) readonly buffer Bias { float bias[]; };
layout(std430, binding = 7) readonly buffer XScale { float x_scale[]; };
layout(std430, binding = 8) readonly buffer XZp { int x_zp[]; };

layout(push_constant) uniform P {
  uint M;
  uint N;
  uint KC;
  uint G;
  uint GS;
  uint HAS_BIAS;
  uint OUT_STRIDE;
} p;

void main() {
  const uint n0 = gl_GlobalInvocationID.x * TN;
  const uint m0 = gl_GlobalInvocationID.y * TM;
  if (n0 >= p.N || m0 >= p.M) return;
  const bool whole_chunks = (p.GS & 31u) == 0u;

  uint rows[TN];
  uint toks[TM];
  [[unroll]] for (uint r = 0u; r < TN; ++r) rows[r] = min(n0 + r, p.N - 1u);
  [[unroll]] for (uint t = 0u; t < TM; ++t) toks[t] = min(m0 + t, p.M - 1u);

  float acc[TM][TN];
  int d[TM][TN];
  [[unroll]] for (uint t = 0u; t < TM; ++t)
    [[unroll]] for (uint r = 0u; r < TN; ++r) { acc[t][r] = 0.0; d[t][r] = 0; }

  for (uint c = 0u; c < p.KC; ++c) {
    uvec4 wv[TN];
    [[unroll]] for (uint r = 0u; r < TN; ++r) wv[r] = w[rows[r] * p.KC + c];
    ivec4 s[TM];
    [[unroll]] for (uint t = 0u; t < TM; ++t) s[t] = xs[toks[t] * p.KC + c] * 8;

    [[unroll]] for (uint j = 0u; j < 4u; ++j) {
      uvec4 xv[TM];
      [[unroll]] for (uint t = 0u; t < TM; ++t) xv[t] = xp[(toks[t] * p.KC + c) * 4u + j];
      [[unroll]] for (uint r = 0u; r < TN; ++r) {
        // Two words (16 values) per lane accumulator keep the lanes exact.
        [[unroll]] for (uint t = 0u; t < TM; ++t) d[t][r] += int(mad8(wv[r][j], xv[t], 0u) >> 16u) - s[t][j];
      }
      if (!whole_chunks || j == 3u) {
        const uint g = min((c * 32u + 8u * j) / p.GS, p.G - 1u);
        [[unroll]] for (uint r = 0u; r < TN; ++r) {
          const float sc = wscale[rows[r] * p.G + g];
          [[unroll]] for (uint t = 0u; t < TM; ++t) { acc[t][r] += sc * float(d[t][r]); d[t][r] = 0; }
        }
      }
    }
  }

  [[unroll]] for (uint t = 0u; t < TM; ++t) {
    const uint m = m0 + t;
    if (m >= p.M) break;
    const float xsc = x_scale[m];
    const float zc = float(128 + x_zp[m]);
#if defined(DTYPE_fp16)
    [[unroll]] for (uint r = 0u; r < TN; r += 2u) {
      if (n0 + r >= p.N) break;
      vec2 y;
      [[unroll]] for (uint h = 0u; h < 2u; ++h) {
        const uint n = min(n0 + r + h, p.N - 1u);
        y[h] = xsc * (acc[t][r + h] - zc * corr[n]) + (p.HAS_BIAS != 0u ? bias[n] : 0.0);
      }
      out_y[(m * p.OUT_STRIDE + n0 + r) / 2u] = packHalf2x16(y);
    }
#else
    [[unroll]] for (uint r = 0u; r < TN; ++r) {
      const uint n = n0 + r;
      if (n >= p.N) break;
      out_y[m * p.OUT_STRIDE + n] = xsc * (acc[t][r] - zc * corr[n]) + (p.HAS_BIAS != 0u ? bias[n] : 0.0);
    }
#endif
  }
}
