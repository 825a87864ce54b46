// fastagg CPU kernels: fused correct-and-merge and fused KD loss + gradient.
//
// Built without torch headers: Python passes raw data pointers (tensor.data_ptr()), sizes and
// strides, so one build serves any torch version. Loops are OpenMP-parallel across rows or
// parameter blocks, inner loops are written to vectorise, and the GIL is released while they run.
// Contracts: fastagg/ops/merge.py and fastagg/ops/kd_loss.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

#ifdef __FLT16_MAX__
static inline float f16_to_f32(uint16_t h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return float(x);
}
static inline uint16_t f32_to_f16(float f) {
    _Float16 x = _Float16(f);
    uint16_t h;
    std::memcpy(&h, &x, 2);
    return h;
}
static constexpr bool kHasF16 = true;
#else
static inline float f16_to_f32(uint16_t) { return 0.f; }
static inline uint16_t f32_to_f16(float) { return 0; }
static constexpr bool kHasF16 = false;
#endif

static void check_dtype(int dt) {
    if (dt != F32 && dt != BF16 && dt != F16) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
    if (dt == F16 && !kHasF16) throw std::invalid_argument("this build has no fp16 support (compiler lacks _Float16)");
}

// ---------------------------------------------------------------------------------------------
// fused merge: out[p] = c0 * theta[p] + sum_g sum_r coef_g[r] * rows_g[idx_g[r]][p]
// ---------------------------------------------------------------------------------------------
struct Group {
    const char* base;
    int dtype;
    int64_t stride;  // elements between rows
    std::vector<float> coefs;
    std::vector<int64_t> rows;
};

static constexpr int64_t kBlock = 4096;  // 16 KB of fp32 accumulators: stays in L1

template <typename F>
static inline void axpy(float* __restrict acc, const uint16_t* __restrict x, float c, int64_t n, F conv) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += c * conv(x[i]);
}

void fused_merge(uintptr_t theta_ptr, uintptr_t out_ptr, int64_t P, double c0, const std::vector<py::tuple>& groups_in) {
    std::vector<Group> groups;
    for (const auto& t : groups_in) {
        Group g;
        g.base = reinterpret_cast<const char*>(t[0].cast<uintptr_t>());
        g.dtype = t[1].cast<int>();
        check_dtype(g.dtype);
        g.stride = t[2].cast<int64_t>();
        g.coefs = t[3].cast<std::vector<float>>();
        g.rows = t[4].cast<std::vector<int64_t>>();
        if (g.coefs.size() != g.rows.size()) throw std::invalid_argument("coefs and rows differ in length");
        groups.push_back(std::move(g));
    }
    const float* theta = reinterpret_cast<const float*>(theta_ptr);
    float* out = reinterpret_cast<float*>(out_ptr);
    const float fc0 = float(c0);
    const int64_t nblocks = (P + kBlock - 1) / kBlock;
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
        alignas(64) float acc[kBlock];
        const int64_t i0 = b * kBlock;
        const int64_t n = std::min(kBlock, P - i0);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) acc[i] = fc0 * theta[i0 + i];
        for (const Group& g : groups) {
            const int64_t esize = g.dtype == F32 ? 4 : 2;
            const size_t R = g.rows.size();
            auto row_ptr = [&](size_t r) { return g.base + (g.rows[r] * g.stride + i0) * esize; };  // 64-bit offsets
            size_t r = 0;
            // four rows per pass over the accumulators: four independent streams in flight and a
            // quarter of the accumulator traffic
            for (; r + 4 <= R; r += 4) {
                const float c0_ = g.coefs[r], c1_ = g.coefs[r + 1], c2_ = g.coefs[r + 2], c3_ = g.coefs[r + 3];
                if (g.dtype == F32) {
                    const float *x0 = reinterpret_cast<const float*>(row_ptr(r)), *x1 = reinterpret_cast<const float*>(row_ptr(r + 1)),
                                *x2 = reinterpret_cast<const float*>(row_ptr(r + 2)), *x3 = reinterpret_cast<const float*>(row_ptr(r + 3));
#pragma omp simd
                    for (int64_t i = 0; i < n; ++i) acc[i] += c0_ * x0[i] + c1_ * x1[i] + c2_ * x2[i] + c3_ * x3[i];
                } else {
                    const uint16_t *x0 = reinterpret_cast<const uint16_t*>(row_ptr(r)), *x1 = reinterpret_cast<const uint16_t*>(row_ptr(r + 1)),
                                   *x2 = reinterpret_cast<const uint16_t*>(row_ptr(r + 2)), *x3 = reinterpret_cast<const uint16_t*>(row_ptr(r + 3));
                    if (g.dtype == BF16) {
#pragma omp simd
                        for (int64_t i = 0; i < n; ++i)
                            acc[i] += c0_ * bf16_to_f32(x0[i]) + c1_ * bf16_to_f32(x1[i]) + c2_ * bf16_to_f32(x2[i]) + c3_ * bf16_to_f32(x3[i]);
                    } else {
#pragma omp simd
                        for (int64_t i = 0; i < n; ++i)
                            acc[i] += c0_ * f16_to_f32(x0[i]) + c1_ * f16_to_f32(x1[i]) + c2_ * f16_to_f32(x2[i]) + c3_ * f16_to_f32(x3[i]);
                    }
                }
            }
            for (; r < R; ++r) {
                const char* row = row_ptr(r);
                const float c = g.coefs[r];
                if (g.dtype == F32) {
                    const float* x = reinterpret_cast<const float*>(row);
#pragma omp simd
                    for (int64_t i = 0; i < n; ++i) acc[i] += c * x[i];
                } else if (g.dtype == BF16) {
                    axpy(acc, reinterpret_cast<const uint16_t*>(row), c, n, bf16_to_f32);
                } else {
                    axpy(acc, reinterpret_cast<const uint16_t*>(row), c, n, f16_to_f32);
                }
            }
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[i0 + i] = acc[i];
    }
}

// ---------------------------------------------------------------------------------------------
// fused KD loss + gradient, one row of logits at a time
// ---------------------------------------------------------------------------------------------
// exp(x) for x <= 0 (arguments are z - max): 2^(x log2 e) split into 2^i * 2^f, |f| <= 1/2, and a
// degree-7 Taylor polynomial for 2^f (relative error < 1e-8). Plain arithmetic, so it vectorises.
static inline float fast_exp(float x) {
    x = std::max(x, -87.0f);
    const float t = x * 1.44269504088896341f;
    const float fi = std::nearbyint(t);
    const float f = (t - fi) * 0.693147180559945309f;
    float p = 1.f / 5040.f;
    p = p * f + 1.f / 720.f;
    p = p * f + 1.f / 120.f;
    p = p * f + 1.f / 24.f;
    p = p * f + 1.f / 6.f;
    p = p * f + 0.5f;
    p = p * f + 1.f;
    p = p * f + 1.f;
    const int32_t bits = (int32_t(fi) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

template <typename T, typename Load, typename Store>
static void kd_rows(const T* z, int64_t M, int64_t C, int64_t zs, const float* p, int64_t n_teacher, int64_t ps,
                    T* g, int64_t gs, float* row_loss, float inv_T, float grad_scale, const std::vector<float>& plogp,
                    Load load, Store store) {
#pragma omp parallel
    {
        std::vector<float> e(C);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < M; ++r) {
            const T* zr = z + r * zs;
            const int64_t tr = r % n_teacher;
            const float* pr = p + tr * ps;
            T* gr = g + r * gs;
            float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
            for (int64_t c = 0; c < C; ++c) m = std::max(m, load(zr[c]) * inv_T);
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t c = 0; c < C; ++c) {
                e[c] = fast_exp(load(zr[c]) * inv_T - m);
                s += e[c];
            }
            const float inv_s = 1.f / s, shift = m + std::log(s);
            float cross = 0.f;  // sum_c p log q
#pragma omp simd reduction(+ : cross)
            for (int64_t c = 0; c < C; ++c) {
                const float pc = pr[c];
                cross += pc * (load(zr[c]) * inv_T - shift);
                gr[c] = store((e[c] * inv_s - pc) * grad_scale);
            }
            row_loss[r] = plogp[tr] - cross;
        }
    }
}

void kd_loss_grad(uintptr_t z_ptr, int zdt, int64_t M, int64_t C, int64_t zs, uintptr_t p_ptr, int64_t n_teacher,
                  int64_t ps, uintptr_t g_ptr, int64_t gs, uintptr_t loss_ptr, double inv_T, double grad_scale) {
    check_dtype(zdt);
    const float* p = reinterpret_cast<const float*>(p_ptr);
    float* row_loss = reinterpret_cast<float*>(loss_ptr);
    py::gil_scoped_release release;
    std::vector<float> plogp(n_teacher);  // sum_c p log p per teacher row, shared by all K clients
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n_teacher; ++t) {
        double acc = 0.0;
        for (int64_t c = 0; c < C; ++c) {
            const float pc = p[t * ps + c];
            if (pc > 0.f) acc += double(pc) * std::log(double(pc));
        }
        plogp[t] = float(acc);
    }
    const float fi = float(inv_T), fs = float(grad_scale);
    if (zdt == F32) {
        kd_rows(reinterpret_cast<const float*>(z_ptr), M, C, zs, p, n_teacher, ps, reinterpret_cast<float*>(g_ptr), gs,
                row_loss, fi, fs, plogp, [](float x) { return x; }, [](float x) { return x; });
    } else if (zdt == BF16) {
        kd_rows(reinterpret_cast<const uint16_t*>(z_ptr), M, C, zs, p, n_teacher, ps, reinterpret_cast<uint16_t*>(g_ptr),
                gs, row_loss, fi, fs, plogp, bf16_to_f32, f32_to_bf16);
    } else {
        kd_rows(reinterpret_cast<const uint16_t*>(z_ptr), M, C, zs, p, n_teacher, ps, reinterpret_cast<uint16_t*>(g_ptr),
                gs, row_loss, fi, fs, plogp, f16_to_f32, f32_to_f16);
    }
}

int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "fastagg C++ CPU kernels (no torch headers; raw pointers)";
    m.def("fused_merge", &fused_merge, "out = c0*theta + sum coef*row over row groups (ptr, dtype, stride, coefs, rows)");
    m.def("kd_loss_grad", &kd_loss_grad, "row losses and logit gradient of the KD loss");
    m.def("num_threads", &num_threads);
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
    m.attr("fp16") = kHasF16;
}
