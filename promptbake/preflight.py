"""Option checks that need the model's config but not its weights: run them before the weights load.

The model's layer names come from an empty copy built on torch's "meta" device (no memory, no
weights read), so an unknown --lora-targets name fails in a second instead of after a minute of
loading, and fails at all: peft quietly ignores a target name that matches nothing as long as
another name matches something.
"""

from __future__ import annotations

from .errors import InputError

# Layer types LoRA can adapt (peft's LoRA layers); a target naming anything else is refused.
_LORA_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")


def check_kl_topk(kl_topk: int, vocab: int) -> None:
    if kl_topk > vocab:
        raise InputError(f"--kl-topk {kl_topk} is larger than the vocabulary ({vocab} tokens); use 0 for exact KL.")


def layer_names(config, *, trust_remote_code: bool = False) -> dict[str, str]:
    """Every module of the model `config` describes, by name, with its kind; built without weights.

    The kind of a layer LoRA can adapt is the torch class it derives from ("Linear", "Embedding": Gemma's
    scaled embedding is one); any other module's kind is its own class name.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    bases = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D,
             torch.nn.MultiheadAttention)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)

    def kind(module) -> str:
        return next((base.__name__ for base in bases if isinstance(module, base)), type(module).__name__)

    return {name: kind(module) for name, module in model.named_modules() if name}


def check_lora_targets(lora_targets: str, layers: dict[str, str]) -> None:
    """Each comma-separated --lora-targets name must name (as peft matches it: the full name, or its last
    dotted parts) at least one layer LoRA can adapt. "all-linear" is always accepted."""
    if lora_targets == "all-linear":
        return
    targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    if not targets:
        raise InputError(f"--lora-targets {lora_targets!r} names no layer; give names like q_proj,v_proj or "
                         "all-linear.")
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, kind in layers.items() if kind in _LORA_TYPES})
    for target in targets:
        matched = [name for name in layers if name == target or name.endswith(f".{target}")]
        if not matched:
            raise InputError(f"--lora-targets {lora_targets}: the model has no layer named {target!r}; its layers "
                             f"LoRA can adapt are named {', '.join(adaptable)} (or use all-linear).")
        if not any(layers[name] in _LORA_TYPES for name in matched):
            raise InputError(f"--lora-targets {lora_targets}: {target!r} names a {layers[matched[0]]}, which LoRA "
                             f"can't adapt; use layer names such as {', '.join(adaptable[:4])} (or all-linear).")
