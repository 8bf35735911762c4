"""Timing of qlower's fused linear kernels on a Vulkan device (``qlower bench``).

Every number is taken with GPU timestamps and set against a compute-shader
copy measured in the same run (``copy_bandwidth``), the practical ceiling of
a bandwidth-bound kernel on that device. Weights rotate through enough copies
to exceed the last-level cache, so a GEMV's bytes really come from memory.

Per layer two times are reported:
  ``time_us``   median of single calls, each fenced by timestamps and
                barriers (a layer that waits for the previous one);
  ``stream_us`` mean per call over back-to-back calls on rotating weight
                copies with no barrier between them (independent layers
                in flight, as a GPU overlaps them).
``gbps`` and ``fraction`` use the better of the two; both are in the JSON.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import numpy as np

from qlower.vk.device import Buffer, Device, open_device, pack_push
from qlower.vk.kernels import LinearQta8aQga4w, Q8taLinear, choose_qparams_per_token

# Weight bytes a rotation must exceed: larger than any current GPU's L2
# (H100 50 MB, H200 60 MB) with margin.
ROTATE_BYTES = 160 << 20
COPY_BYTES = 256 << 20


@dataclass
class KernelTiming:
    name: str
    op: str
    m: int
    n: int
    k: int
    variant: str
    bytes: int          # bytes one call must move (weights, scales, sums, activations, output)
    ops: int            # 2 * M * N * K
    time_us: float
    stream_us: float
    gbps: float
    gops: float
    fraction: float     # of the copy bandwidth
    group_size: int | None = None
    copies: int = 1
    extra: dict = field(default_factory=dict)


def copy_bandwidth(dev: Device, nbytes: int = COPY_BYTES, repeats: int = 10) -> float:
    """GB/s (bytes read + written) of the streaming copy shader, median of repeats."""
    nbytes = nbytes // 16 * 16
    src, dst = dev.buffer(nbytes), dev.buffer(nbytes)
    pipe = dev.pipeline("copy_buffer_uvec4")
    count = nbytes // 16
    wg = pipe.local_size[0]
    groups = min(-(-count // (wg * 4)), 65535)
    _warm_up(dev, lambda c, i: c.dispatch(pipe, [dst, src], pack_push("I", count), (groups, 1, 1)), 1)
    times = []
    with dev.commands(max_timestamps=2 * (repeats + 1)) as c:
        for _ in range(repeats + 1):  # the first is a warm-up
            a = c.timestamp()
            c.dispatch(pipe, [dst, src], pack_push("I", count), (groups, 1, 1))
            c.barrier()
            b = c.timestamp()
            times.append((a, b))
    secs = [c.elapsed_ns(a, b) * 1e-9 for a, b in times[1:]]
    dev.free(src)
    dev.free(dst)
    return 2 * nbytes / statistics.median(secs) / 1e9


def _warm_up(dev: Device, record, copies: int, seconds: float = 0.05) -> None:
    """Run calls until the GPU has been busy for ``seconds``: clocks ramp up
    from idle over milliseconds, and short timings taken cold are wrong."""
    n = 8
    for _ in range(6):
        with dev.commands(max_timestamps=2) as c:
            a = c.timestamp()
            for i in range(n):
                record(c, i % copies)
            b = c.timestamp()
        if c.elapsed_ns(a, b) * 1e-9 >= seconds:
            return
        n *= 4


def _time_calls(dev: Device, record, copies: int, repeats: int, stream: int) -> tuple[float, float]:
    """(median single-call seconds, mean back-to-back seconds); record(c, i)
    records one call on weight copy i."""
    _warm_up(dev, record, copies)
    n_ts = 2 * repeats + 2
    with dev.commands(max_timestamps=n_ts) as c:
        pairs = []
        for i in range(repeats):
            a = c.timestamp()
            record(c, i % copies)
            c.barrier()
            pairs.append((a, c.timestamp()))
        s0 = c.timestamp()
        for i in range(stream):
            record(c, i % copies)
        c.barrier()
        s1 = c.timestamp()
    single = statistics.median(c.elapsed_ns(a, b) for a, b in pairs) * 1e-9
    return single, c.elapsed_ns(s0, s1) * 1e-9 / stream


MAX_COPIES = 64


def _copies_for(nbytes: int, rotate_bytes: int) -> int:
    # Capped: a layer so small that 64 copies fit in L2 is cache-resident in a
    # real model too.
    return min(MAX_COPIES, max(1, -(-rotate_bytes // max(nbytes, 1))))


def _duplicate(dev: Device, bufs: tuple[Buffer, ...], copies: int) -> list[tuple[Buffer, ...]]:
    out = [bufs]
    with dev.commands() as c:
        for _ in range(copies - 1):
            dup = tuple(dev.buffer(b.size) for b in bufs)
            for s, d in zip(bufs, dup):
                c.copy(s, d, s.size)
            out.append(dup)
    return out


def bench_linear_qta8a_qga4w(dev: Device, layer: LinearQta8aQga4w, m: int = 1, *, name: str = "",
                             copy_gbps: float, variant: str | None = None, dtype: str = "fp32",
                             repeats: int = 20, stream: int = 50, rotate_bytes: int = ROTATE_BYTES,
                             x=None) -> KernelTiming:
    a = layer.activations(m, dtype)
    if x is None:
        x = np.random.default_rng(0).standard_normal((m, layer.k)).astype(np.float32)
    s, z = choose_qparams_per_token(x)
    layer.set_input(a, x, s, z)
    with dev.commands() as c:
        layer.record_quantize(c, a)
    copies = _copies_for(layer.weight_bytes, rotate_bytes)
    sets = _duplicate(dev, (layer.w, layer.s, layer.corr), copies)
    used = []

    def record(c, i):
        used.append(layer.record_linear(c, a, variant, sets[i]))

    single, streamed = _time_calls(dev, record, copies, repeats, stream)
    for dup in sets[1:]:
        for b in dup:
            dev.free(b)
    es = 4 if dtype == "fp32" else 2
    nbytes = layer.weight_bytes + m * layer.kc * 80 + m * layer.n * es + m * 12 + layer.n * 4
    best = min(single, streamed)
    ops = 2 * m * layer.n * layer.k
    return KernelTiming(
        name=name, op="linear_qta8a_qga4w", m=m, n=layer.n, k=layer.k, variant=used[-1],
        bytes=nbytes, ops=ops, time_us=single * 1e6, stream_us=streamed * 1e6,
        gbps=nbytes / best / 1e9, gops=ops / best / 1e9,
        fraction=nbytes / best / 1e9 / copy_gbps, group_size=layer.group_size, copies=copies,
    )


def bench_q8ta_linear(dev: Device, layer: Q8taLinear, m: int = 1, *, name: str = "",
                      copy_gbps: float, variant: str | None = None, repeats: int = 20,
                      stream: int = 50, rotate_bytes: int = ROTATE_BYTES) -> KernelTiming:
    xb, _ = layer.buffers(m)
    dev.upload(xb, np.random.default_rng(0).integers(-128, 128, (m, layer.k), dtype=np.int8))
    copies = _copies_for(layer.weight_bytes, rotate_bytes)
    sets = _duplicate(dev, (layer.w,), copies)
    used = []

    def record(c, i):
        used.append(layer.record(c, m, variant, sets[i][0]))

    single, streamed = _time_calls(dev, record, copies, repeats, stream)
    for dup in sets[1:]:
        dev.free(dup[0])
    nbytes = layer.weight_bytes + m * layer.k + m * layer.n4
    best = min(single, streamed)
    ops = 2 * m * layer.n * layer.k
    return KernelTiming(
        name=name, op="q8ta_linear", m=m, n=layer.n, k=layer.k, variant=used[-1], bytes=nbytes,
        ops=ops, time_us=single * 1e6, stream_us=streamed * 1e6, gbps=nbytes / best / 1e9,
        gops=ops / best / 1e9, fraction=nbytes / best / 1e9 / copy_gbps, copies=copies,
    )


def random_qga4w(n: int, k: int, group_size: int, seed: int = 0):
    """Serialized-layout operands of a random int4 layer: (weights, sums, scales)."""
    rng = np.random.default_rng(seed)
    g = k // group_size
    w = rng.integers(-8, 8, (n, k), dtype=np.int8)
    k8 = -(-k // 8) * 8
    u = np.full((n, k8), 8, np.uint8)
    u[:, :k] = (w + 8).astype(np.uint8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    n4, n8 = -(-n // 4) * 4, -(-n // 8) * 8
    scales = np.zeros((g, n4), np.float32)
    scales[:, :n] = rng.uniform(0.005, 0.02, (g, n)).astype(np.float32)
    sums = np.zeros((g, n8), np.int32)
    sums[:, :n] = w.reshape(n, g, group_size).sum(axis=2, dtype=np.int32).T
    return packed, sums, scales


def bench_layers(layers, device: Device | str | int | None = None, tokens: int = 1,
                 repeats: int = 20, copy_bytes: int | None = None) -> dict:
    """Bench fused layers given as ``(name, op, args)`` with ``args`` in the op's
    schema order (as ``qlower.vk.ops.run_op`` takes them). Returns one
    JSON-ready document: device, copy bandwidth, per-layer timings."""
    from qlower.vk.ops import build_layer

    dev = device if isinstance(device, Device) else open_device(device)
    try:
        if copy_bytes is None:
            copy_bytes = (16 << 20) if dev.is_cpu else COPY_BYTES
        copy_gbps = copy_bandwidth(dev, copy_bytes)
        rotate = copy_bytes if dev.is_cpu else ROTATE_BYTES
        rows = []
        for name, op, args in layers:
            layer, kind = build_layer(dev, op, args)
            if kind == "linear_qta8a_qga4w":
                t = bench_linear_qta8a_qga4w(dev, layer, tokens, name=name, copy_gbps=copy_gbps,
                                             repeats=repeats, rotate_bytes=rotate)
            else:
                t = bench_q8ta_linear(dev, layer, tokens, name=name, copy_gbps=copy_gbps,
                                      repeats=repeats, rotate_bytes=rotate)
            rows.append(asdict(t))
        return {"device": dev.name, "copy_gbps": copy_gbps, "copy_bytes": copy_bytes,
                "tokens": tokens, "layers": rows}
    finally:
        if dev is not device:
            dev.close()
