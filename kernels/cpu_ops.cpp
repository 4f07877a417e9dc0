// plait's CPU kernels: the per-token glue of a Llama-family decoder layer, fused.
//
// A decode step of a small model on a CPU spends as long in its ~25 small
// element-wise ops per layer (norms, RoPE, K/V writes, gathers, attention) as
// in its matmuls. Each op here replaces several of them and reads its input
// once:
//
//   rms_norm(x, w, eps) -> y
//       one pass per row
//   add_rms_norm(residual!, delta, w, eps) -> y
//       residual += delta; y = norm(residual)
//   rope_(qkv!, cos, sin, n_heads, head_dim)
//       rotate the first n_heads heads in place
//   store_kv(k, v, k_pool!, v_pool!, slots)
//       k_pool[slots] = k; v_pool[slots] = v
//   decode_attention(q, k_pool, v_pool, table, rows, seq_lens, scale, window) -> o
//       one query token per sequence, K/V read from the pool by slot (no gather)
//   silu_mul(gate_up) -> silu(gate) * up
//
// All take float32 CPU tensors whose rows may be strided (views into a fused
// qkv or gate|up output) but whose last dimension is contiguous. The torch
// reference of each op is in the plait.kernels package beside this file; tests hold
// them equal.
// Work is split over rows (or sequence x KV head) with at::parallel_for, so
// it runs on torch's own thread pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace plait_cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

void check_rows(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "plait_cpu: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == dims, "plait_cpu: ", name, " must have ", dims, " dims, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, "plait_cpu: ", name, "'s last dimension must be contiguous");
}

// An in-place op's rows must not overlap (an expanded tensor would be written by several threads).
void check_writable_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), "plait_cpu: ", name, "'s rows overlap");
}

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous(),
              "plait_cpu: ", name, " must be a contiguous int64 CPU tensor");
}

// Grain sizes: below these, at::parallel_for runs inline (no thread hand-off).
constexpr int64_t kRowGrain = 8;

float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = w * (x / sqrt(mean(x^2) + eps)), the order HF's LlamaRMSNorm uses.
void norm_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  float inv = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  Vec vinv(inv);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) (Vec::loadu(w + i) * (Vec::loadu(x + i) * vinv)).store(y + i);
  for (; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "x", 2);
  check_rows(w, "w", 1);
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(w.size(0) == n, "plait_cpu: w has ", w.size(0), " entries for rows of ", n);
  auto y = at::empty({rows, n}, x.options());
  const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t sx = x.stride(0);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      norm_row(px + r * sx, pw, py + r * n, n, static_cast<float>(eps));
  });
  return y;
}

at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& w,
                        double eps) {
  check_rows(residual, "residual", 2);
  check_rows(delta, "delta", 2);
  check_rows(w, "w", 1);
  check_writable_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == delta.sizes(), "plait_cpu: residual ", residual.sizes(),
              " and delta ", delta.sizes(), " differ");
  const int64_t rows = residual.size(0), n = residual.size(1);
  TORCH_CHECK(w.size(0) == n, "plait_cpu: w has ", w.size(0), " entries for rows of ", n);
  auto y = at::empty({rows, n}, residual.options());
  float* pr = residual.data_ptr<float>();
  const float *pd = delta.data_ptr<float>(), *pw = w.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t sr = residual.stride(0), sd = delta.stride(0);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* x = pr + r * sr;
      const float* d = pd + r * sd;
      int64_t i = 0;
      for (; i + kVec <= n; i += kVec) (Vec::loadu(x + i) + Vec::loadu(d + i)).store(x + i);
      for (; i < n; ++i) x[i] += d[i];
      norm_row(x, pw, py + r * n, n, static_cast<float>(eps));
    }
  });
  return y;
}

// Rotary embedding, "rotate half" layout: for i < D/2,
//   x[i]     <- x[i] cos[i] - x[i + D/2] sin[i]
//   x[i+D/2] <- x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
// cos/sin: one [D] row per token (the two halves hold the same values).
void rope_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads,
           int64_t head_dim) {
  check_rows(qkv, "qkv", 2);
  check_writable_rows(qkv, "qkv");
  check_rows(cos, "cos", 2);
  check_rows(sin, "sin", 2);
  const int64_t T = qkv.size(0), D = head_dim, h = D / 2;
  TORCH_CHECK(D % 2 == 0 && n_heads * D <= qkv.size(1), "plait_cpu: rope_ over ", n_heads,
              " heads of ", D, " does not fit rows of ", qkv.size(1));
  TORCH_CHECK(cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "plait_cpu: rope_ cos/sin ", cos.sizes(), " do not match ", T, " tokens of head_dim ",
              D);
  float* px = qkv.data_ptr<float>();
  const float *pc = cos.data_ptr<float>(), *ps = sin.data_ptr<float>();
  const int64_t sx = qkv.stride(0), sc = cos.stride(0), ss = sin.stride(0);
  at::parallel_for(0, T, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* c = pc + t * sc;
      const float* s = ps + t * ss;
      for (int64_t hd = 0; hd < n_heads; ++hd) {
        float* x = px + t * sx + hd * D;
        int64_t i = 0;
        for (; i + kVec <= h; i += kVec) {
          Vec lo = Vec::loadu(x + i), hi = Vec::loadu(x + h + i);
          (lo * Vec::loadu(c + i) - hi * Vec::loadu(s + i)).store(x + i);
          (hi * Vec::loadu(c + h + i) + lo * Vec::loadu(s + h + i)).store(x + h + i);
        }
        for (; i < h; ++i) {
          float lo = x[i], hi = x[h + i];
          x[i] = lo * c[i] - hi * s[i];
          x[h + i] = hi * c[h + i] + lo * s[h + i];
        }
      }
    }
  });
}

// k, v: [T, Hkv, D] (rows may be strided); pools: [slots, Hkv, D] contiguous.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_pool, at::Tensor& v_pool,
              const at::Tensor& slots) {
  check_rows(k, "k", 3);
  check_rows(v, "v", 3);
  check_index(slots, "slots");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.scalar_type() == at::kFloat && v_pool.scalar_type() == at::kFloat,
              "plait_cpu: pools must be contiguous float32");
  const int64_t T = k.size(0), width = k.size(1) * k.size(2), n_slots = k_pool.size(0);
  TORCH_CHECK(v.sizes() == k.sizes() && slots.numel() == T && k_pool.numel() == n_slots * width &&
                  v_pool.sizes() == k_pool.sizes(),
              "plait_cpu: store_kv shapes do not match");
  TORCH_CHECK(k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "plait_cpu: k/v heads must be packed");
  const int64_t* ps = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ps[t] >= 0 && ps[t] < n_slots, "plait_cpu: slot ", ps[t], " outside the pool");
  const float *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>();
  float *kp = k_pool.data_ptr<float>(), *vp = v_pool.data_ptr<float>();
  const int64_t sk = k.stride(0), sv = v.stride(0);
  at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      std::copy_n(pk + t * sk, width, kp + ps[t] * width);
      std::copy_n(pv + t * sv, width, vp + ps[t] * width);
    }
  });
}

// One query token per sequence b, attending over the first seq_lens[b] slots of
// table row rows[b] (the last `window` of them when window > 0).
//
// Work items are (chunk of kChunk positions, KV head): a long sequence spreads
// over every thread (split-K, "flash-decoding"), and the H / Hkv query heads
// that share a KV head are done together, so each K/V row is read once per
// group. A chunk keeps its own max and sum of exp; a second pass merges the
// chunks of each sequence.
namespace {
constexpr int64_t kChunk = 256;
constexpr int64_t kBlock = 4 * kVec;  // output floats kept in registers while summing V rows

float hsum(const Vec& v) {
  float buf[kVec];
  v.store(buf);
  float s = 0.f;
  for (int64_t j = 0; j < kVec; ++j) s += buf[j];
  return s;
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define PLAIT_HADD8
// The eight horizontal sums of a[0..7], as one vector (AVX2: Vec is one __m256).
Vec hsum8(const Vec* a) {
  __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit lane
  return Vec(
      _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
}
#endif

void prefetch_row(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(float)) __builtin_prefetch(p + i);
}

// Scores -> exp(score - max) in place; returns (max, sum).
std::pair<float, float> softmax_numerators(float* sc, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sc[i]);
  Vec vmx(mx), acc(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    Vec e = (Vec::loadu(sc + i) - vmx).exp();
    e.store(sc + i);
    acc = acc + e;
  }
  float sum = hsum(acc);
  for (; i < n; ++i) {
    sc[i] = std::exp(sc[i] - mx);
    sum += sc[i];
  }
  return {mx, sum};
}
}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                            const at::Tensor& table, const at::Tensor& rows,
                            const at::Tensor& seq_lens, double scale, int64_t window) {
  check_rows(q, "q", 3);
  check_index(table, "table");
  check_index(rows, "rows");
  check_index(seq_lens, "seq_lens");
  TORCH_CHECK(table.dim() == 2, "plait_cpu: table must be [rows, context]");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.dim() == 3 &&
                  k_pool.scalar_type() == at::kFloat && v_pool.sizes() == k_pool.sizes() &&
                  v_pool.scalar_type() == at::kFloat,
              "plait_cpu: pools must be contiguous float32 [slots, Hkv, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_pool.size(1), n_slots = k_pool.size(0), ctx = table.size(1);
  TORCH_CHECK(k_pool.size(2) == D && H % Hkv == 0, "plait_cpu: q heads ", H, "x", D,
              " do not group over pool heads ", Hkv, "x", k_pool.size(2));
  TORCH_CHECK(q.stride(1) == D, "plait_cpu: q heads must be packed");
  TORCH_CHECK(rows.numel() == B && seq_lens.numel() == B, "plait_cpu: rows/seq_lens must have ", B,
              " entries");
  const int64_t G = H / Hkv;
  const int64_t *prow = rows.data_ptr<int64_t>(), *plen = seq_lens.data_ptr<int64_t>();
  const int64_t* ptab = table.data_ptr<int64_t>();

  // Sequence b covers positions [first[b], plen[b]) in chunks chunk_begin[b] .. chunk_begin[b+1].
  std::vector<int64_t> first(B), chunk_begin(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(prow[b] >= 0 && prow[b] < table.size(0) && plen[b] >= 1 && plen[b] <= ctx,
                "plait_cpu: sequence ", b, " (row ", prow[b], ", length ", plen[b],
                ") is outside the table");
    first[b] = window > 0 ? std::max<int64_t>(0, plen[b] - window) : 0;
    const int64_t* slot = ptab + prow[b] * ctx;
    for (int64_t i = first[b]; i < plen[b]; ++i)
      TORCH_CHECK(slot[i] >= 0 && slot[i] < n_slots, "plait_cpu: slot ", slot[i],
                  " outside the pool");
    chunk_begin[b + 1] = chunk_begin[b] + (plen[b] - first[b] + kChunk - 1) / kChunk;
  }
  const int64_t n_chunks = chunk_begin[B];
  // Per (chunk, KV head, group member): unnormalised output [D], max and sum of exp.
  auto part = at::empty({n_chunks * H, D + 2}, q.options());
  float* ppart = part.data_ptr<float>();
  const float *pq = q.data_ptr<float>(), *kp = k_pool.data_ptr<float>(),
              *vp = v_pool.data_ptr<float>();
  const int64_t sq = q.stride(0), srow = Hkv * D;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, n_chunks * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * kChunk);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t c = w / Hkv, kh = w % Hkv;
      const int64_t b =
          std::upper_bound(chunk_begin.begin(), chunk_begin.end(), c) - chunk_begin.begin() - 1;
      const int64_t lo = first[b] + (c - chunk_begin[b]) * kChunk;
      const int64_t n = std::min(kChunk, plen[b] - lo);
      const int64_t* slot = ptab + prow[b] * ctx + lo;
      const float* qh = pq + b * sq + kh * G * D;
      int64_t i = 0;
#ifdef PLAIT_HADD8
      // Eight positions at a time: eight dot-product accumulators, summed across in one go.
      for (; D % kVec == 0 && i + 8 <= n; i += 8) {
        for (int64_t j = 0; j < 8; ++j)
          prefetch_row(kp + slot[std::min(i + 8 + j, n - 1)] * srow + kh * D, D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qh + g * D;
          Vec acc[8];
          for (int64_t j = 0; j < 8; ++j) {
            const float* k = kp + slot[i + j] * srow + kh * D;
            Vec a(0.f);
            for (int64_t d = 0; d < D; d += kVec)
              a = at::vec::fmadd(Vec::loadu(qg + d), Vec::loadu(k + d), a);
            acc[j] = a;
          }
          (hsum8(acc) * Vec(fscale)).store(scores.data() + g * n + i);
        }
      }
#endif
      for (; i < n; ++i) {
        if (i + 4 < n) prefetch_row(kp + slot[i + 4] * srow + kh * D, D);
        const float* k = kp + slot[i] * srow + kh * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qh + g * D;
          Vec acc(0.f);
          int64_t d = 0;
          for (; d + kVec <= D; d += kVec)
            acc = at::vec::fmadd(Vec::loadu(qg + d), Vec::loadu(k + d), acc);
          float s = hsum(acc);
          for (; d < D; ++d) s += qg[d] * k[d];
          scores[g * n + i] = s * fscale;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* out = ppart + ((c * Hkv + kh) * G + g) * (D + 2);
        float* p = scores.data() + g * n;
        std::tie(out[D], out[D + 1]) = softmax_numerators(p, n);
        // out[0:D] = sum_i p[i] V[slot[i]], a block of kBlock floats in registers at a time.
        int64_t d = 0;
        for (; d + kBlock <= D; d += kBlock) {
          Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
          for (int64_t i = 0; i < n; ++i) {
            const float* v = vp + slot[i] * srow + kh * D + d;
            if (g == 0 && d == 0 && i + 4 < n) prefetch_row(vp + slot[i + 4] * srow + kh * D, D);
            Vec pi(p[i]);
            a0 = at::vec::fmadd(pi, Vec::loadu(v), a0);
            a1 = at::vec::fmadd(pi, Vec::loadu(v + kVec), a1);
            a2 = at::vec::fmadd(pi, Vec::loadu(v + 2 * kVec), a2);
            a3 = at::vec::fmadd(pi, Vec::loadu(v + 3 * kVec), a3);
          }
          a0.store(out + d);
          a1.store(out + d + kVec);
          a2.store(out + d + 2 * kVec);
          a3.store(out + d + 3 * kVec);
        }
        for (; d < D; ++d) {
          float acc = 0.f;
          for (int64_t i = 0; i < n; ++i) acc += p[i] * vp[slot[i] * srow + kh * D + d];
          out[d] = acc;
        }
      }
    }
  });

  // Merge each sequence's chunks: o = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c.
  auto out = at::empty({B, H * D}, q.options());
  float* po = out.data_ptr<float>();
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / H, h = w % H;
      float* o = po + b * H * D + h * D;
      const int64_t c0 = chunk_begin[b], c1 = chunk_begin[b + 1];
      auto chunk = [&](int64_t c) { return ppart + (c * H + h) * (D + 2); };
      float M = -std::numeric_limits<float>::infinity();
      for (int64_t c = c0; c < c1; ++c) M = std::max(M, chunk(c)[D]);
      float denom = 0.f;
      std::fill_n(o, D, 0.f);
      for (int64_t c = c0; c < c1; ++c) {
        const float* part_c = chunk(c);
        const float f = c1 - c0 == 1 ? 1.f : std::exp(part_c[D] - M);
        denom += f * part_c[D + 1];
        for (int64_t d = 0; d < D; ++d) o[d] += f * part_c[d];
      }
      const float inv = 1.f / denom;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
  return out;
}

// gate_up: [T, 2I] (rows may be strided) -> silu(gate) * up: [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", 2);
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "plait_cpu: gate_up width ", gate_up.size(1), " is odd");
  auto out = at::empty({T, I}, gate_up.options());
  const float* pg = gate_up.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t sg = gate_up.stride(0);
  const Vec one(1.f);
  at::parallel_for(0, T, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float *g = pg + t * sg, *u = g + I;
      float* o = po + t * I;
      int64_t i = 0;
      for (; i + kVec <= I; i += kVec) {
        Vec x = Vec::loadu(g + i);
        (x / (one + x.neg().exp()) * Vec::loadu(u + i)).store(o + i);
      }
      for (; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

TORCH_LIBRARY(plait_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) residual, Tensor delta, Tensor w, float eps) -> Tensor",
        &add_rms_norm);
  m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int n_heads, int head_dim) -> ()", &rope_);
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots) -> ()",
        &store_kv);
  m.def(
      "decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor table, Tensor rows, Tensor "
      "seq_lens, "
      "float scale, int window) -> Tensor",
      &decode_attention);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
}

}  // namespace plait_cpu
