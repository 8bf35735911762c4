// qlower.rms_norm.default(x [.., C], weight [C] (constant), eps, out)
//
// out = x * rsqrt(mean(x^2, -1) + eps) * weight, fp32 accumulation; one
// workgroup per row (any number of rows), vec4 loads when C % 4 == 0.
// Falls back to the stock et_vk.rms_norm.default unless x/out are contiguous
// fp32 buffers and weight is a constant fp32 [C].
#include "Gate.h"

#include <executorch/backends/vulkan/runtime/graph/ops/DynamicDispatchNode.h>
#include <executorch/backends/vulkan/runtime/graph/ops/OperatorRegistry.h>

namespace qlower_vk {
namespace {

constexpr uint32_t kRmsThreads = 256;

void rms_norm(ComputeGraph& graph, const std::vector<ValueRef>& args) {
  const ValueRef x = args.at(0);
  const ValueRef weight = args.at(1);
  const ValueRef eps = args.at(2);
  const ValueRef out = args.at(3);

  const int64_t C = graph.size_at<int64_t>(-1, x);
  const bool fast = all_fp32_contiguous_buffers(graph, {x, out}) &&
      graph.val_is_tref(weight) &&
      graph.get_tref(weight)->dtype == vkapi::kFloat &&
      tref_nbytes(graph, weight) == static_cast<size_t>(C) * 4;
  if (!fast) {
    call_stock_op(graph, "et_vk.rms_norm.default", args);
    return;
  }

  const ValueRef w = prepack_words(graph, weight, vkapi::kFloat);
  struct {
    int32_t row_width;
    float epsilon;
  } pc{static_cast<int32_t>(C), graph.extract_scalar<float>(eps)};

  const bool vec4 = C % 4 == 0;
  graph.execute_nodes().emplace_back(new DynamicDispatchNode(
      graph,
      vec4 ? VK_KERNEL(qlower_rms_norm_vec4) : VK_KERNEL(qlower_rms_norm),
      [](ComputeGraph* g,
         const vkapi::ShaderInfo&,
         const std::vector<ArgGroup>& a,
         const std::vector<ValueRef>&) -> utils::uvec3 {
        const uint32_t rows =
            static_cast<uint32_t>(rows_of(*g, a.at(1).refs.at(0)));
        return {rows * kRmsThreads, 1u, 1u};
      },
      [](ComputeGraph*,
         const vkapi::ShaderInfo&,
         const utils::uvec3&,
         const std::vector<ArgGroup>&,
         const std::vector<ValueRef>&) -> utils::uvec3 {
        return {kRmsThreads, 1u, 1u};
      },
      {{out, vkapi::kWrite}, {{x, w}, vkapi::kRead}},
      {graph.numel_ubo(x)},
      {PushConstantDataInfo(&pc, sizeof(pc))},
      {},
      {},
      [](ComputeGraph* g,
         const std::vector<ArgGroup>& a,
         const std::vector<ValueRef>&) {
        g->virtual_resize(a.at(0).refs.at(0), g->sizes_of(a.at(1).refs.at(0)));
      }));
}

} // namespace

REGISTER_OPERATORS {
  VK_REGISTER_OP(qlower.rms_norm.default, rms_norm);
}

} // namespace qlower_vk
