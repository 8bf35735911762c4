"""Calibrated int4 algorithms (GPTQ): calibration tokens, Hessians, and a model quantized block by block.

A decoder is quantized one repeated block at a time (``model.layers.0``, ``.1``, …, found generically as
the ``nn.ModuleList`` of same-typed blocks that holds the most planned linears):

1. the layers outside the blocks that are not calibrated (embeddings, norms) are filled (streaming: read
   from the checkpoint) and quantized data-free where planned;
2. the inputs of the first block are captured for the calibration batches (a pre-hook stops the model);
3. for each block: its weights are read, each calibrated linear's Hessian ``H = 2/T XᵀX`` is collected
   with hooks while the block runs on the current inputs, linears are quantized in the order they run
   (those sharing one input together, each group on inputs produced by the already-quantized ones),
   and the quantized block produces the next block's inputs; streaming, a calibrated linear's weights
   are read only once its Hessian is known, and quantized as they are read (:class:`_Pending`);
4. calibrated layers outside the blocks (the LM head) get their inputs from a whole-model pass over the
   quantized model, stopped just before the layer.

Only one block's float weights are in memory at a time (streaming: one layer's). A model without such blocks falls back to step 4
for every layer (one whole-model pass each), with a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import CALIBRATED_ALGORITHMS, ExportOptions
from .errors import CalibrationError, ExportError, first_line
from .loader import describe_tensor, random_like, read_input_batches
from .modules import replace_module
from .weight_quant import Hessians, add_gram, hessian_sum, true_divide

# Tokens per calibration window (each window runs from position 0), capped by the model's positions.
CALIBRATION_WINDOW = 512
# --weight-algorithm auto: every HELD_OUT_EVERY-th calibration window (at least one) is held out from
# fitting; each layer's choice is judged on those windows' inputs.
HELD_OUT_EVERY = 4
AUTO_MIN_WINDOWS = 2


class _Stop(Exception):
    """Raised by a pre-hook once it has what it needs: the rest of the forward is not run."""


def calibrated(plans) -> list:
    return [p for p in plans if p.quantized and p.algorithm in CALIBRATED_ALGORITHMS]


def held_out_windows(count: int) -> set[int]:
    """Indices of the calibration windows ``auto`` holds out from fitting: every HELD_OUT_EVERY-th, at least one."""
    if count < AUTO_MIN_WINDOWS:
        raise CalibrationError(f"--weight-algorithm auto needs at least {AUTO_MIN_WINDOWS} calibration windows, got {count}",
                               "pass a longer --calibration-text (or more --calibration batches)")
    return {i for i in range(count) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1} or {count - 1}


# --- calibration inputs --------------------------------------------------------------------------------


def text_token_batches(folder_path: Path, text_file: str | Path, tokens: int, max_positions: int | None) -> list[tuple]:
    """``tokens`` tokens of ``text_file`` (the folder's tokenizer) as windows of [1, T] int64 token ids."""
    path = Path(text_file)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration text {path}: {exc.strerror}", "pass a readable text file") from exc
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder_path), local_files_only=True)
    except Exception as exc:
        raise CalibrationError(f"cannot load the tokenizer in {folder_path}: {first_line(exc)}",
                               "the folder needs tokenizer files (tokenizer.json) to read --calibration-text") from exc
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    if len(ids) < 2:
        raise CalibrationError(f"calibration text {path} has {len(ids)} tokens", "pass a text of a few thousand tokens")
    window = min(CALIBRATION_WINDOW, max_positions or CALIBRATION_WINDOW)
    return [(torch.tensor([ids[i:i + window]], dtype=torch.long),) for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


def calibration_inputs(loaded, options: ExportOptions, warn: Callable[[str], None]) -> list[tuple]:
    """The calibration batches of a calibrated algorithm: --calibration-text through a Hugging Face folder's
    tokenizer, else --calibration FILE or the model file's own calibration inputs."""
    from .llm.hf_folder import is_hf_folder, read_hf_folder

    if options.calibration_text is not None:
        folder = read_hf_folder(loaded.source) if Path(loaded.source).is_dir() and is_hf_folder(loaded.source) else None
        if folder is None:
            raise CalibrationError("--calibration-text needs a Hugging Face folder (its tokenizer reads the text)",
                                   "for a model file, pass --calibration FILE with token tensors, or define calibration_inputs")
        return text_token_batches(folder.path, options.calibration_text, options.calibration_tokens, folder.max_positions)
    if options.calibration or loaded.calibration_inputs:

        return calibration_batches(loaded.example_inputs, options, loaded.calibration_inputs, warn, any_length=True)
    raise CalibrationError(f"--weight-algorithm {options.weight_algorithm} needs calibration data",
                           "pass --calibration-text FILE (a Hugging Face folder) or --calibration FILE; "
                           "or use --weight-algorithm hqq (data-free)")


# --- finding the blocks --------------------------------------------------------------------------------


def find_blocks(module: nn.Module, layer_names: list[str]) -> list[str]:
    """Names of the repeated blocks (children of one ModuleList, all one type) holding the most of
    ``layer_names``; [] when there is none."""
    best, best_count = [], 0
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) == 0 or len({type(c) for c in child}) != 1:
            continue
        blocks = [f"{name}.{i}" if name else str(i) for i in range(len(child))]
        count = sum(1 for layer in layer_names if any(layer.startswith(b + ".") for b in blocks))
        if count > best_count:
            best, best_count = blocks, count
    return best


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


# --- Hessians ------------------------------------------------------------------------------------------


class HessianHooks:
    """Forward pre-hooks accumulating ``2/T XᵀX`` of the inputs of named linears; linears fed the same
    input tensor share one Hessian. ``groups()``: lists of names sharing an input, in the order they ran.
    Only the first group's Hessian is summed (the one quantized after the passes: the later groups' inputs
    change once it is), so a pass holds one Hessian (not the down projection's 256 MB beside q/k/v's at 1B).

    ``held_out``: set before a pass whose window is held out from fitting (``--weight-algorithm auto``
    judges on those windows): its inputs go to a second sum, ``Hessians.held_out``. ``first_group_only``:
    the pass stops (``_Stop``) when a linear of a later group is called, so that a block pass runs only as
    far as the group it is for (the later groups are learnt on their own passes). ``device``: where the
    sums are kept (GPTQ's device: a GPU's memory keeps them out of host memory, with the same bits)."""

    def __init__(self, root: nn.Module, names: list[str], stop_after: str | None = None,
                 device: torch.device | str = "cpu", first_group_only: bool = False):
        self.device = device
        self.first_group_only = first_group_only
        self.sums: dict[tuple[bool, int], torch.Tensor] = {}  # (held out, input group) -> sum of 2 xᵀx
        self.rows: dict[tuple[bool, int], int] = {}
        self._made: dict[int, Hessians] = {}  # input group -> its Hessians, once asked for
        self.group_of: dict[str, int] = {}
        self.held_out = False
        self._groups = 0
        self._seen: dict[int, tuple] = {}  # id of an input tensor of the current pass -> (group, tensor)
        self._handles = []
        for name in names:
            self._handles.append(root.get_submodule(name).register_forward_pre_hook(self._hook(name, name == stop_after)))

    def _hook(self, name: str, stop: bool):
        def hook(module, args):
            x = args[0]
            key = self._seen.get(id(x), (None, None))[0]
            if key is None:
                if name in self.group_of:
                    key = self.group_of[name]
                else:
                    key, self._groups = self._groups, self._groups + 1
                if key > 0 and self.first_group_only:
                    raise _Stop  # a later group's input: what the pass is for is done
                self._seen[id(x)] = (key, x)  # holding x: its id is not reused during the pass
                if key == 0:  # the first group only: the others' inputs change once it is quantized
                    flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                    part = (self.held_out, key)
                    if part not in self.sums:
                        self.sums[part] = hessian_sum(flat.shape[1], self.device)
                        self.rows[part] = 0
                    add_gram(self.sums[part], flat)
                    self.rows[part] += flat.shape[0]
            self.group_of.setdefault(name, key)
            if stop:
                raise _Stop
        return hook

    def new_pass(self, held_out: bool = False) -> None:
        """Between forward calls: input tensors of the next call are new (ids may be reused)."""
        self._seen.clear()
        self.held_out = held_out

    def hessian(self, name: str) -> Hessians:
        """The layer's Hessians. Made once per input group, from the sums themselves (divided in place: a
        K = 8192 Hessian is 256 MB) and owned by it (factored in place, once for the group), so the hooks
        take no more passes after the first call."""
        key = self.group_of[name]
        if key not in self._made:
            fit_sum, fit_rows = self.sums.pop((False, key)), max(1, self.rows[(False, key)])
            held = self.sums.pop((True, key), None)
            if held is None:
                self._made[key] = Hessians(true_divide(fit_sum, fit_rows), owned=True)
            else:
                held_rows = max(1, self.rows[(True, key)])
                whole = true_divide(fit_sum + held, fit_rows + held_rows)
                self._made[key] = Hessians(true_divide(fit_sum, fit_rows), true_divide(held, held_rows), whole, owned=True)
        return self._made[key]

    def groups(self) -> list[list[str]]:
        by_key: dict[int, list[str]] = {}
        for name, key in self.group_of.items():
            by_key.setdefault(key, []).append(name)
        return [by_key[k] for k in sorted(by_key)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _Pending(nn.Module):
    """In place of a calibrated linear whose weights are not read yet: zeros of its output's shape.

    A block pass is for the first group of linears not yet quantized (``HessianHooks(first_group_only=True)``):
    everything it runs before that group is quantized already, the group's Hessian is its input, and the pass
    stops at the next group's first linear. What the group's own linears compute reaches no Hessian (the
    block's output, computed at the end, runs the quantized layers), so they need not be there yet."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.out_features = layer.weight.shape[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


# --- running blocks ------------------------------------------------------------------------------------

# Keyword arguments of Hugging Face decoder layers that would carry state from one call to the next.
_STATEFUL_KWARGS = {"past_key_values": None, "past_key_value": None, "cache": None, "use_cache": False}


def _stateless(kwargs: dict) -> dict:
    """A decoder block's captured keyword arguments without the state a call would carry to the next: a KV
    cache object (under any name) would grow on every calibration pass of every block, each pass's queries
    attending to the keys of the passes before it."""
    return {k: (_STATEFUL_KWARGS[k] if k in _STATEFUL_KWARGS else None if _is_cache(v) else v) for k, v in kwargs.items()}


def _is_cache(value) -> bool:
    return any(c.__name__.endswith("Cache") and c.__module__.startswith("transformers.") for c in type(value).__mro__)


def capture_block_inputs(module: nn.Module, block: nn.Module, batches: list[tuple]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of ``block``'s call for each calibration batch (the model stops there)."""
    captured = []

    def hook(_, args, kwargs):
        captured.append((tuple(args), _stateless(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                module(*batch)
            except _Stop:
                continue
            raise ExportError("the model never called its first decoder block on a calibration batch",
                              "gptq quantizes repeated blocks; use --weight-algorithm hqq for this model")
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, state: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = state
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def next_state(state: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = state
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


# --- the driver ----------------------------------------------------------------------------------------

# quantize(name, hessians or None): replaces a layer whose float weights are in memory
Quantize = Callable[[str, Hessians | None], None]
# fill(accept, hessians): streaming only: read the layers ``accept`` takes, quantizing each one named in
# ``hessians`` (with that Hessian, None: data-free) as it is read; the others are filled float
Fill = Callable[[Callable[[str], bool], dict[str, Hessians | None]], None]


def quantize_calibrated(module: nn.Module, plans, batches: list[tuple], quantize: Quantize,
                        fill: Fill | None = None, warn: Callable[[str], None] = lambda m: None,
                        on_block: Callable[[str], None] | None = None,
                        release: Callable[[nn.Module], None] | None = None,
                        hessian_device: torch.device | str = "cpu") -> None:
    """Quantize every planned layer of ``module`` in place, the calibrated ones block by block (module doc).

    ``quantize(name, hessian)`` replaces one layer (hessian None for a data-free one). ``fill`` (streaming)
    reads the weights of the layers a predicate accepts, quantizing each one it is given a Hessian for (None:
    data-free) as it is read; a calibrated linear is read once its Hessian is known.
    ``release(block)``: called once a quantized block is done with for now (after its last pass, and
    after each block of a whole-model pass): its weights kept in files leave the resident set; so do the
    data-free layers' (an int4 embedding) once they are made. ``hessian_device``: where the Hessians are
    summed and factored (GPTQ's device).
    """
    planned = [p.name for p in plans if p.quantized]
    cal = [p.name for p in calibrated(plans)]
    held = held_out_windows(len(batches)) if any(p.algorithm == "auto" for p in calibrated(plans)) else set()
    blocks = find_blocks(module, cal)
    if not blocks:
        warn(f"no repeated decoder blocks found: {len(cal)} layer(s) are calibrated with one whole-model pass each")
    in_blocks = lambda layer: any(_inside(layer, b) for b in blocks)  # noqa: E731
    outside = [n for n in cal if not in_blocks(n)]
    data_free = [n for n in planned if n not in cal]

    def load(accept: Callable[[str], bool]) -> None:
        if fill is not None:
            fill(accept, {n: None for n in data_free if accept(n)})
        else:
            for n in data_free:
                if accept(n):
                    quantize(n, None)
        if release is not None:  # the data-free layers just made (a streamed int4 embedding: 140 MB at 1B)
            release(module)

    load(lambda layer: not in_blocks(layer) and not any(_inside(layer, n) for n in outside))
    # A data-free layer outside the blocks (an int4 embedding) reads a few rows a call, but each read maps
    # in the file's pages around it (the kernel's fault-around): over a pass, most of a 1B model's table.
    released = [module.get_submodule(n).register_forward_hook(lambda layer, args, out: release(layer))
                for n in data_free if not in_blocks(n)] if release is not None else []
    with torch.no_grad():
        if blocks:
            states = capture_block_inputs(module, module.get_submodule(blocks[0]), batches)
            for block_name in blocks:
                block = module.get_submodule(block_name)
                remaining = [n for n in cal if _inside(n, block_name)]
                # Streaming: the calibrated linears are read only when their Hessian is known, each quantized
                # as it is read; until then a _Pending stands in for each (their float weights never
                # wait in memory through the passes of the linears before them).
                pending = {} if fill is None else {n: module.get_submodule(n) for n in remaining}
                load(lambda layer, b=block_name: _inside(layer, b) and layer not in pending)
                for name in pending:  # (no loop variable left holding a layer, whose weight fill will set)
                    replace_module(module, name, _Pending(pending[name]))
                while remaining:  # the linears that run first (sharing one input), then the next ones
                    hooks = HessianHooks(module, remaining, device=hessian_device, first_group_only=True)
                    try:
                        for i, state in enumerate(states):
                            hooks.new_pass(i in held)
                            try:
                                run_block(block, state)
                            except _Stop:
                                pass
                    finally:
                        hooks.remove()
                    if not hooks.group_of:
                        raise ExportError(f"block {block_name} did not call {remaining[0]} on the calibration inputs",
                                          "use --weight-algorithm hqq for this model")
                    group = hooks.groups()[0]
                    if pending:
                        for name in group:
                            replace_module(module, name, pending.pop(name))
                        fill(lambda layer, g=frozenset(group): layer in g, {name: hooks.hessian(name) for name in group})
                    else:
                        for name in group:
                            quantize(name, hooks.hessian(name))
                    remaining = [n for n in remaining if n not in group]
                states = [next_state(s, run_block(block, s)) for s in states]
                if release is not None:
                    release(block)
                if on_block is not None:
                    on_block(block_name)
            del states
        released += [module.get_submodule(b).register_forward_hook(lambda block, args, out: release(block))
                     for b in blocks] if release is not None else []
        for name in outside:  # the LM head (or every layer without blocks): a whole-model pass each
            hooks = HessianHooks(module, [name], stop_after=name, device=hessian_device)
            try:
                for i, batch in enumerate(batches):
                    hooks.new_pass(i in held)
                    try:
                        module(*batch)
                    except _Stop:
                        pass
            finally:
                hooks.remove()
            if name not in hooks.group_of:
                raise ExportError(f"the model never called {name} on the calibration inputs",
                                  "use --weight-algorithm hqq for this model")
            if fill is not None:  # read and quantized a chunk of rows at a time (a large LM head)
                fill(lambda layer, n=name: _inside(layer, n), {name: hooks.hessian(name)})
            else:
                quantize(name, hooks.hessian(name))
        for handle in released:
            handle.remove()


def calibration_batches(example_inputs: tuple, options: ExportOptions, from_model: list[tuple] | None, warn: Callable[[str], None],
                        any_length: bool = False) -> list[tuple]:
    """Calibration batches: --calibration FILE, the model file's own, or random ones (with a warning).

    ``any_length``: token-id inputs may have another sequence length than the example's (a calibrated
    weight algorithm runs the float model on them; static int8 needs the traced shapes)."""
    if options.calibration:
        batches = read_input_batches(Path(options.calibration), "calibration", CalibrationError, tensor_is_batches=True)
    elif from_model:
        batches = from_model
    else:
        warn(
            f"no calibration data: calibrating on {options.calibration_batches} random batches shaped like the example inputs; "
            "accuracy will suffer — pass --calibration FILE with real inputs"
        )
        gen = torch.Generator().manual_seed(options.seed)
        return [tuple(random_like(t, gen) for t in example_inputs) for _ in range(options.calibration_batches)]
    for i, batch in enumerate(batches):
        _check_batch(i, batch, example_inputs, any_length)
    return batches


def _check_batch(i: int, batch: tuple, example: tuple, any_length: bool = False) -> None:
    if len(batch) != len(example) or not all(isinstance(t, torch.Tensor) for t in batch):
        raise CalibrationError(f"calibration batch {i} has {len(batch)} inputs, the model takes {len(example)} tensors", "match the example inputs")
    for j, (got, want) in enumerate(zip(batch, example)):
        tokens = any_length and not want.is_floating_point() and want.dim() == 2
        if got.dtype != want.dtype or got.dim() != want.dim() or (got.shape[1:] != want.shape[1:] and not tokens):
            raise CalibrationError(
                f"calibration batch {i} input {j} is {describe_tensor(got)}, expected {describe_tensor(want)}",
                "calibration inputs must match the example inputs' dtype and shape (the batch dim may differ)",
            )
