// AVX-512F unit (the conversions and masks used are all AVX-512F). Called only when the CPU
// and OS report AVX-512F (see kernel.cpp).
#include <cmath>
#include <cstdint>
#include <immintrin.h>

#include "kernel_common.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")

namespace rk {
namespace avx512 {

typedef __m512 VEC;
static constexpr int W = 16;
static constexpr int NVMAX = 4;
template <int NV> struct RT;  // 32 zmm registers: R*NV accumulators + NV queries
template <> struct RT<1> { static constexpr int value = 16; };
template <> struct RT<2> { static constexpr int value = 12; };
template <> struct RT<3> { static constexpr int value = 8; };
template <> struct RT<4> { static constexpr int value = 6; };

static inline VEC vzero() { return _mm512_setzero_ps(); }
static inline VEC vset(float x) { return _mm512_set1_ps(x); }
static inline VEC vneg_inf() { return _mm512_set1_ps(-INFINITY); }
static inline VEC vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, VEC v) { _mm512_storeu_ps(p, v); }
static inline VEC vbcast(const float* p) { return _mm512_set1_ps(*p); }
static inline VEC vfma(VEC a, VEC b, VEC c) { return _mm512_fmadd_ps(a, b, c); }
static inline VEC vadd(VEC a, VEC b) { return _mm512_add_ps(a, b); }
static inline void vupdate(VEC& bd, VEC& ba, VEC c, VEC j) {
    const __mmask16 m = _mm512_cmp_ps_mask(c, bd, _CMP_GT_OQ);
    bd = _mm512_mask_mov_ps(bd, m, c);
    ba = _mm512_mask_mov_ps(ba, m, j);
}
static void convert_f16(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i,
                         _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + i))));
    for (; i < n; ++i) dst[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(src[i])));
}

#include "kernel_impl.h"

}  // namespace avx512
}  // namespace rk

#pragma GCC pop_options

namespace rk {
const IsaOps& isa_avx512() {
    static const IsaOps ops{"avx512", avx512::BLK, avx512::process_chunk,
                            avx512::stream_sum, avx512::fma_loop};
    return ops;
}
}  // namespace rk
