// qlower.linear_q4gsw.default(x, weights, weight_sums, weight_scales,
//     group_size, bias?, residual?, quantize_input, epilogue, out)
// qlower.linear_q4gsw_split.default(x, weights, weight_sums, weight_scales,
//     group_size, bias?, quantize_input, split_sizes, head_dim, out[])
//
// One row (T = 1): qlower_q4gsw_gemv, one dispatch, float activations, the
// epilogue (silu_mul, + residual, or the column split) fused.
// Several rows (T > 1): the stock ET-VK linear (choose_qparams +
// linear_dq8ca_q4gsw when quantize_input, else linear_q4gsw), into `out` or a
// temporary followed by qlower_rows_epilogue; these nodes are gated to T > 1.
// When our kernels cannot serve the tensors (not contiguous fp32 buffers, K not
// the packed K, ...), the stock path (with stock elementwise ops for the
// epilogue) serves every T.
#include "Gate.h"

#include <executorch/backends/vulkan/runtime/graph/ops/DynamicDispatchNode.h>
#include <executorch/backends/vulkan/runtime/graph/ops/OperatorRegistry.h>

#include <algorithm>

namespace qlower_vk {
namespace {

// qlower_q4gsw_gemv: a workgroup is kGemvThreads / 32 teams of 32 lanes
// (nominally one subgroup each); `ksplit` teams share `rps` output units,
// splitting K between them.
constexpr uint32_t kGemvThreads = 128;
constexpr int64_t kGemvTeams = kGemvThreads / 32; // <= MAX_TEAMS in the shader
constexpr int64_t kGemvMaxRps = 2; // MAX_RPS in qlower_q4gsw_gemv.glsl
constexpr int64_t kGemvMaxUk = 4; // MAX_UK
// K is split between teams while the grid stays within this many lanes
// (about two waves of a 132-SM GPU).
constexpr int64_t kGemvMaxLanes = 524288;
constexpr uint32_t kEpilogueThreads = 64;

// Units per team group (rps), words a lane loads per loop iteration (uk) and
// teams per unit group (ksplit) of the GEMV for one output shape.
struct GemvTiling {
  int32_t rps;
  int32_t uk;
  int32_t ksplit;
  int64_t units_per_wg() const {
    return kGemvTeams / ksplit * rps;
  }
};

GemvTiling gemv_tiling(int64_t n_out, int64_t K, bool two_rows) {
  const int64_t nw = 32 * ((K / 4 + 255) / 256); // 16-byte words a row
  GemvTiling t{1, two_rows ? 1 : 2, 1};
  // Split K between teams while the grid stays within kGemvMaxLanes lanes
  // (and each team keeps at least one 32-word chunk).
  while (t.ksplit < kGemvTeams &&
         n_out * 32 * t.ksplit * 2 <= kGemvMaxLanes &&
         nw >= 32 * 2 * t.ksplit) {
    t.ksplit *= 2;
  }
  // Enough words a lane for the rest of K in few iterations.
  const int64_t per_lane = (nw + 32 * t.ksplit - 1) / (32 * t.ksplit);
  if (per_lane >= 4 * t.uk) {
    t.uk = static_cast<int32_t>(std::min<int64_t>(2 * t.uk, kGemvMaxUk));
  }
  t.uk = static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(t.uk, per_lane)));
  // Stay within one grid dimension.
  while ((n_out + t.units_per_wg() - 1) / t.units_per_wg() > 65535 &&
         t.rps < kGemvMaxRps) {
    ++t.rps;
  }
  return t;
}

// The packed int4 weights (uint8 [N, K/2]) in qlower_q4gsw_gemv's blocked
// layout: [N, nw] 16-byte words, nw = 32 * ceil(K / 1024).
ValueRef prepack_q4_blocks(ComputeGraph& graph, ValueRef tref, int64_t N, int64_t K) {
  const int64_t nw = 32 * ((K / 4 + 255) / 256);
  const int64_t nwords = N * nw * 4;
  VK_CHECK_COND(nwords < (int64_t(1) << 32));
  return prepack_into_words(
      graph, VK_KERNEL(qlower_prepack_q4_blocks), tref, nwords, vkapi::kInt,
      {static_cast<int32_t>(N),
       static_cast<int32_t>(K / 4),
       static_cast<int32_t>(nw)});
}

enum Mode : int32_t { kPlain = 0, kSiluMul = 1, kSplit = 2 };

struct LinearArgs {
  ValueRef x;
  ValueRef weights;
  ValueRef weight_sums;
  ValueRef weight_scales;
  ValueRef group_size;
  ValueRef bias; // may be None
  ValueRef residual = kDummyValueRef; // valid tensor or kDummyValueRef
  bool quantize_input = false;
  Mode mode = kPlain;
  std::vector<ValueRef> outs;
  std::vector<int64_t> split_sizes; // kSplit
  int64_t head_dim = 0; // kSplit
};

std::vector<int64_t> with_last(std::vector<int64_t> sizes, int64_t last) {
  sizes.back() = last;
  return sizes;
}

// Output sizes for the current x.
std::vector<std::vector<int64_t>> out_sizes(
    ComputeGraph& graph,
    const LinearArgs& a,
    int64_t n_out) {
  const std::vector<int64_t> xs = graph.sizes_of(a.x);
  std::vector<std::vector<int64_t>> r;
  if (a.mode == kSplit) {
    for (const int64_t n : a.split_sizes) {
      std::vector<int64_t> s(xs.begin(), xs.end() - 1);
      s.push_back(n / a.head_dim);
      s.push_back(a.head_dim);
      r.push_back(s);
    }
  } else {
    r.push_back(with_last(xs, n_out));
  }
  return r;
}

ValueRef temp_like(ComputeGraph& graph, ValueRef x, int64_t last) {
  return graph.add_tensor(
      with_last(graph.sizes_of(x), last),
      graph.dtype_of(x),
      graph.storage_type_of(x),
      utils::kWidthPacked);
}

// The stock linear y = x W^T + b into y (nodes appended to the graph).
void add_stock_linear(ComputeGraph& graph, const LinearArgs& a, ValueRef y) {
  if (a.quantize_input) {
    const std::vector<int64_t> xs = graph.sizes_of(a.x);
    const std::vector<int64_t> qs(xs.begin(), xs.end() - 1);
    const ValueRef scales = graph.add_tensor(
        qs, graph.dtype_of(a.x), utils::kTexture3D, utils::kWidthPacked);
    const ValueRef zps = graph.add_tensor(
        qs, vkapi::kChar, utils::kTexture3D, utils::kWidthPacked);
    std::vector<int64_t> block(xs.size(), 1);
    block.back() = xs.back();
    const ValueRef none = graph.add_none();
    call_stock_op(
        graph,
        "torchao.choose_qparams_affine.default",
        {a.x,
         graph.add_string("ASYMMETRIC"),
         graph.add_scalar_list<int64_t>(std::move(block)),
         none,
         graph.add_scalar<int64_t>(-128),
         graph.add_scalar<int64_t>(127),
         none,
         none,
         none,
         graph.add_scalar<bool>(false),
         graph.add_value_list({scales, zps})});
    call_stock_op(
        graph,
        "et_vk.linear_dq8ca_q4gsw.default",
        {a.x,
         scales,
         zps,
         a.weights,
         a.weight_sums,
         a.weight_scales,
         a.group_size,
         a.bias,
         y});
  } else {
    call_stock_op(
        graph,
        "et_vk.linear_q4gsw.default",
        {a.x, a.weights, a.weight_scales, a.group_size, a.bias, y});
  }
}

// Fallback epilogue with stock elementwise ops (any storage).
void add_stock_epilogue(
    ComputeGraph& graph,
    const LinearArgs& a,
    ValueRef y,
    int64_t n_out) {
  const ValueRef none = graph.add_none();
  auto slice = [&](ValueRef src, int64_t start, int64_t end) {
    const ValueRef dst = temp_like(graph, src, end - start);
    call_stock_op(
        graph,
        "aten.slice_copy.Tensor",
        {src,
         graph.add_scalar<int64_t>(-1),
         graph.add_scalar<int64_t>(start),
         graph.add_scalar<int64_t>(end),
         graph.add_scalar<int64_t>(1),
         dst});
    return dst;
  };
  if (a.mode == kSplit) {
    int64_t start = 0;
    for (size_t i = 0; i < a.outs.size(); ++i) {
      const int64_t n = a.split_sizes[i];
      const ValueRef part = slice(y, start, start + n);
      std::vector<int64_t> vs = graph.sizes_of(a.outs[i]);
      vs[vs.size() - 3] = -1;
      call_stock_op(
          graph,
          "aten.view_copy.default",
          {part, graph.add_scalar_list<int64_t>(std::move(vs)), a.outs[i]});
      start += n;
    }
    return;
  }
  const ValueRef out = a.outs.at(0);
  ValueRef v = y;
  if (a.mode == kSiluMul) {
    const ValueRef gate = slice(y, 0, n_out);
    const ValueRef up = slice(y, n_out, 2 * n_out);
    // silu(g) = g * sigmoid(g) (ET-VK registers no aten.silu).
    const ValueRef sig = temp_like(graph, gate, n_out);
    call_stock_op(graph, "aten.sigmoid.default", {gate, sig});
    const ValueRef act = temp_like(graph, gate, n_out);
    call_stock_op(graph, "aten.mul.Tensor", {gate, sig, act});
    const ValueRef prod = is_valid(a.residual) ? temp_like(graph, act, n_out) : out;
    call_stock_op(graph, "aten.mul.Tensor", {act, up, prod});
    v = prod;
  }
  if (is_valid(a.residual)) {
    call_stock_op(
        graph,
        "aten.add.Tensor",
        {v, a.residual, graph.add_scalar<int64_t>(1), out});
  }
  (void)none;
}

void build_linear(ComputeGraph& graph, const LinearArgs& a) {
  VK_CHECK_COND(graph.val_is_tref(a.weights) && graph.val_is_tref(a.weight_scales));
  // Copies: no TensorRefPtr may live while values are added to the graph.
  const std::vector<int64_t> w_sizes = graph.get_tref(a.weights)->sizes;
  const std::vector<int64_t> s_sizes = graph.get_tref(a.weight_scales)->sizes;
  const vkapi::ScalarType s_dtype = graph.get_tref(a.weight_scales)->dtype;
  VK_CHECK_COND(w_sizes.size() == 2 && s_sizes.size() == 2);
  const int64_t N = w_sizes[0];
  const int64_t Kp = 2 * w_sizes[1];
  const int64_t K = graph.size_at<int64_t>(-1, a.x);
  const int64_t gs = graph.extract_scalar<int64_t>(a.group_size);
  const int64_t scale_stride = s_sizes[1];
  const bool has_bias = !graph.val_is_none(a.bias);
  const bool has_res = is_valid(a.residual);

  int64_t n_out = N;
  if (a.mode == kSiluMul) {
    VK_CHECK_COND(N % 2 == 0, "silu_mul needs stacked gate/up rows (even N)");
    n_out = N / 2;
  }
  int64_t split_starts[4] = {0, N, N, N};
  if (a.mode == kSplit) {
    int64_t s = 0;
    for (size_t i = 0; i < a.split_sizes.size(); ++i) {
      if (i < 4) {
        split_starts[i] = s;
      }
      VK_CHECK_COND(a.split_sizes[i] % a.head_dim == 0);
      s += a.split_sizes[i];
    }
    VK_CHECK_COND(s == N, "split sizes must add up to N");
    VK_CHECK_COND(a.outs.size() == a.split_sizes.size());
  }

  std::vector<ValueRef> io = {a.x};
  io.insert(io.end(), a.outs.begin(), a.outs.end());
  if (has_res) {
    io.push_back(a.residual);
  }
  bool fast = all_fp32_contiguous_buffers(graph, io) && K == Kp && K % 8 == 0 &&
      gs > 0 && gs % 8 == 0 && Kp % gs == 0 && s_dtype == vkapi::kFloat &&
      s_sizes[0] * gs == Kp && scale_stride >= N &&
      (n_out + kGemvTeams * kGemvMaxRps - 1) / (kGemvTeams * kGemvMaxRps) <=
          65535 &&
      a.outs.size() <= 4;
  if (has_bias) {
    fast = fast && graph.val_is_tref(a.bias) &&
        graph.get_tref(a.bias)->dtype == vkapi::kFloat &&
        tref_nbytes(graph, a.bias) >= static_cast<size_t>(N) * 4;
  }

  const bool direct = a.mode == kPlain && !has_res;
  if (!fast) {
    // Stock kernels for every T.
    if (direct) {
      add_stock_linear(graph, a, a.outs.at(0));
    } else {
      const ValueRef y = temp_like(graph, a.x, N);
      add_stock_linear(graph, a, y);
      add_stock_epilogue(graph, a, y, n_out);
    }
    return;
  }

  // T > 1: stock linear (+ our epilogue), gated.
  const size_t first = graph.execute_nodes().size();
  if (direct) {
    add_stock_linear(graph, a, a.outs.at(0));
  } else {
    const ValueRef y = temp_like(graph, a.x, N);
    add_stock_linear(graph, a, y);
    std::vector<ValueRef> outs4(4, a.outs.at(0));
    for (size_t i = 0; i < a.outs.size(); ++i) {
      outs4[i] = a.outs[i];
    }
    graph.execute_nodes().emplace_back(new DynamicDispatchNode(
        graph,
        VK_KERNEL(qlower_rows_epilogue),
        [n_out](ComputeGraph* g,
                const vkapi::ShaderInfo&,
                const std::vector<ArgGroup>& args,
                const std::vector<ValueRef>&) -> utils::uvec3 {
          const int64_t rows = rows_of(*g, args.at(1).refs.at(0));
          return {static_cast<uint32_t>(rows * n_out), 1u, 1u};
        },
        [](ComputeGraph*,
           const vkapi::ShaderInfo&,
           const utils::uvec3&,
           const std::vector<ArgGroup>&,
           const std::vector<ValueRef>&) -> utils::uvec3 {
          return {kEpilogueThreads, 1u, 1u};
        },
        {{outs4, vkapi::kWrite},
         {{y, has_res ? a.residual : y}, vkapi::kRead}},
        {graph.numel_ubo(y)},
        {},
        {static_cast<int32_t>(N),
         static_cast<int32_t>(n_out),
         static_cast<int32_t>(a.mode == kSiluMul ? n_out : 0),
         static_cast<int32_t>(a.mode),
         static_cast<int32_t>(has_res ? 1 : 0),
         static_cast<int32_t>(split_starts[1]),
         static_cast<int32_t>(split_starts[2]),
         static_cast<int32_t>(split_starts[3])},
        {}));
  }
  gate_nodes_since(graph, first, rows_gt_1(a.x));

  // T = 1: our GEMV, one dispatch (grid {0,0,0} while T > 1).
  const ValueRef w = prepack_q4_blocks(graph, a.weights, N, K);
  const ValueRef s = prepack_words(graph, a.weight_scales, vkapi::kFloat);
  const ValueRef b = has_bias ? prepack_words(graph, a.bias, vkapi::kFloat) : a.x;
  std::vector<ValueRef> outs4(4, a.outs.at(0));
  for (size_t i = 0; i < a.outs.size(); ++i) {
    outs4[i] = a.outs[i];
  }
  const GemvTiling tiling = gemv_tiling(n_out, K, a.mode == kSiluMul);
  const int64_t units_per_wg = tiling.units_per_wg();
  const LinearArgs captured = a;
  graph.execute_nodes().emplace_back(new DynamicDispatchNode(
      graph,
      VK_KERNEL(qlower_q4gsw_gemv),
      [n_out, units_per_wg](
          ComputeGraph* g,
          const vkapi::ShaderInfo&,
          const std::vector<ArgGroup>& args,
          const std::vector<ValueRef>&) -> utils::uvec3 {
        if (rows_of(*g, args.at(1).refs.at(0)) != 1) {
          return {0u, 0u, 0u};
        }
        const uint32_t wgs =
            static_cast<uint32_t>((n_out + units_per_wg - 1) / units_per_wg);
        return {wgs * kGemvThreads, 1u, 1u};
      },
      [](ComputeGraph*,
         const vkapi::ShaderInfo&,
         const utils::uvec3&,
         const std::vector<ArgGroup>&,
         const std::vector<ValueRef>&) -> utils::uvec3 {
        return {kGemvThreads, 1u, 1u};
      },
      {{outs4, vkapi::kWrite},
       {{a.x, w, s, b, has_res ? a.residual : a.x}, vkapi::kRead}},
      {},
      {},
      {static_cast<int32_t>(K / 4),
       static_cast<int32_t>(32 * ((K / 4 + 255) / 256)),
       static_cast<int32_t>(gs / 4),
       static_cast<int32_t>(scale_stride),
       static_cast<int32_t>(n_out),
       static_cast<int32_t>(a.mode == kSiluMul ? n_out : 0),
       static_cast<int32_t>(a.mode),
       static_cast<int32_t>(has_bias ? 1 : 0),
       static_cast<int32_t>(has_res ? 1 : 0),
       static_cast<int32_t>(split_starts[1]),
       static_cast<int32_t>(split_starts[2]),
       static_cast<int32_t>(split_starts[3]),
       tiling.rps,
       tiling.uk,
       tiling.ksplit},
      {},
      [captured, n_out](
          ComputeGraph* g,
          const std::vector<ArgGroup>&,
          const std::vector<ValueRef>&) {
        const auto sizes = out_sizes(*g, captured, n_out);
        for (size_t i = 0; i < captured.outs.size(); ++i) {
          g->virtual_resize(captured.outs[i], sizes[i]);
        }
      }));
}

bool extract_bool(ComputeGraph& graph, ValueRef v) {
  return !graph.val_is_none(v) && graph.extract_scalar<bool>(v);
}

// The arguments both linear ops start with: x, weights, weight_sums, weight_scales, group_size, bias.
int read_linear_args(const std::vector<ValueRef>& args, LinearArgs& a) {
  int i = 0;
  a.x = args.at(i++);
  a.weights = args.at(i++);
  a.weight_sums = args.at(i++);
  a.weight_scales = args.at(i++);
  a.group_size = args.at(i++);
  a.bias = args.at(i++);
  return i;
}

void linear_q4gsw(ComputeGraph& graph, const std::vector<ValueRef>& args) {
  LinearArgs a;
  int i = read_linear_args(args, a);
  const ValueRef residual = args.at(i++);
  a.quantize_input = extract_bool(graph, args.at(i++));
  const ValueRef epilogue = args.at(i++);
  a.outs = {args.at(i++)};
  if (graph.val_is_tensor(residual)) {
    a.residual = residual;
  }
  const std::string ep =
      graph.val_is_none(epilogue) ? "none" : graph.extract_string(epilogue);
  if (ep == "none") {
    a.mode = kPlain;
  } else if (ep == "silu_mul") {
    a.mode = kSiluMul;
  } else {
    VK_THROW("qlower.linear_q4gsw: unknown epilogue ", ep);
  }
  build_linear(graph, a);
}

void linear_q4gsw_split(ComputeGraph& graph, const std::vector<ValueRef>& args) {
  LinearArgs a;
  int i = read_linear_args(args, a);
  a.quantize_input = extract_bool(graph, args.at(i++));
  a.split_sizes = *graph.get_int_list(args.at(i++));
  a.head_dim = graph.extract_scalar<int64_t>(args.at(i++));
  {
    const ValueListPtr outs = graph.get_value_list(args.at(i++));
    a.outs.assign(outs->begin(), outs->end());
  }
  a.mode = kSplit;
  build_linear(graph, a);
}

} // namespace

REGISTER_OPERATORS {
  VK_REGISTER_OP(qlower.linear_q4gsw.default, linear_q4gsw);
  VK_REGISTER_OP(qlower.linear_q4gsw_split.default, linear_q4gsw_split);
}

} // namespace qlower_vk
