// The head route's two sweeps over a chunk of the vocabulary (fastagg/ops/vocab_head.py): a chunk's
// logits z [K, R, NC] as the products left them (fp32 / bf16 / fp16, any student and row strides,
// columns contiguous), the bias's chunk b [K, NC] in fp32 (always given: zeros of student stride
// 0 for a layer without one, so that no loop branches on it), the teacher's p [R, NC]
#include "fastagg_cpu.h"

namespace fastagg {

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

}  // namespace fastagg
