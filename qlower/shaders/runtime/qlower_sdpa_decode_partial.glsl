/*
 * qlower decode attention, pass 1 of 2 (split-K over the context).
 *
 * One query row at position pos (read from the input_pos uniform, so the
 * dispatch never changes as pos grows). Workgroup (c, h): query head h over
 * the context chunk [c * CH, c * CH + CH) (CH = workgroup size, one thread per
 * position). Chunks past pos write an empty partial. The partial of (h, c) is
 * D4 + 1 vec4s: (max score, sum of exp, 0, 0), then sum_p exp(s_p - max) v_p.
 * Position pos itself is read from the new k/v inputs; workgroup (0, h) with
 * h % (HQ / HKV) == 0 writes them into the caches ([1, C, HKV, D]) at pos.
 */
#version 450 core

#extension GL_KHR_shader_subgroup_arithmetic : enable

#define PRECISION ${PRECISION}

layout(std430) buffer;

${layout_declare_tensor(B, "w", "t_part", DTYPE, "buffer", is_scalar_array=False)}
${layout_declare_tensor(B, "rw", "t_kcache", DTYPE, "buffer", is_scalar_array=False)}
${layout_declare_tensor(B, "rw", "t_vcache", DTYPE, "buffer", is_scalar_array=False)}
${layout_declare_tensor(B, "r", "t_q", DTYPE, "buffer", is_scalar_array=False)}
${layout_declare_tensor(B, "r", "t_k", DTYPE, "buffer", is_scalar_array=False)}
${layout_declare_tensor(B, "r", "t_v", DTYPE, "buffer", is_scalar_array=False)}
${layout_declare_ubo(B, "int", "input_pos")}

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z_id = 2) in;

${layout_declare_spec_const(C, "int", "D", "64")}
${layout_declare_spec_const(C, "int", "HQ", "1")}
${layout_declare_spec_const(C, "int", "HKV", "1")}
${layout_declare_spec_const(C, "int", "NCH", "1")}
${layout_declare_spec_const(C, "int", "CTX", "1")}

#define MAX_WG 256
#define MAX_SUBGROUPS 64

shared float red_max[MAX_SUBGROUPS];
shared float red_sum[MAX_SUBGROUPS];
shared float e_sh[MAX_WG];
shared vec4 o_sh[MAX_WG];

void main() {
  const uint CH = gl_WorkGroupSize.x;
  const uint tid = gl_LocalInvocationID.x;
  const uint c = gl_WorkGroupID.x;
  const uint h = gl_WorkGroupID.y;
  const uint D4 = uint(D) / 4u;
  const uint G = uint(HQ / HKV);
  const uint kvh = h / G;
  const int pos = input_pos;
  const uint part_base = (h * uint(NCH) + c) * (D4 + 1u);

  // The new k/v go into the caches at pos (one writer per kv head).
  if (c == 0u && (h % G) == 0u && pos >= 0 && pos < CTX) {
    const uint dst = (uint(pos) * uint(HKV) + kvh) * D4;
    for (uint d4 = tid; d4 < D4; d4 += CH) {
      t_kcache[dst + d4] = t_k[kvh * D4 + d4];
      t_vcache[dst + d4] = t_v[kvh * D4 + d4];
    }
  }

  const uint L = uint(pos) + 1u;
  const uint start = c * CH;
  if (start >= L) {
    // Uniform per workgroup.
    for (uint i = tid; i <= D4; i += CH) {
      t_part[part_base + i] = i == 0u ? vec4(-3.0e38, 0.0, 0.0, 0.0) : vec4(0.0);
    }
    return;
  }
  const uint n = min(CH, L - start);

  // Scores, one position a thread.
  const uint p = start + tid;
  float s = -3.0e38;
  if (tid < n) {
    float acc = 0.0;
    const uint qb = h * D4;
    if (p == uint(pos)) {
      for (uint d4 = 0u; d4 < D4; ++d4) {
        acc += dot(t_q[qb + d4], t_k[kvh * D4 + d4]);
      }
    } else {
      const uint kb = (p * uint(HKV) + kvh) * D4;
      for (uint d4 = 0u; d4 < D4; ++d4) {
        acc += dot(t_q[qb + d4], t_kcache[kb + d4]);
      }
    }
    s = acc * inversesqrt(float(D));
  }

  const float sm = subgroupMax(s);
  if (subgroupElect()) {
    red_max[gl_SubgroupID] = sm;
  }
  memoryBarrierShared();
  barrier();
  float m = -3.0e38;
  for (uint i = 0u; i < gl_NumSubgroups; ++i) {
    m = max(m, red_max[i]);
  }
  const float e = tid < n ? exp(s - m) : 0.0;
  e_sh[tid] = e;
  const float se = subgroupAdd(e);
  if (subgroupElect()) {
    red_sum[gl_SubgroupID] = se;
  }
  memoryBarrierShared();
  barrier();
  float l = 0.0;
  for (uint i = 0u; i < gl_NumSubgroups; ++i) {
    l += red_sum[i];
  }

  // Weighted V: lane = (d4, position group).
  const uint PG = max(CH / D4, 1u);
  for (uint lane = tid; lane < D4 * PG; lane += CH) {
    const uint d4 = lane % D4;
    const uint pg = lane / D4;
    vec4 a = vec4(0.0);
    for (uint i = pg; i < n; i += PG) {
      const uint pp = start + i;
      const vec4 vv = pp == uint(pos)
          ? t_v[kvh * D4 + d4]
          : t_vcache[(pp * uint(HKV) + kvh) * D4 + d4];
      a += e_sh[i] * vv;
    }
    o_sh[lane] = a;
  }
  memoryBarrierShared();
  barrier();
  for (uint d4 = tid; d4 < D4; d4 += CH) {
    vec4 a = vec4(0.0);
    for (uint pg = 0u; pg < PG; ++pg) {
      a += o_sh[pg * D4 + d4];
    }
    t_part[part_base + 1u + d4] = a;
  }
  if (tid == 0u) {
    t_part[part_base] = vec4(m, l, 0.0, 0.0);
  }
}
