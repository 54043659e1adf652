// AVX2 + FMA + F16C unit. Called only when the CPU reports all three (see kernel.cpp).
#include <cmath>
#include <cstdint>
#include <immintrin.h>

#include "kernel_common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace rk {
namespace avx2 {

typedef __m256 VEC;
static constexpr int W = 8;
static constexpr int NVMAX = 4;
template <int NV> struct RT;  // rows per register tile: R*NV accumulators + NV queries + 1
template <> struct RT<1> { static constexpr int value = 8; };
template <> struct RT<2> { static constexpr int value = 6; };
template <> struct RT<3> { static constexpr int value = 4; };
template <> struct RT<4> { static constexpr int value = 3; };

static inline VEC vzero() { return _mm256_setzero_ps(); }
static inline VEC vset(float x) { return _mm256_set1_ps(x); }
static inline VEC vneg_inf() { return _mm256_set1_ps(-INFINITY); }
static inline VEC vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, VEC v) { _mm256_storeu_ps(p, v); }
static inline VEC vbcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline VEC vfma(VEC a, VEC b, VEC c) { return _mm256_fmadd_ps(a, b, c); }
static inline VEC vadd(VEC a, VEC b) { return _mm256_add_ps(a, b); }
static inline void vupdate(VEC& bd, VEC& ba, VEC c, VEC j) {
    const VEC m = _mm256_cmp_ps(c, bd, _CMP_GT_OQ);
    bd = _mm256_blendv_ps(bd, c, m);
    ba = _mm256_blendv_ps(ba, j, m);
}
static void convert_f16(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
    for (; i < n; ++i) dst[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(src[i])));
}

#include "kernel_impl.h"

}  // namespace avx2
}  // namespace rk

#pragma GCC pop_options

namespace rk {
const IsaOps& isa_avx2() {
    static const IsaOps ops{"avx2", avx2::BLK, avx2::process_chunk, avx2::stream_sum,
                            avx2::fma_loop};
    return ops;
}
}  // namespace rk
