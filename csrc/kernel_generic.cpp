// Portable unit: SSE2 (part of every x86-64), multiply + add instead of FMA, software
// float16 conversion. Runs on any x86-64 CPU.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <emmintrin.h>
#include <xmmintrin.h>

#include "kernel_common.h"

namespace rk {
namespace generic {

typedef __m128 VEC;
static constexpr int W = 4;
static constexpr int NVMAX = 4;
template <int NV> struct RT;  // 16 xmm registers
template <> struct RT<1> { static constexpr int value = 8; };
template <> struct RT<2> { static constexpr int value = 5; };
template <> struct RT<3> { static constexpr int value = 3; };
template <> struct RT<4> { static constexpr int value = 2; };

static inline VEC vzero() { return _mm_setzero_ps(); }
static inline VEC vset(float x) { return _mm_set1_ps(x); }
static inline VEC vneg_inf() { return _mm_set1_ps(-INFINITY); }
static inline VEC vload(const float* p) { return _mm_loadu_ps(p); }
static inline void vstore(float* p, VEC v) { _mm_storeu_ps(p, v); }
static inline VEC vbcast(const float* p) { return _mm_load1_ps(p); }
static inline VEC vfma(VEC a, VEC b, VEC c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
static inline VEC vadd(VEC a, VEC b) { return _mm_add_ps(a, b); }
static inline void vupdate(VEC& bd, VEC& ba, VEC c, VEC j) {
    const VEC m = _mm_cmpgt_ps(c, bd);
    bd = _mm_or_ps(_mm_and_ps(m, c), _mm_andnot_ps(m, bd));
    ba = _mm_or_ps(_mm_and_ps(m, j), _mm_andnot_ps(m, ba));
}

// IEEE 754 binary16 -> binary32, exact for all inputs (normals, subnormals, inf, NaN).
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
            mant &= 0x3FFu;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
static void convert_f16(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

#include "kernel_impl.h"

}  // namespace generic

const IsaOps& isa_generic() {
    static const IsaOps ops{"generic", generic::BLK, generic::process_chunk,
                            generic::stream_sum, generic::fma_loop};
    return ops;
}
}  // namespace rk
