/* Helpers shared by the C tests of oxccl: checks that count, element
 * conversion for every oxcclDataType_t (half and bfloat16 as uint16_t bit
 * patterns), and the expected value of every reduction. */
#ifndef OXCCL_TEST_COMMON_H
#define OXCCL_TEST_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "oxccl.h"

/* Not every test uses every helper. */
#if defined(__GNUC__)
#define TEST_HELPER static __attribute__((unused))
#else
#define TEST_HELPER static
#endif

static int g_passed = 0;
static int g_failed = 0;

#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    if (cond) {                                                                \
      g_passed++;                                                              \
    } else {                                                                   \
      g_failed++;                                                              \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);          \
      fprintf(stderr, __VA_ARGS__);                                            \
      fprintf(stderr, "\n");                                                   \
    }                                                                          \
  } while (0)

/* A call that must succeed; prints the thread's last error if not. */
#define OK(call)                                                               \
  do {                                                                         \
    oxcclResult_t ok_r_ = (call);                                              \
    CHECK(ok_r_ == oxcclSuccess, "%s returned %d (%s): %s", #call, (int)ok_r_, \
          oxcclGetErrorString(ok_r_), oxcclGetLastError(NULL));                \
  } while (0)

/* A call that must fail with `code` and leave a non-empty message. */
#define FAILS(code, call)                                                      \
  do {                                                                         \
    oxcclResult_t f_r_ = (call);                                               \
    const char *f_m_ = oxcclGetLastError(NULL);                                \
    CHECK(f_r_ == (code) && f_m_ != NULL && f_m_[0] != '\0',                   \
          "%s returned %d, expected %d; message '%s'", #call, (int)f_r_,       \
          (int)(code), f_m_ ? f_m_ : "(null)");                                \
  } while (0)

TEST_HELPER int finish(const char *name, int rank) {
  printf("%s (rank %d): %d passed, %d failed\n", name, rank, g_passed, g_failed);
  fflush(stdout);
  return g_failed == 0 && g_passed > 0 ? 0 : 1;
}

TEST_HELPER const oxcclDataType_t ALL_DTYPES[] = {
    oxcclInt8,    oxcclUint8,  oxcclInt32,   oxcclUint32,  oxcclInt64,
    oxcclUint64,  oxcclFloat16, oxcclFloat32, oxcclFloat64, oxcclBfloat16};
TEST_HELPER const oxcclRedOp_t ALL_OPS[] = {oxcclSum, oxcclProd, oxcclMax, oxcclMin,
                                       oxcclAvg};
TEST_HELPER const char *const DTYPE_NAMES[] = {"int8",  "uint8",   "int32",
                                          "uint32", "int64",  "uint64",
                                          "half",  "float",   "double",
                                          "bfloat16"};
TEST_HELPER const char *const OP_NAMES[] = {"sum", "prod", "max", "min", "avg"};

TEST_HELPER size_t dtype_size(oxcclDataType_t t) {
  switch (t) {
  case oxcclInt8:
  case oxcclUint8:
    return 1;
  case oxcclFloat16:
  case oxcclBfloat16:
    return 2;
  case oxcclInt32:
  case oxcclUint32:
  case oxcclFloat32:
    return 4;
  default:
    return 8;
  }
}

TEST_HELPER int is_float(oxcclDataType_t t) {
  return t == oxcclFloat16 || t == oxcclFloat32 || t == oxcclFloat64 ||
         t == oxcclBfloat16;
}

/* Half precision bits of a small integer (|v| < 2048, exact). */
TEST_HELPER uint16_t half_from_int(int v) {
  uint16_t sign = 0;
  int e = 0;
  unsigned m;
  if (v == 0)
    return 0;
  if (v < 0) {
    sign = 0x8000;
    v = -v;
  }
  m = (unsigned)v;
  while (m >= 2u << e)
    e++;
  /* value = 2^e * (1 + frac/1024) */
  return (uint16_t)(sign | (uint16_t)((e + 15) << 10) |
                    (uint16_t)(((m << 10) >> e) & 0x3FF));
}

TEST_HELPER double half_to_double(uint16_t h) {
  int e = (h >> 10) & 0x1F;
  double m = h & 0x3FF;
  double v;
  if (e == 0)
    v = m / 1024.0 / 16384.0;
  else if (e == 31)
    v = m ? 0.0 / 0.0 : 1.0 / 0.0;
  else {
    v = (1.0 + m / 1024.0);
    while (e > 15) {
      v *= 2;
      e--;
    }
    while (e < 15) {
      v /= 2;
      e++;
    }
  }
  return (h & 0x8000) ? -v : v;
}

TEST_HELPER uint16_t bf16_from_double(double v) {
  float f = (float)v;
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16); /* exact for small integers and halves */
}

TEST_HELPER double bf16_to_double(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Stores `v` (an integer, or a multiple of 1/4 for float types) at index i. */
TEST_HELPER void put(void *buf, oxcclDataType_t t, size_t i, double v) {
  switch (t) {
  case oxcclInt8:
    ((int8_t *)buf)[i] = (int8_t)v;
    break;
  case oxcclUint8:
    ((uint8_t *)buf)[i] = (uint8_t)v;
    break;
  case oxcclInt32:
    ((int32_t *)buf)[i] = (int32_t)v;
    break;
  case oxcclUint32:
    ((uint32_t *)buf)[i] = (uint32_t)v;
    break;
  case oxcclInt64:
    ((int64_t *)buf)[i] = (int64_t)v;
    break;
  case oxcclUint64:
    ((uint64_t *)buf)[i] = (uint64_t)v;
    break;
  case oxcclFloat16:
    ((uint16_t *)buf)[i] = half_from_int((int)v);
    break;
  case oxcclFloat32:
    ((float *)buf)[i] = (float)v;
    break;
  case oxcclFloat64:
    ((double *)buf)[i] = v;
    break;
  case oxcclBfloat16:
    ((uint16_t *)buf)[i] = bf16_from_double(v);
    break;
  }
}

TEST_HELPER double get(const void *buf, oxcclDataType_t t, size_t i) {
  switch (t) {
  case oxcclInt8:
    return ((const int8_t *)buf)[i];
  case oxcclUint8:
    return ((const uint8_t *)buf)[i];
  case oxcclInt32:
    return ((const int32_t *)buf)[i];
  case oxcclUint32:
    return ((const uint32_t *)buf)[i];
  case oxcclInt64:
    return (double)((const int64_t *)buf)[i];
  case oxcclUint64:
    return (double)((const uint64_t *)buf)[i];
  case oxcclFloat16:
    return half_to_double(((const uint16_t *)buf)[i]);
  case oxcclFloat32:
    return ((const float *)buf)[i];
  case oxcclFloat64:
    return ((const double *)buf)[i];
  case oxcclBfloat16:
    return bf16_to_double(((const uint16_t *)buf)[i]);
  }
  return -1;
}

/* The value rank `r` holds at index `i`: small (1..3), so that sums and
 * products (3^4 = 81) are exact in every type, and averages are once
 * rounded to it. */
TEST_HELPER int value(int r, size_t i) { return 1 + (int)((i * 7 + (size_t)r) % 3); }

/* Positive `v` rounded to `bits` bits after the binary point of its
 * leading one, ties to even (the types' rounding, in their normal range). */
TEST_HELPER double round_bits(double v, int bits) {
  double scale = 1.0, q, fl;
  int e = 0;
  while (v >= 2.0 * (1 << e) && e < 60)
    e++;
  while (e < bits) {
    scale *= 2;
    e++;
  }
  while (e > bits) {
    scale /= 2;
    e--;
  }
  q = v * scale;
  fl = (double)(long)q;
  if (q - fl > 0.5 || (q - fl == 0.5 && ((long)fl & 1)))
    fl += 1;
  return fl / scale;
}

/* The reduction over `world` ranks of value(r, i). */
TEST_HELPER double expected(oxcclRedOp_t op, oxcclDataType_t t, int world, size_t i) {
  long acc = value(0, i);
  int r;
  for (r = 1; r < world; r++) {
    long v = value(r, i);
    switch (op) {
    case oxcclSum:
    case oxcclAvg:
      acc += v;
      break;
    case oxcclProd:
      acc *= v;
      break;
    case oxcclMax:
      acc = v > acc ? v : acc;
      break;
    case oxcclMin:
      acc = v < acc ? v : acc;
      break;
    }
  }
  if (op == oxcclAvg && is_float(t)) {
    /* Exact only over powers of two: round the mean to the type, as the
     * library's result is (9 / 5 in half is 1.7998). */
    switch (t) {
    case oxcclFloat16:
      return round_bits((double)acc / world, 10);
    case oxcclBfloat16:
      return round_bits((double)acc / world, 7);
    case oxcclFloat32:
      return (double)(float)((double)acc / world);
    default:
      return (double)acc / world;
    }
  }
  if (op == oxcclAvg)
    return (double)(acc / world);
  return (double)acc;
}

/* Compares `n` elements of `buf` with want(i); reports the first mismatch. */
#define CHECK_ELEMS(what, buf, t, n, want_expr)                                \
  do {                                                                         \
    size_t ce_i_, ce_bad_ = (size_t)-1;                                        \
    for (ce_i_ = 0; ce_i_ < (n); ce_i_++) {                                    \
      size_t i = ce_i_;                                                        \
      if (get((buf), (t), i) != (want_expr)) {                                 \
        ce_bad_ = i;                                                           \
        break;                                                                 \
      }                                                                        \
    }                                                                          \
    {                                                                          \
      size_t i = ce_bad_;                                                      \
      CHECK(ce_bad_ == (size_t)-1, "%s %s: element %zu is %g, expected %g",    \
            (what), DTYPE_NAMES[t], i,                                         \
            i == (size_t)-1 ? 0.0 : get((buf), (t), i),                        \
            i == (size_t)-1 ? 0.0 : (double)(want_expr));                      \
    }                                                                          \
  } while (0)

#endif
