/*
 * qlower decode attention, pass 2 of 2: merges the chunk partials of each
 * query head (see qlower_sdpa_decode_partial) into out [1, 1, HQ, D].
 * Workgroup h = query head; threads over D/4.
 */
#version 450 core

#define PRECISION ${PRECISION}

layout(std430) buffer;

${layout_declare_tensor(B, "w", "t_out", DTYPE, "buffer", is_scalar_array=False)}
${layout_declare_tensor(B, "r", "t_part", DTYPE, "buffer", is_scalar_array=False)}
${layout_declare_ubo(B, "int", "input_pos")}

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z_id = 2) in;

${layout_declare_spec_const(C, "int", "D", "64")}
${layout_declare_spec_const(C, "int", "NCH", "1")}
${layout_declare_spec_const(C, "int", "CH", "32")}

void main() {
  const uint h = gl_WorkGroupID.x;
  const uint tid = gl_LocalInvocationID.x;
  const uint D4 = uint(D) / 4u;
  const uint used = min(uint(input_pos) / uint(CH) + 1u, uint(NCH));
  const uint base = h * uint(NCH) * (D4 + 1u);

  float m = -3.0e38;
  for (uint c = 0u; c < used; ++c) {
    m = max(m, t_part[base + c * (D4 + 1u)].x);
  }
  float l = 0.0;
  for (uint c = 0u; c < used; ++c) {
    const vec4 ml = t_part[base + c * (D4 + 1u)];
    l += exp(ml.x - m) * ml.y;
  }
  const float inv = 1.0 / l;
  for (uint d4 = tid; d4 < D4; d4 += gl_WorkGroupSize.x) {
    vec4 a = vec4(0.0);
    for (uint c = 0u; c < used; ++c) {
      const uint cb = base + c * (D4 + 1u);
      a += exp(t_part[cb].x - m) * t_part[cb + 1u + d4];
    }
    t_out[h * D4 + d4] = a * inv;
  }
}
