// Gating of ExecuteNodes by a runtime condition, and small helpers shared by
// qlower's ET-VK operators.
#pragma once

#include <executorch/backends/vulkan/runtime/graph/ComputeGraph.h>
#include <executorch/backends/vulkan/runtime/graph/ops/ExecuteNode.h>
#include <executorch/backends/vulkan/runtime/graph/ops/PrepackNode.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace qlower_vk {

using namespace vkcompute;

// Rows of a tensor: numel / size(-1) (the "T" of a [1, T, C] activation).
int64_t rows_of(ComputeGraph& graph, ValueRef t);

// True when every tensor is a contiguous fp32 buffer (what our kernels read).
bool all_fp32_contiguous_buffers(
    ComputeGraph& graph,
    const std::vector<ValueRef>& tensors);

using GateCond = std::function<bool(ComputeGraph*)>;

// Wraps one ExecuteNode: encodes it only while `cond` holds.
//
// While the condition is false the inner node is neither encoded nor resized
// (so e.g. a stock SDPA whose grid follows input_pos cannot force a re-encode
// of the whole graph during decode). When the condition turns true, the inner
// node is resized with force_resize set (recomputing its sizes and dispatch
// grid from the current shapes) and the graph re-encodes; when it turns false
// the graph re-encodes without it.
class GatedNode final : public ExecuteNode {
 public:
  GatedNode(std::unique_ptr<ExecuteNode> inner, GateCond cond, bool initial);

  void prepare_pipelines(ComputeGraph* graph) override;
  void encode(ComputeGraph* graph) override;
  bool trigger_resize(ComputeGraph* graph) override;

 private:
  std::unique_ptr<ExecuteNode> inner_;
  GateCond cond_;
  bool active_;
};

// Wraps every execute node appended since `first` in a GatedNode with `cond`.
void gate_nodes_since(ComputeGraph& graph, size_t first, const GateCond& cond);

// Condition helpers on the rows of a tensor.
GateCond rows_gt_1(ValueRef t);

// Copies a constant (TensorRef) into a plain buffer tensor of `numel` 32-bit
// words (dtype `dtype`, 1-D), with qlower_prepack_words: the raw bytes, no
// repacking. The TensorRef's byte size must be a multiple of 4.
ValueRef prepack_words(ComputeGraph& graph, ValueRef tref, vkapi::ScalarType dtype);

// A constant prepacked by `shader` (one invocation per output word, 64-wide
// workgroups, grid-stride) into a new 1-D buffer of `nwords` words.
ValueRef prepack_into_words(
    ComputeGraph& graph,
    const vkapi::ShaderInfo& shader,
    ValueRef tref,
    int64_t nwords,
    vkapi::ScalarType dtype,
    const vkapi::SpecVarList& spec);

// Byte size of a TensorRef.
size_t tref_nbytes(ComputeGraph& graph, ValueRef tref);

// Calls a registered ET-VK operator by name (throws if it is not registered).
void call_stock_op(
    ComputeGraph& graph,
    const std::string& name,
    const std::vector<ValueRef>& args);

} // namespace qlower_vk
