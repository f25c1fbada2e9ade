"""Write the merged checkpoint: adapter folded into the unquantised base, saved as safetensors.

Merging into 4-bit or 8-bit weights changes generations (peft#2321), so a quantised
run reloads the base in full precision first. A .gguf base needs nothing special here:
`load_model` reads it from its converted copy in promptbake's cache, a plain model.
"""

from __future__ import annotations

from pathlib import Path

from .models import ModelSource, load_model


def save_merged(peft_model, adapter_dir: Path, out: Path, *, src: ModelSource, quantised: bool, dtype,
                trust_remote_code: bool, stop_ids: list[int] | None = None):
    """Save base+adapter merged into `out`. Consumes `peft_model` when it is unquantised.

    `stop_ids` (see render.stop_token_ids) become generation_config.json's eos_token_id, so
    `generate`, vLLM and other servers stop the baked model where the bake's rollouts stopped.
    """
    import torch
    from peft import PeftModel

    if quantised:
        del peft_model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        base = load_model(src, quant="none", device=torch.device("cpu"), dtype=dtype, trust_remote_code=trust_remote_code)
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    if stop_ids:
        merged.generation_config.eos_token_id = list(stop_ids)
    merged.to(dtype)
    merged.save_pretrained(out, safe_serialization=True)
    return merged
