// retrieval._kernel: multi-patch image-to-image distances (min / mean-min of Euclidean
// distances between unit patch descriptors), with run-time ISA dispatch.
//
// This unit is compiled for baseline x86-64: input validation, chunking, OpenMP and the
// Python binding live here; the arithmetic lives in kernel_{avx512,avx2,generic}.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel_common.h"

namespace py = pybind11;

namespace rk {
namespace {

bool cpu_has(const std::string& isa) {
    if (isa == "generic") return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    // __builtin_cpu_supports also checks that the OS saves the wider register state.
    if (isa == "avx2")
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    if (isa == "avx512")
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return false;
}

const IsaOps& ops_for(const std::string& isa) {
    if (isa == "avx512") return isa_avx512();
    if (isa == "avx2") return isa_avx2();
    return isa_generic();
}

std::string best_isa() {
    if (cpu_has("avx512")) return "avx512";
    if (cpu_has("avx2")) return "avx2";
    return "generic";
}

const IsaOps* g_ops = nullptr;
std::string g_note;  // why the chosen path differs from the request, if it does

void select_from_env() {
    const char* env = std::getenv("RETRIEVAL_KERNEL_ISA");
    std::string req = env ? env : "";
    std::string chosen = best_isa();
    g_note.clear();
    if (!req.empty() && req != "auto") {
        if (req != "avx512" && req != "avx2" && req != "generic") {
            g_note = "RETRIEVAL_KERNEL_ISA=" + req +
                     " is not one of avx512|avx2|generic|auto; using " + chosen;
        } else if (!cpu_has(req)) {
            g_note = "RETRIEVAL_KERNEL_ISA=" + req + " is not supported by this CPU; using " +
                     chosen;
        } else {
            chosen = req;
        }
    }
    g_ops = &ops_for(chosen);
}

void set_isa(const std::string& isa) {
    if (isa == "auto") {
        g_ops = &ops_for(best_isa());
        g_note.clear();
        return;
    }
    if (isa != "avx512" && isa != "avx2" && isa != "generic")
        throw std::invalid_argument("isa must be one of 'avx512', 'avx2', 'generic', 'auto', got '" +
                                    isa + "'");
    if (!cpu_has(isa))
        throw std::invalid_argument("ISA path '" + isa + "' is not supported by this CPU");
    g_ops = &ops_for(isa);
    g_note.clear();
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> out;
    for (const char* s : {"avx512", "avx2", "generic"})
        if (cpu_has(s)) out.push_back(s);
    return out;
}

int resolve_threads(int threads) {
    if (threads < 0) throw std::invalid_argument("threads must be >= 0 (0 = OpenMP default)");
    return threads == 0 ? omp_get_max_threads() : threads;
}

std::string describe() {
    std::string s = std::string("retrieval._kernel ") + g_ops->name + " (OpenMP, " +
                    std::to_string(omp_get_max_threads()) + " threads)";
    if (!g_note.empty()) s += " [" + g_note + "]";
    return s;
}

bool is_c_contig(const py::array& a) {
    return (a.flags() & py::array::c_style) != 0;
}

void require(bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument(msg);
}

// For checks inside loops over every image or candidate: `require` there built its
// message (a heap string) on every pass, 3.5 ms a call over a 250,000-image segment.
[[noreturn]] void fail(const std::string& msg) {
    throw std::invalid_argument(msg);
}

py::array as_array(const py::object& o, const char* name) {
    require(py::isinstance<py::array>(o), std::string(name) + " must be a numpy array");
    return py::reinterpret_borrow<py::array>(o);
}

void check_i64_vector(const py::array& a, const char* name) {
    require(a.dtype().kind() == 'i' && a.itemsize() == 8,
            std::string(name) + " must have dtype int64");
    require(a.ndim() == 1, std::string(name) + " must be 1-D");
    require(is_c_contig(a), std::string(name) + " must be C-contiguous");
}

// The validated query side of a call: patches [nq_total, d] float32, split by query_offsets.
struct Queries {
    py::array query, qoff;
    const float* data;
    const int64_t* qo;
    int64_t nq_total, d, nQ;
};

Queries check_queries(const py::object& query_o, const py::object& qoff_o) {
    Queries Q;
    Q.query = as_array(query_o, "query");
    Q.qoff = as_array(qoff_o, "query_offsets");
    const py::array& query = Q.query;
    require(query.dtype().kind() == 'f' && query.itemsize() == 4, "query must have dtype float32");
    require(query.ndim() == 2, "query must be 2-D [n_patches, d]");
    require(is_c_contig(query), "query must be C-contiguous");
    Q.nq_total = query.shape(0);
    Q.d = query.shape(1);
    require(Q.d >= 1, "query must have at least one dimension (d >= 1)");
    require(Q.nq_total >= 1, "query must have at least one patch");
    require(Q.nq_total < INT32_MAX, "too many query patches");
    check_i64_vector(Q.qoff, "query_offsets");
    Q.nQ = Q.qoff.shape(0) - 1;
    require(Q.nQ >= 1, "query_offsets must have at least 2 entries");
    Q.qo = static_cast<const int64_t*>(Q.qoff.data());
    require(Q.qo[0] == 0, "query_offsets[0] must be 0");
    require(Q.qo[Q.nQ] == Q.nq_total,
            "query_offsets[-1] must equal the number of query patches (" +
                std::to_string(Q.nq_total) + ")");
    for (int64_t q = 0; q < Q.nQ; ++q)
        if (Q.qo[q + 1] <= Q.qo[q])
            fail("query_offsets must be strictly increasing (every query needs at least one patch)");
    Q.data = static_cast<const float*>(query.data());
    return Q;
}

// The validated database side: rows [n_rows, d] float32 or float16, split by offsets.
struct Database {
    py::array db, offsets;
    const int64_t* off;
    int64_t n_images;
    bool f16;
};

Database check_db(const py::object& db_o, const py::object& offsets_o, int64_t d) {
    Database D;
    D.db = as_array(db_o, "db");
    D.offsets = as_array(offsets_o, "offsets");
    const py::array& db = D.db;
    D.f16 = db.dtype().kind() == 'f' && db.itemsize() == 2;
    require(D.f16 || (db.dtype().kind() == 'f' && db.itemsize() == 4),
            "db must have dtype float32 or float16");
    require(db.ndim() == 2, "db must be 2-D [n_patches, d]");
    require(is_c_contig(db), "db must be C-contiguous");
    require(db.shape(1) == d, "db dimension " + std::to_string(db.shape(1)) +
                                  " does not match query dimension " + std::to_string(d));
    const int64_t n_rows = db.shape(0);
    check_i64_vector(D.offsets, "offsets");
    D.n_images = D.offsets.shape(0) - 1;
    require(D.n_images >= 0, "offsets must have at least 1 entry (n_images + 1)");
    D.off = static_cast<const int64_t*>(D.offsets.data());
    require(D.off[0] >= 0, "offsets[0] must be >= 0");
    for (int64_t i = 0; i < D.n_images; ++i)
        if (D.off[i + 1] < D.off[i]) fail("offsets must be non-decreasing");
    require(D.off[D.n_images] <= n_rows, "offsets[-1] (" + std::to_string(D.off[D.n_images]) +
                                             ") exceeds the number of db rows (" +
                                             std::to_string(n_rows) + ")");
    return D;
}

void check_candidates(const int64_t* cand, int64_t m, int64_t n_images, const char* name) {
    for (int64_t p = 0; p < m; ++p)
        if (cand[p] < 0 || cand[p] >= n_images)
            fail(std::string(name) + "[" + std::to_string(p) + "] = " + std::to_string(cand[p]) +
                 " is out of range [0, " + std::to_string(n_images) + ")");
}

int check_aggregate(const std::string& aggregate) {
    if (aggregate == "min") return AGG_MIN;
    if (aggregate == "mean-min") return AGG_MEAN_MIN;
    throw std::invalid_argument("aggregate must be 'min' or 'mean-min', got '" + aggregate + "'");
}

// Pack queries transposed, block by block: qpack[b][k][lane] for the n_blocks blocks of
// the nq patches at `src`.
void pack_queries(const float* src, int64_t nq, int64_t d, int blk, float* qpack) {
    const int64_t n_blocks = (nq + blk - 1) / blk;
    for (int64_t b = 0; b < n_blocks; ++b)
        for (int64_t l = 0; l < blk && b * blk + l < nq; ++l) {
            const float* row = src + (b * blk + l) * d;
            float* dst = qpack + b * d * blk + l;
            for (int64_t k = 0; k < d; ++k) dst[k * blk] = row[k];
        }
}

// Chunk limits: ~128 KiB of float32 db rows per chunk (stays in L2 while every query
// block is applied), and a bounded per-image scratch for queries of nq_pad lanes.
int64_t chunk_rows_target(int64_t d) {
    return std::max<int64_t>(16, std::min<int64_t>(512, 32768 / d));
}
int64_t chunk_images(int64_t d, int64_t nq_pad) {
    return std::max<int64_t>(4, std::min<int64_t>(chunk_rows_target(d), 65536 / nq_pad));
}

// Appends the chunks of consecutive candidate images of positions [0, m) of `cand`
// (nullptr: identity); returns the most rows in one of them.
int64_t add_chunks(const int64_t* cand, int64_t m, const int64_t* off, int64_t max_imgs,
                   int64_t max_rows_target, std::vector<Chunk>& chunks) {
    int64_t max_rows = 0;
    Chunk cur{0, 0, 0, 0};
    bool open = false;
    for (int64_t p = 0; p < m; ++p) {
        const int64_t img = cand ? cand[p] : p;
        const int64_t r0 = off[img], r1 = off[img + 1];
        const bool extend = open && r0 == cur.row1 && (cur.p1 - cur.p0) < max_imgs &&
                            (r1 - cur.row0) <= max_rows_target && (!cand || img == cand[p - 1] + 1);
        if (extend) {
            cur.p1 = p + 1;
            cur.row1 = r1;
        } else {
            if (open) {
                chunks.push_back(cur);
                max_rows = std::max(max_rows, cur.row1 - cur.row0);
            }
            cur = Chunk{p, p + 1, r0, r1};
            open = true;
        }
    }
    if (open) {
        chunks.push_back(cur);
        max_rows = std::max(max_rows, cur.row1 - cur.row0);
    }
    return max_rows;
}

// Waking a thread team costs more than it saves on small problems, and far more on a busy
// machine: each thread gets at least ~4M multiply-adds.
int team_size(int nt, int64_t items, int64_t madds) {
    const int64_t by_work = std::max<int64_t>(1, madds / (int64_t(1) << 22));
    return (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)nt, items, by_work}));
}

// One work item: chunk `chunk` of problem `problem`.
struct Item {
    int64_t problem, chunk;
};

// Runs every item on `nthreads` threads, each with its own scratch (GIL released by caller).
void run_items(const std::vector<Problem>& problems, const std::vector<Chunk>& chunks,
               const std::vector<Item>& items, int nthreads, bool f16, int64_t d,
               int64_t max_rows, int64_t max_imgs, int64_t nq_pad, int blk) {
    const size_t xsz = f16 ? (size_t)(max_rows * d) : 0;
    const size_t csz = (size_t)(std::max<int64_t>(max_rows, 1) * blk);
    const size_t bsz = (size_t)(max_imgs * nq_pad);
    std::vector<float> scratch((size_t)nthreads * (xsz + csz + 2 * bsz));
    auto process = g_ops->process_chunk;
    const int64_t n_items = (int64_t)items.size();
#pragma omp parallel num_threads(nthreads)
    {
        float* base = scratch.data() + (size_t)omp_get_thread_num() * (xsz + csz + 2 * bsz);
        Work w{base, base + xsz, base + xsz + csz, base + xsz + csz + bsz};
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < n_items; ++i)
            process(problems[items[i].problem], chunks[items[i].chunk], w);
    }
}

Problem base_problem(const Database& D, int64_t d, int agg) {
    Problem P{};
    P.db32 = D.f16 ? nullptr : static_cast<const float*>(D.db.data());
    P.db16 = D.f16 ? static_cast<const uint16_t*>(D.db.data()) : nullptr;
    P.d = d;
    P.offsets = D.off;
    P.aggregate = agg;
    return P;
}

// Returns (dist[nQ, m] float32, query_patch[nQ, m] int32, db_patch[nQ, m] int32): every
// query against the same candidates.
py::tuple distances(const py::object& query_o, const py::object& qoff_o, const py::object& db_o,
                    const py::object& offsets_o, const py::object& candidates_o,
                    const std::string& aggregate, int threads, bool want_pairs) {
    const Queries Q = check_queries(query_o, qoff_o);
    const Database D = check_db(db_o, offsets_o, Q.d);
    const int64_t d = Q.d;
    const int64_t* cand = nullptr;
    int64_t m = D.n_images;
    py::array cand_arr;
    if (!candidates_o.is_none()) {
        cand_arr = as_array(candidates_o, "candidates");
        check_i64_vector(cand_arr, "candidates");
        cand = static_cast<const int64_t*>(cand_arr.data());
        m = cand_arr.shape(0);
        check_candidates(cand, m, D.n_images, "candidates");
    }
    const int agg = check_aggregate(aggregate);
    const int nt = resolve_threads(threads);
    const int blk = g_ops->blk;
    const int64_t n_blocks = (Q.nq_total + blk - 1) / blk;
    const int64_t nq_pad = n_blocks * blk;

    py::array_t<float> dist({Q.nQ, m});
    py::array_t<int32_t> qi, dj;
    if (want_pairs) {
        qi = py::array_t<int32_t>({Q.nQ, m});
        dj = py::array_t<int32_t>({Q.nQ, m});
    }
    Problem P = base_problem(D, d, agg);
    P.cand = cand;
    P.m = m;
    P.query = Q.data;
    P.nq_total = Q.nq_total;
    P.n_blocks = n_blocks;
    P.qoff = Q.qo;
    P.nQ = Q.nQ;
    P.out_dist = dist.mutable_data();
    P.out_qi = want_pairs ? qi.mutable_data() : nullptr;
    P.out_dj = want_pairs ? dj.mutable_data() : nullptr;
    {
        py::gil_scoped_release nogil;
        std::vector<float> qpack((size_t)(n_blocks * d * blk), 0.0f);
        pack_queries(Q.data, Q.nq_total, d, blk, qpack.data());
        P.qpack = qpack.data();
        const int64_t max_imgs = chunk_images(d, nq_pad);
        std::vector<Chunk> chunks;
        chunks.reserve((size_t)(m / 4 + 16));
        const int64_t max_rows = add_chunks(cand, m, D.off, max_imgs, chunk_rows_target(d), chunks);
        int64_t rows = 0;
        std::vector<Item> items(chunks.size());
        for (size_t c = 0; c < chunks.size(); ++c) {
            rows += chunks[c].row1 - chunks[c].row0;
            items[c] = Item{0, (int64_t)c};
        }
        const int nthreads = team_size(nt, (int64_t)chunks.size(), rows * nq_pad * d);
        run_items({P}, chunks, items, nthreads, D.f16, d, max_rows, max_imgs, nq_pad, blk);
    }
    if (want_pairs) return py::make_tuple(dist, qi, dj);
    return py::make_tuple(dist, py::none(), py::none());
}

// Returns (dist[total] float32, query_patch[total] int32, db_patch[total] int32): query q
// against ITS OWN candidates candidates[candidate_offsets[q]:candidate_offsets[q+1]], its
// results at the same positions. One thread team over every (query, chunk) pair, so a
// batch of small pools keeps every thread busy where one call per query would not.
py::tuple distances_each(const py::object& query_o, const py::object& qoff_o,
                         const py::object& db_o, const py::object& offsets_o,
                         const py::object& candidates_o, const py::object& coff_o,
                         const std::string& aggregate, int threads) {
    const Queries Q = check_queries(query_o, qoff_o);
    const Database D = check_db(db_o, offsets_o, Q.d);
    const int64_t d = Q.d;
    py::array cand_arr = as_array(candidates_o, "candidates");
    check_i64_vector(cand_arr, "candidates");
    const int64_t* cand = static_cast<const int64_t*>(cand_arr.data());
    const int64_t total = cand_arr.shape(0);
    check_candidates(cand, total, D.n_images, "candidates");
    py::array coff_arr = as_array(coff_o, "candidate_offsets");
    check_i64_vector(coff_arr, "candidate_offsets");
    require(coff_arr.shape(0) == Q.nQ + 1,
            "candidate_offsets must have one entry more than there are queries (" +
                std::to_string(Q.nQ + 1) + "), got " + std::to_string(coff_arr.shape(0)));
    const int64_t* co = static_cast<const int64_t*>(coff_arr.data());
    require(co[0] == 0, "candidate_offsets[0] must be 0");
    require(co[Q.nQ] == total, "candidate_offsets[-1] must equal len(candidates) (" +
                                   std::to_string(total) + ")");
    for (int64_t q = 0; q < Q.nQ; ++q)
        if (co[q + 1] < co[q]) fail("candidate_offsets must be non-decreasing");
    const int agg = check_aggregate(aggregate);
    const int nt = resolve_threads(threads);
    const int blk = g_ops->blk;

    py::array_t<float> dist(total);
    py::array_t<int32_t> qi(total), dj(total);
    float* out_dist = dist.mutable_data();
    int32_t* out_qi = qi.mutable_data();
    int32_t* out_dj = dj.mutable_data();
    {
        py::gil_scoped_release nogil;
        // Each query is its own one-query problem: its packed blocks, its candidates, its
        // slice of the output; its local query offsets are {0, nq}.
        std::vector<int64_t> block0((size_t)Q.nQ + 1, 0), local((size_t)(2 * Q.nQ), 0);
        int64_t max_nq_pad = 0;
        for (int64_t q = 0; q < Q.nQ; ++q) {
            const int64_t nb = (Q.qo[q + 1] - Q.qo[q] + blk - 1) / blk;
            block0[q + 1] = block0[q] + nb;
            local[2 * q + 1] = Q.qo[q + 1] - Q.qo[q];
            max_nq_pad = std::max(max_nq_pad, nb * blk);
        }
        std::vector<float> qpack((size_t)(block0[Q.nQ] * d * blk), 0.0f);
        const int64_t max_imgs = chunk_images(d, max_nq_pad);
        const int64_t rows_target = chunk_rows_target(d);
        std::vector<Problem> problems((size_t)Q.nQ, base_problem(D, d, agg));
        std::vector<Chunk> chunks;
        std::vector<Item> items;
        chunks.reserve((size_t)(total / 4 + 16));
        items.reserve((size_t)(total / 4 + 16));
        int64_t max_rows = 0, madds = 0;
        for (int64_t q = 0; q < Q.nQ; ++q) {
            Problem& P = problems[q];
            const int64_t nq = Q.qo[q + 1] - Q.qo[q];
            P.query = Q.data + Q.qo[q] * d;
            P.qpack = qpack.data() + block0[q] * d * blk;
            pack_queries(P.query, nq, d, blk, qpack.data() + block0[q] * d * blk);
            P.nq_total = nq;
            P.n_blocks = block0[q + 1] - block0[q];
            P.qoff = local.data() + 2 * q;
            P.nQ = 1;
            P.cand = cand + co[q];
            P.m = co[q + 1] - co[q];
            P.out_dist = out_dist + co[q];
            P.out_qi = out_qi + co[q];
            P.out_dj = out_dj + co[q];
            const size_t first = chunks.size();
            max_rows = std::max(max_rows, add_chunks(P.cand, P.m, D.off, max_imgs, rows_target, chunks));
            for (size_t c = first; c < chunks.size(); ++c) {
                items.push_back(Item{q, (int64_t)c});
                madds += (chunks[c].row1 - chunks[c].row0) * P.n_blocks * blk * d;
            }
        }
        const int nthreads = team_size(nt, (int64_t)items.size(), madds);
        run_items(problems, chunks, items, nthreads, D.f16, d, max_rows, max_imgs, max_nq_pad, blk);
    }
    return py::make_tuple(dist, qi, dj);
}

// Streaming read of a float32 array with `threads` threads; returns the sum.
double stream_read(const py::array& a, int threads) {
    require(a.dtype().kind() == 'f' && a.itemsize() == 4 && is_c_contig(a),
            "stream_read needs a C-contiguous float32 array");
    const int nt = resolve_threads(threads);
    const float* p = static_cast<const float*>(a.data());
    const int64_t n = a.size();
    double total = 0.0;
    auto fn = g_ops->stream_sum;
    {
        py::gil_scoped_release nogil;
        const int64_t step = 1 << 16;  // 256 KiB pieces
        const int64_t pieces = (n + step - 1) / step;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : total)
        for (int64_t i = 0; i < pieces; ++i) {
            const int64_t b = i * step, e = std::min(n, b + step);
            total += fn(p + b, e - b);
        }
    }
    return total;
}

// Measured multiply-add peak (flop/s) of the selected ISA path on `threads` threads.
double fma_peak(int64_t iters, int threads) {
    const int nt = resolve_threads(threads);
    const IsaOps& ops = *g_ops;
    const int lanes = ops.blk / 4;  // NVMAX == 4 in every unit
    double sink = 0.0, secs = 0.0;
    {
        py::gil_scoped_release nogil;
        const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nt) reduction(+ : sink)
        sink += ops.fma_loop(iters, 1e-3f * (float)(omp_get_thread_num() + 1));
        secs = omp_get_wtime() - t0;
    }
    if (sink == 12345.678) secs += 1e-12;  // keep sink alive
    return (double)iters * 12.0 * lanes * 2.0 * nt / secs;
}

}  // namespace
}  // namespace rk

PYBIND11_MODULE(_kernel, m) {
    m.doc() = "Native multi-patch image distance kernel (see retrieval.kernel)";
    rk::select_from_env();
    m.def("distances", &rk::distances, py::arg("query"), py::arg("query_offsets"), py::arg("db"),
          py::arg("offsets"), py::arg("candidates") = py::none(), py::arg("aggregate") = "min",
          py::arg("threads") = 0, py::arg("want_pairs") = true,
          "-> (dist float32[nQ, m], query_patch int32[nQ, m] | None, db_patch int32[nQ, m] | None)");
    m.def("distances_each", &rk::distances_each, py::arg("query"), py::arg("query_offsets"),
          py::arg("db"), py::arg("offsets"), py::arg("candidates"), py::arg("candidate_offsets"),
          py::arg("aggregate") = "min", py::arg("threads") = 0,
          "-> (dist float32[total], query_patch int32[total], db_patch int32[total]): query q "
          "against candidates[candidate_offsets[q]:candidate_offsets[q+1]]");
    m.def("describe", &rk::describe);
    m.def("isa", []() { return std::string(rk::g_ops->name); });
    m.def("set_isa", &rk::set_isa, py::arg("isa"),
          "Force 'avx512' | 'avx2' | 'generic' (must be supported), or 'auto'.");
    m.def("supported_isas", &rk::supported_isas);
    m.def("stream_read", &rk::stream_read, py::arg("a"), py::arg("threads") = 0);
    m.def("fma_peak", &rk::fma_peak, py::arg("iters") = 20000000, py::arg("threads") = 0);
}
