// fastagg CPU kernels: fused correct-and-merge, fused KD loss + gradient, and the staging of a
// host update into its buffer row (dtype conversion and sum of squares in one pass).
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

enum DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };  // F64: stage_row only

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t nan = -uint32_t((u & 0x7fffffffu) > 0x7f800000u);  // all ones for a NaN: a select, no branch
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    return uint16_t((quiet & nan) | (rounded & ~nan));
}

// fp16 on the bits, both ways (a _Float16 conversion can be a library call per element, which
// keeps a loop from vectorising, and needs compiler support)
static inline uint32_t pick(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }
static inline uint32_t all_if(bool c) { return -uint32_t(c); }

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    const uint32_t normal = pick(all_if(e == 31), 0x7f800000u | (m << 13), ((e + 112u) << 23) | (m << 13));
    const float sub = float(m) * 5.9604644775390625e-8f;  // a subnormal: m * 2^-24, exact
    uint32_t sub_bits, out;
    std::memcpy(&sub_bits, &sub, 4);
    out = sign | pick(all_if(e == 0), sub_bits, normal);
    float f;
    std::memcpy(&f, &out, 4);
    return f;
}

// rounded to nearest even; NaN -> quiet NaN, 65520 and up -> Inf. Below 2^-14 (an fp16
// subnormal) adding 0.5 in fp32 rounds the value to a multiple of 2^-24 (the ulp of 0.5) to nearest
// even, which leaves the fp16 bits in the sum's low mantissa: no variable shifts, which ran ~40x
// slower vectorised here. Needs fp32 arithmetic as written (no -ffast-math).
static inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    const uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - (112u << 23)) >> 13;
    float mag, t;
    std::memcpy(&mag, &a, 4);
    t = mag + 0.5f;
    uint32_t t_bits;
    std::memcpy(&t_bits, &t, 4);
    const uint32_t sub = t_bits - 0x3f000000u;
    uint32_t h = pick(all_if(a >= 0x38800000u), normal, sub);
    h = pick(all_if(a >= 0x477ff000u), 0x7c00u, h);
    h = pick(all_if(a > 0x7f800000u), 0x7e00u, h);
    return uint16_t(sign | h);
}

static void check_dtype(int dt) {
    if (dt != F32 && dt != BF16 && dt != F16) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
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
                    T* g, int64_t gs, float* row_loss, float temp, float grad_scale, const std::vector<double>& plogp,
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
            for (int64_t c = 0; c < C; ++c) m = std::max(m, load(zr[c]) / temp);
            // The loss is the small difference of sum_c p log p and sum_c p log q (~log C each): the
            // p-weighted sums run in double, log q as (z/T - m) - log s, and z / T divides as the
            // references do (z times a rounded 1/T scales every logit by that rounding). With one
            // fp32 shift m + log s and fp32 sums, the loss was 10-200x further from float64 than
            // torch's (1.7e-6 and 5.5e-5 against 2e-7 and 3e-7, relative, at C = 1k and 32k)
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t c = 0; c < C; ++c) {
                e[c] = fast_exp(load(zr[c]) / temp - m);
                s += e[c];
            }
            const float inv_s = float(1.0 / s);
            double cross = 0.0, mass = 0.0;  // sum_c p (z/T - m), sum_c p
#pragma omp simd reduction(+ : cross, mass)
            for (int64_t c = 0; c < C; ++c) {
                const float pc = pr[c];
                cross += double(pc * (load(zr[c]) / temp - m));
                mass += double(pc);
                gr[c] = store((e[c] * inv_s - pc) * grad_scale);
            }
            row_loss[r] = float(plogp[tr] - (cross - mass * std::log(double(s))));
        }
    }
}

void kd_loss_grad(uintptr_t z_ptr, int zdt, int64_t M, int64_t C, int64_t zs, uintptr_t p_ptr, int64_t n_teacher,
                  int64_t ps, uintptr_t g_ptr, int64_t gs, uintptr_t loss_ptr, double temperature, double grad_scale) {
    check_dtype(zdt);
    const float* p = reinterpret_cast<const float*>(p_ptr);
    float* row_loss = reinterpret_cast<float*>(loss_ptr);
    py::gil_scoped_release release;
    std::vector<double> plogp(n_teacher);  // sum_c p log p per teacher row, shared by all K clients
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n_teacher; ++t) {
        double acc = 0.0;
        for (int64_t c = 0; c < C; ++c) {
            const float pc = p[t * ps + c];
            if (pc > 0.f) acc += double(pc) * std::log(double(pc));
        }
        plogp[t] = acc;
    }
    const float ft = float(temperature), fs = float(grad_scale);
    if (zdt == F32) {
        kd_rows(reinterpret_cast<const float*>(z_ptr), M, C, zs, p, n_teacher, ps, reinterpret_cast<float*>(g_ptr), gs,
                row_loss, ft, fs, plogp, [](float x) { return x; }, [](float x) { return x; });
    } else if (zdt == BF16) {
        kd_rows(reinterpret_cast<const uint16_t*>(z_ptr), M, C, zs, p, n_teacher, ps, reinterpret_cast<uint16_t*>(g_ptr),
                gs, row_loss, ft, fs, plogp, [](uint16_t v) { return bf16_to_f32(v); },
                [](float x) { return f32_to_bf16(x); });  // lambdas: a function pointer is not inlined
    } else {
        kd_rows(reinterpret_cast<const uint16_t*>(z_ptr), M, C, zs, p, n_teacher, ps, reinterpret_cast<uint16_t*>(g_ptr),
                gs, row_loss, ft, fs, plogp, [](uint16_t v) { return f16_to_f32(v); },
                [](float x) { return f32_to_f16(x); });
    }
}

// ---------------------------------------------------------------------------------------------
// the head route's two sweeps over a chunk of the vocabulary (fastagg/ops/vocab_head.py): a chunk's
// logits z [K, R, NC] as the products left them (fp32 / bf16 / fp16, any student and row strides,
// columns contiguous), the bias's chunk b [K, NC] in fp32 (always given: zeros of student stride
// 0 for a layer without one, so that no loop branches on it), the teacher's p [R, NC]
// ---------------------------------------------------------------------------------------------
template <typename T, typename Load>
static void head_stats_rows(const T* z, int64_t K, int64_t R, int64_t NC, int64_t zs_k, int64_t zs_r, const float* p,
                            int64_t ps, const float* b, int64_t bs_k, float* m_acc, float* s_acc, double* pz_acc,
                            float temp, Load load) {
#pragma omp parallel
    {
        std::vector<float> x(NC);
#pragma omp for schedule(static)
        for (int64_t kr = 0; kr < K * R; ++kr) {
            const int64_t k = kr / R, r = kr % R;
            const T* zr = z + k * zs_k + r * zs_r;
            const float* pr = p + r * ps;
            const float* bk = b + k * bs_k;
            float m = -std::numeric_limits<float>::infinity();
            double pz = 0.0;
#pragma omp simd reduction(max : m) reduction(+ : pz)
            for (int64_t c = 0; c < NC; ++c) {
                x[c] = (load(zr[c]) + bk[c]) / temp;  // divided as the references do
                m = std::max(m, x[c]);
                pz += double(pr[c] * x[c]);
            }
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t c = 0; c < NC; ++c) s += fast_exp(x[c] - m);
            // fold into the running row: max and sum of exp over the chunks so far
            const float m_old = m_acc[kr], m_tot = std::max(m_old, m);
            s_acc[kr] = (m_old == -std::numeric_limits<float>::infinity() ? 0.f : s_acc[kr] * std::exp(m_old - m_tot))
                        + s * std::exp(m - m_tot);
            m_acc[kr] = m_tot;
            pz_acc[kr] += pz;
        }
    }
}

void head_stats(uintptr_t z_ptr, int zdt, int64_t K, int64_t R, int64_t NC, int64_t zs_k, int64_t zs_r, uintptr_t p_ptr,
                int64_t ps, uintptr_t b_ptr, int64_t bs_k, uintptr_t m_ptr, uintptr_t s_ptr, uintptr_t pz_ptr,
                double temperature) {
    check_dtype(zdt);
    const float* p = reinterpret_cast<const float*>(p_ptr);
    const float* b = reinterpret_cast<const float*>(b_ptr);
    float* m = reinterpret_cast<float*>(m_ptr);
    float* s = reinterpret_cast<float*>(s_ptr);
    double* pz = reinterpret_cast<double*>(pz_ptr);
    const float ft = float(temperature);
    py::gil_scoped_release release;
    if (zdt == F32) {
        head_stats_rows(reinterpret_cast<const float*>(z_ptr), K, R, NC, zs_k, zs_r, p, ps, b, bs_k, m, s, pz, ft,
                        [](float v) { return v; });
    } else if (zdt == BF16) {
        head_stats_rows(reinterpret_cast<const uint16_t*>(z_ptr), K, R, NC, zs_k, zs_r, p, ps, b, bs_k, m, s, pz, ft,
                        [](uint16_t v) { return bf16_to_f32(v); });
    } else {
        head_stats_rows(reinterpret_cast<const uint16_t*>(z_ptr), K, R, NC, zs_k, zs_r, p, ps, b, bs_k, m, s, pz, ft,
                        [](uint16_t v) { return f16_to_f32(v); });
    }
}

// g = scale * (exp((z + b) / T - lse) - p), written over z in z's dtype; db [K, NC] (row stride
// dbs_k, or none) <- the sum of g over the rows, of the values before rounding: per-thread partial
// sums, added under a lock at the end
template <typename T, typename Load, typename Store>
static void head_grad_rows(T* z, int64_t K, int64_t R, int64_t NC, int64_t zs_k, int64_t zs_r, const float* p, int64_t ps,
                           const float* b, int64_t bs_k, const float* lse, float scale, float* db, int64_t dbs_k,
                           float temp, Load load, Store store) {
    if (db) {
        for (int64_t k = 0; k < K; ++k) std::fill(db + k * dbs_k, db + k * dbs_k + NC, 0.f);
    }
#pragma omp parallel
    {
        std::vector<float> part(db ? K * NC : 0, 0.f);
#pragma omp for schedule(static)
        for (int64_t kr = 0; kr < K * R; ++kr) {
            const int64_t k = kr / R, r = kr % R;
            T* zr = z + k * zs_k + r * zs_r;
            const float* pr = p + r * ps;
            const float* bk = b + k * bs_k;
            const float l = lse[kr];
            if (db) {
                float* acc = part.data() + k * NC;
#pragma omp simd
                for (int64_t c = 0; c < NC; ++c) {
                    const float g = (fast_exp((load(zr[c]) + bk[c]) / temp - l) - pr[c]) * scale;
                    acc[c] += g;
                    zr[c] = store(g);
                }
            } else {
#pragma omp simd
                for (int64_t c = 0; c < NC; ++c) zr[c] = store((fast_exp((load(zr[c]) + bk[c]) / temp - l) - pr[c]) * scale);
            }
        }
        if (db) {
#pragma omp critical
            for (int64_t k = 0; k < K; ++k)
                for (int64_t c = 0; c < NC; ++c) db[k * dbs_k + c] += part[k * NC + c];
        }
    }
}

void head_grad(uintptr_t z_ptr, int zdt, int64_t K, int64_t R, int64_t NC, int64_t zs_k, int64_t zs_r, uintptr_t p_ptr,
               int64_t ps, uintptr_t b_ptr, int64_t bs_k, uintptr_t lse_ptr, double scale, uintptr_t db_ptr,
               int64_t dbs_k, double temperature) {
    check_dtype(zdt);
    const float* p = reinterpret_cast<const float*>(p_ptr);
    const float* b = reinterpret_cast<const float*>(b_ptr);
    const float* lse = reinterpret_cast<const float*>(lse_ptr);
    float* db = reinterpret_cast<float*>(db_ptr);
    const float ft = float(temperature), fs = float(scale);
    py::gil_scoped_release release;
    if (zdt == F32) {
        head_grad_rows(reinterpret_cast<float*>(z_ptr), K, R, NC, zs_k, zs_r, p, ps, b, bs_k, lse, fs, db, dbs_k, ft,
                       [](float v) { return v; }, [](float v) { return v; });
    } else if (zdt == BF16) {
        head_grad_rows(reinterpret_cast<uint16_t*>(z_ptr), K, R, NC, zs_k, zs_r, p, ps, b, bs_k, lse, fs, db, dbs_k, ft,
                       [](uint16_t v) { return bf16_to_f32(v); }, [](float v) { return f32_to_bf16(v); });
    } else {
        head_grad_rows(reinterpret_cast<uint16_t*>(z_ptr), K, R, NC, zs_k, zs_r, p, ps, b, bs_k, lse, fs, db, dbs_k, ft,
                       [](uint16_t v) { return f16_to_f32(v); }, [](float v) { return f32_to_f16(v); });
    }
}

// ---------------------------------------------------------------------------------------------
// staging: dst[i] = src[i] converted to dst's dtype; returns sum_i dst[i]^2 (of the stored values)
// ---------------------------------------------------------------------------------------------
// One read of the update and one write of the row, the squares summed on the way (a copy followed
// by a norm reads the row twice, and a 16-bit row has no fast norm in torch on a CPU). Squares are
// summed in double (no fp32 value's square overflows it), so the result is non-finite exactly
// when a stored value is NaN or Inf. Blocks of 4096 elements, OpenMP over blocks if threads > 1.
static constexpr int64_t kStageBlock = 4096;

// conversions as function objects (a function pointer would not be inlined into the loops)
struct Bf16 {
    static constexpr auto widen = [](uint16_t v) { return bf16_to_f32(v); };
    static constexpr auto narrow = [](float x) { return f32_to_bf16(x); };
};
struct F16 {
    static constexpr auto widen = [](uint16_t v) { return f16_to_f32(v); };
    static constexpr auto narrow = [](float x) { return f32_to_f16(x); };
};

template <typename S, typename D, typename Conv, typename Widen>
static double stage_impl(const S* __restrict src, D* __restrict dst, int64_t n, int threads, Conv conv, Widen widen) {
    const int64_t nblocks = (n + kStageBlock - 1) / kStageBlock;
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(threads) if (threads > 1 && nblocks > 16)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t i0 = b * kStageBlock, m = std::min(kStageBlock, n - i0);
        const S* s = src + i0;
        D* d = dst + i0;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < m; ++i) {
            const D v = conv(s[i]);
            d[i] = v;
            const double w = widen(v);
            acc += w * w;
        }
        total += acc;
    }
    return total;
}

// a double row: squares summed in double (its values need not fit fp32)
template <typename S, typename Conv>
static double stage_f64(const S* __restrict src, double* __restrict dst, int64_t n, int threads, Conv conv) {
    double total = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : total) num_threads(threads) if (threads > 1 && n > 16 * kStageBlock)
    for (int64_t i = 0; i < n; ++i) {
        const double v = conv(src[i]);
        dst[i] = v;
        total += v * v;
    }
    return total;
}

template <typename S, typename Load>
static double stage_to16(const S* src, uint16_t* dst, int64_t n, int threads, int ddt, Load load) {
    if (ddt == BF16)
        return stage_impl(src, dst, n, threads, [load](S x) { return Bf16::narrow(load(x)); }, Bf16::widen);
    return stage_impl(src, dst, n, threads, [load](S x) { return F16::narrow(load(x)); }, F16::widen);
}

double stage_row(uintptr_t src_ptr, int sdt, uintptr_t dst_ptr, int ddt, int64_t n, int threads) {
    if (sdt != F64) check_dtype(sdt);
    if (ddt != F64) check_dtype(ddt);
    if (n < 0) throw std::invalid_argument("n must be >= 0");
    threads = std::max(threads, 1);
    py::gil_scoped_release release;
    const double* s64 = reinterpret_cast<const double*>(src_ptr);
    const float* s32 = reinterpret_cast<const float*>(src_ptr);
    const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src_ptr);
    const auto id32 = [](float x) { return x; };
    const auto from64 = [](double x) { return float(x); };  // a double is rounded once, to fp32, first: as torch does
    if (ddt == F64) {
        double* d = reinterpret_cast<double*>(dst_ptr);
        if (sdt == F64) return stage_f64(s64, d, n, threads, [](double x) { return x; });
        if (sdt == F32) return stage_f64(s32, d, n, threads, [](float x) { return double(x); });
        if (sdt == BF16) return stage_f64(s16, d, n, threads, [](uint16_t x) { return double(Bf16::widen(x)); });
        return stage_f64(s16, d, n, threads, [](uint16_t x) { return double(F16::widen(x)); });
    }
    if (ddt == F32) {
        float* d = reinterpret_cast<float*>(dst_ptr);
        if (sdt == F64) return stage_impl(s64, d, n, threads, from64, id32);
        if (sdt == F32) return stage_impl(s32, d, n, threads, id32, id32);
        if (sdt == BF16) return stage_impl(s16, d, n, threads, Bf16::widen, id32);
        return stage_impl(s16, d, n, threads, F16::widen, id32);
    }
    uint16_t* d = reinterpret_cast<uint16_t*>(dst_ptr);  // rounded to nearest even
    if (sdt == ddt)
        return ddt == BF16 ? stage_impl(s16, d, n, threads, [](uint16_t x) { return x; }, Bf16::widen)
                           : stage_impl(s16, d, n, threads, [](uint16_t x) { return x; }, F16::widen);
    if (sdt == F64) return stage_to16(s64, d, n, threads, ddt, from64);
    if (sdt == F32) return stage_to16(s32, d, n, threads, ddt, id32);
    if (sdt == BF16) return stage_to16(s16, d, n, threads, ddt, Bf16::widen);
    return stage_to16(s16, d, n, threads, ddt, F16::widen);
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
    m.def("stage_row", &stage_row, "dst = src converted to dst's dtype; returns the sum of squares of dst (double)");
    m.def("head_stats", &head_stats, "fold a chunk of logits into the rows' running max, sum of exp and sum p z / T");
    m.def("head_grad", &head_grad, "a chunk's logit gradient over its logits, and its column sums into db");
    m.def("num_threads", &num_threads);
    // the calling convention's version (fastagg/cpu_cpp.py checks it): 2 since kd_loss_grad takes
    // the temperature instead of its inverse (a stale build would compute with the wrong scale), 3
    // since head_stats and head_grad (a stale build lacks them)
    m.attr("abi") = 3;
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
