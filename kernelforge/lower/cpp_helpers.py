"""The C++ text every module of the C++ lowering starts with: 16-bit float
conversions, NaN-propagating max/min, a vectorisable exp, and the block
matrix product that ``dot`` lowers to. Pasted into each generated source
(not #included), so a module is one self-contained file and its hash covers
everything it compiles."""

PRELUDE = r'''#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <type_traits>
#include <omp.h>

// bf16 and f16 values live in float registers, rounded to their precision
// after every op (what torch does for a 16-bit tensor op); memory holds bits.
static inline float kf_bf16_load(uint16_t b) {
  uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4); return f;
}
static inline uint16_t kf_bf16_bits(float f) {          // round to nearest even
  uint32_t u; std::memcpy(&u, &f, 4);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;                          // NaN stays a (quiet) NaN
  return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : r);   // a select, no branch
}
static inline float kf_rbf16(float f) { return kf_bf16_load(kf_bf16_bits(f)); }
static inline float kf_f16_load(uint16_t b) { _Float16 h; std::memcpy(&h, &b, 2); return (float)h; }
static inline uint16_t kf_f16_bits(float f) { _Float16 h = (_Float16)f; uint16_t b; std::memcpy(&b, &h, 2); return b; }
static inline float kf_rf16(float f) { return (float)(_Float16)f; }

// no short-circuit operators in helpers and masks: branch-free code vectorises
template <class T> static inline T kf_max(T a, T b) { return ((a != a) | (a > b)) ? a : b; }
template <class T> static inline T kf_min(T a, T b) { return ((a != a) | (a < b)) ? a : b; }
// arguments are evaluated before the call: both sides are read unconditionally
// (every address is valid), so the compiler emits a blend, not a masked load
template <class T> static inline T kf_sel(bool c, T v) { return c ? v : (T)0; }
template <class T> static inline T kf_where(bool c, T a, T b) { return c ? a : b; }
static inline int64_t kf_clamp(int64_t i, int64_t n) { return std::max<int64_t>(std::min<int64_t>(i, n - 1), 0); }
template <class To, class From> static inline To kf_bitcast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bitcast between widths");
  To y; std::memcpy(&y, &x, sizeof(To)); return y;
}
static inline uint32_t kf_mulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * b) >> 32); }
// C division and remainder (toward zero), defined for every input: padded
// lanes compute too, and a 0 divisor or INT_MIN / -1 would trap
template <class T> static inline T kf_safe_divisor(T a, T b) {
  b = b + (T)(b == 0);
  if constexpr (std::is_signed<T>::value)
    b = (a == std::numeric_limits<T>::min() && b == (T)-1) ? (T)1 : b;
  return b;
}
template <class T> static inline T kf_idiv(T a, T b) { return a / kf_safe_divisor(a, b); }
template <class T> static inline T kf_imod(T a, T b) { return a % kf_safe_divisor(a, b); }

// exp in plain arithmetic (no libm call), so loops over it vectorise:
// 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial
// (relative error about 2e-7, like a float libm exp). 2^n is two factors
// 2^(n/2) 2^(n - n/2), each a normal float, so results down to the
// subnormals come out right; 0 below them, inf above the float range.
static inline float kf_exp_scaled(float n, float r);
static inline float kf_exp(float x) {
  float xc = std::min(std::max(x, -103.97208f), 88.72284f);
  // round to nearest through the 1.5 * 2^23 trick (vectorises without libm)
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = std::fma(n, -0.693145751953125f, xc);
  r = std::fma(n, -1.428606765330187e-06f, r);
  float y = kf_exp_scaled(n, r);
  y = x < -103.97208f ? 0.0f : y;
  y = x > 88.72284f ? INFINITY : y;
  return x != x ? x : y;
}
// 2^x the same way, with no conversion to base e first: n = round(x),
// x - n exact, r = (x - n) ln2 (one rounding)
static inline float kf_exp2(float x) {
  float xc = std::min(std::max(x, -150.0f), 128.0f);
  float n = (xc + 12582912.0f) - 12582912.0f;
  float y = kf_exp_scaled(n, (xc - n) * 0.693147180559945309f);
  y = x < -150.0f ? 0.0f : y;
  y = x >= 128.0f ? INFINITY : y;
  return x != x ? x : y;
}
// 2^n e^r for an integer n in [-150, 128] and |r| <= ln2/2
static inline float kf_exp_scaled(float n, float r) {
  float p = 1.3888889e-3f;
  p = std::fma(p, r, 8.3333338e-3f);
  p = std::fma(p, r, 4.1666668e-2f);
  p = std::fma(p, r, 1.6666667e-1f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  int32_t n1 = (int32_t)n >> 1, n2 = (int32_t)n - n1;
  return p * kf_bitcast<float>((uint32_t)(n1 + 127) << 23)
           * kf_bitcast<float>((uint32_t)(n2 + 127) << 23);
}
static inline double kf_exp(double x) { return std::exp(x); }
static inline double kf_exp2(double x) { return std::exp2(x); }

// C[M][N] = A[M][K] * B[K][N] (row-major blocks, fp32): panels of up to 64
// columns, up to 4 rows at a time, accumulators in vector registers.
typedef float kf_vf __attribute__((vector_size(64), aligned(4)));
#if defined(__GNUC__) && !defined(__clang__)
#define KF_FMA __attribute__((optimize("fp-contract=fast")))   // products fuse into FMAs
#else
#define KF_FMA
#endif
// columns [j0, j0 + PN) of C; R rows at a time, R dividing M (a G of 5 or 6
// query heads must not run past the last row)
template <int M, int N, int K, int PN>
KF_FMA static inline void kf_dot_panel(const float* __restrict A, const float* __restrict B,
                                float* __restrict C, int j0) {
  constexpr int NV = PN / 16, R = M % 4 == 0 ? 4 : M % 3 == 0 ? 3 : M % 2 == 0 ? 2 : 1;
  for (int i0 = 0; i0 < M; i0 += R) {
    kf_vf c[R][NV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) c[r][j] = kf_vf{};
    for (int k = 0; k < K; ++k) {
      kf_vf b[NV];
      for (int j = 0; j < NV; ++j) std::memcpy(&b[j], B + k * N + j0 + j * 16, 64);
      for (int r = 0; r < R; ++r) {
        float a = A[(i0 + r) * K + k];
        for (int j = 0; j < NV; ++j) c[r][j] += a * b[j];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) std::memcpy(C + (i0 + r) * N + j0 + j * 16, &c[r][j], 64);
  }
}
template <int M, int N, int K>
KF_FMA static inline void kf_dot(const float* __restrict A, const float* __restrict B,
                          float* __restrict C) {
  if constexpr (N % 16 == 0) {
    // whole panels of 64 columns, then the rest (a head size of 80 or 96)
    constexpr int P = N < 64 ? N : 64;
    for (int j0 = 0; j0 + P <= N; j0 += P) kf_dot_panel<M, N, K, P>(A, B, C, j0);
    if constexpr (N % P != 0) kf_dot_panel<M, N, K, N % P>(A, B, C, N - N % P);
  } else {
    for (int i = 0; i < M; ++i) {
      float c[N] = {};
      for (int k = 0; k < K; ++k) {
        float a = A[i * K + k];
        for (int j = 0; j < N; ++j) c[j] += a * B[k * N + j];
      }
      for (int j = 0; j < N; ++j) C[i * N + j] = c[j];
    }
  }
}

// Two vectors' lanes picked by index (0-15 from a, 16-31 from b), in GCC's
// and clang's spelling.
#if defined(__clang__)
#define KF_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t kf_vi __attribute__((vector_size(64)));
#define KF_SHUF(a, b, ...) __builtin_shuffle(a, b, (kf_vi){__VA_ARGS__})
#endif
// Lane j of the result is the sum of v[j]'s 16 lanes: 16 horizontal sums in
// 15 shuffle pairs and adds (four levels; each folds every vector's partials
// in half and interleaves two vectors), not one reduction tree per vector.
static inline kf_vf kf_hsum16(const kf_vf* v) {
  kf_vf a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)     // lanes 0-7: v[j]'s 8 partials; 8-15: v[j + 8]'s
    a[j] = KF_SHUF(v[j], v[j + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           KF_SHUF(v[j], v[j + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)     // lanes 4q-4q+3: v[j + 4q]'s 4 partials
    b[j] = KF_SHUF(a[j], a[j + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           KF_SHUF(a[j], a[j + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)     // lanes 2p, 2p+1: v[j + 2p]'s 2 partials
    c[j] = KF_SHUF(b[j], b[j + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           KF_SHUF(b[j], b[j + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return KF_SHUF(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         KF_SHUF(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// C[M][N] = A[M][K] * B[N][K]^T (both read along K, N and K multiples of 16):
// for a few rows (decode's query heads) against keys stored key by key. Each
// row meets 16 B rows at a time, one vector accumulator per B row, then
// kf_hsum16; kf_dot would first need B transposed, one scalar move per value.
template <int M, int N, int K>
KF_FMA static inline void kf_dot_nt(const float* __restrict A, const float* __restrict B,
                             float* __restrict C) {
  static_assert(N % 16 == 0 && K % 16 == 0, "kf_dot_nt: N and K multiples of 16");
  for (int j0 = 0; j0 < N; j0 += 16) {
    for (int i = 0; i < M; ++i) {
      kf_vf acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = kf_vf{};
      for (int k = 0; k < K; k += 16) {
        kf_vf a;
        std::memcpy(&a, A + i * K + k, 64);
        for (int j = 0; j < 16; ++j) {
          kf_vf b;
          std::memcpy(&b, B + (j0 + j) * K + k, 64);
          acc[j] += a * b;
        }
      }
      kf_vf s = kf_hsum16(acc);
      std::memcpy(C + i * N + j0, &s, 64);
    }
  }
}
'''
