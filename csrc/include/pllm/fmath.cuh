// exp / log for the pllm kernels that give the same bits on the GPU and on the CPU emulator (pllm/emu_runtime.h).
//
// The CUDA math library's expf / logf are accurate (<= 2 ulp) but not correctly rounded, so the device's bits differ
// from the host libm's, and the emulator could not check kernels that use them bit for bit. These are built only from
// IEEE-exact operations (fmaf, rounded multiply / add that are never contracted, rintf, bit manipulation): Cephes'
// single-precision expf / logf (range reduction + minimax polynomial, about 1 ulp), the same arithmetic on both.
#pragma once

#include "pllm/kernel_prims.cuh"

namespace pllm {
namespace PLLM_KNS {

// a * b and a + b rounded on their own: the device compiler never fuses them into an FMA (the emulator build is
// compiled with -ffp-contract=off).
PLLM_DEV float mul_rn(float a, float b) {
#if defined(PLLM_EMULATE)
  return a * b;
#else
  return __fmul_rn(a, b);
#endif
}

PLLM_DEV float add_rn(float a, float b) {
#if defined(PLLM_EMULATE)
  return a + b;
#else
  return __fadd_rn(a, b);
#endif
}

PLLM_DEV float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

PLLM_DEV uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// e^x. x <= ln(2^-126) (and -inf) gives +0 (no subnormal results), x > ln(FLT_MAX) gives +inf, NaN stays NaN.
PLLM_DEV float exp_det(float x) {
  if (x != x) return x;
  if (!(x > -87.33654475f)) return 0.0f;
  if (x > 88.72283905f) return INFINITY;
  const float n = rintf(mul_rn(x, 1.44269504088896341f));  // x = n ln2 + r, |r| <= ln2 / 2 (+ rounding)
  float r = fmaf(-n, 0.693359375f, x);                     // Cody-Waite: ln2 = 0.693359375 - 2.12194440e-4
  r = fmaf(n, 2.12194440e-4f, r);
  const float z = mul_rn(r, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, z, r);
  p = add_rn(p, 1.0f);  // e^r in [0.70, 1.42]
  int e = static_cast<int>(n);  // in [-126, 128]
  if (e > 127) {
    p = mul_rn(p, 2.0f);
    e -= 1;
  }
  return mul_rn(p, bits_to_float(static_cast<uint32_t>(e + 127) << 23));
}

// ln(x). +0 / subnormal inputs are scaled first; 0 gives -inf, x < 0 NaN, +inf stays +inf.
PLLM_DEV float log_det(float x) {
  if (x != x || x == INFINITY) return x;
  if (x < 0.0f) return NAN;
  if (x == 0.0f) return -INFINITY;
  int e = 0;
  if (x < 1.17549435e-38f) {  // subnormal: scale into the normal range
    x = mul_rn(x, 16777216.0f);
    e = -24;
  }
  const uint32_t u = float_to_bits(x);
  e += static_cast<int>((u >> 23) & 0xffu) - 126;        // x = m 2^e, m in [0.5, 1)
  float m = bits_to_float((u & 0x807fffffu) | 0x3f000000u);
  if (m < 0.707106781186547524f) {
    e -= 1;
    m = add_rn(add_rn(m, m), -1.0f);
  } else {
    m = add_rn(m, -1.0f);
  }
  const float z = mul_rn(m, m);
  float y = 7.0376836292e-2f;
  y = fmaf(y, m, -1.1514610310e-1f);
  y = fmaf(y, m, 1.1676998740e-1f);
  y = fmaf(y, m, -1.2420140846e-1f);
  y = fmaf(y, m, 1.4249322787e-1f);
  y = fmaf(y, m, -1.6668057665e-1f);
  y = fmaf(y, m, 2.0000714765e-1f);
  y = fmaf(y, m, -2.4999993993e-1f);
  y = fmaf(y, m, 3.3333331174e-1f);
  y = mul_rn(mul_rn(y, m), z);
  const float fe = static_cast<float>(e);
  y = fmaf(fe, -2.12194440e-4f, y);
  y = fmaf(-0.5f, z, y);
  return fmaf(fe, 0.693359375f, add_rn(m, y));
}

}  // namespace PLLM_KNS
}  // namespace pllm
