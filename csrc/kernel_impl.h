// ISA-independent body of the patch-distance kernel. Included once per ISA unit, inside a
// namespace and after `#pragma GCC target(...)`. The including unit defines:
//   VEC, W (lanes), NVMAX (vectors per query block), vzero(), vload(p), vstore(p, v),
//   vbcast(p) (broadcast one float), vfma(a, b, c) = a*b + c, vupdate(bd, ba, c, j),
//   vneg_inf(), vset(x), RT<NV>::value (db rows per register tile),
//   convert_f16(src, dst, n).
//
// Layout: dots of one query block against a tile of R db rows are accumulated in registers
// as acc[R][NV] vectors, lane l of vector v holding query patch (block*BLK + v*W + l).
// Per k: NV vector loads of the packed (transposed) queries, R scalar broadcasts of the db
// rows, R*NV FMAs. Every db value is read once per query block, the packed query block
// (d*BLK floats) stays in L1/L2, so db rows are streamed from memory exactly once per chunk.
// No standard-library templates here (see kernel_common.h).

static constexpr int BLK = W * NVMAX;
#ifndef PF_TILES
#define PF_TILES 0
#endif
#ifndef KCF
#define KCF 4096
#endif

// Depth of a k panel: the panel of the packed query block (KC * BLK floats = 16 KiB) stays in
// L1 while every db row tile of the chunk is multiplied against it.
static constexpr int64_t KC = KCF / BLK;

// C[r*BLK + v*W ..] (+)= X[r*ld + 0..kc) . Qb[0..kc)[v*W ..] for r < R, v < NV.
template <int NV, int R>
static inline void micro(const float* __restrict X, int64_t ld, int64_t kc,
                         const float* __restrict Qb, float* __restrict C, bool accumulate) {
    VEC acc[R][NV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? vload(C + r * BLK + v * W) : vzero();
    for (int64_t k = 0; k < kc; ++k) {
        const float* qk = Qb + k * BLK;
        VEC q[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) q[v] = vload(qk + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            const VEC b = vbcast(X + r * ld + k);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[r][v] = vfma(q[v], b, acc[r][v]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) vstore(C + r * BLK + v * W, acc[r][v]);
}

template <int NV, int RR>
struct Tail {
    static inline void run(int64_t rem, const float* X, int64_t ld, int64_t kc, const float* Qb,
                           float* C, bool acc) {
        if (rem == RR)
            micro<NV, RR>(X, ld, kc, Qb, C, acc);
        else
            Tail<NV, RR - 1>::run(rem, X, ld, kc, Qb, C, acc);
    }
};
template <int NV>
struct Tail<NV, 0> {
    static inline void run(int64_t, const float*, int64_t, int64_t, const float*, float*, bool) {}
};

// C[r*BLK + lane] = dot(X[r], query lane) for r < nrows, lanes < NV*W.
template <int NV>
static void gemm_nv(const float* X, int64_t nrows, int64_t d, const float* Qb, float* C) {
    constexpr int R = RT<NV>::value;
    for (int64_t k0 = 0; k0 < d; k0 += KC) {
        const int64_t kc = (d - k0) < KC ? (d - k0) : KC;
        const bool acc = k0 > 0;
        int64_t r = 0;
        for (; r + R <= nrows; r += R) {
            // Software prefetch of this tile's rows (this panel's part) before the FMA loop,
            // so all their cache lines are requested at once (measured best of 0/1/2 tiles
            // ahead on Zen 3; the FMA loop walks R rows in lockstep, 4 bytes at a time).
            const int64_t pr = r + PF_TILES * R;
            if (pr + R <= nrows)
                for (int rr = 0; rr < R; ++rr)
                    for (int64_t k = 0; k < kc; k += 16)
                        _mm_prefetch((const char*)(X + (pr + rr) * d + k0 + k), _MM_HINT_T0);
            micro<NV, R>(X + r * d + k0, d, kc, Qb + k0 * BLK, C + r * BLK, acc);
        }
        if (r < nrows)
            Tail<NV, R - 1>::run(nrows - r, X + r * d + k0, d, kc, Qb + k0 * BLK, C + r * BLK,
                                 acc);
    }
}

static void gemm(int nv, const float* X, int64_t nrows, int64_t d, const float* Qb, float* C) {
    switch (nv) {
        case 1: gemm_nv<1>(X, nrows, d, Qb, C); break;
        case 2: if constexpr (NVMAX >= 2) gemm_nv<2>(X, nrows, d, Qb, C); break;
        case 3: if constexpr (NVMAX >= 3) gemm_nv<3>(X, nrows, d, Qb, C); break;
        case 4: if constexpr (NVMAX >= 4) gemm_nv<4>(X, nrows, d, Qb, C); break;
        default: break;
    }
}

// Squared distances below this are recomputed from a float64 dot product.
static constexpr double REFINE_T = 0.05;

static double dot64(const float* a, const float* b, int64_t d) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t k = 0;
    for (; k + 4 <= d; k += 4) {
        s0 += (double)a[k] * (double)b[k];
        s1 += (double)a[k + 1] * (double)b[k + 1];
        s2 += (double)a[k + 2] * (double)b[k + 2];
        s3 += (double)a[k + 3] * (double)b[k + 3];
    }
    for (; k < d; ++k) s0 += (double)a[k] * (double)b[k];
    return (s0 + s1) + (s2 + s3);
}

static inline int64_t cand_at(const Problem& P, int64_t p) { return P.cand ? P.cand[p] : p; }

static void process_chunk(const Problem& P, const Chunk& c, const Work& w) {
    const int64_t d = P.d;
    const int64_t nrows = c.row1 - c.row0;
    const int64_t nimg = c.p1 - c.p0;
    const int64_t nq_pad = P.n_blocks * BLK;
    const float* X;
    if (P.db16) {
        convert_f16(P.db16 + c.row0 * d, w.xbuf, nrows * d);
        X = w.xbuf;
    } else {
        X = P.db32 + c.row0 * d;
    }

    for (int64_t b = 0; b < P.n_blocks; ++b) {
        const int64_t active_lanes =
            (P.nq_total - b * BLK) < BLK ? (P.nq_total - b * BLK) : BLK;
        const int nv = (int)((active_lanes + W - 1) / W);
        if (nrows > 0) gemm(nv, X, nrows, d, P.qpack + b * d * BLK, w.cbuf);
        // Per image: best dot and its (image-local) row for every query lane of the block.
        for (int64_t i = 0; i < nimg; ++i) {
            const int64_t img = cand_at(P, c.p0 + i);
            const int64_t rs = P.offsets[img] - c.row0, re = P.offsets[img + 1] - c.row0;
            float* bd = w.best + i * nq_pad + b * BLK;
            float* ba = w.barg + i * nq_pad + b * BLK;
            for (int v = 0; v < nv; ++v) {
                VEC vb = vneg_inf(), va = vset(-1.0f);
                for (int64_t r = rs; r < re; ++r)
                    vupdate(vb, va, vload(w.cbuf + r * BLK + v * W), vset((float)(r - rs)));
                vstore(bd + v * W, vb);
                vstore(ba + v * W, va);
            }
        }
    }

    // Aggregate per (query, image). A pair whose float32 distance is small is re-scored
    // with a float64 dot product: sqrt(2 - 2*dot) loses relative accuracy as dot -> 1
    // (near duplicates, the case retrieval cares most about), the float64 dot restores it.
    for (int64_t q = 0; q < P.nQ; ++q) {
        const int64_t c0 = P.qoff[q], c1 = P.qoff[q + 1];
        for (int64_t i = 0; i < nimg; ++i) {
            const int64_t img = cand_at(P, c.p0 + i);
            const float* Xi = X + (P.offsets[img] - c.row0) * d;
            const float* bd = w.best + i * nq_pad;
            const float* ba = w.barg + i * nq_pad;
            int64_t bestc = -1;
            double bestt = INFINITY, sum = 0.0;
            for (int64_t col = c0; col < c1; ++col) {
                if (!(ba[col] >= 0.0f)) continue;  // empty image
                double t = 2.0 - 2.0 * (double)bd[col];
                if (t < REFINE_T) t = 2.0 - 2.0 * dot64(P.query + col * d, Xi + (int64_t)ba[col] * d, d);
                if (t < 0.0) t = 0.0;
                if (t < bestt) { bestt = t; bestc = col; }
                if (P.aggregate == AGG_MEAN_MIN) sum += sqrt(t);
            }
            const int64_t o = q * P.m + c.p0 + i;
            if (bestc < 0) {  // empty image: no pair, infinite distance
                P.out_dist[o] = INFINITY;
                if (P.out_qi) P.out_qi[o] = -1;
                if (P.out_dj) P.out_dj[o] = -1;
                continue;
            }
            P.out_dist[o] = P.aggregate == AGG_MEAN_MIN ? (float)(sum / (double)(c1 - c0))
                                                        : (float)sqrt(bestt);
            if (P.out_qi) P.out_qi[o] = (int32_t)(bestc - c0);
            if (P.out_dj) P.out_dj[o] = (int32_t)ba[bestc];
        }
    }
}

// Streaming read of n floats (memory-bandwidth probe). Four independent accumulators.
static double stream_sum(const float* p, int64_t n) {
    VEC a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
        a0 = vadd(a0, vload(p + i));
        a1 = vadd(a1, vload(p + i + W));
        a2 = vadd(a2, vload(p + i + 2 * W));
        a3 = vadd(a3, vload(p + i + 3 * W));
    }
    float tmp[W];
    vstore(tmp, vadd(vadd(a0, a1), vadd(a2, a3)));
    double s = 0.0;
    for (int l = 0; l < W; ++l) s += tmp[l];
    for (; i < n; ++i) s += p[i];
    return s;
}

// Dependency-free multiply-add loop (FMA peak probe): 12 independent chains.
static double fma_loop(int64_t iters, float seed) {
    constexpr int K = 12;
    VEC acc[K];
    const VEC a = vset(0.999999f), b = vset(seed);
#pragma GCC unroll 12
    for (int k = 0; k < K; ++k) acc[k] = vset(seed + (float)k);
    for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
        for (int k = 0; k < K; ++k) acc[k] = vfma(acc[k], a, b);
    }
    VEC s = acc[0];
    for (int k = 1; k < K; ++k) s = vadd(s, acc[k]);
    float tmp[W];
    vstore(tmp, s);
    double r = 0.0;
    for (int l = 0; l < W; ++l) r += tmp[l];
    // Returned so the loop cannot be removed; callers use the flop count iters*K*W*2.
    return r;
}
