// q8ta_linear helpers: int8 x int8 dot products and int8 requantization.
// Included after the push-constant block `p` of the including shader.
#ifndef QLOWER_Q8TA_H
#define QLOWER_Q8TA_H

// Dot product of 4 packed signed bytes with 4 packed signed bytes.
int dot4_i8(uint a, uint b) {
  return sbyte(a, 0u) * sbyte(b, 0u) + sbyte(a, 1u) * sbyte(b, 1u)
       + sbyte(a, 2u) * sbyte(b, 2u) + sbyte(a, 3u) * sbyte(b, 3u);
}

// acc = sum_k q[k] * w[n, k] (exact int32). The activation zero point is
// applied through the weight sum before anything becomes float:
//   y = (acc - x_zp * wsum[n]) * x_scale * w_scale[n] + bias[n]
//   out = clamp(roundEven(y * (1 / out_scale)) + out_zp, -128, 127), relu first.
int q8ta_requant(int acc, int wsum_n, float wscale_n, float bias_n) {
  precise float y = float(acc - p.X_ZP * wsum_n) * (p.X_SCALE * wscale_n) + bias_n;
  if (p.RELU != 0u) y = max(y, 0.0);
  precise float t = y * p.INV_OUT_SCALE;
  return clamp(int(roundEven(t)) + p.OUT_ZP, -128, 127);
}

uint pack_i8x4(ivec4 v) {
  return (uint(v.x) & 0xFFu) | ((uint(v.y) & 0xFFu) << 8u) |
         ((uint(v.z) & 0xFFu) << 16u) | ((uint(v.w) & 0xFFu) << 24u);
}

#endif  // QLOWER_Q8TA_H
