"""qlower's own ET-VK runtime ops: the exporter's side.

``export --runtime qlower`` writes files whose Vulkan graph calls ops that the stock
ExecuTorch Vulkan runtime does not have; they run where the runtime is linked with
qlower's op library (``runtime/``, built by ``scripts/build_runtime.sh``):

* ``qlower.rms_norm``: RMSNorm as a parallel reduction;
* ``qlower.linear_q4gsw``: an int4 linear that skips the activation quantization on one
  row (a decode step) and fuses its epilogue (SiLU·mul of stacked gate/up, a residual add);
* ``qlower.linear_q4gsw_split``: a merged Q/K/V projection written straight as heads;
* ``qlower.sdpa_with_kv_cache``: KV-cache attention, one split-K pass and a combine on one row.

Each computes what the stock ops it replaces compute (:mod:`qlower.references` has the
references the golden executor runs); for several rows the library runs the stock kernels.

:mod:`.ops` defines the ops for torch and ExecuTorch's partitioner; :mod:`.rewrite` is the
Vulkan preprocess pass that puts them into the graph.
"""

RUNTIME_STOCK = "stock"
RUNTIME_QLOWER = "qlower"
RUNTIMES = (RUNTIME_STOCK, RUNTIME_QLOWER)
OP_NAMESPACE = "qlower"
# The ops' schemas: the op library's contract (runtime/README.md), inputs in this order, then the output(s).
LINEAR_SCHEMA = ("linear_q4gsw(Tensor x, Tensor weights, Tensor? weight_sums, Tensor weight_scales, int group_size, "
                 "Tensor? bias, Tensor? residual, bool quantize_input, str epilogue) -> Tensor")
SPLIT_SCHEMA = ("linear_q4gsw_split(Tensor x, Tensor weights, Tensor? weight_sums, Tensor weight_scales, "
                "int group_size, Tensor? bias, bool quantize_input, int[] split_sizes, int head_dim) -> Tensor[]")
RMS_NORM_SCHEMA = "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"
# The same arguments as ExecuTorch's llama::sdpa_with_kv_cache (extension/llm/custom_ops).
SDPA_SCHEMA = ("sdpa_with_kv_cache(Tensor query, Tensor key, Tensor value, Tensor(a!) key_cache, "
               "Tensor(b!) value_cache, SymInt start_pos, SymInt seq_len, Tensor? attn_mask=None, "
               "float drpout_p=0., bool is_causal=False, float? scale=None) -> Tensor")
SCHEMAS = (LINEAR_SCHEMA, SPLIT_SCHEMA, RMS_NORM_SCHEMA, SDPA_SCHEMA)
# The operators the op library registers, as a VkGraph names them.
LIBRARY_OPS = frozenset(f"{OP_NAMESPACE}.{s.split('(', 1)[0]}.default" for s in SCHEMAS)
NEEDS_LIBRARY = "an ExecuTorch Vulkan runtime linked with qlower's op library (runtime/README.md)"


def required_runtime(op_names) -> str:
    """``"qlower"`` when any of a Vulkan graph's op names (``qlower.rms_norm.default``) is the op library's,
    else ``"stock"``."""
    return RUNTIME_QLOWER if any(name in LIBRARY_OPS for name in op_names) else RUNTIME_STOCK
