#version 450
// Repacks a linear_dq8ca_q4gsw / linear_q4gsw weight, as serialized in the
// .pte, into the layout the GEMV/GEMM kernels read:
//   weights uint8 [N, K8/2] (two nibbles w+8 per byte along K)
//     -> uint [N, KW] with KW = ceil32(K8)/8, padded with 0x88888888 (zeros),
//        so every row is whole uvec4s (32 values);
//   scales [G, N4] -> [N, G], so one row's group scales are contiguous;
//   weight sums int32 [G, N8] -> corr[n] = sum_g scale[g, n] * wsum[g, n],
//     the per-row term the activation zero point multiplies.
#extension GL_GOOGLE_include_directive : require
#include "common.h"

layout(local_size_x = WG, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer SrcW { uint src_w[]; };
layout(std430, binding = 1) readonly buffer SrcS { float src_s[]; };
layout(std430, binding = 2) readonly buffer SrcSum { int src_sum[]; };
layout(std430, binding = 3) writeonly buffer DstW { uint dst_w[]; };
layout(std430, binding = 4) writeonly buffer DstS { float dst_s[]; };
layout(std430, binding = 5) writeonly buffer Corr { float corr[]; };

layout(push_constant) uniform P {
  uint N;
  uint KW_SRC;  // words per serialized row: K8 / 8
  uint KW;      // words per repacked row
  uint G;       // groups
  uint N4;      // scale row length
  uint N8;      // weight-sum row length
} p;

void main() {
  const uint j = gl_GlobalInvocationID.x;
  const uint n = gl_WorkGroupID.y + gl_NumWorkGroups.y * gl_WorkGroupID.z;
  if (n >= p.N) return;
  if (j < p.KW) {
    dst_w[n * p.KW + j] = j < p.KW_SRC ? src_w[n * p.KW_SRC + j] : 0x88888888u;
  }
  if (j < p.G) {
    dst_s[n * p.G + j] = src_s[j * p.N4 + n];
  }
  if (j == 0u) {
    float c = 0.0;
    for (uint g = 0u; g < p.G; ++g) {
      c += src_s[g * p.N4 + n] * float(src_sum[g * p.N8 + n]);
    }
    corr[n] = c;
  }
}
