"""Train a small causal language model on text this machine already has (no downloads).

The models in examples/trained/ were made with this script: a byte-level BPE tokenizer
and a small decoder (Llama or Qwen3 family), trained on the Python standard library's
own sources or on the system's C headers, so that quantization quality (perplexity on
text the model never saw) can be measured and tested without fetching anything.

Two stages, which can run on different machines:

    # 1. CPU, seconds to a minute: gather the files, split them by file into train /
    #    calibration / held-out sets, train the tokenizer (tokenizer.json + tokenizer_config.json).
    python3 benchmarks/train_lm.py prepare --preset py-llama --work /tmp/lm/py-llama

    # 2. GPU (CPU works, far slower): train the model on the prepared folder and write a
    #    save_pretrained folder: config.json, generation_config.json, model.safetensors
    #    (bfloat16), the tokenizer files (copied byte for byte), heldout.txt,
    #    calibration.txt, corpus.json (which files went where) and train.json (the run's numbers).
    python3 benchmarks/train_lm.py train --work /tmp/lm/py-llama --out examples/trained/py-llama --steps 3000

    # or both at once
    python3 benchmarks/train_lm.py all --preset c-qwen3 --work /tmp/lm/c-qwen3 --out examples/trained/c-qwen3

    # two models at once on one GPU (small models leave it mostly idle): each waits for the other
    for m in py-llama c-qwen3; do python3 benchmarks/train_lm.py train --work /tmp/lm/$m \\
        --out out/$m --barrier /tmp/lm/barrier:2 & done; wait

Presets (``--preset``): ``pm-llama`` (the Perl modules ``*.pm`` under /usr), ``py-llama`` (LlamaForCausalLM on the ``*.py`` files of the running
Python's standard library, its tests included, without site-packages and encodings/, whose
codec tables are generated) and ``c-qwen3``
(Qwen3ForCausalLM on ``/usr/include/**/*.h``, without the C++ trees c++/, node/, llvm-*/ and
unicode/). Files over 256 KB (generated tables) and files that are not UTF-8 are skipped;
identical files are kept once, so no held-out file has a copy in the training set.

Shapes: hidden 256, MLP 768, 3 layers, 4 query heads and 2 KV heads of dim 64, tied
embeddings, vocab 4096, 1024 positions: every linear's K (256 or 768) is divisible by each
group size 32..256, and the bf16 folder stays under 8 MB (4 layers would be 8.4 MB).
``train`` takes other shapes (``--hidden`` with heads of dim 64, ``--layers``, ``--kv-heads``,
``--mlp``, ``--untied``) and ``--family`` other than the preset's; the models of the quality table in
docs/quantization.md ("auto") were made so, five at once on one H200 for 3.3 minutes each:

    T="python3 benchmarks/train_lm.py train --steps auto --minutes 3.3 --barrier /tmp/m/barrier:5"
    $T --work /tmp/lm/py-llama --out out/py-llama-384x6 --family llama --hidden 384 --layers 6 --mlp 1024 &
    $T --work /tmp/lm/c-qwen3 --out out/c-qwen3-512x3 --family qwen3 --hidden 512 --layers 3 --mlp 1024 &
    $T --work /tmp/lm/pm-llama --out out/pm-llama-256x4-untied --family llama --hidden 256 --layers 4 --mlp 768 --untied &
    $T --work /tmp/lm/pm-llama --out out/pm-qwen3-384x3-untied --family qwen3 --hidden 384 --layers 3 --mlp 1024 --untied &
    $T --work /tmp/lm/c-qwen3 --out out/c-llama-640x2 --family llama --hidden 640 --layers 2 --mlp 1024 &
    wait

Training: windows of 256 tokens drawn at random from the stream of training files (each
file as ``<s> text </s>``), batch 128, AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1),
200 warm-up steps then cosine to 10%, bf16 autocast, gradient clipping at 1.0. With
``--steps auto`` the step count is set after 50 steps from the measured speed to fill
``--minutes``; train.json records it, and ``--steps N`` repeats the run with the same data
order and schedule (``--seed``; GPU kernels may still differ in the last bits). On one H200,
with both presets training at once, 3000 steps (98 M tokens, the shipped models) took 76-85 s
plus ~30 s of start-up; 3000 steps on 2 CPU cores would take hours.

Held-out perplexity (train.json and examples/trained/README.md): the held-out text is
tokenized without special tokens, cut into non-overlapping windows of 256 tokens, each
window scored from position 0, every token after the first.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: BOS is 1, EOS is 2, never 0
PAD, BOS, EOS = SPECIAL_TOKENS
MAX_FILE_BYTES = 256 * 1024
HELDOUT_BYTES = 60_000
CALIBRATION_BYTES = 40_000
# Files picked for the evaluation sets are between these sizes: many files, none dominating.
EVAL_FILE_MIN_BYTES, EVAL_FILE_MAX_BYTES = 1_500, 16_000
EVAL_WINDOW = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

PRESETS = {
    "py-llama": dict(
        family="llama",
        root=sysconfig.get_paths()["stdlib"],
        pattern="*.py",
        exclude_dirs=["site-packages", "dist-packages", "__pycache__", "encodings"],
        description="the *.py sources of Python's standard library",
    ),
    "c-qwen3": dict(
        family="qwen3",
        root="/usr/include",
        pattern="*.h",
        exclude_dirs=["c++", "node", "llvm-*", "unicode"],
        description="the C headers under /usr/include",
    ),
    "pm-llama": dict(
        family="llama",
        root="/usr",
        pattern="*.pm",
        exclude_dirs=[],
        description="the Perl modules (*.pm) under /usr",
    ),
}

SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- prepare (CPU)

def gather(root: Path, pattern: str, exclude_dirs: list[str]) -> list[tuple[str, str]]:
    """(relative path, text) of the matching files under root, sorted, UTF-8 only, each content once."""
    docs, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not any(fnmatch.fnmatch(d, x) for x in exclude_dirs))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not fnmatch.fnmatch(name, pattern) or path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            if not data.strip() or len(data) > MAX_FILE_BYTES:
                continue
            digest = hashlib.sha1(data).hexdigest()
            if digest in seen:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            seen.add(digest)
            docs.append((str(path.relative_to(root)), text))
    docs.sort()
    return docs


def split_by_file(docs: list[tuple[str, str]], seed: int) -> dict[str, list[tuple[str, str]]]:
    """Whole files to heldout (~60 KB), calibration (~40 KB) and train (the rest), in a seeded order."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sets: dict[str, list[tuple[str, str]]] = {"heldout": [], "calibration": [], "train": []}
    size = {"heldout": 0, "calibration": 0}
    budget = {"heldout": HELDOUT_BYTES, "calibration": CALIBRATION_BYTES}
    for i in order:
        nbytes = len(docs[i][1].encode())
        target = "train"
        if EVAL_FILE_MIN_BYTES <= nbytes <= EVAL_FILE_MAX_BYTES:
            target = next((k for k in ("heldout", "calibration") if size[k] < budget[k]), "train")
        if target != "train":
            size[target] += nbytes
        sets[target].append(docs[i])
    for name in sets:
        sets[name].sort()
    return sets


def train_tokenizer(texts: list[str], out: Path) -> None:
    """Byte-level BPE (GPT-2 style) with <pad>=0, <s>=1, </s>=2; encode() prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2], "special tokens must be ids 0, 1, 2"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=SHAPE["max_position_embeddings"])
    fast.save_pretrained(str(out))
    # The class name every transformers release knows (v5 maps it to its tokenizers backend).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("special_tokens_map.json",):  # everything it says is in tokenizer_config.json
        (out / extra).unlink(missing_ok=True)


def prepare(preset: str, work: Path, seed: int, root: str | None) -> None:
    spec = PRESETS[preset]
    root_path = Path(root or spec["root"])
    t0 = time.time()
    docs = gather(root_path, spec["pattern"], spec["exclude_dirs"])
    if len(docs) < 50:
        sys.exit(f"error: only {len(docs)} files matching {spec['pattern']} under {root_path}\nhint: pass --root")
    sets = split_by_file(docs, seed)
    work.mkdir(parents=True, exist_ok=True)
    with gzip.open(work / "train.jsonl.gz", "wt", encoding="utf-8", compresslevel=6) as f:
        for _, text in sets["train"]:
            f.write(json.dumps(text) + "\n")
    for name in ("heldout", "calibration"):
        (work / f"{name}.txt").write_text("\n".join(text for _, text in sets[name]), encoding="utf-8")
    log(f"{len(docs)} files: {len(sets['train'])} train, {len(sets['calibration'])} calibration, "
        f"{len(sets['heldout'])} held out ({time.time() - t0:.1f}s); training the tokenizer")
    train_tokenizer([text for _, text in sets["train"]], work)
    manifest = {
        "preset": preset, "family": spec["family"], "source": spec["description"], "root": str(root_path),
        "pattern": spec["pattern"], "exclude_dirs": spec["exclude_dirs"], "max_file_bytes": MAX_FILE_BYTES,
        "seed": seed,
        "sets": {name: {"files": len(items), "bytes": sum(len(t.encode()) for _, t in items)}
                 for name, items in sets.items()},
        "heldout_files": [p for p, _ in sets["heldout"]],
        "calibration_files": [p for p, _ in sets["calibration"]],
    }
    (work / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"prepared {work} in {time.time() - t0:.1f}s")


# ---------------------------------------------------------------- train (GPU)

def model_shape(hidden: int | None = None, layers: int | None = None, heads: int | None = None,
                kv_heads: int | None = None, mlp: int | None = None, tied: bool | None = None) -> dict:
    """SHAPE with the given changes (head dim stays 64: heads default to hidden / 64)."""
    shape = dict(SHAPE)
    if hidden is not None:
        shape["hidden_size"] = hidden
        shape["num_attention_heads"] = hidden // shape["head_dim"]
        shape["intermediate_size"] = hidden * 3
    for key, value in (("num_hidden_layers", layers), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                       ("intermediate_size", mlp), ("tie_word_embeddings", tied)):
        if value is not None:
            shape[key] = value
    return shape


def build_model(family: str, vocab_size: int, shape: dict | None = None):
    import transformers

    common = dict(shape or SHAPE, vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, use_sliding_window=False))
    raise ValueError(f"unknown family {family!r}")


def window_losses(model, ids, window: int, batch: int, device) -> tuple[float, int]:
    """Summed NLL and count over non-overlapping windows of ids, each scored from position 0."""
    import torch
    import torch.nn.functional as F

    n = len(ids) // window
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch):
            rows = [ids[i * window:(i + 1) * window] for i in range(start, min(n, start + batch))]
            x = torch.tensor(rows, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x).logits
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    return total, count


def wait_for_peers(barrier: str | None) -> None:
    """With --barrier DIR:N, wait until N runs sharing the GPU are ready, so --steps auto times them together."""
    if not barrier:
        return
    folder, count = barrier.rsplit(":", 1)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"ready-{os.getpid()}").touch()
    while len(list(Path(folder).glob("ready-*"))) < int(count):
        time.sleep(0.2)


def train(work: Path, out: Path, steps: str, minutes: float, batch: int, seq: int, lr: float, seed: int,
          barrier: str | None = None, shape: dict | None = None, family: str | None = None) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from transformers import GenerationConfig

    manifest = json.loads((work / "corpus.json").read_text())
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    with gzip.open(work / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line) for line in f]
    stream = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        stream.extend((BOS_ID, *enc.ids, EOS_ID))
    stream = torch.from_numpy(np.asarray(stream, dtype=np.int32)).to(device)
    heldout = tok.encode((work / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False).ids
    log(f"{len(texts)} training files, {len(stream):,} tokens, {len(heldout):,} held-out tokens "
        f"(tokenized in {time.time() - t0:.1f}s)")

    torch.manual_seed(seed)
    model = build_model(family or manifest["family"], tok.get_vocab_size(), shape).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    warmup = 200
    total_steps = None if steps == "auto" else int(steps)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq + 1, device=device)
    wait_for_peers(barrier)
    history, recent, t_train = [], [], time.time()
    step, t_measure = 0, None
    while total_steps is None or step < total_steps:
        if total_steps is None and step == 20:
            torch.cuda.synchronize() if device.type == "cuda" else None
            t_measure = time.time()
        if total_steps is None and step == 50:
            torch.cuda.synchronize() if device.type == "cuda" else None
            per_step = (time.time() - t_measure) / 30
            total_steps = max(warmup + 100, int(minutes * 60 / per_step) // 100 * 100)
            log(f"{per_step * 1000:.1f} ms a step: {total_steps} steps for {minutes} minutes")
        horizon = total_steps or 10 ** 9
        if step < warmup:
            scale = (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, horizon - warmup)
            scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen).to(device)
        chunk = stream[starts[:, None] + offsets].long()
        x, y = chunk[:, :-1], chunk[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(loss.detach())
        step += 1
        if step % 500 == 0 or step == total_steps:
            train_loss = torch.stack(recent).mean().item()
            recent = []
            model.eval()
            nll, count = window_losses(model, heldout, EVAL_WINDOW, 64, device)
            model.train()
            history.append({"step": step, "train_loss": round(train_loss, 4), "heldout_loss": round(nll / count, 4),
                            "seconds": round(time.time() - t_train, 1)})
            log(json.dumps(history[-1]))
    train_seconds = time.time() - t_train

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(torch.bfloat16).cpu()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in (*TOKENIZER_FILES, "heldout.txt", "calibration.txt", "corpus.json"):
        shutil.copyfile(work / name, out / name)
    info = {
        "family": family or manifest["family"], "shape": shape or SHAPE, "architecture": type(model).__name__, "parameters": n_params,
        "steps": step, "batch": batch, "seq_len": seq, "lr": lr, "seed": seed,
        "train_tokens_seen": step * batch * seq, "corpus_tokens": len(stream),
        "heldout_tokens": len(heldout), "train_seconds": round(train_seconds, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "final": history[-1], "history": history,
    }
    (out / "train.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"wrote {out}: {step} steps in {train_seconds:.0f}s, final {history[-1]}")


PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "train", "all"])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="what to train on (prepare, all)")
    parser.add_argument("--root", help="folder to gather from instead of the preset's")
    parser.add_argument("--work", type=Path, required=True, help="prepared corpus and tokenizer")
    parser.add_argument("--out", type=Path, help="save_pretrained folder to write (train, all)")
    parser.add_argument("--steps", default="auto", help="optimizer steps, or 'auto' to fill --minutes")
    parser.add_argument("--minutes", type=float, default=3.5, help="training time for --steps auto")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--barrier", metavar="DIR:N", help="runs sharing one GPU: start training when N are ready")
    parser.add_argument("--family", choices=["llama", "qwen3"], help="model family instead of the preset's (train)")
    parser.add_argument("--hidden", type=int, help="hidden size (query heads of dim 64; MLP 3x) instead of 256")
    parser.add_argument("--layers", type=int, help="decoder layers instead of 3")
    parser.add_argument("--kv-heads", type=int, help="KV heads instead of 2")
    parser.add_argument("--mlp", type=int, help="MLP width instead of 3 x hidden")
    parser.add_argument("--untied", action="store_true", help="an LM head of its own (not the embedding's)")
    args = parser.parse_args()
    shape = model_shape(args.hidden, args.layers, None, args.kv_heads, args.mlp, False if args.untied else None)
    if args.stage in ("prepare", "all"):
        if not args.preset:
            parser.error("prepare needs --preset")
        prepare(args.preset, args.work, args.seed, args.root)
    if args.stage in ("train", "all"):
        if not args.out:
            parser.error("train needs --out")
        train(args.work, args.out, args.steps, args.minutes, args.batch, args.seq, args.lr, args.seed, args.barrier,
              shape, args.family)


if __name__ == "__main__":
    main()
