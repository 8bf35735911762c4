"""Hugging Face GPT2LMHeadModel, 2 layers, random weights from a small config.

GPT-2's projections are HF ``Conv1D`` modules; qlower's quantize stage turns
them into ``nn.Linear`` (same math, ``qlower.hf.conv1d_to_linear``) so that
they are quantized and fused like any linear.

    qlower export examples/hf_gpt2.py -o gpt2.pte

Needs ``pip install transformers``; nothing is downloaded.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qlower.hf import CausalLMLogits

SEQ_LEN = 16

torch.manual_seed(0)
config = GPT2Config(
    vocab_size=256,
    n_embd=128,
    n_inner=256,
    n_layer=2,
    n_head=4,
    n_positions=128,
    bos_token_id=0,
    eos_token_id=0,
    attn_implementation="sdpa",
)
model = CausalLMLogits(GPT2LMHeadModel(config)).eval()
example_inputs = (torch.randint(0, config.vocab_size, (1, SEQ_LEN)),)
