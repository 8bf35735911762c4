"""Group-wise symmetric int4 weight quantizers: round-to-nearest, HQQ (scale only) and GPTQ.

All three produce the one stored format ET-VK's fused ops read: int values in
[-8, 7] (int8 tensors ``[N, K]``), one float32 scale per group of ``group_size``
values along K (``[N, K / group_size]``), zero points 0. Only the values and
scales they pick differ; the packing, the ops and the runtime stay the same.

* ``rtn``: ``s = max|w| / 7.5`` per group, ``q = clamp(round(w / s), -8, 7)``
  (torchao's symmetric ``choose_qparams_affine``).
* ``hqq``: torchao's half-quadratic scale-only search
  (``IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY``): alternate rounding and the
  least-squares scale ``s = <w, q> / <q, q>``. Data-free.
* ``gptq``: Frantar et al. 2022 (GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers). With ``H = 2 XᵀX`` from the layer's
  calibration inputs, columns are quantized one at a time and each one's
  rounding error is spread over the columns not yet quantized through the upper
  Cholesky factor of ``H⁻¹``, so that ``‖XWᵀ − XŴᵀ‖`` (not ``‖W − Ŵ‖``) is
  kept small. Rows are independent given H, so a large weight is quantized a
  chunk of rows at a time with the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory import release_pages

QMIN, QMAX = -8, 7
# RTN's scale divisor: torchao's symmetric mapping spreads max|w| over (qmax - qmin) / 2 steps.
RTN_DIVISOR = (QMAX - QMIN) / 2
EPS = torch.finfo(torch.float32).eps

# Scale choices for GPTQ's groups: "absmax" (RTN's), "mse" (best clip ratio for the group's
# squared error), "hqq" (HQQ's least-squares scale).
GPTQ_SCALE_CHOICES = ("absmax", "mse", "hqq")


def _divisor(by: float, x: torch.Tensor) -> torch.Tensor:
    """``by`` as a tensor on ``x``'s device, so that dividing ``x`` by it is a true division on every device:
    CUDA divides by a Python number as a multiplication by its reciprocal (7.5's is inexact)."""
    return torch.tensor(by, dtype=x.dtype, device=x.device)


def _over_rtn_divisor(x: torch.Tensor) -> torch.Tensor:
    """``x / RTN_DIVISOR``, rounded alike on every device."""
    return x / _divisor(RTN_DIVISOR, x)


def true_divide(x: torch.Tensor, by: float) -> torch.Tensor:
    """``x / by`` in place, rounded alike on every device."""
    return x.div_(_divisor(by, x))


def rtn_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """RTN's scale per group: [N, K / group_size]."""
    n, k = w.shape
    return _over_rtn_divisor(w.reshape(n, k // group_size, group_size).abs().amax(dim=-1)).clamp_min(EPS)


def quantize_with_scales(w: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 values in [-8, 7] of ``w`` [N, K] with the given group scales [N, K / group_size]."""
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size) / scales.unsqueeze(-1)
    return groups.round().clamp(QMIN, QMAX).to(torch.int8).reshape(n, k)


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    return (q.reshape(n, k // group_size, group_size).to(torch.float32) * scales.unsqueeze(-1)).reshape(n, k)


def rtn(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.to(torch.float32)
    scales = rtn_scales(w, group_size)
    return quantize_with_scales(w, scales, group_size), scales


def hqq(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's own HQQ scale-only search (the same call its intx configs make)."""
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    q, scales = _choose_qparams_and_quantize_scale_only_hqq(w.to(torch.float32), [1, group_size], QMIN, QMAX)
    return q.to(torch.int8), scales.reshape(w.shape[0], -1).to(torch.float32)


# Clip ratios tried by the "mse" scale choice (1.0 is RTN's scale).
MSE_CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 … 0.6


def mse_scales(w: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``w`` [..., g] (groups along the last dimension) the scale minimising the
    (``weight``-weighted, ``weight`` broadcasting against ``w``) squared rounding error over clip ratios of
    max|w|. The errors are summed in float64, so that a CUDA device and the CPU (whose sums run in other
    orders) pick the same ratio. Every group is searched on its own: [N, G, g] gives the scales of G groups
    at once, the same as G calls on [N, g]."""
    amax = w.abs().amax(dim=-1).clamp_min(EPS)
    best = _over_rtn_divisor(amax)
    best_err = torch.full_like(amax, float("inf"), dtype=torch.float64)
    weight = weight.to(w.device, torch.float64) if weight is not None else None
    err = torch.empty_like(w)  # the rounding error of one ratio, made in place (the same values as out of place)
    for ratio in MSE_CLIP_RATIOS:
        s = _over_rtn_divisor(amax * ratio).clamp_min(EPS)
        scale = s.unsqueeze(-1)
        torch.div(w, scale, out=err).round_().clamp_(QMIN, QMAX).mul_(scale)
        torch.sub(w, err, out=err).mul_(err)
        squared = err.to(torch.float64)
        total = squared.mul_(weight).sum(-1) if weight is not None else squared.sum(-1)
        better = total < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, total, best_err)
    return best


# Values searched at once by static_scales (a slab of rows, all their groups): stays in the CPU's caches.
_SEARCH_VALUES = 1 << 18


def static_scales(w: torch.Tensor, group_size: int, how: str, weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Scales [N, K / group_size] of every group of ``w`` [N, K] (``how``: one of GPTQ_SCALE_CHOICES), the
    ``dead`` input columns counted as zeros, ``weight`` [K] weighting the "mse" search: the same values as
    :func:`group_scales` on each group. "mse" searches a slab of rows' groups at once."""
    n, k = w.shape
    groups = k // group_size
    scales = torch.empty(n, groups, dtype=torch.float32)
    if how != "mse":
        for g in range(groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            block = w[:, cols]
            if bool(dead[cols].any()):
                block = block.masked_fill(dead[cols], 0.0)
            scales[:, g] = group_scales(block, how, weight[cols])
        return scales
    by_group = weight.reshape(groups, group_size)
    any_dead = bool(dead.any())
    step = max(1, _SEARCH_VALUES // k)
    for r0 in range(0, n, step):
        rows = w[r0:r0 + step]
        if any_dead:
            rows = rows.masked_fill(dead, 0.0)
        scales[r0:r0 + step] = mse_scales(rows.reshape(-1, groups, group_size), by_group)
    return scales


def group_scales(w: torch.Tensor, how: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scales [N] of one group of columns ``w`` [N, g] chosen by ``how`` (one of GPTQ_SCALE_CHOICES)."""
    if how == "absmax":
        return rtn_scales(w, w.shape[1])[:, 0]
    if how == "mse":
        return mse_scales(w, weight)
    if how == "hqq":  # torchao's search runs on the CPU
        return hqq(w.cpu(), w.shape[1])[1][:, 0].to(w.device)
    raise ValueError(f"unknown scale choice {how!r}; legal: {', '.join(GPTQ_SCALE_CHOICES)}")


def gptq_device(choice: str = "auto") -> torch.device:
    """Where GPTQ's column loop runs: ``auto`` a CUDA GPU when torch sees one, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class GptqSettings:
    """GPTQ's knobs (defaults chosen by the measurements in docs/quantization.md, "Quality of int4 weights")."""

    damp: float = 0.01  # dampening added to H's diagonal, as a fraction of its mean
    block: int = 128  # columns per lazy-update block
    act_order: bool = True  # columns by decreasing H diagonal, group scales fixed up front (static groups)
    scales: str = "mse"  # how each group's scale is chosen (GPTQ_SCALE_CHOICES)


# Rows (and columns) of H handled at once: filling the working copy, and the tiles of the factor.
_PREPARE_ROWS = 256


def to_cpu(x: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``x``, wherever it is kept: the factor's arithmetic runs on such copies, so
    that a matrix kept on a GPU and one kept in host memory are factored with the same bits."""
    return x.to("cpu", memory_format=torch.contiguous_format, copy=True)


def on_cpu(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is in host memory, else a contiguous CPU copy (:func:`to_cpu`)."""
    return x if x.device.type == "cpu" else to_cpu(x)


def prepare_hessian(h: torch.Tensor, damp: float, perm: torch.Tensor | None = None,
                    consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor U of the dampened H⁻¹ (H⁻¹ = UᵀU), mask of dead input columns), both in the
    order ``perm`` visits H's columns, on H's device.

    Columns never seen by the inputs (zero diagonal) get a unit diagonal and are quantized as RTN would.
    U comes without forming H⁻¹: with J the order reversal, if J H J = M Mᵀ (M lower) then U = J M⁻¹ J.
    One float64 working copy of H, permuted into the reversed visiting order, is factored and inverted in
    place a tile at a time (reading its lower triangle: the upper one in the visiting order), and U is its
    float32 rounding. The matrix stays where H is (a CUDA GPU's memory too); every tile's arithmetic runs
    on a CPU copy of it, so U has the same bits wherever H is kept.

    ``consume``: ``h`` (float32, owning its storage) is given up: its storage grows into the working copy
    and ends up holding U, so the peak is the float64 copy alone (512 MB at K = 8192) instead of H, the
    copy and U at once (1 GB); H's values wait in a temporary file in case dampening must be retried.
    Otherwise ``h`` is not changed. Either way U has the same bits.
    """
    k = h.shape[0]
    order = perm.cpu() if perm is not None else torch.arange(k)
    diag = torch.diagonal(h).to("cpu", torch.float64)[order]
    dead = diag == 0
    diag[dead] = 1.0
    mean = torch.mean(diag)
    reverse = order.flip(0)  # the working copy's order: the visiting order reversed
    dead_reversed = dead.flip(0)
    in_place = consume and _owns_storage(h)
    if in_place:
        storage, spill = h.untyped_storage(), _spill(h)
        try:
            if storage.nbytes() < k * k * 8:  # grown (a new allocation, then a copy); hessian_sum has the room
                storage.resize_(k * k * 8)  # the float32 values stay at the front
        except RuntimeError:  # pinned (a NumPy view was taken of it): factor a separate copy
            spill.close()
            in_place = False
    work = _view(storage, torch.float64, k) if in_place else torch.empty(k, k, dtype=torch.float64, device=h.device)

    def fill(attempt: int, extra: torch.Tensor) -> None:
        if in_place:
            if attempt:
                _unspill(spill, _view(storage, torch.float32, k))
            _widen_in_place(storage, k)
        else:
            for start in range(0, k, _PREPARE_ROWS):
                work[start:start + _PREPARE_ROWS] = h[start:start + _PREPARE_ROWS]
        _permute_in_place(work, reverse)
        on_diag = on_cpu(work.diagonal()).clone()
        on_diag[dead_reversed] = 1.0
        on_diag += extra
        work.diagonal().copy_(on_diag)

    try:
        extra = damp * mean
        for attempt in range(7):
            fill(attempt, extra)
            if _cholesky_in_place(work):
                break
            extra = extra + (10 ** attempt) * damp * mean  # not positive definite at float precision: dampen more
        else:
            raise ValueError("the calibration Hessian is not positive definite even after dampening")
    finally:
        if in_place:
            spill.close()
    _zero_upper_in_place(work)
    _invert_lower_in_place(work)
    _rotate_in_place(work)  # J M⁻¹ J: upper, in the visiting order
    if in_place:
        u = _narrow_in_place(storage, k)
        if u.device.type == "cpu":
            release_pages(storage.data_ptr() + k * k * 4, storage.nbytes() - k * k * 4)  # the float64 copy's back half
        return u, dead
    return work.to(torch.float32), dead


def _cholesky_in_place(a: torch.Tensor) -> bool:
    """a's lower triangle ← its Cholesky factor M (a = M Mᵀ, read from the lower triangle), a tile column at
    a time (right-looking); the strict upper triangle is left with scratch. False: not positive definite."""
    k, t = a.shape[0], _PREPARE_ROWS
    for j0 in range(0, k, t):
        j1 = min(k, j0 + t)
        panel = to_cpu(a[j0:, j0:j1])  # the tile column, from the diagonal down
        diagonal, info = torch.linalg.cholesky_ex(panel[:j1 - j0])
        if int(info) != 0:
            return False
        below = torch.linalg.solve_triangular(diagonal.mT, panel[j1 - j0:], upper=True, left=False)
        panel[:j1 - j0], panel[j1 - j0:] = diagonal, below
        a[j0:, j0:j1] = panel
        for i0 in range(j1, k, t):  # the trailing lower triangle, a row of tiles at a time
            i1 = min(k, i0 + t)
            rows = to_cpu(a[i0:i1, j1:i1])
            rows -= below[i0 - j1:i1 - j1] @ below[:i1 - j1].mT
            a[i0:i1, j1:i1] = rows
    return True


def _invert_lower_in_place(a: torch.Tensor) -> None:
    """a ← a⁻¹ for a lower-triangular ``a`` (zero above the diagonal), a tile column at a time from the last:
    X_jj = M_jj⁻¹, X_ij = −(Σ_l X_il M_lj) X_jj over the already inverted trailing part."""
    k, t = a.shape[0], _PREPARE_ROWS
    for j0 in reversed(range(0, k, t)):
        j1 = min(k, j0 + t)
        inverse = torch.linalg.solve_triangular(to_cpu(a[j0:j1, j0:j1]), torch.eye(j1 - j0, dtype=a.dtype), upper=False)
        if j1 < k:
            below = to_cpu(a[j1:, j0:j1])  # M's tile column under the diagonal
            made = torch.empty_like(below)
            for i0 in range(j1, k, t):
                i1 = min(k, i0 + t)
                made[i0 - j1:i1 - j1] = to_cpu(a[i0:i1, j1:i1]) @ below[:i1 - j1]
            a[j1:, j0:j1] = (made @ inverse).neg_()
        a[j0:j1, j0:j1] = inverse


def _zero_upper_in_place(a: torch.Tensor) -> None:
    """a's strict upper triangle ← 0 (a tile at a time)."""
    for rows, cols in _tiles(a.shape[0]):
        if rows == cols:
            a[rows, cols] = torch.tril(on_cpu(a[rows, cols]))
        else:
            a[rows, cols] = 0


def _rotate_in_place(a: torch.Tensor) -> None:
    """a ← J a J (both orders reversed: a[i, j] ← a[k-1-i, k-1-j]), swapping row tiles from both ends."""
    k = a.shape[0]
    half = k // 2
    for r0 in range(0, half, _PREPARE_ROWS):
        r1 = min(half, r0 + _PREPARE_ROWS)
        top = to_cpu(a[r0:r1])
        a[r0:r1] = on_cpu(a[k - r1:k - r0]).flip(0, 1)
        a[k - r1:k - r0] = top.flip(0, 1)
    if k % 2:
        a[half] = on_cpu(a[half]).flip(0)


def _with_room(k: int, device: torch.device | str) -> torch.Tensor:
    """An unset float32 [k, k] on ``device`` whose storage has room behind it for :func:`prepare_hessian`'s
    float64 working copy: growing it in place then needs no new allocation and copy, and the room, never
    written until then, is not resident memory."""
    return _view(torch.UntypedStorage(k * k * 8, device=device), torch.float32, k)


def hessian_sum(k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A float32 [k, k] of zeros on ``device`` to sum a Hessian in (:func:`_with_room`)."""
    return _with_room(k, device).zero_()


def moved_hessian(h: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``h`` copied to ``device`` (:func:`_with_room`), a slab of rows at a time, so that the factor can be
    made there in place."""
    k = h.shape[0]
    moved = _with_room(k, device)
    for start in range(0, k, _PREPARE_ROWS):
        moved[start:start + _PREPARE_ROWS] = h[start:start + _PREPARE_ROWS]
    return moved


# Bytes of the Gram product made at once on the CPU by add_gram (a slab of its rows).
_GRAM_BYTES = 16 << 20


def add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += 2 xᵀx`` for ``x`` [T, K]: the product is made on the CPU a slab of rows at a time and each
    slab is added where ``total`` is kept (a GPU's memory too), with the same bits either way."""
    x = x.cpu()
    step = max(1, _GRAM_BYTES // (4 * x.shape[1]))
    for start in range(0, x.shape[1], step):
        part = x[:, start:start + step].T @ x
        total[start:start + step] += part.mul_(2.0).to(total.device)


def _tiles(k: int):
    """(rows, columns) slices of the tiles on and above the diagonal of a [k, k] matrix."""
    for a in range(0, k, _PREPARE_ROWS):
        for b in range(a, k, _PREPARE_ROWS):
            yield slice(a, a + _PREPARE_ROWS), slice(b, b + _PREPARE_ROWS)


def _owns_storage(h: torch.Tensor) -> bool:
    """Is ``h`` a float32 matrix at the front of a storage of its own, which has (hessian_sum) or can be
    given the room for the float64 working copy?"""
    nbytes = h.untyped_storage().nbytes()
    return (h.dtype == torch.float32 and h.is_contiguous() and h.storage_offset() == 0
            and (nbytes == h.numel() * 8 or (nbytes == h.numel() * 4 and h.untyped_storage().resizable())))


def _view(storage, dtype: torch.dtype, k: int) -> torch.Tensor:
    """The [k, k] matrix of ``dtype`` at the front of ``storage``."""
    return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, 0, (k, k))


def _widen_in_place(storage, k: int) -> None:
    """float32 [k, k] at the front of ``storage`` (k² · 8 bytes) → float64 [k, k] over all of it. Rows go
    last first: float64 row i overwrites float32 rows 2i and 2i + 1, which are read by then."""
    narrow, wide = _view(storage, torch.float32, k), _view(storage, torch.float64, k)
    for end in range(k, 0, -_PREPARE_ROWS):
        start = max(0, end - _PREPARE_ROWS)
        wide[start:end] = narrow[start:end].to(torch.float64)  # converted (read) before written


def _narrow_in_place(storage, k: int) -> torch.Tensor:
    """float64 [k, k] over ``storage`` → its float32 rounding at the front (first rows first: float32 row i
    lands on float64 row i / 2, read by then); the float32 view is returned."""
    narrow, wide = _view(storage, torch.float32, k), _view(storage, torch.float64, k)
    for start in range(0, k, _PREPARE_ROWS):
        end = min(k, start + _PREPARE_ROWS)
        narrow[start:end] = wide[start:end].to(torch.float32)
    return narrow


def _permute_in_place(work: torch.Tensor, order: torch.Tensor) -> None:
    """``work ← work[order][:, order]`` with one row and one chunk of rows as temporaries: rows along the
    permutation's cycles, then each chunk's columns."""
    moved = [False] * len(order)
    targets = order.tolist()
    for first in range(len(targets)):
        if moved[first] or targets[first] == first:
            continue
        held, row = work[first].clone(), first
        while True:
            moved[row] = True
            source = targets[row]
            if source == first:
                work[row] = held
                break
            work[row] = work[source]
            row = source
    for start in range(0, len(targets), _PREPARE_ROWS):  # indexed on the CPU (so are all of a GPU's indexes)
        work[start:start + _PREPARE_ROWS] = on_cpu(work[start:start + _PREPARE_ROWS])[:, order]


def _spill(h: torch.Tensor):
    """A temporary file holding ``h``'s float32 values (to refill the working copy for another try). Written
    from copies of a few rows at a time: a NumPy view of ``h`` itself would pin its storage's size."""
    import tempfile

    f = tempfile.TemporaryFile(prefix="qlower_hessian_")
    for start in range(0, h.shape[0], _PREPARE_ROWS):
        f.write(memoryview(to_cpu(h[start:start + _PREPARE_ROWS]).numpy()).cast("B"))
    return f


def _unspill(f, into: torch.Tensor) -> None:
    f.seek(0)
    row_bytes = into.shape[1] * 4
    for start in range(0, into.shape[0], _PREPARE_ROWS):
        rows = min(_PREPARE_ROWS, into.shape[0] - start)
        data = f.read(rows * row_bytes)
        if len(data) != rows * row_bytes:
            raise OSError("the Hessian's temporary file was cut short")
        into[start:start + rows] = torch.frombuffer(bytearray(data), dtype=torch.float32).view(rows, -1)


@dataclass(frozen=True)
class Prepared:
    """What GPTQ needs from H, shared by every row chunk of one weight and every weight of one input."""

    u: torch.Tensor  # upper Cholesky factor of the dampened H⁻¹, in visiting order
    dead: torch.Tensor  # input columns the calibration never saw (zero diagonal)
    perm: torch.Tensor  # visiting order of the columns
    diag: torch.Tensor  # H's diagonal (original order): weights the "mse" scale choice


def prepare(h: torch.Tensor, settings: GptqSettings, consume: bool = False,
            device: torch.device | str | None = None) -> Prepared:
    """GPTQ's factor of ``h``. ``consume``: ``h`` is given up to hold the factor (:func:`prepare_hessian`).
    ``device``: where the factor is kept (the column loop's device); it is made where ``h`` is, with the
    same bits anywhere."""
    diag = torch.diagonal(h).to("cpu", torch.float32, copy=True)
    perm = torch.argsort(diag, descending=True, stable=True) if settings.act_order else torch.arange(h.shape[0])
    u, dead = prepare_hessian(h.to(torch.float32), settings.damp, perm if settings.act_order else None, consume)
    if device is not None and torch.device(device) != u.device:
        u = u.to(device)  # the first copy (a consumed H's storage) goes once the caller lets go of H
    return Prepared(u, dead[torch.argsort(perm)], perm, diag)


# Bytes of the lazy update's float64 product made at once on the CPU (a slab of rows; the bits are the same).
_UPDATE_BYTES = 16 << 20


def gptq(w: torch.Tensor, h: torch.Tensor | None, group_size: int, settings: GptqSettings = GptqSettings(),
         prepared: Prepared | None = None, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` [N, K] given ``h`` [K, K] (``2 XᵀX`` over the calibration inputs X [T, K]).

    Returns int8 values [N, K] in [-8, 7] and float32 scales [N, K / group_size] (on the CPU). Without
    act-order a group's scale is chosen when its first column comes up (from the error-updated weights);
    with act-order the scales are chosen up front from the original weights (static groups) and the
    columns are visited by decreasing ``H`` diagonal. ``prepared``: :func:`prepare`'s result, when
    quantizing a weight a chunk of rows at a time (``h`` may then be None). ``device``: where the column
    loop runs (default: ``w``'s); every step there is an elementwise float32 operation, rounded alike on a
    CUDA device and the CPU, except the lazy block update, which runs in float64 so that the different
    summation orders round to the same float32 values. The scale search always runs on the CPU.
    """
    p = prepared if prepared is not None else prepare(h, settings)
    dev = torch.device(device) if device is not None else w.device
    # Everything but the column loop's arithmetic runs on the CPU: the scale search, the masks and the
    # permutations. On a GPU each kind of kernel costs host memory once first used (its module is loaded),
    # so the loop keeps to a few kinds (copies, + − × ÷, round, clamp and the float64 product).
    source = on_cpu(w).to(torch.float32)  # not changed: the loop works on a permuted copy
    n, k = source.shape
    groups = k // group_size
    dead, diag = p.dead.cpu(), p.diag.cpu()
    if settings.act_order:  # static groups: every scale chosen up front, from the original weights
        scales = static_scales(source, group_size, settings.scales, diag, dead)
    else:
        scales = torch.empty(n, groups, dtype=torch.float32)
    perm = p.perm.cpu()
    dead_visited = dead[perm]
    w = torch.empty(n, k, dtype=torch.float32, device=dev)  # the visiting order, filled a slab of rows at a time
    step = max(1, _UPDATE_BYTES // (4 * k))
    for r0 in range(0, n, step):
        rows = source[r0:r0 + step][:, perm]
        rows[:, dead_visited] = 0
        w[r0:r0 + step] = rows
    del source
    device_scales = scales.to(dev)  # the scales themselves on the CPU; without act-order each group's is set below
    # The lazy update's float64 product, a slab of rows at a time on the CPU (bounds its temporaries).
    slab = n if dev.type != "cpu" else max(1, _UPDATE_BYTES // (8 * k))
    group_of = (perm // group_size).tolist()  # the (original) group of each visited column
    u = p.u.to(dev)
    q = torch.zeros(n, k, dtype=torch.int8, device=dev)
    for b0 in range(0, k, settings.block):
        b1 = min(k, b0 + settings.block)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            g = group_of[col]
            if not settings.act_order and col % group_size == 0:
                # the group's columns: the rest of this block (updated so far) then the later ones
                current = on_cpu(wb[:, i:i + group_size])
                if current.shape[1] < group_size:
                    current = torch.cat([current, on_cpu(w[:, b1:b1 + group_size - current.shape[1]])], dim=1)
                scales[:, g] = group_scales(current, settings.scales, diag[col:col + group_size])
                if device_scales is not scales:
                    device_scales[:, g] = scales[:, g]
            s = device_scales[:, g]
            column = wb[:, i]
            qc = (column / s).round().clamp(QMIN, QMAX)
            q[:, col] = qc.to(torch.int8)
            e = (column - qc * s) / u[col, col]
            wb[:, i:] -= e.unsqueeze(1) * u[col, col:b1].unsqueeze(0)
            err[:, i] = e
        if b1 < k:
            later = u[b0:b1, b1:].to(torch.float64)
            for r0 in range(0, n, slab):
                w[r0:r0 + slab, b1:] -= (err[r0:r0 + slab].to(torch.float64) @ later).to(torch.float32)
    return on_cpu(q)[:, torch.argsort(perm)].contiguous(), scales


class Hessians:
    """A calibrated layer's ``2/T XᵀX``: over the windows its values are fitted on (``fit``), over the
    calibration windows held out from fitting (``held_out``: None when nothing was held out), and over
    all of them (``whole``: None when nothing was held out, then it is ``fit``).

    Linears fed the same input (q/k/v, gate/up) share one: :meth:`prepared` factors a part once for all of
    them. ``owned``: the tensors are this object's alone (the calibration hooks' sums), and a part's
    storage becomes its factor (the part itself is gone after that)."""

    PARTS = ("fit", "held_out", "whole")

    def __init__(self, fit: torch.Tensor, held_out: torch.Tensor | None = None, whole: torch.Tensor | None = None,
                 owned: bool = False):
        self.fit, self.held_out, self.whole = fit, held_out, whole
        self.owned = owned
        self._whole_is_fit = whole is None
        self._prepared: dict[tuple, Prepared] = {}

    def prepared(self, part: str = "fit", settings: GptqSettings | None = None,
                 device: torch.device | str | None = None) -> Prepared:
        """GPTQ's factor of one part (``whole`` falls back to ``fit``), made on first use and kept."""
        settings = settings or DEFAULT_GPTQ
        if part == "whole" and self._whole_is_fit:
            part = "fit"
        key = (part, settings, str(device))
        if key not in self._prepared:
            h = getattr(self, part)
            if h is None:
                raise ValueError(f"the {part} Hessian was already given up to its factor")
            alone = self.owned and sum(getattr(self, p) is h for p in self.PARTS) == 1
            if alone:
                setattr(self, part, None)  # its storage becomes the factor's
                if device is not None and torch.device(device) != h.device:
                    h = moved_hessian(h, device)  # factored where the column loop runs: H leaves host memory
            self._prepared[key] = prepare(h, settings, consume=alone, device=device)
        return self._prepared[key]


# Columns of H converted to float64 at once by output_error (bounds its temporaries).
_ERROR_BYTES = 64 << 20


def output_error(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row of ``w`` [N, K]: ``(w − deq) H (w − deq)ᵀ`` = the layer output's squared error summed over
    the tokens ``H = 2/T XᵀX`` was taken on (times 2/T). Rows are independent: sums over rows add. Summed on
    the CPU wherever H is kept."""
    d = (w.to(torch.float32) - deq).to(torch.float64)
    step = max(1, _ERROR_BYTES // (8 * h.shape[0]))
    total = torch.zeros(d.shape[0], dtype=torch.float64)
    for start in range(0, h.shape[1], step):
        total += ((d @ h[:, start:start + step].to("cpu", torch.float64)) * d[:, start:start + step]).sum(dim=1)
    return total


def layer_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group_size: int) -> float:
    """‖XWᵀ − XŴᵀ‖² summed over the rows of ``x`` [T, K]."""
    return float(((x @ w.T - x @ dequantize(q, scales, group_size).T) ** 2).sum())


# What --weight-algorithm gptq uses (benchmarks/weight_quality.py compares the alternatives).
DEFAULT_GPTQ = GptqSettings()
