// Shared plain-C interface between the driver (kernel.cpp, baseline ISA, OpenMP, pybind11)
// and the per-ISA compute units (kernel_avx512.cpp, kernel_avx2.cpp, kernel_generic.cpp).
//
// The per-ISA units are compiled with `#pragma GCC target(...)` for the whole translation
// unit. To keep AVX-512/AVX2 instructions out of any code that could run on a CPU without
// them, those units use no C++ standard-library templates and no OpenMP: they see only the
// plain structs below and raw pointers. All allocation, validation and threading happens in
// kernel.cpp, which is compiled for baseline x86-64.
#pragma once
#include <cstdint>

namespace rk {

enum Aggregate : int { AGG_MIN = 0, AGG_MEAN_MIN = 1 };

struct Problem {
    const float* db32;      // [n_rows, d] float32, or nullptr
    const uint16_t* db16;   // [n_rows, d] IEEE half, or nullptr
    int64_t d;
    const int64_t* offsets; // [n_images + 1]
    const int64_t* cand;    // [m] image indices, or nullptr = identity
    int64_t m;
    const float* query;     // [nq_total, d] original query patches
    const float* qpack;     // packed queries: [n_blocks][d][blk] (zero padded lanes)
    int64_t nq_total;       // total query patches (all queries)
    int64_t n_blocks;
    const int64_t* qoff;    // [nQ + 1] query patch offsets
    int64_t nQ;
    int aggregate;
    float* out_dist;        // [nQ][m]
    int32_t* out_qi;        // [nQ][m] or nullptr
    int32_t* out_dj;        // [nQ][m] or nullptr
};

// A chunk: candidate positions [p0, p1) whose images are consecutive, i.e. whose rows are
// the contiguous range [row0, row1).
struct Chunk {
    int64_t p0, p1, row0, row1;
};

// Per-thread scratch, sized by the driver from the ISA's blk() and the chunk limits.
struct Work {
    float* xbuf;   // [max_rows * d]   float16 -> float32 converted rows
    float* cbuf;   // [max_rows * blk] dot products of one query block
    float* best;   // [max_imgs * nq_pad] best dot per (image, query patch)
    float* barg;   // [max_imgs * nq_pad] its row (local to image), stored as float
};

struct IsaOps {
    const char* name;
    int blk;  // query lanes per packed block
    void (*process_chunk)(const Problem&, const Chunk&, const Work&);
    // Sum of all floats in [p, p+n) (streaming read, for measuring memory bandwidth).
    double (*stream_sum)(const float* p, int64_t n);
    // Runs `iters` iterations of a dependency-free FMA loop; returns flops done.
    double (*fma_loop)(int64_t iters, float seed);
};

// Defined in the per-ISA units. avx512/avx2 ones must only be called when the CPU has them.
const IsaOps& isa_generic();
const IsaOps& isa_avx2();
const IsaOps& isa_avx512();

}  // namespace rk
