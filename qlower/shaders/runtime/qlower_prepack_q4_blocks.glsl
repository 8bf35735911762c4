/*
 * qlower prepack: packed int4 weights (uint8 [N, K/2], byte i of a row holding
 * values 2i, 2i + 1 in its low, high nibble, each + 8) into the blocked layout
 * of qlower_q4gsw_gemv: row n = NW uvec4 words; word 32 * b + l holds the
 * quads (4 values, 16 bits) 256 * b + 32 * k + l for k = 0..7, quad k in the
 * 16-bit half k % 2 of component k / 2. Quads past K4 are 0x8888 (value 0).
 * One invocation per output uint.
 */
#version 450 core

#define PRECISION ${PRECISION}

layout(std430) buffer;

${layout_declare_tensor(B, "w", "t_dst", "uint", "buffer")}
${layout_declare_tensor(B, "r", "t_src", "uint", "buffer")}

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z_id = 2) in;

${layout_declare_spec_const(C, "int", "N", "1")}
${layout_declare_spec_const(C, "int", "K4", "1")}
${layout_declare_spec_const(C, "int", "NW", "32")}

uint quad_bits(const uint row_base, const uint q) {
  if (q >= uint(K4)) {
    return 0x8888u;
  }
  return (t_src[row_base + q / 2u] >> (16u * (q % 2u))) & 0xFFFFu;
}

void main() {
  const uint total = uint(N) * uint(NW) * 4u;
  const uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
  for (uint o = gl_GlobalInvocationID.x; o < total; o += stride) {
    const uint c = o % 4u;
    const uint wi = (o / 4u) % uint(NW);
    const uint n = o / (4u * uint(NW));
    const uint q0 = (wi / 32u) * 256u + (wi % 32u) + 64u * c;
    const uint row_base = n * (uint(K4) / 2u);
    t_dst[o] = quad_bits(row_base, q0) | (quad_bits(row_base, q0 + 32u) << 16u);
  }
}
