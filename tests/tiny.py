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
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    config = LlamaConfig(**{**kwargs, **overrides})
    return LlamaForCausalLM(config)


def save_tiny(folder: Path, template: str | None = CHATML, seed: int = 0, **overrides) -> Path:
    tok = build_tokenizer(template)
    model = build_model(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        bos_token_id=None, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_pair(folder: Path, system: str, *, lora_init_std: float = 0.02, **pair_kwargs):
    """Load the tiny checkpoint through promptbake's loaders, add LoRA (with non-zero B so the
    student differs from the teacher's base) and return the StudentTeacher."""
    import torch

    from promptbake.config import DistillConfig
    from promptbake.models import load_model, load_tokenizer, resolve_model
    from promptbake.pair import StudentTeacher
    from promptbake.render import Renderer
    from promptbake.setup import add_lora

    src = resolve_model(str(folder))
    tok = load_tokenizer(src)
    torch.manual_seed(0)
    model = load_model(src, quant="none", device=torch.device("cpu"), dtype=torch.float32)
    cfg = DistillConfig(model=str(folder), prompt=Path("x"))
    student = add_lora(model, cfg)
    if lora_init_std:
        g = torch.Generator().manual_seed(1)
        for name, p in student.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * lora_init_std)
    kwargs = dict(vocab=model.config.vocab_size, quantised=False, max_new_tokens=12, temperature=1.0, top_p=1.0)
    kwargs.update(pair_kwargs)
    return StudentTeacher(student, Renderer(tok, system), **kwargs)
