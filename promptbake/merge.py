"""Write the merged checkpoint: adapter folded into the unquantised base, saved as safetensors.

Merging into 4-bit or 8-bit weights changes generations (peft#2321), so a quantised
run reloads the base in full precision first.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .models import ModelSource, load_model


def save_merged(peft_model, adapter_dir: Path, out: Path, *, src: ModelSource, quantised: bool, dtype, trust_remote_code: bool):
    """Save base+adapter merged into `out`. Consumes `peft_model` when it is unquantised."""
    import torch
    from peft import PeftModel

    if quantised:
        del peft_model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        base = load_model(src, quant="none", device=torch.device("cpu"), dtype=dtype, trust_remote_code=trust_remote_code)
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    if src.gguf_file:
        # A model loaded from GGUF carries GGUF-specific state that save_pretrained rejects:
        # copy the merged weights into a plain model built from the same config. The config
        # names the GGUF "quantizer" too; left in config.json, the output would reload as a
        # quantized model that can be neither saved again nor trained.
        config = copy.deepcopy(merged.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(merged)(config)
        plain.load_state_dict(merged.state_dict())
        plain.generation_config = merged.generation_config
        merged = plain
    merged.to(dtype)
    merged.save_pretrained(out, safe_serialization=True)
    return merged
