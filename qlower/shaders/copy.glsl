#version 450
// Streaming copy, the bandwidth roofline that bench reports fractions of.
// A compute copy, not vkCmdCopyBuffer: on some drivers the transfer path is
// several times slower than what shaders can move.
#extension GL_GOOGLE_include_directive : require
#include "common.h"

layout(local_size_x = WG, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) writeonly buffer Dst { uvec4 dst[]; };
layout(std430, binding = 1) readonly buffer Src { uvec4 src[]; };

layout(push_constant) uniform P { uint COUNT; } p;  // uvec4 elements

void main() {
  const uint stride = gl_NumWorkGroups.x * WG;
  // Several independent loads in flight per thread before the stores.
  uint i = gl_GlobalInvocationID.x;
  for (; i + (UNROLL - 1u) * stride < p.COUNT; i += UNROLL * stride) {
    uvec4 v[UNROLL];
    [[unroll]] for (uint u = 0u; u < UNROLL; ++u) v[u] = src[i + u * stride];
    [[unroll]] for (uint u = 0u; u < UNROLL; ++u) dst[i + u * stride] = v[u];
  }
  for (; i < p.COUNT; i += stride) dst[i] = src[i];
}
