/*
 * qlower epilogue of a many-row linear: reads y [rows, N] and writes, per row,
 * N_OUT units: MODE 0 y[j]; MODE 1 silu(y[j]) * y[UP_OFF + j]; MODE 2 the
 * column split of y into up to four outputs ([rows, SPLIT_{s+1} - SPLIT_s]
 * each). HAS_RES adds residual[row, j] (MODE 0/1). One thread per unit.
 */
#version 450 core

#define PRECISION ${PRECISION}

layout(std430) buffer;

${layout_declare_tensor(B, "w", "t_out0", DTYPE, "buffer")}
${layout_declare_tensor(B, "w", "t_out1", DTYPE, "buffer")}
${layout_declare_tensor(B, "w", "t_out2", DTYPE, "buffer")}
${layout_declare_tensor(B, "w", "t_out3", DTYPE, "buffer")}
${layout_declare_tensor(B, "r", "t_y", DTYPE, "buffer")}
${layout_declare_tensor(B, "r", "t_res", DTYPE, "buffer")}
${layout_declare_ubo(B, "int", "y_numel")}

layout(local_size_x_id = 0, local_size_y_id = 1, local_size_z_id = 2) in;

${layout_declare_spec_const(C, "int", "N", "1")}
${layout_declare_spec_const(C, "int", "N_OUT", "1")}
${layout_declare_spec_const(C, "int", "UP_OFF", "0")}
${layout_declare_spec_const(C, "int", "MODE", "0")}
${layout_declare_spec_const(C, "int", "HAS_RES", "0")}
${layout_declare_spec_const(C, "int", "SPLIT1", "1")}
${layout_declare_spec_const(C, "int", "SPLIT2", "1")}
${layout_declare_spec_const(C, "int", "SPLIT3", "1")}

void main() {
  const int rows = y_numel / N;
  const int idx = int(gl_GlobalInvocationID.x);
  if (idx >= rows * N_OUT) {
    return;
  }
  const int t = idx / N_OUT;
  const int j = idx - t * N_OUT;
  float v = t_y[t * N + j];
  if (MODE == 1) {
    v = v / (1.0 + exp(-v)) * t_y[t * N + UP_OFF + j];
  }
  if (MODE == 2) {
    if (j < SPLIT1) {
      t_out0[t * SPLIT1 + j] = v;
    } else if (j < SPLIT2) {
      t_out1[t * (SPLIT2 - SPLIT1) + j - SPLIT1] = v;
    } else if (j < SPLIT3) {
      t_out2[t * (SPLIT3 - SPLIT2) + j - SPLIT2] = v;
    } else {
      t_out3[t * (N_OUT - SPLIT3) + j - SPLIT3] = v;
    }
    return;
  }
  if (HAS_RES != 0) {
    v += t_res[idx];
  }
  t_out0[idx] = v;
}
