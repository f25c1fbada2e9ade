"""Which code draws the responses: one `Sampler` interface over every rollout backend.

A sampler is built once for a model and asked for one response per prompt:
`refresh()` before sampling when the weights it reads may have changed (the LoRA
adapter after an optimizer step), then `sample(prompt_ids, generator)`. The bake,
the baselines' teacher samples and the evaluation all go through it, so a new
backend is one new class here and a line in `make_sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .render import stop_token_ids
from .sampling import RolloutModel, rollout_dtype, sample, sample_with_generate


@dataclass(frozen=True)
class SamplingArgs:
    """What every sampler needs besides the prompts: length, temperature, nucleus, stop and pad ids."""

    max_new_tokens: int
    temperature: float
    top_p: float
    eos_ids: list[int]
    pad_id: int

    @classmethod
    def for_model(cls, tokenizer, model, *, max_new_tokens: int, temperature: float, top_p: float = 1.0):
        """Stop where a chat server stops: EOS, the generation config's ids and the template's end of turn."""
        stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        return cls(max_new_tokens, temperature, top_p, stops, tokenizer.pad_token_id)

    def kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    eos_ids=self.eos_ids, pad_id=self.pad_id)


class Sampler(Protocol):
    description: str  # which code runs, in words (benchmarks and notices print it)

    def refresh(self) -> None: ...

    def sample(self, prompts: list[list[int]], generator: torch.Generator) -> list[list[int]]: ...


class LoopSampler:
    """promptbake's own decode loop on a model as it is (a PEFT model runs its LoRA branches at every token)."""

    def __init__(self, model, args: SamplingArgs, description: str = "own decode loop"):
        self.model, self.args, self.description = model, args, description

    def refresh(self) -> None:
        pass  # reads the live weights

    def sample(self, prompts, generator):
        self.model.eval()
        return sample(self.model, prompts, generator=generator, **self.args.kwargs())


class GenerateSampler:
    """Hugging Face `generate` on the model as it is: for debugging, and the benchmarks' baseline."""

    description = "HF generate on the PEFT model"

    def __init__(self, model, args: SamplingArgs):
        self.model, self.args = model, args

    def refresh(self) -> None:
        pass

    def sample(self, prompts, generator):
        self.model.eval()
        return sample_with_generate(self.model, prompts, generator=generator, **self.args.kwargs())


class MergedCopySampler:
    """The own loop on a plain copy of the student with the adapter merged in, rewritten at each refresh."""

    def __init__(self, peft_model, args: SamplingArgs):
        base_param = next(peft_model.parameters())
        dtype = rollout_dtype(base_param.dtype, base_param.device)
        self.copy = RolloutModel(peft_model, dtype)
        self.args = args
        name = str(dtype).removeprefix("torch.")
        self.description = (f"LeanDecoder, {name}" if self.copy.reason is None
                            else f"merged HF copy, {name} ({self.copy.reason})")

    def refresh(self) -> None:
        self.copy.refresh()

    def sample(self, prompts, generator):
        return sample(self.copy.model, prompts, generator=generator, **self.args.kwargs())


class FrozenSampler:
    """promptbake's own loop on weights that never change (the teacher): built once, never refreshed.

    `model` is a `LeanDecoder` over the base layers' own weights where the architecture allows
    (it reads past a PEFT model's LoRA wrappers, so it is the adapter-off teacher), else the
    causal LM, sampled inside `context()` (peft's `disable_adapter()` for the student's own base).
    """

    def __init__(self, model, args: SamplingArgs, description: str, context=None):
        import contextlib

        self.model, self.args, self.description = model, args, description
        self.context = context or contextlib.nullcontext

    def refresh(self) -> None:
        pass  # frozen weights: nothing to rewrite

    def sample(self, prompts, generator):
        with self.context():
            if hasattr(self.model, "eval"):
                self.model.eval()
            return sample(self.model, prompts, generator=generator, **self.args.kwargs())


def make_teacher_sampler(mode: str, peft_model, args: SamplingArgs, *, teacher=None, quantised: bool) -> Sampler:
    """The prompted teacher's sampler for --rollout `mode`: the frozen base with the adapter off, or `teacher`.

    Its weights never change, so unlike the student's it needs no merge refresh. `generate`
    keeps the own loop here: Hugging Face generate is only the student's debugging path.
    """
    lm = teacher if teacher is not None else peft_model.get_base_model()
    adapter_off = None if teacher is not None else peft_model.disable_adapter
    return frozen_sampler(lm, args, fast=mode == "fast" and not quantised, what="the frozen teacher",
                          context=adapter_off)


def frozen_sampler(lm, args: SamplingArgs, *, fast: bool, what: str, context=None) -> FrozenSampler:
    """promptbake's own loop on weights that never change: on a `LeanDecoder` copy (bf16 where the CPU
    has it) if `fast` and the architecture allows, else on `lm` as it is, inside `context()`."""
    from .decoder import LeanDecoder, unsupported_reason

    if fast and unsupported_reason(lm) is None:
        param = next(lm.parameters())
        dtype = rollout_dtype(param.dtype, param.device)
        name = str(dtype).removeprefix("torch.")
        return FrozenSampler(LeanDecoder(lm, dtype), args, f"LeanDecoder on {what}, {name}")
    return FrozenSampler(lm, args, f"own loop on {what}", context)


def make_sampler(mode: str, peft_model, args: SamplingArgs, *, quantised: bool) -> Sampler:
    """The student's sampler for --rollout `mode` (fast / exact / generate)."""
    if mode == "generate":
        return GenerateSampler(peft_model, args)
    if mode == "exact":
        return LoopSampler(peft_model, args, "own loop on the PEFT model")
    if quantised:  # no merged copy of a quantised base: sample from the quantised weights as stored
        from .qdecoder import QuantisedSampler, unsupported_reason

        reason = unsupported_reason(peft_model)
        if reason is None:
            return QuantisedSampler(peft_model, args)
        return LoopSampler(peft_model, args, f"own loop on the PEFT model (no fast quantised path: {reason})")
    return MergedCopySampler(peft_model, args)
