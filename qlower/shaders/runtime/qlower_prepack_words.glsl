/*
 * qlower prepack: copies a constant's bytes, as 32-bit words, from its
 * staging buffer into a plain buffer (packed int4 bytes, fp32 scales/bias/
 * norm weights). Needs no 8-bit storage support.
 */
#version 450 core

#define PRECISION ${PRECISION}

layout(std430) buffer;

${layout_declare_tensor(B, "w", "t_dst", "uint", "buffer")}
${layout_declare_tensor(B, "r", "t_src", "uint", "buffer")}

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z_id = 2) in;

${layout_declare_spec_const(C, "int", "NWORDS", "1")}

void main() {
  const uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
  for (uint i = gl_GlobalInvocationID.x; i < uint(NWORDS); i += stride) {
    t_dst[i] = t_src[i];
  }
}
