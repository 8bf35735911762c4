#include "Gate.h"

#include <executorch/backends/vulkan/runtime/graph/ops/OperatorRegistry.h>

#include <algorithm>

namespace qlower_vk {

int64_t rows_of(ComputeGraph& graph, ValueRef t) {
  const std::vector<int64_t> sizes = graph.sizes_of(t);
  const int64_t last = sizes.empty() ? 1 : sizes.back();
  return last == 0 ? 0 : graph.numel_of(t) / last;
}

bool all_fp32_contiguous_buffers(
    ComputeGraph& graph,
    const std::vector<ValueRef>& tensors) {
  for (const ValueRef t : tensors) {
    if (!graph.val_is_tensor(t)) {
      return false;
    }
    if (!graph.is_buffer_storage(t) || graph.dtype_of(t) != vkapi::kFloat ||
        !graph.is_contiguous_buffer_tensor(t)) {
      return false;
    }
  }
  return true;
}

GatedNode::GatedNode(
    std::unique_ptr<ExecuteNode> inner,
    GateCond cond,
    bool initial)
    : ExecuteNode(nullptr, {}, {}, "qlower gated: " + inner->name()),
      inner_(std::move(inner)),
      cond_(std::move(cond)),
      active_(initial) {}

void GatedNode::prepare_pipelines(ComputeGraph* graph) {
  inner_->prepare_pipelines(graph);
}

void GatedNode::encode(ComputeGraph* graph) {
  if (active_) {
    inner_->encode(graph);
  }
}

bool GatedNode::trigger_resize(ComputeGraph* graph) {
  const bool now = cond_(graph);
  if (now != active_) {
    active_ = now;
    graph->set_requires_reencode();
    if (!now) {
      return false;
    }
    // Coming back: recompute the node from the current shapes, whatever
    // changed while it slept.
    GraphConfig& config = graph->graphconfig();
    const bool saved = config.force_resize;
    config.force_resize = true;
    bool updated = false;
    try {
      updated = inner_->trigger_resize(graph);
    } catch (...) {
      config.force_resize = saved;
      throw;
    }
    config.force_resize = saved;
    return updated;
  }
  if (!active_) {
    return false;
  }
  return inner_->trigger_resize(graph);
}

void gate_nodes_since(ComputeGraph& graph, size_t first, const GateCond& cond) {
  auto& nodes = graph.execute_nodes();
  const bool initial = cond(&graph);
  for (size_t i = first; i < nodes.size(); ++i) {
    nodes[i] = std::make_unique<GatedNode>(std::move(nodes[i]), cond, initial);
  }
}

GateCond rows_gt_1(ValueRef t) {
  return [t](ComputeGraph* g) { return rows_of(*g, t) > 1; };
}

size_t tref_nbytes(ComputeGraph& graph, ValueRef tref) {
  const TensorRefPtr t = graph.get_tref(tref);
  size_t numel = 1;
  for (const int64_t s : t->sizes) {
    numel *= static_cast<size_t>(s);
  }
  return numel * vkapi::element_size(t->dtype);
}

ValueRef prepack_into_words(
    ComputeGraph& graph,
    const vkapi::ShaderInfo& shader,
    ValueRef tref,
    int64_t nwords,
    vkapi::ScalarType dtype,
    const vkapi::SpecVarList& spec) {
  const ValueRef packed = graph.add_tensor(
      {nwords}, dtype, utils::kBuffer, utils::kWidthPacked);
  const uint32_t wgs = static_cast<uint32_t>(
      std::min<int64_t>((nwords + 63) / 64, 65535));
  graph.prepack_nodes().emplace_back(new PrepackNode(
      graph, shader, {wgs * 64u, 1u, 1u}, {64u, 1u, 1u}, tref, packed, {}, spec));
  return packed;
}

ValueRef prepack_words(
    ComputeGraph& graph,
    ValueRef tref,
    vkapi::ScalarType dtype) {
  VK_CHECK_COND(graph.val_is_tref(tref));
  const size_t nbytes = tref_nbytes(graph, tref);
  VK_CHECK_COND(nbytes % 4 == 0 && nbytes > 0);
  const int64_t nwords = static_cast<int64_t>(nbytes / 4);
  return prepack_into_words(
      graph, VK_KERNEL(qlower_prepack_words), tref, nwords, dtype,
      {static_cast<int32_t>(nwords)});
}

void call_stock_op(
    ComputeGraph& graph,
    const std::string& name,
    const std::vector<ValueRef>& args) {
  if (!operator_registry().has_op(name)) {
    VK_THROW("qlower: stock ET-VK op ", name, " is not registered");
  }
  operator_registry().get_op_fn(name)(graph, args);
}

} // namespace qlower_vk
