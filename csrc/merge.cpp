// fused merge: out[p] = c0 * theta[p] + sum_g sum_r coef_g[r] * rows_g[idx_g[r]][p]
// (fastagg/ops/merge.py). Blocks of parameters, OpenMP over blocks; each block's accumulators stay
// in L1 while every row is added into them.
#include "fastagg_cpu.h"

namespace fastagg {

static constexpr int64_t kBlock = 4096;  // 16 KB of fp32 accumulators: stays in L1

template <typename F>
static inline void axpy(float* __restrict acc, const uint16_t* __restrict x, float c, int64_t n, F conv) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += c * conv(x[i]);
}

void fused_merge(const float* theta, float* out, int64_t P, double c0, const std::vector<Group>& groups) {
    const float fc0 = float(c0);
    const int64_t nblocks = (P + kBlock - 1) / kBlock;
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

}  // namespace fastagg
