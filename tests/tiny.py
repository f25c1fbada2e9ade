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


# --- A tiny Gemma 3: the other family promptbake is measured on (Gemma 3 270M) ---

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


def build_gemma_tokenizer(template: str | None = GEMMA_TEMPLATE):
    """A byte-level BPE tokenizer with Gemma's special tokens (<pad> 0, <eos> 1, <bos> 2, turn markers) and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=GEMMA_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
                                  unk_token=None)
    if template is not None:
        tok.chat_template = template
    return tok


def build_gemma3_model(vocab_size: int, seed: int = 0, **overrides):
    """A random Gemma3ForCausalLM shaped like Gemma 3 270M in miniature.

    Sliding-window and global layers (window 8, shorter than most test sequences, so the
    window matters), one KV head, head_dim * heads wider than hidden, local and global rope
    bases, query_pre_attn_scalar != head_dim, tied embeddings. Gemma initialises its (1 + w)
    norm weights to 0; they are drawn at random here so a wrong norm can't pass a test.
    """
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24,
                  sliding_window=8, max_position_embeddings=512, tie_word_embeddings=True,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
    kwargs.update(overrides)
    if len(kwargs["layer_types"]) != kwargs["num_hidden_layers"]:
        kwargs["layer_types"] = [("full_attention" if (i + 1) % 4 == 0 else "sliding_attention")
                                 for i in range(kwargs["num_hidden_layers"])]
    model = Gemma3ForCausalLM(Gemma3TextConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def save_tiny_gemma3(folder: Path, template: str | None = GEMMA_TEMPLATE, seed: int = 0, **overrides) -> Path:
    """Save a tiny random Gemma 3 with a Gemma-style tokenizer (no system role), like a hub checkpoint."""
    tok = build_gemma_tokenizer(template)
    model = build_gemma3_model(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
