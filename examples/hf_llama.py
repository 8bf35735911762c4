"""Hugging Face LlamaForCausalLM, 2 layers, random weights from a small config.

    qlower export examples/hf_llama.py -o llama.pte

Needs ``pip install transformers``; nothing is downloaded.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlower.hf import CausalLMLogits

SEQ_LEN = 16

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attn_implementation="sdpa",
)
model = CausalLMLogits(LlamaForCausalLM(config)).eval()
example_inputs = (torch.randint(0, config.vocab_size, (1, SEQ_LEN)),)
