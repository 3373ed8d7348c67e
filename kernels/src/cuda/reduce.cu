// oxccl reduction kernels, compiled at run time with NVRTC (and by
// ci/cuda-ptx.sh for compute_80/compute_90 to check that every kernel builds).
//
// Semantics (those of oxccl_kernels::reference):
// * integers wrap (computed on the unsigned type); avg truncates toward zero;
// * min/max propagate NaN (canonical quiet NaN) and keep dst on a tie;
// * f16/bf16 are computed in float and rounded back to nearest even;
// * avg divides by the count (floats: IEEE division, -prec-div=true; the
//   divisor is the count rounded to the float type, as `n as f32` in Rust).
//
// Kernels: oxccl_reduce_<dtype>_<op>(T* dst, const T* src, size_t n) and
// oxccl_avg_<dtype>(T* dst, size_t n, <divisor>), grid-stride loops. When
// both pointers are 16-byte aligned the body moves 16 bytes per load/store.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef signed char i8;
typedef unsigned char u8;
typedef int i32;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;
typedef float f32;
typedef double f64;
typedef __half f16;
typedef __nv_bfloat16 bf16;

// ---- element operations -------------------------------------------------

template <typename T, typename U> struct IntOps {
    __device__ static T sum(T a, T b) { return (T)(U)((U)a + (U)b); }
    __device__ static T prod(T a, T b) { return (T)(U)((U)a * (U)b); }
    __device__ static T max(T a, T b) { return b > a ? b : a; }
    __device__ static T min(T a, T b) { return b < a ? b : a; }
};

__device__ __forceinline__ float canon_nan_f() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double canon_nan_d() { return __longlong_as_double(0x7ff8000000000000LL); }

struct F32Ops {
    __device__ static f32 sum(f32 a, f32 b) { return __fadd_rn(a, b); }
    __device__ static f32 prod(f32 a, f32 b) { return __fmul_rn(a, b); }
    __device__ static f32 max(f32 a, f32 b) { return (isnan(a) || isnan(b)) ? canon_nan_f() : (b > a ? b : a); }
    __device__ static f32 min(f32 a, f32 b) { return (isnan(a) || isnan(b)) ? canon_nan_f() : (b < a ? b : a); }
};

struct F64Ops {
    __device__ static f64 sum(f64 a, f64 b) { return __dadd_rn(a, b); }
    __device__ static f64 prod(f64 a, f64 b) { return __dmul_rn(a, b); }
    __device__ static f64 max(f64 a, f64 b) { return (isnan(a) || isnan(b)) ? canon_nan_d() : (b > a ? b : a); }
    __device__ static f64 min(f64 a, f64 b) { return (isnan(a) || isnan(b)) ? canon_nan_d() : (b < a ? b : a); }
};

struct F16Ops {
    __device__ static f16 sum(f16 a, f16 b) { return __float2half_rn(F32Ops::sum(__half2float(a), __half2float(b))); }
    __device__ static f16 prod(f16 a, f16 b) { return __float2half_rn(F32Ops::prod(__half2float(a), __half2float(b))); }
    __device__ static f16 max(f16 a, f16 b) { return __float2half_rn(F32Ops::max(__half2float(a), __half2float(b))); }
    __device__ static f16 min(f16 a, f16 b) { return __float2half_rn(F32Ops::min(__half2float(a), __half2float(b))); }
};

struct BF16Ops {
    __device__ static bf16 sum(bf16 a, bf16 b) { return __float2bfloat16_rn(F32Ops::sum(__bfloat162float(a), __bfloat162float(b))); }
    __device__ static bf16 prod(bf16 a, bf16 b) { return __float2bfloat16_rn(F32Ops::prod(__bfloat162float(a), __bfloat162float(b))); }
    __device__ static bf16 max(bf16 a, bf16 b) { return __float2bfloat16_rn(F32Ops::max(__bfloat162float(a), __bfloat162float(b))); }
    __device__ static bf16 min(bf16 a, bf16 b) { return __float2bfloat16_rn(F32Ops::min(__bfloat162float(a), __bfloat162float(b))); }
};

// ---- the loops ----------------------------------------------------------

template <typename T, T (*Op)(T, T)>
__device__ __forceinline__ void reduce_loop(T* __restrict__ dst, const T* __restrict__ src, size_t n) {
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t per_vec = sizeof(uint4) / sizeof(T);
    size_t start = 0;
    if ((((size_t)dst | (size_t)src) & 15) == 0) {
        const size_t nvec = n / per_vec;
        uint4* dv = reinterpret_cast<uint4*>(dst);
        const uint4* sv = reinterpret_cast<const uint4*>(src);
        for (size_t v = tid; v < nvec; v += stride) {
            uint4 a = dv[v];
            const uint4 b = sv[v];
            T* at = reinterpret_cast<T*>(&a);
            const T* bt = reinterpret_cast<const T*>(&b);
#pragma unroll
            for (size_t k = 0; k < per_vec; k++) {
                at[k] = Op(at[k], bt[k]);
            }
            dv[v] = a;
        }
        start = nvec * per_vec;
    }
    for (size_t i = start + tid; i < n; i += stride) {
        dst[i] = Op(dst[i], src[i]);
    }
}

#define OXCCL_REDUCE(NAME, T, OPS)                                                              \
    extern "C" __global__ void oxccl_reduce_##NAME##_sum(T* dst, const T* src, size_t n) {      \
        reduce_loop<T, OPS::sum>(dst, src, n);                                                  \
    }                                                                                           \
    extern "C" __global__ void oxccl_reduce_##NAME##_prod(T* dst, const T* src, size_t n) {     \
        reduce_loop<T, OPS::prod>(dst, src, n);                                                 \
    }                                                                                           \
    extern "C" __global__ void oxccl_reduce_##NAME##_max(T* dst, const T* src, size_t n) {      \
        reduce_loop<T, OPS::max>(dst, src, n);                                                  \
    }                                                                                           \
    extern "C" __global__ void oxccl_reduce_##NAME##_min(T* dst, const T* src, size_t n) {      \
        reduce_loop<T, OPS::min>(dst, src, n);                                                  \
    }

typedef IntOps<i8, u8> I8Ops;
typedef IntOps<u8, u8> U8Ops;
typedef IntOps<i32, u32> I32Ops;
typedef IntOps<u32, u32> U32Ops;
typedef IntOps<i64, u64> I64Ops;
typedef IntOps<u64, u64> U64Ops;

OXCCL_REDUCE(i8, i8, I8Ops)
OXCCL_REDUCE(u8, u8, U8Ops)
OXCCL_REDUCE(i32, i32, I32Ops)
OXCCL_REDUCE(u32, u32, U32Ops)
OXCCL_REDUCE(i64, i64, I64Ops)
OXCCL_REDUCE(u64, u64, U64Ops)
OXCCL_REDUCE(f32, f32, F32Ops)
OXCCL_REDUCE(f64, f64, F64Ops)
OXCCL_REDUCE(f16, f16, F16Ops)
OXCCL_REDUCE(bf16, bf16, BF16Ops)

// ---- avg ------------------------------------------------------------------

#define OXCCL_GRID_LOOP(BODY)                                                  \
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;         \
    const size_t stride = (size_t)gridDim.x * blockDim.x;                     \
    for (size_t i = tid; i < n; i += stride) {                                \
        BODY;                                                                 \
    }

// Integers: d is the count, or 0 when it does not fit the type (the quotient is then 0).
#define OXCCL_AVG_INT(NAME, T)                                                   \
    extern "C" __global__ void oxccl_avg_##NAME(T* dst, size_t n, u64 d) {       \
        OXCCL_GRID_LOOP(dst[i] = d == 0 ? (T)0 : (T)(dst[i] / (T)d))             \
    }

OXCCL_AVG_INT(i8, i8)
OXCCL_AVG_INT(u8, u8)
OXCCL_AVG_INT(i32, i32)
OXCCL_AVG_INT(u32, u32)
OXCCL_AVG_INT(i64, i64)
OXCCL_AVG_INT(u64, u64)

extern "C" __global__ void oxccl_avg_f32(f32* dst, size_t n, f32 d) {
    OXCCL_GRID_LOOP(dst[i] = __fdiv_rn(dst[i], d))
}
extern "C" __global__ void oxccl_avg_f64(f64* dst, size_t n, f64 d) {
    OXCCL_GRID_LOOP(dst[i] = __ddiv_rn(dst[i], d))
}
extern "C" __global__ void oxccl_avg_f16(f16* dst, size_t n, f32 d) {
    OXCCL_GRID_LOOP(dst[i] = __float2half_rn(__fdiv_rn(__half2float(dst[i]), d)))
}
extern "C" __global__ void oxccl_avg_bf16(bf16* dst, size_t n, f32 d) {
    OXCCL_GRID_LOOP(dst[i] = __float2bfloat16_rn(__fdiv_rn(__bfloat162float(dst[i]), d)))
}
