"""Hugging Face Qwen2ForCausalLM, 2 layers, random weights from a small config.

    qlower export examples/hf_qwen2.py -o qwen2.pte

Needs ``pip install transformers``; nothing is downloaded.
"""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qlower.hf import CausalLMLogits

SEQ_LEN = 16

torch.manual_seed(0)
config = Qwen2Config(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attn_implementation="sdpa",
)
model = CausalLMLogits(Qwen2ForCausalLM(config)).eval()
example_inputs = (torch.randint(0, config.vocab_size, (1, SEQ_LEN)),)
