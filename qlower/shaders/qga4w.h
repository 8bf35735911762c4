// int8 x int4 dot products with plain 32-bit integer arithmetic.
//
// Without an integer dot-product instruction, one 32-bit multiply still yields
// a two-term dot product: with a = lo_a | hi_a << 16 and b = lo_b << 16 | hi_b,
// bits 16..31 of a * b are lo_a * lo_b + hi_a * hi_b (plus carries from the
// low half, kept at zero by the operand ranges below).
//   weights: unsigned nibbles u = w + 8 in [0, 15], as stored in the .pte;
//   activations: unsigned bytes v = q + 128 in [0, 255], pre-paired by
//   qta8a_quantize as ((v[i] << 16) | v[i + 4]) for i = 0..3 of each 8-value word.
// Low halves sum to at most 8 * 15 * 255 < 2^16 and the high halves to at most
// 16 * 15 * 255 < 2^16, so up to 8 products (16 values) accumulate exactly
// before the high half is taken. The result is sum(u * v); callers recover
// sum(w * v) = sum(u * v) - 8 * sum(v) with the per-word activation sums.
#ifndef QLOWER_QGA4W_H
#define QLOWER_QGA4W_H

// Nibbles i and i + 4 of a weight word in the two 16-bit lanes.
uint nib_pair(uint w, uint i) { return (w >> (4u * i)) & 0x000F000Fu; }

// Four products (one weight word, 8 values) added to a lane accumulator.
uint mad8(uint w, uvec4 xp, uint acc) {
  acc += nib_pair(w, 0u) * xp.x;
  acc += nib_pair(w, 1u) * xp.y;
  acc += nib_pair(w, 2u) * xp.z;
  acc += nib_pair(w, 3u) * xp.w;
  return acc;
}

// sum(u * v) over 32 values: one uvec4 of weights and its 4 paired x words.
int udot32(uvec4 w, uvec4 x0, uvec4 x1, uvec4 x2, uvec4 x3) {
  uint a = mad8(w.y, x1, mad8(w.x, x0, 0u));
  uint b = mad8(w.w, x3, mad8(w.z, x2, 0u));
  return int(a >> 16u) + int(b >> 16u);
}

// sum(u * v) over the 8 values of one word.
int udot8(uint w, uvec4 xp) { return int(mad8(w, xp, 0u) >> 16u); }

#endif  // QLOWER_QGA4W_H
