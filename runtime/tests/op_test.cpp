// qlower_vk_op_test: runs qlower's ET-VK operators on ComputeGraphs built
// directly and compares them with CPU references written here. Each graph is
// built at its largest T and then resized between runs (T > 1, T = 1, T > 1
// on the same graph), as a decoder's delegate is.
//
//   VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json qlower_vk_op_test [filter]
#include <executorch/backends/vulkan/runtime/graph/ComputeGraph.h>
#include <executorch/backends/vulkan/runtime/graph/ops/OperatorRegistry.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace vkcompute;

namespace {

int g_passed = 0;
int g_failed = 0;

std::mt19937& rng() {
  static std::mt19937 r(1234);
  return r;
}

std::vector<float> randn(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) {
    x = d(rng());
  }
  return v;
}

int64_t align_up(int64_t v, int64_t a) {
  return (v + a - 1) / a * a;
}

// max |a - b| <= atol + rtol * max |b|
bool close(
    const std::vector<float>& got,
    const std::vector<float>& want,
    float rtol,
    float atol,
    std::string& why) {
  if (got.size() != want.size()) {
    why = "size " + std::to_string(got.size()) + " vs " + std::to_string(want.size());
    return false;
  }
  float maxref = 0.0f, maxerr = 0.0f;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    maxref = std::max(maxref, std::fabs(want[i]));
    const float e = std::fabs(got[i] - want[i]);
    if (!(e <= maxerr)) {
      maxerr = std::isnan(e) ? INFINITY : e;
      at = i;
    }
  }
  char buf[160];
  std::snprintf(buf, sizeof(buf), "max err %.3g at %zu (got %.5g want %.5g), max |ref| %.3g",
      maxerr, at, got.empty() ? 0.f : got[at], want.empty() ? 0.f : want[at], maxref);
  why = buf;
  return maxerr <= atol + rtol * maxref;
}

void report(const std::string& name, bool ok, const std::string& why) {
  std::printf("%s %s: %s\n", ok ? "PASS" : "FAIL", name.c_str(), why.c_str());
  std::fflush(stdout);
  (ok ? g_passed : g_failed)++;
}

std::vector<float> read_out(ComputeGraph& g, size_t out_idx, ValueRef tensor) {
  const size_t n = static_cast<size_t>(g.numel_of(tensor));
  std::vector<float> v(n);
  g.maybe_cast_and_copy_from_staging(
      g.outputs().at(out_idx).staging, v.data(), n, vkapi::kFloat);
  return v;
}

void write_in(ComputeGraph& g, size_t in_idx, const std::vector<float>& v) {
  g.maybe_cast_and_copy_into_staging(
      g.inputs().at(in_idx).staging, v.data(), v.size(), vkapi::kFloat);
}

// ---------------------------------------------------------------- rms_norm

void test_rms_norm(int64_t C, int64_t maxT, utils::StorageType st, const std::string& tag) {
  const std::string name = "rms_norm C=" + std::to_string(C) + " " + tag;
  try {
    ComputeGraph g{GraphConfig()};
    const std::vector<float> w = randn(C, 0.5f);
    const IOValueRef x = g.add_input_tensor({1, maxT, C}, vkapi::kFloat, st);
    const ValueRef wref = g.add_tensorref({C}, vkapi::kFloat, w.data());
    const ValueRef out = g.add_tensor({1, maxT, C}, vkapi::kFloat, st);
    const float eps = 1e-5f;
    VK_GET_OP_FN("qlower.rms_norm.default")(
        g, {x.value, wref, g.add_scalar<double>(eps), out});
    g.set_output_tensor(out);
    g.prepare();
    g.prepare_pipelines();
    g.prepack();
    for (const int64_t T : {maxT, int64_t(1), int64_t(3)}) {
      g.resize_input(0, {1, T, C});
      g.propagate_resize();
      const std::vector<float> xv = randn(T * C);
      write_in(g, 0, xv);
      g.execute();
      const std::vector<float> got = read_out(g, 0, out);
      std::vector<float> want(T * C);
      for (int64_t t = 0; t < T; ++t) {
        double ss = 0;
        for (int64_t c = 0; c < C; ++c) {
          ss += double(xv[t * C + c]) * xv[t * C + c];
        }
        const float r = 1.0f / std::sqrt(float(ss / C) + eps);
        for (int64_t c = 0; c < C; ++c) {
          want[t * C + c] = xv[t * C + c] * r * w[c];
        }
      }
      std::string why;
      const bool ok = close(got, want, 1e-4f, 1e-5f, why);
      report(name + " T=" + std::to_string(T), ok, why);
    }
  } catch (const std::exception& e) {
    report(name, false, std::string("exception: ") + e.what());
  }
}

// ---------------------------------------------------------------- linear

struct Q4Weights {
  int64_t N, K, gs, ngroups, Npad4;
  std::vector<int8_t> q; // [N, K]
  std::vector<uint8_t> packed; // [N, K/2]
  std::vector<float> scales; // [ngroups, Npad4]
  std::vector<int32_t> sums; // [ngroups, Npad4]
  std::vector<float> bias; // [Npad4]
};

Q4Weights make_weights(int64_t N, int64_t K, int64_t gs) {
  Q4Weights w;
  w.N = N;
  w.K = K;
  w.gs = gs;
  w.ngroups = K / gs;
  w.Npad4 = align_up(N, 4);
  std::uniform_int_distribution<int> qd(-8, 7);
  std::uniform_real_distribution<float> sd(0.01f, 0.05f);
  w.q.resize(N * K);
  for (auto& v : w.q) {
    v = static_cast<int8_t>(qd(rng()));
  }
  w.packed.resize(N * K / 2);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < K / 2; ++i) {
      const int lo = w.q[n * K + 2 * i] + 8;
      const int hi = w.q[n * K + 2 * i + 1] + 8;
      w.packed[n * K / 2 + i] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
  w.scales.assign(w.ngroups * w.Npad4, 0.0f);
  w.sums.assign(w.ngroups * w.Npad4, 0);
  for (int64_t g = 0; g < w.ngroups; ++g) {
    for (int64_t n = 0; n < N; ++n) {
      w.scales[g * w.Npad4 + n] = sd(rng());
      int32_t s = 0;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        s += w.q[n * K + k];
      }
      w.sums[g * w.Npad4 + n] = s;
    }
  }
  w.bias.assign(w.Npad4, 0.0f);
  const std::vector<float> b = randn(N, 0.5f);
  std::copy(b.begin(), b.end(), w.bias.begin());
  return w;
}

// y [T, N] = x W^T (+ b)
std::vector<float> ref_linear(const Q4Weights& w, const std::vector<float>& x, int64_t T, bool bias) {
  std::vector<float> y(T * w.N);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < w.N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < w.K; ++k) {
        acc += double(x[t * w.K + k]) * w.q[n * w.K + k] * w.scales[(k / w.gs) * w.Npad4 + n];
      }
      y[t * w.N + n] = float(acc) + (bias ? w.bias[n] : 0.0f);
    }
  }
  return y;
}

float silu(float v) {
  return v / (1.0f + std::exp(-v));
}

struct LinearCase {
  int64_t K, N, gs;
  bool bias, residual, quantize;
  std::string epilogue; // "none" | "silu_mul" | "split"
  std::vector<int64_t> splits; // split
  int64_t head_dim = 0;
  utils::StorageType st = utils::kBuffer;
};

void test_linear(const LinearCase& c) {
  char buf[200];
  std::snprintf(buf, sizeof(buf), "linear K=%lld N=%lld g=%lld%s%s%s %s%s",
      (long long)c.K, (long long)c.N, (long long)c.gs, c.bias ? " bias" : "",
      c.residual ? " residual" : "", c.quantize ? " dq8" : "", c.epilogue.c_str(),
      c.st == utils::kBuffer ? "" : " texture(fallback)");
  const std::string name = buf;
  const int64_t maxT = 5;
  try {
    const Q4Weights w = make_weights(c.N, c.K, c.gs);
    ComputeGraph g{GraphConfig()};
    const IOValueRef x = g.add_input_tensor({1, maxT, c.K}, vkapi::kFloat, c.st);
    const int64_t n_out = c.epilogue == "silu_mul" ? c.N / 2 : c.N;
    IOValueRef res{kDummyValueRef, kDummyValueRef};
    if (c.residual) {
      res = g.add_input_tensor({1, maxT, n_out}, vkapi::kFloat, c.st);
    }
    const ValueRef wref = g.add_tensorref({c.N, c.K / 2}, vkapi::kByte, w.packed.data());
    const ValueRef sums = g.add_tensorref({w.ngroups, w.Npad4}, vkapi::kInt, w.sums.data());
    const ValueRef scales = g.add_tensorref({w.ngroups, w.Npad4}, vkapi::kFloat, w.scales.data());
    const ValueRef bias = c.bias ? g.add_tensorref({w.Npad4}, vkapi::kFloat, w.bias.data()) : g.add_none();
    std::vector<ValueRef> outs;
    if (c.epilogue == "split") {
      for (const int64_t n : c.splits) {
        outs.push_back(g.add_tensor({1, maxT, n / c.head_dim, c.head_dim}, vkapi::kFloat, c.st));
      }
      VK_GET_OP_FN("qlower.linear_q4gsw_split.default")(
          g, {x.value, wref, sums, scales, g.add_scalar<int64_t>(c.gs), bias,
              g.add_scalar<bool>(c.quantize),
              g.add_scalar_list<int64_t>(std::vector<int64_t>(c.splits)),
              g.add_scalar<int64_t>(c.head_dim),
              g.add_value_list(std::vector<ValueRef>(outs))});
    } else {
      outs.push_back(g.add_tensor({1, maxT, n_out}, vkapi::kFloat, c.st));
      VK_GET_OP_FN("qlower.linear_q4gsw.default")(
          g, {x.value, wref, sums, scales, g.add_scalar<int64_t>(c.gs), bias,
              c.residual ? res.value : g.add_none(), g.add_scalar<bool>(c.quantize),
              g.add_string(std::string(c.epilogue)), outs[0]});
    }
    for (const ValueRef o : outs) {
      g.set_output_tensor(o);
    }
    g.prepare();
    g.prepare_pipelines();
    g.prepack();
    for (const int64_t T : {maxT, int64_t(1), int64_t(3), int64_t(1)}) {
      g.resize_input(0, {1, T, c.K});
      if (c.residual) {
        g.resize_input(1, {1, T, n_out});
      }
      g.propagate_resize();
      const std::vector<float> xv = randn(T * c.K);
      const std::vector<float> rv = randn(T * n_out);
      write_in(g, 0, xv);
      if (c.residual) {
        write_in(g, 1, rv);
      }
      g.execute();
      const std::vector<float> y = ref_linear(w, xv, T, c.bias);
      // One row runs in float; several rows quantize activations to int8
      // when asked (per-row asymmetric), hence the looser tolerance.
      const float rtol = (c.quantize && T > 1) ? 3e-2f : 2e-4f;
      bool ok = true;
      std::string why;
      if (c.epilogue == "split") {
        int64_t start = 0;
        for (size_t i = 0; i < outs.size(); ++i) {
          const int64_t n = c.splits[i];
          std::vector<float> want(T * n);
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t j = 0; j < n; ++j) {
              want[t * n + j] = y[t * c.N + start + j];
            }
          }
          std::string w1;
          const bool ok1 = close(read_out(g, i, outs[i]), want, rtol, 1e-4f, w1);
          ok = ok && ok1;
          why += (i ? "; " : "") + w1;
          start += n;
        }
      } else {
        std::vector<float> want(T * n_out);
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t j = 0; j < n_out; ++j) {
            float v = y[t * c.N + j];
            if (c.epilogue == "silu_mul") {
              v = silu(v) * y[t * c.N + n_out + j];
            }
            if (c.residual) {
              v += rv[t * n_out + j];
            }
            want[t * n_out + j] = v;
          }
        }
        ok = close(read_out(g, 0, outs[0]), want, rtol, 1e-4f, why);
      }
      report(name + " T=" + std::to_string(T), ok, why);
    }
  } catch (const std::exception& e) {
    report(name, false, std::string("exception: ") + e.what());
  }
}

// ---------------------------------------------------------------- sdpa

struct SdpaCase {
  int64_t Hq, Hkv, D, C;
  std::vector<std::pair<int64_t, int64_t>> steps; // (T, pos)
};

void test_sdpa(const SdpaCase& c) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "sdpa Hq=%lld Hkv=%lld D=%lld C=%lld",
      (long long)c.Hq, (long long)c.Hkv, (long long)c.D, (long long)c.C);
  const std::string name = buf;
  int64_t maxT = 1;
  for (const auto& s : c.steps) {
    maxT = std::max(maxT, s.first);
  }
  try {
    ComputeGraph g{GraphConfig()};
    const int64_t Hq = c.Hq, Hkv = c.Hkv, D = c.D, C = c.C;
    const IOValueRef q = g.add_input_tensor({1, maxT, Hq, D}, vkapi::kFloat, utils::kBuffer);
    const IOValueRef k = g.add_input_tensor({1, maxT, Hkv, D}, vkapi::kFloat, utils::kBuffer);
    const IOValueRef v = g.add_input_tensor({1, maxT, Hkv, D}, vkapi::kFloat, utils::kBuffer);
    const std::vector<float> zeros(C * Hkv * D, 0.0f);
    const ValueRef kc = g.add_tensorref({1, C, Hkv, D}, vkapi::kFloat, zeros.data());
    const ValueRef vc = g.add_tensorref({1, C, Hkv, D}, vkapi::kFloat, zeros.data());
    const ValueRef pos = g.add_symint(0);
    g.set_val_as_input(pos);
    const ValueRef out = g.add_tensor({1, maxT, Hq, D}, vkapi::kFloat, utils::kBuffer);
    const ValueRef none = g.add_none();
    VK_GET_OP_FN("qlower.sdpa_with_kv_cache.default")(
        g, {q.value, k.value, v.value, kc, vc, pos, g.add_scalar<int64_t>(1), none,
            g.add_scalar<int64_t>(0), g.add_scalar<bool>(true), none, out});
    g.set_output_tensor(out);
    g.prepare();
    g.prepare_pipelines();
    g.prepack();

    std::vector<float> rk(C * Hkv * D, 0.0f), rv(C * Hkv * D, 0.0f);
    for (const auto& step : c.steps) {
      const int64_t T = step.first, p = step.second;
      g.resize_input(0, {1, T, Hq, D});
      g.resize_input(1, {1, T, Hkv, D});
      g.resize_input(2, {1, T, Hkv, D});
      g.set_symint(pos, static_cast<int32_t>(p));
      g.propagate_resize();
      const std::vector<float> qv = randn(T * Hq * D), kv = randn(T * Hkv * D), vv = randn(T * Hkv * D);
      write_in(g, 0, qv);
      write_in(g, 1, kv);
      write_in(g, 2, vv);
      g.execute();
      const std::vector<float> got = read_out(g, 0, out);

      std::copy(kv.begin(), kv.end(), rk.begin() + p * Hkv * D);
      std::copy(vv.begin(), vv.end(), rv.begin() + p * Hkv * D);
      std::vector<float> want(T * Hq * D);
      const float scale = 1.0f / std::sqrt(float(D));
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < Hq; ++h) {
          const int64_t kh = h / (Hq / Hkv);
          const int64_t L = p + t + 1;
          std::vector<double> s(L);
          double m = -1e30;
          for (int64_t j = 0; j < L; ++j) {
            double a = 0;
            for (int64_t d = 0; d < D; ++d) {
              a += double(qv[(t * Hq + h) * D + d]) * rk[(j * Hkv + kh) * D + d];
            }
            s[j] = a * scale;
            m = std::max(m, s[j]);
          }
          double l = 0;
          for (auto& e : s) {
            e = std::exp(e - m);
            l += e;
          }
          for (int64_t d = 0; d < D; ++d) {
            double a = 0;
            for (int64_t j = 0; j < L; ++j) {
              a += s[j] * rv[(j * Hkv + kh) * D + d];
            }
            want[(t * Hq + h) * D + d] = float(a / l);
          }
        }
      }
      std::string why;
      const bool ok = close(got, want, 2e-4f, 1e-4f, why);
      report(name + " T=" + std::to_string(T) + " pos=" + std::to_string(p), ok, why);
    }
  } catch (const std::exception& e) {
    report(name, false, std::string("exception: ") + e.what());
  }
}

} // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  auto want = [&](const char* group) {
    return filter.empty() || filter == group;
  };
  std::printf("device: %s\n", api::context()->adapter_ptr()->device_name().c_str());

  if (want("rms")) {
    test_rms_norm(7, 5, utils::kBuffer, "buffer");
    test_rms_norm(256, 5, utils::kBuffer, "buffer");
    test_rms_norm(2048, 5, utils::kBuffer, "buffer");
    test_rms_norm(4100, 3, utils::kBuffer, "buffer");
    test_rms_norm(1030, 3, utils::kBuffer, "buffer");
    test_rms_norm(64, 5, utils::kTexture3D, "texture(fallback)");
  }
  if (want("linear")) {
    test_linear({72, 20, 8, false, false, false, "none"});
    test_linear({72, 20, 24, true, true, false, "none"});
    test_linear({256, 512, 32, false, false, false, "none"});
    test_linear({256, 512, 64, true, false, true, "none"});
    test_linear({256, 512, 128, false, true, true, "none"});
    test_linear({256, 96, 32, true, false, false, "silu_mul"});
    test_linear({256, 96, 64, false, true, true, "silu_mul"});
    test_linear({72, 40, 8, false, true, false, "silu_mul"});
    test_linear({256, 96, 32, false, false, false, "silu_mul", {}, 0, utils::kTexture3D});
    test_linear({256, 96, 32, true, true, true, "silu_mul", {}, 0, utils::kTexture3D});
    test_linear({256, 64, 64, true, false, true, "none", {}, 0, utils::kTexture3D});
    // One-row GEMV tilings: several 1024-value blocks, a partial last block,
    // long K (several words a lane), N not a multiple of a workgroup's units.
    // (The stock T > 1 path needs N % 4 == 0.)
    test_linear({2048, 20, 64, false, true, false, "none"});
    test_linear({1056, 28, 32, true, false, false, "none"});
    test_linear({8192, 12, 64, true, true, false, "none"});
    test_linear({2048, 44, 64, false, true, false, "silu_mul"});
    test_linear({8192, 12, 256, true, false, false, "silu_mul"});
    // More than 4 * 65535 units: two units a team.
    test_linear({96, 262148, 32, false, false, false, "none"});
  }
  if (want("split")) {
    test_linear({256, 256, 32, false, false, false, "split", {128, 64, 64}, 32});
    test_linear({256, 384, 64, true, false, true, "split", {256, 64, 64}, 64});
    test_linear({72, 24, 8, true, false, false, "split", {8, 8, 4, 4}, 4});
    test_linear({2048, 136, 128, true, false, false, "split", {64, 32, 40}, 8});
    test_linear({256, 256, 32, false, false, false, "split", {128, 64, 64}, 32, utils::kTexture3D});
  }
  if (want("sdpa")) {
    const std::vector<std::pair<int64_t, int64_t>> a = {
        {5, 0}, {1, 5}, {1, 6}, {5, 7}, {5, 12}, {5, 17}, {5, 22}, {5, 27},
        {5, 32}, {1, 37}, {1, 38}, {1, 39}};
    const std::vector<std::pair<int64_t, int64_t>> b = {
        {1, 0}, {1, 1}, {5, 2}, {1, 7}, {1, 8}};
    test_sdpa({4, 2, 64, 40, a});
    test_sdpa({6, 2, 32, 40, a});
    test_sdpa({4, 2, 32, 40, b});
    test_sdpa({6, 2, 64, 300, b});
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
