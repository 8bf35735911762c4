#version 450
// Per-token asymmetric int8 quantization of activations (the qta8a input of
// linear_qta8a_qga4w), written in the paired layout that qga4w.h consumes.
//   q = clamp(roundEven(x * inv_scale[m]) + zp[m], -128, 127)   (as torchao)
//   v = q + 128; each 8-value word k0..k7 becomes
//   uvec4((v0 << 16) | v4, (v1 << 16) | v5, (v2 << 16) | v6, (v3 << 16) | v7)
//   and xs[word] = v0 + ... + v7. Values past K are 0 (they meet zero weights).
#extension GL_GOOGLE_include_directive : require
#include "common.h"

layout(local_size_x = WG, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer X { ACT_T x[]; };
layout(std430, binding = 1) readonly buffer InvScale { float inv_scale[]; };
layout(std430, binding = 2) readonly buffer Zp { int zp[]; };
layout(std430, binding = 3) writeonly buffer XP { uvec4 xp[]; };
layout(std430, binding = 4) writeonly buffer XS { int xs[]; };

layout(push_constant) uniform P {
  uint M;
  uint K;
  uint KW;  // 8-value words per row, padded to a multiple of 4
} p;

void main() {
  const uint w = gl_GlobalInvocationID.x;
  const uint m = gl_GlobalInvocationID.y;
  if (w >= p.KW || m >= p.M) return;
  const float inv = inv_scale[m];
  const int z = zp[m];
  uint v[8];
  int s = 0;
  for (uint i = 0u; i < 8u; ++i) {
    const uint k = w * 8u + i;
    uint u = 0u;
    if (k < p.K) {
      // precise: the product must be rounded once, as on the CPU, before roundEven.
      precise float t = LOAD_ACT(x, m * p.K + k) * inv;
      const int q = clamp(int(roundEven(t)) + z, -128, 127);
      u = uint(q + 128);
    }
    v[i] = u;
    s += int(u);
  }
  xp[m * p.KW + w] = uvec4((v[0] << 16) | v[4], (v[1] << 16) | v[5],
                           (v[2] << 16) | v[6], (v[3] << 16) | v[7]);
  xs[m * p.KW + w] = s;
}
