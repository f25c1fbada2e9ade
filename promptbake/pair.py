"""The student and the teacher: one set of base weights, two views.

student = base + LoRA adapter, no system prompt.
teacher = base with the adapter disabled (or a separate --teacher model), system prompt in context.

`StudentTeacher` samples student rollouts and computes the per-token reverse KL
between the two on those rollouts; `distill` and `evaluate` build on it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .data import Messages
from .losses import chunked_reverse_kl
from .render import Renderer
from .sampling import RolloutModel, rollout_dtype, sample, sample_with_generate
from .scoring import PrefixCache, logits_fn, response_hidden, teacher_hidden


@dataclass
class Rollout:
    prompts: list[Messages]
    student_ids: list[list[int]]
    teacher_ids: list[list[int]]
    responses: list[list[int]]

    @property
    def n_tokens(self) -> int:
        return sum(len(r) for r in self.responses)


class StudentTeacher:
    def __init__(
        self,
        student,  # peft model
        renderer: Renderer,
        *,
        teacher=None,  # a separate causal LM, or None for the student's own base
        vocab: int,
        quantised: bool,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        kl_topk: int = 0,
        chunk_size: int = 128,
        rollout: str = "fast",
        prefix_reuse: bool = True,
    ):
        self.student = student
        self.renderer = renderer
        self.tok = renderer.tok
        self.teacher = teacher
        self.quantised = quantised
        self.gen_kwargs = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_ids=eos_token_ids(self.tok, student),
            pad_id=self.tok.pad_token_id,
        )
        self.kl_topk = kl_topk
        self.chunk_size = chunk_size
        # fast: plain copy with the adapter merged (impossible on a quantised base: use the LoRA path).
        self.rollout_mode = "exact" if rollout == "fast" and quantised else rollout
        self.sampler_model = None
        if self.rollout_mode == "fast":
            base_param = next(student.parameters())
            self.sampler_model = RolloutModel(student, rollout_dtype(base_param.dtype, base_param.device))
        base = student.get_base_model()
        self.student_logits = logits_fn(base, vocab)
        self.teacher_logits = logits_fn(teacher if teacher is not None else base, vocab)
        self.prefix: PrefixCache | None = None
        self.prefix_misses = 0  # teacher batches that needed a full pass although reuse was on
        if prefix_reuse:
            with self.teacher_weights() as lm:
                self.prefix = PrefixCache(lm, renderer.system_prefix())

    @contextlib.contextmanager
    def teacher_weights(self):
        """The causal LM that acts as the teacher: the frozen base (adapter off) or --teacher."""
        if self.teacher is not None:
            yield self.teacher
        else:
            with self.student.disable_adapter():
                yield self.student.get_base_model()

    def rollout(self, prompts: list[Messages], generator: torch.Generator) -> Rollout:
        """Sample one response per prompt from the student (adapter on, no system prompt)."""
        student_ids = [self.renderer.student_ids(m) for m in prompts]
        teacher_ids = [self.renderer.teacher_ids(m) for m in prompts]
        self.student.eval()
        if self.rollout_mode == "generate":
            responses = sample_with_generate(self.student, student_ids, generator=generator, **self.gen_kwargs)
        elif self.rollout_mode == "exact":
            responses = sample(self.student, student_ids, generator=generator, **self.gen_kwargs)
        else:
            self.sampler_model.refresh()
            responses = sample(self.sampler_model.model, student_ids, generator=generator, **self.gen_kwargs)
        return Rollout(prompts, student_ids, teacher_ids, responses)

    def teacher_states(self, ro: Rollout) -> torch.Tensor:
        """(N, H) teacher hidden states on the rollout, no gradient (prefix cache when it applies)."""
        with self.teacher_weights() as lm:
            if self.prefix is not None and not self.prefix.covers(ro.teacher_ids):
                self.prefix_misses += 1
            return teacher_hidden(lm, ro.teacher_ids, ro.responses, self.tok.pad_token_id, self.prefix)

    def student_kl(self, ro: Rollout, t_hidden: torch.Tensor, *, train: bool) -> torch.Tensor:
        """(N,) per-token KL(student || teacher) on the rollout's response tokens.

        With train=True the gradient of the token-mean is accumulated into the LoRA weights.
        """
        base = self.student.get_base_model()
        pad = self.tok.pad_token_id
        if train:
            self.student.train()  # LoRA dropout, if any
            s_hidden = response_hidden(base, ro.student_ids, ro.responses, pad)  # (N, H), with grad
            self.student.eval()
        else:
            with torch.no_grad():
                s_hidden = response_hidden(base, ro.student_ids, ro.responses, pad)
        return chunked_reverse_kl(
            s_hidden, t_hidden, self.student_logits, self.teacher_logits,
            chunk_size=self.chunk_size, topk=self.kl_topk,
            backward_scale=1.0 / max(ro.n_tokens, 1) if train else None,
        )

    def reverse_kl(self, ro: Rollout, *, train: bool) -> torch.Tensor:
        return self.student_kl(ro, self.teacher_states(ro), train=train)


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the generation config's (often a list)."""
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)
