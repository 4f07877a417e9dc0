// plait's CPU kernels: the per-token glue of a Llama-family decoder layer, fused.
//
// A decode step of a small model on a CPU spends as long in its ~25 small
// element-wise ops per layer (norms, RoPE, K/V writes, gathers, attention) as
// in its matmuls. Each op here replaces several of them and reads its input
// once:
//
//   rms_norm(x, w, eps)                  -> y                  one pass per row
//   add_rms_norm(residual!, delta, w, eps) -> y                residual += delta; y = norm(residual)
//   rope_(qkv!, cos, sin, n_heads, head_dim)                   rotate the first n_heads heads in place
//   store_kv(k, v, k_pool!, v_pool!, slots)                    k_pool[slots] = k; v_pool[slots] = v
//   decode_attention(q, k_pool, v_pool, table, rows, seq_lens, scale, window) -> o
//                                                             one query token per sequence, K/V read
//                                                             from the pool by slot (no gather)
//   silu_mul(gate_up)                    -> silu(gate) * up
//
// All take float32 CPU tensors whose rows may be strided (views into a fused
// qkv or gate|up output) but whose last dimension is contiguous. The torch
// reference of each op is in kernels/cpu.py beside this file; tests hold them equal.
// Work is split over rows (or sequence x KV head) with at::parallel_for, so
// it runs on torch's own thread pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
    for (int64_t r = b; r < e; ++r) norm_row(px + r * sx, pw, py + r * n, n, static_cast<float>(eps));
  });
  return y;
}

at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& w, double eps) {
  check_rows(residual, "residual", 2);
  check_rows(delta, "delta", 2);
  check_rows(w, "w", 1);
  TORCH_CHECK(residual.sizes() == delta.sizes(), "plait_cpu: residual ", residual.sizes(),
              " and delta ", delta.sizes(), " differ");
  const int64_t rows = residual.size(0), n = residual.size(1);
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
void rope_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads, int64_t head_dim) {
  check_rows(qkv, "qkv", 2);
  check_rows(cos, "cos", 2);
  check_rows(sin, "sin", 2);
  const int64_t T = qkv.size(0), D = head_dim, h = D / 2;
  TORCH_CHECK(D % 2 == 0 && n_heads * D <= qkv.size(1), "plait_cpu: rope_ over ", n_heads, " heads of ",
              D, " does not fit rows of ", qkv.size(1));
  TORCH_CHECK(cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "plait_cpu: rope_ cos/sin ", cos.sizes(), " do not match ", T, " tokens of head_dim ", D);
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
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.scalar_type() == at::kFloat &&
                  v_pool.scalar_type() == at::kFloat,
              "plait_cpu: pools must be contiguous float32");
  const int64_t T = k.size(0), width = k.size(1) * k.size(2), n_slots = k_pool.size(0);
  TORCH_CHECK(v.sizes() == k.sizes() && slots.numel() == T && k_pool.numel() == n_slots * width &&
                  v_pool.sizes() == k_pool.sizes(),
              "plait_cpu: store_kv shapes do not match");
  TORCH_CHECK(k.stride(1) == k.size(2) && v.stride(1) == v.size(2), "plait_cpu: k/v heads must be packed");
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
// table row rows[b] (the last `window` of them when window > 0). Grouped-query:
// the H / Hkv query heads sharing a KV head are done together, so each K/V row
// is read once per group. Softmax in two passes over the scores (exact, no
// running rescale).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                            const at::Tensor& table, const at::Tensor& rows, const at::Tensor& seq_lens,
                            double scale, int64_t window) {
  check_rows(q, "q", 3);
  check_index(table, "table");
  check_index(rows, "rows");
  check_index(seq_lens, "seq_lens");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.dim() == 3 &&
                  k_pool.scalar_type() == at::kFloat && v_pool.sizes() == k_pool.sizes() &&
                  v_pool.scalar_type() == at::kFloat,
              "plait_cpu: pools must be contiguous float32 [slots, Hkv, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_pool.size(1), n_slots = k_pool.size(0), ctx = table.size(1);
  TORCH_CHECK(k_pool.size(2) == D && H % Hkv == 0, "plait_cpu: q heads ", H, "x", D,
              " do not group over pool heads ", Hkv, "x", k_pool.size(2));
  TORCH_CHECK(q.stride(1) == D, "plait_cpu: q heads must be packed");
  TORCH_CHECK(rows.numel() == B && seq_lens.numel() == B, "plait_cpu: rows/seq_lens must have ", B, " entries");
  const int64_t G = H / Hkv;
  const int64_t *prow = rows.data_ptr<int64_t>(), *plen = seq_lens.data_ptr<int64_t>();
  const int64_t* ptab = table.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(prow[b] >= 0 && prow[b] < table.size(0) && plen[b] >= 1 && plen[b] <= ctx,
                "plait_cpu: sequence ", b, " (row ", prow[b], ", length ", plen[b], ") is outside the table");
  auto out = at::empty({B, H * D}, q.options());
  const float *pq = q.data_ptr<float>(), *kp = k_pool.data_ptr<float>(), *vp = v_pool.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t sq = q.stride(0), srow = Hkv * D;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / Hkv, kh = w % Hkv;
      const int64_t len = plen[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int64_t* slot = ptab + prow[b] * ctx + first;
      for (int64_t i = 0; i < n; ++i)
        TORCH_CHECK(slot[i] >= 0 && slot[i] < n_slots, "plait_cpu: slot ", slot[i], " outside the pool");
      scores.resize(G * n);
      // Scores, then their max per head.
      for (int64_t i = 0; i < n; ++i) {
        const float* k = kp + slot[i] * srow + kh * D;
        for (int64_t g = 0; g < G; ++g) scores[g * n + i] = dot(pq + b * sq + (kh * G + g) * D, k, D) * fscale;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sc = scores.data() + g * n;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sc[i]);
        // exp(s - max), vectorized, then the sum.
        Vec vmx(mx), acc(0.f);
        int64_t i = 0;
        for (; i + kVec <= n; i += kVec) {
          Vec e = (Vec::loadu(sc + i) - vmx).exp();
          e.store(sc + i);
          acc = acc + e;
        }
        float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
        for (; i < n; ++i) {
          sc[i] = std::exp(sc[i] - mx);
          sum += sc[i];
        }
        const float inv = 1.f / sum;
        for (i = 0; i < n; ++i) sc[i] *= inv;
      }
      // Weighted sum of V rows, one output head per group member.
      for (int64_t g = 0; g < G; ++g) {
        float* o = po + b * H * D + (kh * G + g) * D;
        std::fill_n(o, D, 0.f);
      }
      for (int64_t i = 0; i < n; ++i) {
        const float* v = vp + slot[i] * srow + kh * D;
        for (int64_t g = 0; g < G; ++g) {
          float* o = po + b * H * D + (kh * G + g) * D;
          Vec p(scores[g * n + i]);
          int64_t d = 0;
          for (; d + kVec <= D; d += kVec) at::vec::fmadd(p, Vec::loadu(v + d), Vec::loadu(o + d)).store(o + d);
          for (; d < D; ++d) o[d] += scores[g * n + i] * v[d];
        }
      }
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
  m.def("add_rms_norm(Tensor(a!) residual, Tensor delta, Tensor w, float eps) -> Tensor", &add_rms_norm);
  m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int n_heads, int head_dim) -> ()",
        &rope_);
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots) -> ()", &store_kv);
  m.def(
      "decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor table, Tensor rows, Tensor seq_lens, "
      "float scale, int window) -> Tensor",
      &decode_attention);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
}

}  // namespace plait_cpu
