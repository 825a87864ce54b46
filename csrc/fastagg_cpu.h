// fastagg CPU kernels, shared by the ops' files: the dtype codes, the 16-bit conversions on the
// bits, the vectorisable exp, and each op's entry point (bindings.cpp hands them to Python).
//
// Built without torch headers: Python passes raw data pointers (tensor.data_ptr()), sizes and
// strides, so one build serves any torch version. Loops are OpenMP-parallel across rows or
// parameter blocks and inner loops are written to vectorise; the bindings release the GIL while
// they run. One file per fused op (merge.cpp, kd_loss.cpp, vocab_head.cpp, stage.cpp); their
// contracts and references are in fastagg/ops/ under the same names.
#pragma once

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

namespace fastagg {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };  // F64: stage_row only

inline float bf16_to_f32(uint16_t b) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t nan = -uint32_t((u & 0x7fffffffu) > 0x7f800000u);  // all ones for a NaN: a select, no branch
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    return uint16_t((quiet & nan) | (rounded & ~nan));
}

// fp16 on the bits, both ways (a _Float16 conversion can be a library call per element, which
// keeps a loop from vectorising, and needs compiler support)
inline uint32_t pick(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }
inline uint32_t all_if(bool c) { return -uint32_t(c); }

inline float f16_to_f32(uint16_t h) {
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
inline uint16_t f32_to_f16(float f) {
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

inline void check_dtype(int dt) {
    if (dt != F32 && dt != BF16 && dt != F16) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
}

// exp(x) for x <= 0 (arguments are z - max): 2^(x log2 e) split into 2^i * 2^f, |f| <= 1/2, and a
// degree-7 Taylor polynomial for 2^f (relative error < 1e-8). Plain arithmetic, so it vectorises.
inline float fast_exp(float x) {
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

// fused merge (merge.cpp): one group of rows of one dtype, stride elements apart; the rows at
// indices rows[r] weighted by coefs[r]
struct Group {
    const char* base;
    int dtype;
    int64_t stride;
    std::vector<float> coefs;
    std::vector<int64_t> rows;
};

void fused_merge(const float* theta, float* out, int64_t P, double c0, const std::vector<Group>& groups);
void kd_loss_grad(uintptr_t z_ptr, int zdt, int64_t M, int64_t C, int64_t zs, uintptr_t p_ptr, int64_t n_teacher,
                  int64_t ps, uintptr_t g_ptr, int64_t gs, uintptr_t loss_ptr, double temperature, double grad_scale);
void head_stats(uintptr_t z_ptr, int zdt, int64_t K, int64_t R, int64_t NC, int64_t zs_k, int64_t zs_r, uintptr_t p_ptr,
                int64_t ps, uintptr_t b_ptr, int64_t bs_k, uintptr_t m_ptr, uintptr_t s_ptr, uintptr_t pz_ptr,
                double temperature);
void head_grad(uintptr_t z_ptr, int zdt, int64_t K, int64_t R, int64_t NC, int64_t zs_k, int64_t zs_r, uintptr_t p_ptr,
               int64_t ps, uintptr_t b_ptr, int64_t bs_k, uintptr_t lse_ptr, double scale, uintptr_t db_ptr,
               int64_t dbs_k, double temperature);
double stage_row(uintptr_t src_ptr, int sdt, uintptr_t dst_ptr, int ddt, int64_t n, int threads);

}  // namespace fastagg
