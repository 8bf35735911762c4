#version 450
// linear_qta8a_qga4w for few tokens (GEMV): y[m, n] =
//   x_scale[m] * sum_g wscale[n, g] * (sum_{k in g} w[n, k] * q[m, k] - zp[m] * wsum[g, n])
//   + bias[n]
// with q the per-token int8 activations and w the int4 weights, accumulated
// exactly in int32 per group (qga4w.h). Rewritten over v = q + 128:
//   sum w * q - zp * wsum = sum w * v - (128 + zp) * wsum
// and sum w * v = sum u * v - 8 * sum v; the wsum term folds into corr[n]
// (qga4w_prepack), so per group only the weight scale is read.
//
// One workgroup computes ROWS rows of one token; its threads split K in
// 32-value chunks (one uvec4 of weights each), so a warp reads contiguous
// bytes of each row; partial sums are reduced with subgroup adds.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_KHR_shader_subgroup_basic : require
#include "common.h"
#include "qga4w.h"

layout(local_size_x = WG, local_size_y = 1, local_size_z = 1) in;

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
  uint KC;  // 32-value chunks per row
  uint G;
  uint GS;  // group size, a multiple of 8
  uint HAS_BIAS;
  uint OUT_STRIDE;  // output row length (N, or N rounded up to even for fp16)
} p;

shared float partial[ROWS][WG];

void main() {
  const uint tid = gl_LocalInvocationID.x;
  const uint m = gl_WorkGroupID.y;
  const uint n0 = gl_WorkGroupID.x * ROWS;
  // A group boundary never splits a chunk when GS % 32 == 0 (uniform branch).
  const bool whole_chunks = (p.GS & 31u) == 0u;

  float acc[ROWS];
  uint rows[ROWS];
  [[unroll]] for (uint r = 0u; r < ROWS; ++r) {
    acc[r] = 0.0;
    rows[r] = min(n0 + r, p.N - 1u);  // tail rows compute a duplicate, never stored
  }

  // KU chunks per thread per iteration: all their weight loads are issued
  // before any is used, so long rows keep enough bytes in flight.
  for (uint c0 = tid; c0 < p.KC; c0 += WG * KU) {
    uvec4 wv[KU][ROWS];
    [[unroll]] for (uint u = 0u; u < KU; ++u) {
      const uint c = min(c0 + u * WG, p.KC - 1u);
      [[unroll]] for (uint r = 0u; r < ROWS; ++r) wv[u][r] = w[rows[r] * p.KC + c];
    }
    [[unroll]] for (uint u = 0u; u < KU; ++u) {
      const uint c = c0 + u * WG;
      if (c >= p.KC) break;
      const uint xb = (m * p.KC + c) * 4u;
      const uvec4 x0 = xp[xb], x1 = xp[xb + 1u], x2 = xp[xb + 2u], x3 = xp[xb + 3u];
      const ivec4 s = xs[m * p.KC + c] * 8;
      if (whole_chunks) {
        const int s8 = s.x + s.y + s.z + s.w;
        const uint g = (c * 32u) / p.GS;
        [[unroll]] for (uint r = 0u; r < ROWS; ++r) {
          const int d = udot32(wv[u][r], x0, x1, x2, x3) - s8;
          acc[r] += wscale[rows[r] * p.G + g] * float(d);
        }
      } else {
        uint g[4];
        [[unroll]] for (uint j = 0u; j < 4u; ++j) g[j] = min((c * 32u + 8u * j) / p.GS, p.G - 1u);
        [[unroll]] for (uint r = 0u; r < ROWS; ++r) {
          const uvec4 q = wv[u][r];
          const uint sb = rows[r] * p.G;
          acc[r] += wscale[sb + g[0]] * float(udot8(q.x, x0) - s.x)
                  + wscale[sb + g[1]] * float(udot8(q.y, x1) - s.y)
                  + wscale[sb + g[2]] * float(udot8(q.z, x2) - s.z)
                  + wscale[sb + g[3]] * float(udot8(q.w, x3) - s.w);
        }
      }
    }
  }

  [[unroll]] for (uint r = 0u; r < ROWS; ++r) {
    const float t = subgroupAdd(acc[r]);
    if (subgroupElect()) partial[r][gl_SubgroupID] = t;
  }
  barrier();

#if defined(DTYPE_fp16)
  // Each writer packs two adjacent rows into one word (ROWS is even).
  if (tid < ROWS / 2u) {
    vec2 y;
    [[unroll]] for (uint h = 0u; h < 2u; ++h) {
      const uint r = 2u * tid + h;
      const uint n = min(n0 + r, p.N - 1u);
      float a = 0.0;
      for (uint i = 0u; i < gl_NumSubgroups; ++i) a += partial[r][i];
      y[h] = x_scale[m] * (a - float(128 + x_zp[m]) * corr[n]) + (p.HAS_BIAS != 0u ? bias[n] : 0.0);
    }
    if (n0 + 2u * tid < p.N) out_y[(m * p.OUT_STRIDE + n0) / 2u + tid] = packHalf2x16(y);
  }
#else
  if (tid < ROWS && n0 + tid < p.N) {
    const uint n = n0 + tid;
    float a = 0.0;
    for (uint i = 0u; i < gl_NumSubgroups; ++i) a += partial[tid][i];
    out_y[m * p.OUT_STRIDE + n] =
        x_scale[m] * (a - float(128 + x_zp[m]) * corr[n]) + (p.HAS_BIAS != 0u ? bias[n] : 0.0);
  }
#endif
}
