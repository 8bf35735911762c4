// Shared helpers for qlower's compute shaders.
//
// Every buffer is an array of 32-bit words (uint/int/float, or uvec4 where a
// layout guarantees 16-byte rows), so no optional 8/16-bit storage feature is
// needed; fp16 activations travel as packed half pairs.
#ifndef QLOWER_COMMON_H
#define QLOWER_COMMON_H

#extension GL_EXT_control_flow_attributes : require

#define DIV_UP(a, b) (((a) + (b) - 1) / (b))

// Signed byte i (0..3) of a word, sign-extended.
int sbyte(uint w, uint i) { return bitfieldExtract(int(w), int(8u * i), 8); }

// Activation element i of a float buffer `buf` stored as fp32 or as fp16 pairs.
#if defined(DTYPE_fp16)
#define ACT_T uint
#define LOAD_ACT(buf, i) (unpackHalf2x16(buf[(i) >> 1u])[(i) & 1u])
#else
#define ACT_T float
#define LOAD_ACT(buf, i) (buf[(i)])
#endif

#endif  // QLOWER_COMMON_H
