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
