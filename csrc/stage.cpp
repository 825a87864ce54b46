// Staging a host update into its buffer row (fastagg/ops/stage.py): dst[i] = src[i] converted to
// dst's dtype; returns sum_i dst[i]^2 (of the stored values).
//
// One read of the update and one write of the row, the squares summed on the way (a copy followed
// by a norm reads the row twice, and a 16-bit row has no fast norm in torch on a CPU). Squares are
// summed in double (no fp32 value's square overflows it), so the result is non-finite exactly
// when a stored value is NaN or Inf. Blocks of 4096 elements, OpenMP over blocks if threads > 1.
#include "fastagg_cpu.h"

namespace fastagg {

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

}  // namespace fastagg
