// Helpers shared by every oxccl reduction shader. Everything works on u32
// bit patterns: the float helpers never let the GPU's own conversions,
// division or comparisons (whose NaN, rounding and denormal behaviour WGSL
// leaves open) decide a result.

struct Params {
    // Byte offset of element 0 in the dst binding.
    dst_off: u32,
    // Byte offset of element 0 in the src binding (unused by unary kernels).
    src_off: u32,
    // Number of elements.
    n: u32,
    // Number of invocations that do work (dst words, or elements for 8-byte types).
    work: u32,
    // Kernel argument: the avg divisor (0 = "the quotient is 0"), f32 bits for floats.
    arg: u32,
    // Invocations per row of the 2-D dispatch grid.
    row: u32,
    pad0: u32,
    pad1: u32,
}

const CANON_NAN: u32 = 0x7fc00000u;

fn is_nan32(x: u32) -> bool {
    return (x & 0x7fffffffu) > 0x7f800000u;
}

// A key whose unsigned order is the order of the (non-NaN) floats, with
// -0 and +0 equal.
fn order_key(x: u32) -> u32 {
    if ((x & 0x7fffffffu) == 0u) {
        return 0x80000000u;
    }
    if ((x & 0x80000000u) != 0u) {
        return ~x;
    }
    return x | 0x80000000u;
}

// NaN-propagating max and min; on a tie (including -0 vs +0) the first
// operand wins, as in the reference reducer.
fn max_f32(a: u32, b: u32) -> u32 {
    if (is_nan32(a) || is_nan32(b)) {
        return CANON_NAN;
    }
    return select(a, b, order_key(b) > order_key(a));
}

fn min_f32(a: u32, b: u32) -> u32 {
    if (is_nan32(a) || is_nan32(b)) {
        return CANON_NAN;
    }
    return select(a, b, order_key(b) < order_key(a));
}

fn add_f32(a: u32, b: u32) -> u32 {
    return bitcast<u32>(bitcast<f32>(a) + bitcast<f32>(b));
}

fn mul_f32(a: u32, b: u32) -> u32 {
    return bitcast<u32>(bitcast<f32>(a) * bitcast<f32>(b));
}

// x / d correctly rounded (nearest even), by integer long division.
// d is a positive, finite, normal f32 >= 2 (a contribution count).
fn div_f32(x: u32, d: u32) -> u32 {
    let sign = x & 0x80000000u;
    let ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) {
        return x | 0x00400000u;
    }
    if (ax == 0x7f800000u || ax == 0u) {
        return x;
    }
    var ex = i32(ax >> 23u);
    var mx = ax & 0x7fffffu;
    if (ex == 0) {
        let k = firstLeadingBit(mx);
        mx = mx << (23u - k);
        ex = 1 - i32(23u - k);
    } else {
        mx = mx | 0x800000u;
    }
    let ed = i32(d >> 23u);
    let md = (d & 0x7fffffu) | 0x800000u;
    var e = ex - ed + 127;
    var num = mx;
    if (num < md) {
        num = num << 1u;
        e = e - 1;
    }
    // q = floor(num / md * 2^25), in [2^25, 2^26); sticky: remainder != 0.
    var q = 0u;
    var r = num;
    for (var i = 0u; i < 26u; i = i + 1u) {
        q = q << 1u;
        if (r >= md) {
            r = r - md;
            q = q | 1u;
        }
        r = r << 1u;
    }
    let sticky = r != 0u;
    var shift = 2u;
    var subnormal = false;
    if (e <= 0) {
        if (1 - e > 24) {
            return sign;
        }
        shift = 2u + u32(1 - e);
        subnormal = true;
    }
    let kept = q >> shift;
    let rem = q & ((1u << shift) - 1u);
    let halfway = 1u << (shift - 1u);
    var m = kept;
    if (rem > halfway || (rem == halfway && (sticky || (kept & 1u) == 1u))) {
        m = m + 1u;
    }
    if (subnormal) {
        return sign | m;
    }
    return sign | ((u32(e - 1) << 23u) + m);
}

// f16 bits (low 16) to f32 bits, exact; NaN stays NaN (quiet).
fn f16_to_f32(h: u32) -> u32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0x1fu) {
        if (m == 0u) {
            return s | 0x7f800000u;
        }
        return s | 0x7fc00000u | (m << 13u);
    }
    if (e == 0u) {
        if (m == 0u) {
            return s;
        }
        let k = firstLeadingBit(m);
        return s | ((k + 103u) << 23u) | ((m << (23u - k)) & 0x7fffffu);
    }
    return s | ((e + 112u) << 23u) | (m << 13u);
}

// f32 bits to f16 bits, rounding to nearest even; NaN stays NaN (quiet).
fn f32_to_f16(x: u32) -> u32 {
    let sign = (x & 0x80000000u) >> 16u;
    let exp = x & 0x7f800000u;
    let man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        if (man == 0u) {
            return sign | 0x7c00u;
        }
        return sign | 0x7e00u | (man >> 13u);
    }
    let half_exp = i32(exp >> 23u) - 112;
    if (half_exp >= 0x1f) {
        return sign | 0x7c00u;
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return sign;
        }
        let mm = man | 0x00800000u;
        var half_man = mm >> u32(14 - half_exp);
        let round_bit = 1u << u32(13 - half_exp);
        if ((mm & round_bit) != 0u && (mm & (3u * round_bit - 1u)) != 0u) {
            half_man = half_man + 1u;
        }
        return sign | half_man;
    }
    let hm = sign | (u32(half_exp) << 10u) | (man >> 13u);
    if ((man & 0x1000u) != 0u && (man & 0x2fffu) != 0u) {
        return hm + 1u;
    }
    return hm;
}

fn bf16_to_f32(h: u32) -> u32 {
    return h << 16u;
}

// f32 bits to bf16 bits, rounding to nearest even; NaN stays NaN (quiet).
fn f32_to_bf16(x: u32) -> u32 {
    if (is_nan32(x)) {
        return (x >> 16u) | 0x0040u;
    }
    if ((x & 0x8000u) != 0u && (x & 0x17fffu) != 0u) {
        return (x >> 16u) + 1u;
    }
    return x >> 16u;
}

fn sext8(x: u32) -> i32 {
    return bitcast<i32>(x << 24u) >> 24u;
}

// 64-bit integers as (lo, hi) word pairs.
fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn mulhi32(a: u32, b: u32) -> u32 {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    return p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
}

fn mul64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(a.x * b.x, mulhi32(a.x, b.x) + a.x * b.y + a.y * b.x);
}

fn lt_u64(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.y < b.y || (a.y == b.y && a.x < b.x);
}

fn lt_i64(a: vec2<u32>, b: vec2<u32>) -> bool {
    let ah = bitcast<i32>(a.y);
    let bh = bitcast<i32>(b.y);
    return ah < bh || (ah == bh && a.x < b.x);
}

fn neg64(a: vec2<u32>) -> vec2<u32> {
    return add64(vec2<u32>(~a.x, ~a.y), vec2<u32>(1u, 0u));
}

// a / d for unsigned 64-bit a and 32-bit d > 0, by long division.
fn divu64(a: vec2<u32>, d: u32) -> vec2<u32> {
    var q = vec2<u32>(0u, 0u);
    var r = 0u;
    for (var i = 0u; i < 64u; i = i + 1u) {
        var bit: u32;
        if (i < 32u) {
            bit = (a.y >> (31u - i)) & 1u;
        } else {
            bit = (a.x >> (63u - i)) & 1u;
        }
        let top = r >> 31u;
        r = (r << 1u) | bit;
        var qb = 0u;
        if (top == 1u || r >= d) {
            r = r - d;
            qb = 1u;
        }
        q = vec2<u32>((q.x << 1u) | qb, (q.y << 1u) | (q.x >> 31u));
    }
    return q;
}

fn divi64(a: vec2<u32>, d: u32) -> vec2<u32> {
    if (bitcast<i32>(a.y) < 0) {
        return neg64(divu64(neg64(a), d));
    }
    return divu64(a, d);
}
