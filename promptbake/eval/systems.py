"""The three systems an evaluation compares, and how they are loaded and asked.

    baked   - the merged checkpoint, no system prompt (what will be deployed)
    teacher - the base model with the system prompt (what the bake imitates)
    base    - the base model without it (where the bake started)
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..data import Messages
from ..errors import InputError, note
from ..models import (ModelSource, load_config, load_model, load_tokenizer, model_fingerprint, pick_device_and_dtype,
                      resolve_model)
from ..provenance import check_bake_inputs, check_same_tokenizer
from ..render import Renderer
from ..setup import quiet_libraries, read_template
from .report import KL


class ComparedModels:
    """The baked checkpoint and the base model, and the three systems they make (see SYSTEMS)."""

    def __init__(self, baked_lm, base_lm, renderer, *, vocab: int, max_new_tokens: int, temperature: float,
                 batch_size: int = 8, chunk_size: int = 128, sampler: str = "exact"):
        """`sampler`: fast (LeanDecoder copies, bf16 where the CPU has it) or exact (the models as loaded)."""
        from ..samplers import SamplingArgs, frozen_sampler

        self.baked_lm, self.base_lm, self.renderer, self.tok = baked_lm, base_lm, renderer, renderer.tok
        self.vocab, self.batch_size, self.chunk_size = vocab, batch_size, chunk_size
        args = SamplingArgs.for_model(self.tok, base_lm, max_new_tokens=max_new_tokens, temperature=temperature)
        self.sampler, fast = sampler, sampler == "fast"  # for the records
        self.samplers = {"baked": frozen_sampler(baked_lm, args, fast=fast, what="the baked model"),
                         "base": frozen_sampler(base_lm, args, fast=fast, what="the base model")}

    def _view(self, system: str, prompts: list[Messages]):
        """The causal LM and input ids that make up `system`."""
        if system == "baked":
            return self.baked_lm, [self.renderer.student_ids(m) for m in prompts]
        if system == "teacher":
            return self.base_lm, [self.renderer.teacher_ids(m) for m in prompts]
        return self.base_lm, [self.renderer.student_ids(m) for m in prompts]

    def sample(self, system: str, prompts: list[Messages], seed: int) -> list[list[int]]:
        """One response per prompt; every system starts from the same generator seed."""
        import torch

        lm, ids = self._view(system, prompts)
        sampler = self.samplers["baked" if system == "baked" else "base"]
        gen = torch.Generator(lm.device).manual_seed(seed)
        out = []
        for i in range(0, len(ids), self.batch_size):
            out += sampler.sample(ids[i : i + self.batch_size], gen)
        return out

    def kl(self, p: str, q: str, prompts: list[Messages], responses: list[list[int]]) -> KL:
        """Mean per-token KL(p || q) on `responses` (which should be samples from p)."""
        import torch

        from ..losses import chunked_kl, row_sums
        from ..scoring import logits_fn, response_hidden

        (p_lm, p_ids), (q_lm, q_ids) = self._view(p, prompts), self._view(q, prompts)
        p_head, q_head = logits_fn(p_lm, self.vocab), logits_fn(q_lm, self.vocab)
        pad, B = self.tok.pad_token_id, self.batch_size
        sums, counts = [], []  # per prompt: summed KL and response tokens
        for i in range(0, len(prompts), B):
            rows = responses[i : i + B]
            with torch.no_grad():
                hp = response_hidden(p_lm, p_ids[i : i + B], rows, pad)  # (N, H), rows in order
                hq = response_hidden(q_lm, q_ids[i : i + B], rows, pad)  # (N, H)
            lengths = [len(r) for r in rows]
            sums += row_sums(chunked_kl(hp, hq, p_head, q_head, chunk_size=self.chunk_size), lengths)  # (N,)
            counts += lengths
        return KL.from_sums(sums, counts)

    def text(self, responses: list[list[int]]) -> list[str]:
        return [self.tok.decode(r, skip_special_tokens=True).strip() for r in responses]


def resolve_baked(path: Path, what: str = "--baked") -> ModelSource:
    """The baked checkpoint folder, checked for a config and weights before anything loads."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist; give the --out folder of promptbake distill.")
    if not path.is_dir():
        raise InputError(f"{what} {path} is a file; give the checkpoint folder promptbake distill wrote.")
    if not (path / "config.json").is_file():
        raise InputError(f"{what} {path} is not a checkpoint (no config.json); give the --out folder of "
                         "promptbake distill.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise InputError(f"{what} {path} has a config.json but no weights (*.safetensors); the bake may not "
                         "have finished.")
    return ModelSource(str(path), str(path))


def check_same_base(baked_dir: Path, baked_config, base_config, model: str, what: str = "--baked") -> None:
    """Refuse a baked folder whose architecture or vocabulary differs from --model's.

    Compares `model_type` rather than `architectures`: a config read from a .gguf file has no
    `architectures`, while the merged checkpoint's config.json names the class.
    """
    def describe(config):
        return config.model_type, config.get_text_config().vocab_size

    baked, base = describe(baked_config), describe(base_config)
    record_file = Path(baked_dir) / "promptbake.json"
    record = {}
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{what} {baked_dir}: promptbake.json is not valid JSON.") from None
    if baked != base or record.get("vocab_size", base[1]) != base[1]:
        origin = f" (promptbake.json says it was baked from {record['base_model']})" if record.get("base_model") else ""
        raise InputError(
            f"{what} {baked_dir} is a {baked[0]} model with a {baked[1]}-token vocabulary but --model {model} is a "
            f"{base[0]} model with {base[1]}{origin}; pass the --model the bake started from."
        )


def load_compared(baked: Path, model: str, system_prompt: str, *, max_new_tokens: int, temperature: float,
                  batch_size: int = 8, chunk_size: int = 128, chat_template: Path | None = None,
                  trust_remote_code: bool = False, allow_pickle: bool = False, force: bool = False,
                  sampler: str = "exact", console: Console, what: str = "--baked") -> ComparedModels:
    """Load the base model (for teacher and base) and the baked checkpoint, after checking they match.

    Matching: the bake's promptbake.json names the base and the prompt's SHA-256, and the two
    tokenizers must agree; a mismatch is an error unless `force` (then a note). `sampler`: exact
    or fast (see ComparedModels).
    """
    template = read_template(chat_template)
    baked_src = resolve_baked(baked, what)
    src = resolve_model(model, allow_pickle=allow_pickle)
    quiet_libraries()
    told = lambda message: note(console, message)  # noqa: E731

    base_config = load_config(src, trust_remote_code=trust_remote_code)
    check_bake_inputs(Path(baked), model=model, system=system_prompt, fingerprint=model_fingerprint(src),
                      force=force, what=what, note=told)
    baked_config = load_config(baked_src, trust_remote_code=trust_remote_code)
    check_same_base(Path(baked), baked_config, base_config, model, what)
    tok = load_tokenizer(src, chat_template=template, trust_remote_code=trust_remote_code)
    baked_tok = load_tokenizer(baked_src, trust_remote_code=trust_remote_code)
    check_same_tokenizer(baked_tok, tok, baked=Path(baked), model=model, force=force, what=what, note=told)
    renderer = Renderer(tok, system_prompt, model)
    device, dtype = pick_device_and_dtype()
    console.print(f"loading {model} and {baked} ({device.type}, {str(dtype).removeprefix('torch.')})", markup=False)
    kw = dict(quant="none", device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    base_lm = load_model(src, **kw)
    baked_lm = load_model(baked_src, **kw)
    return ComparedModels(baked_lm, base_lm, renderer, vocab=base_config.get_text_config().vocab_size,
                          max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                          chunk_size=chunk_size, sampler=sampler)

