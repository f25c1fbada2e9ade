"""The student and the teacher: one set of base weights, two views.

student = base + LoRA adapter, no system prompt.
teacher = base with the adapter disabled (or a separate --teacher model), system prompt in context.

`StudentTeacher` draws student rollouts (and, for the off-policy baselines, prompted
teacher samples from the frozen weights) and runs the forward passes the training
methods and the held-out measurement need: teacher hidden states (no gradient,
from the cached system-prompt prefix where it applies), student hidden states
(with gradient), and the LM heads that turn either into logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .data import Messages
from .losses import chunked_kl
from .render import Renderer
from .samplers import Sampler, SamplingArgs, make_sampler, make_teacher_sampler
from .scoring import PrefixCache, logits_fn, response_hidden, teacher_hidden


@dataclass
class Rollout:
    """Sampled responses with both renders of their prompts; `responses` come from the student
    (`rollout`) or from the prompted teacher (`teacher_rollout`), the other fields are the same."""

    prompts: list[Messages]
    student_ids: list[list[int]]
    teacher_ids: list[list[int]]
    responses: list[list[int]]

    @property
    def n_tokens(self) -> int:
        return sum(len(r) for r in self.responses)

    @staticmethod
    def join(parts: list[Rollout]) -> Rollout:
        """One rollout of the parts' rows, in order."""
        if len(parts) == 1:
            return parts[0]
        return Rollout(*([row for part in parts for row in getattr(part, name)]
                         for name in ("prompts", "student_ids", "teacher_ids", "responses")))

    def split(self, size: int | None) -> list[Rollout]:
        """Consecutive parts of at most `size` rollouts (the whole rollout when size is None); their
        response tokens, concatenated in order, are this rollout's N tokens."""
        if size is None or size >= len(self.responses):
            return [self]
        return [Rollout(self.prompts[i : i + size], self.student_ids[i : i + size], self.teacher_ids[i : i + size],
                        self.responses[i : i + size]) for i in range(0, len(self.responses), size)]


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
        micro_batch_size: int | None = None,  # rollouts per student pass and backward (None: all)
        gradient_checkpointing: bool = False,
    ):
        self.student = student
        self.renderer = renderer
        self.tok = renderer.tok
        self.teacher = teacher
        self.quantised = quantised
        self.kl_topk = kl_topk
        self.chunk_size = chunk_size
        self.micro_batch_size = micro_batch_size
        self.gradient_checkpointing = gradient_checkpointing
        self.sampling = SamplingArgs.for_model(self.tok, student, max_new_tokens=max_new_tokens,
                                               temperature=temperature, top_p=top_p)
        self.sampler = make_sampler(rollout, student, self.sampling, quantised=quantised)
        self.rollout_mode = rollout
        self._teacher_sampler: Sampler | None = None  # built on first use: only the off-policy methods sample it
        base = student.get_base_model()
        if gradient_checkpointing:
            _checkpoint_layers(base)
        self.student_head = logits_fn(base, vocab)  # (n, H) -> (n, V); LoRA on the head, if any, is live
        self.teacher_head = logits_fn(teacher if teacher is not None else base, vocab)
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
        self.sampler.refresh()
        responses = self.sampler.sample(student_ids, generator)
        return Rollout(prompts, student_ids, teacher_ids, responses)

    @property
    def teacher_sampler(self) -> Sampler:
        if self._teacher_sampler is None:
            self._teacher_sampler = make_teacher_sampler(self.rollout_mode, self.student, self.sampling,
                                                         teacher=self.teacher, quantised=self.quantised)
        return self._teacher_sampler

    def teacher_rollout(self, prompts: list[Messages], generator: torch.Generator) -> Rollout:
        """Sample one response per prompt from the prompted teacher (frozen weights, system prompt in context).

        The same sampling settings as the student's rollout; the draw depends only on the
        generator's seed, so a resumed bake samples exactly what an uninterrupted one did.
        """
        student_ids = [self.renderer.student_ids(m) for m in prompts]
        teacher_ids = [self.renderer.teacher_ids(m) for m in prompts]
        responses = self.teacher_sampler.sample(teacher_ids, generator)
        return Rollout(prompts, student_ids, teacher_ids, responses)

    def teacher_states(self, ro: Rollout) -> torch.Tensor:
        """(N, H) teacher hidden states on the rollout, no gradient (prefix cache when it applies)."""
        with self.teacher_weights() as lm:
            if self.prefix is not None and not self.prefix.covers(ro.teacher_ids):
                self.prefix_misses += 1
            return teacher_hidden(lm, ro.teacher_ids, ro.responses, self.tok.pad_token_id, self.prefix)

    def student_states(self, ro: Rollout) -> torch.Tensor:
        """(N, H) student hidden states on the rollout, with gradient through the LoRA weights.

        With gradient checkpointing each decoder layer keeps only its input and recomputes the
        rest in the backward. HF checkpoints only in training mode, which this pass alone uses:
        rollouts, teacher passes and the held-out KL run in eval mode, unchanged.
        """
        self.student.train()  # LoRA dropout, if any (the recompute replays the same dropout masks)
        try:
            return response_hidden(self.student.get_base_model(), ro.student_ids, ro.responses, self.tok.pad_token_id)
        finally:
            self.student.eval()

    def reverse_kl(self, ro: Rollout) -> torch.Tensor:
        """(N,) per-token KL(student || teacher) on the rollout, no gradient (the held-out measurement)."""
        with torch.no_grad():
            s_hidden = response_hidden(self.student.get_base_model(), ro.student_ids, ro.responses,
                                       self.tok.pad_token_id)
        return chunked_kl(s_hidden, self.teacher_states(ro), self.student_head, self.teacher_head,
                          chunk_size=self.chunk_size, topk=self.kl_topk)


def use_checkpointing(setting: str, device) -> bool:
    """--gradient-checkpointing auto/on/off on this device. auto is on on CUDA: there the student
    backward's activations grow with batch x length and are what stops an 8B model at 512 new
    tokens from fitting a 24 GB card (see memory.estimate_peak_memory), for ~1 extra student
    forward per step; on CPU memory is rarely the limit and time is, so it stays off."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _checkpoint_layers(causal_lm) -> None:
    """Turn on HF activation checkpointing for every decoder layer (non-reentrant: the base is frozen
    and its inputs need no gradient). Older transformers only have gradient_checkpointing_enable."""
    enable = getattr(causal_lm, "activation_checkpointing_enable", None)
    kwargs = {"use_reentrant": False}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
