// qlower.sdpa_with_kv_cache.default(q [1,T,Hq,D], k [1,T,Hkv,D],
//     v [1,T,Hkv,D], k_cache, v_cache (constants [1,C,Hkv,D]), input_pos,
//     seq_len, attn_mask (None), dropout_p, is_causal, scale (None), out)
//
// The same semantics as the stock sdpa_with_kv_cache.default, with caches
// created the same way (add_tensor_like(cache, storage of q, width packed)).
// T > 1: stock update_cache x2 + llama.custom_sdpa on our caches, gated.
// T = 1: split-K decode attention in two dispatches (partials over fixed
// context chunks, then combine); pass 1 also writes the new k/v into the
// caches at input_pos. input_pos is read from its uniform buffer, so nothing
// re-encodes as the position grows.
#include "Gate.h"

#include <executorch/backends/vulkan/runtime/graph/ops/DynamicDispatchNode.h>
#include <executorch/backends/vulkan/runtime/graph/ops/OperatorRegistry.h>

namespace qlower_vk {
namespace {

constexpr uint32_t kCombineThreads = 64;

uint32_t chunk_size_for(int64_t context_len) {
  return context_len > 256 ? 64u : 32u;
}

void sdpa_with_kv_cache(ComputeGraph& graph, const std::vector<ValueRef>& args) {
  int i = 0;
  const ValueRef q = args.at(i++);
  const ValueRef k = args.at(i++);
  const ValueRef v = args.at(i++);
  const ValueRef k_cache_data = args.at(i++);
  const ValueRef v_cache_data = args.at(i++);
  const ValueRef input_pos = args.at(i++);
  const ValueRef seq_len = args.at(i++);
  const ValueRef attn_mask = args.at(i++);
  const ValueRef dropout_p = args.at(i++);
  const ValueRef is_causal = args.at(i++);
  const ValueRef scale = args.at(i++);
  const ValueRef out = args.at(i++);
  (void)seq_len;

  const utils::StorageType storage = graph.storage_type_of(q);
  const ValueRef k_cache =
      graph.add_tensor_like(k_cache_data, storage, utils::kWidthPacked);
  const ValueRef v_cache =
      graph.add_tensor_like(v_cache_data, storage, utils::kWidthPacked);

  const int64_t D = graph.size_at<int64_t>(-1, q);
  const int64_t Hq = graph.size_at<int64_t>(-2, q);
  const int64_t Hkv = graph.size_at<int64_t>(-2, k);
  const int64_t C = graph.size_at<int64_t>(-3, k_cache);

  auto add_stock = [&]() {
    call_stock_op(graph, "update_cache.default", {k, k_cache, input_pos, -1});
    call_stock_op(graph, "update_cache.default", {v, v_cache, input_pos, -1});
    call_stock_op(
        graph,
        "llama.custom_sdpa.default",
        {q, k_cache, v_cache, input_pos, attn_mask, dropout_p, is_causal, scale, out});
  };

  const bool fast = all_fp32_contiguous_buffers(graph, {q, k, v, out, k_cache, v_cache}) &&
      D % 4 == 0 && Hkv > 0 && Hq % Hkv == 0 && graph.val_is_none(attn_mask) &&
      graph.val_is_none(scale) && graph.val_is_symint(input_pos) &&
      graph.size_at<int64_t>(-1, k_cache) == D &&
      graph.size_at<int64_t>(-2, k_cache) == Hkv;
  if (!fast) {
    add_stock();
    return;
  }

  const GateCond many = [q](ComputeGraph* g) {
    return g->size_at<int64_t>(-3, q) > 1;
  };
  const size_t first = graph.execute_nodes().size();
  add_stock();
  gate_nodes_since(graph, first, many);

  const uint32_t CH = chunk_size_for(C);
  const int64_t NCH = (C + CH - 1) / CH;
  const int64_t D4 = D / 4;
  const ValueRef partials = graph.add_tensor(
      {Hq * NCH * (D4 + 1) * 4}, vkapi::kFloat, utils::kBuffer, utils::kWidthPacked);

  graph.execute_nodes().emplace_back(new DynamicDispatchNode(
      graph,
      VK_KERNEL(qlower_sdpa_decode_partial),
      [NCH, Hq, CH](ComputeGraph* g,
                    const vkapi::ShaderInfo&,
                    const std::vector<ArgGroup>& a,
                    const std::vector<ValueRef>&) -> utils::uvec3 {
        if (g->size_at<int64_t>(-3, a.at(2).refs.at(0)) != 1) {
          return {0u, 0u, 0u};
        }
        return {static_cast<uint32_t>(NCH) * CH, static_cast<uint32_t>(Hq), 1u};
      },
      [CH](ComputeGraph*,
           const vkapi::ShaderInfo&,
           const utils::uvec3&,
           const std::vector<ArgGroup>&,
           const std::vector<ValueRef>&) -> utils::uvec3 {
        return {CH, 1u, 1u};
      },
      {{partials, vkapi::kWrite},
       {{k_cache, v_cache}, vkapi::kReadWrite},
       {{q, k, v}, vkapi::kRead}},
      {graph.get_or_create_int_param_buffer(input_pos)},
      {},
      {static_cast<int32_t>(D),
       static_cast<int32_t>(Hq),
       static_cast<int32_t>(Hkv),
       static_cast<int32_t>(NCH),
       static_cast<int32_t>(C)},
      {}));

  graph.execute_nodes().emplace_back(new DynamicDispatchNode(
      graph,
      VK_KERNEL(qlower_sdpa_decode_combine),
      [Hq, q](ComputeGraph* g,
              const vkapi::ShaderInfo&,
              const std::vector<ArgGroup>&,
              const std::vector<ValueRef>&) -> utils::uvec3 {
        if (g->size_at<int64_t>(-3, q) != 1) {
          return {0u, 0u, 0u};
        }
        return {static_cast<uint32_t>(Hq) * kCombineThreads, 1u, 1u};
      },
      [](ComputeGraph*,
         const vkapi::ShaderInfo&,
         const utils::uvec3&,
         const std::vector<ArgGroup>&,
         const std::vector<ValueRef>&) -> utils::uvec3 {
        return {kCombineThreads, 1u, 1u};
      },
      {{out, vkapi::kWrite}, {partials, vkapi::kRead}},
      {graph.get_or_create_int_param_buffer(input_pos)},
      {},
      {static_cast<int32_t>(D),
       static_cast<int32_t>(NCH),
       static_cast<int32_t>(CH)},
      {q},
      [](ComputeGraph* g,
         const std::vector<ArgGroup>& a,
         const std::vector<ValueRef>& extra) {
        g->virtual_resize(a.at(0).refs.at(0), g->sizes_of(extra.at(0)));
      }));
}

} // namespace

REGISTER_OPERATORS {
  VK_REGISTER_OP(qlower.sdpa_with_kv_cache.default, sdpa_with_kv_cache);
}

} // namespace qlower_vk
