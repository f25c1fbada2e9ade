"""A tiny real model and tokenizer, built in-process and saved like any Hugging Face checkpoint.

2-layer Llama, hidden 64, a byte-level BPE tokenizer trained on a few sentences,
and a ChatML chat template with a system role. Loading them goes through the
same `from_pretrained` code as a real model.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template with no system role: it raises when given one (as Gemma's does).
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "Why is the sky blue? Because air scatters blue light more than red light.",
    "Arr matey, ahoy there! Ye be talking like a pirate now, aye.",
    "Write a short poem about the sea and the wind and the stars.",
    "How do I sort a list in Python? Use sorted(items) or items.sort().",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "You are a helpful assistant. Answer briefly and clearly.",
    "Bonjour, comment allez-vous? Hola, ¿qué tal? Guten Tag!",
    "Explain photosynthesis: plants turn light, water and carbon dioxide into sugar.",
]


def build_tokenizer(template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    if template is not None:
        tok.chat_template = template
    return tok


def build_model(vocab_size: int, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, **overrides)
    return LlamaForCausalLM(config)


def save_tiny(folder: Path, template: str | None = CHATML, seed: int = 0, **overrides) -> Path:
    tok = build_tokenizer(template)
    model = build_model(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        bos_token_id=None, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
