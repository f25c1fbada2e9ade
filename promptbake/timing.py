"""How long a bake takes, timed before its weights load: the real step on the model cut to a few layers.

`plan` has the model's config and tokenizer but not its weights. A FLOP count over a measured matmul
rate misses what a step's time depends on: decoding a few rows at a time is bound by memory traffic
and by the cost of launching each operation, more so on a GPU, and a method's extra decode loop
(--teacher-rollouts, the teacher's samples of offpolicy and sft) costs its sequential steps whatever
its FLOPs. So the bake's own code runs instead (the method's step: rollouts, teacher pass, student
forward and backward, the optimizer; and one held-out KL batch's sampling and scoring) on copies of
the model with random weights and `SHALLOW` and `DEEP` decoder layers, on the bake's device and
dtype, with its batch, prompts and answer length. A layer's cost is the difference between the two
over the layers between them, and the full model's is the shallow copy's plus that for each further
layer: embeddings, head, sampling and loss are in both copies, the layers scale with depth.

Random weights almost never sample an end-of-turn token, so every answer runs to
--max-new-tokens: the figures are for full-length answers, an upper bound for a prompt whose
answers stop earlier. The copies are unquantised even where the bake quantises its base, and a
--teacher model is cut to the same layers as the student. `benchmarks/bench_plan.py` sets the
estimate beside a real bake.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

from .config import DistillConfig
from .data import Messages

SHALLOW, DEEP = 1, 8  # decoder layers of the two timed copies (8: the slope is read over 7 layers)
CLOSING_EVAL_PROMPTS = 16  # evaluate_bake's


@dataclass
class StepTimes:
    """Seconds of one training step by phase (rollout, teacher, student, optim) and of one held-out KL batch."""

    phases: dict[str, float]
    heldout_batch: float

    @property
    def step(self) -> float:
        return sum(self.phases.values())


def cut_config(config, layers: int):
    """A copy of a transformers config with only the first `layers` decoder layers."""
    cut = copy.deepcopy(config)
    text = cut.get_text_config()
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):  # per-layer attention kinds (Gemma 3, Qwen 3, ...)
        text.layer_types = text.layer_types[:layers]
    return cut


def cut_layers(config) -> list[int]:
    """The decoder layers of the copies time_bake times: SHALLOW and DEEP, or a model of up to DEEP layers as it is."""
    layers = config.get_text_config().num_hidden_layers
    return sorted({min(SHALLOW, layers), min(DEEP, layers)})


def time_bake(cfg: DistillConfig, config, renderer, train: list[Messages], heldout: int, *, vocab: int, device,
              dtype, quant: str, teacher_config=None) -> dict:
    """Estimated seconds of a bake by phase, from two cut copies of the model (see the module doc).

    `heldout` is the size of the held-out split; `quant` the bake's resolved quantisation."""
    layers = config.get_text_config().num_hidden_layers
    cuts = cut_layers(config)
    timed = [time_cut(cfg, config, renderer, train, n, vocab=vocab, device=device, dtype=dtype,
                      teacher_config=teacher_config) for n in cuts]
    shallow, deep = timed[0], timed[-1]

    def full(a: float, b: float) -> float:  # the shallow copy's time, plus each further layer at the measured slope
        return a if len(cuts) == 1 else a + (layers - cuts[0]) * max(b - a, 0.0) / (cuts[1] - cuts[0])

    phases = {k: full(shallow.phases[k], deep.phases.get(k, 0.0)) for k in shallow.phases}
    step = sum(phases.values())
    batch = full(shallow.heldout_batch, deep.heldout_batch)
    measured = min(heldout, cfg.heldout_prompts) if cfg.heldout_prompts else heldout
    heldout_kl = 2 * math.ceil(measured / (2 * cfg.batch_size)) * batch  # before and after, 2 x batch rows at a time
    # The closing evaluation samples baked, teacher and base --batch-size rows at a time and scores the KL
    # both ways: about two held-out batches' work (one samples and scores twice the rows) per batch.
    closing = 2 * math.ceil(min(heldout, CLOSING_EVAL_PROMPTS) / cfg.batch_size) * batch if cfg.eval else 0.0
    parts = {"training": round(cfg.steps * step, 2), "per_step": round(step, 2),
             "per_step_phases": {k: round(v, 2) for k, v in phases.items()},
             "heldout_kl": round(heldout_kl, 2), "closing_eval": round(closing, 2)}
    parts["total"] = round(cfg.steps * step + heldout_kl + closing, 2)
    quantised = f" (unquantised: the bake's base is {quant})" if quant != "none" else ""
    copies = " and ".join(map(str, cuts))
    parts["how"] = (f"the bake's own step timed on copies of the model with {copies} of its {layers} layers and "
                    f"random weights{quantised}, scaled to {layers}; answers of the full "
                    f"--max-new-tokens {cfg.max_new_tokens}; model loading not included")
    return parts


def time_cut(cfg: DistillConfig, config, renderer, train: list[Messages], layers: int, *, vocab: int, device, dtype,
             teacher_config=None, repeats: int = 1) -> StepTimes:
    """The fastest of `repeats` steps (after one warm-up), and one held-out KL batch, on a copy of the model
    cut to `layers` layers."""
    import torch

    from .methods import PhaseTimer, make_method
    from .setup import add_lora, build_pair, lora_optimizer
    from .train import MAX_GRAD_NORM, step_batch

    torch.manual_seed(0)
    student = add_lora(_random_model(cut_config(config, layers), cfg, device, dtype), cfg)
    teacher = (_random_model(cut_config(teacher_config, layers), cfg, device, dtype)
               if teacher_config is not None else None)
    pair = build_pair(student, renderer, cfg, vocab=vocab, quant="none", teacher=teacher)
    method = make_method(cfg, pair)
    params, optimizer = lora_optimizer(student, cfg)
    steps: list[dict[str, float]] = []
    heldout_batch = 0.0
    for step in range(1, repeats + 2):
        gen = torch.Generator(device).manual_seed(step)
        timer = PhaseTimer(device)
        method.step(step_batch(train, cfg, step), gen, timer)
        with timer("optim"):
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step > 1:
            steps.append(timer.seconds)
        else:  # step 1 warmed caches, allocator and kernels up; now one held-out KL batch (2 x --batch-size)
            timer.sync()
            t0 = time.perf_counter()
            pair.reverse_kl(pair.rollout([train[i % len(train)] for i in range(2 * cfg.batch_size)], gen))
            timer.sync()
            heldout_batch = time.perf_counter() - t0
    return StepTimes(min(steps, key=lambda s: sum(s.values())), heldout_batch)


def _random_model(config, cfg: DistillConfig, device, dtype):
    from transformers import AutoModelForCausalLM

    import torch

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return model.eval()
