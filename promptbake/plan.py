"""`promptbake plan`: what `distill` would do and cost, checked as far as it can be without the weights.

It runs the same checks `distill` runs before loading weights (setup.read_inputs and
setup.read_model_files: the same code, so the same errors and the same prompt counts), then
estimates memory from the model's config and time from the bake's own step run on cut copies of the
model with random weights (promptbake.timing). The model's layers are built on torch's "meta"
device (shapes only, no memory, no weights read) to count parameters and LoRA weights.
Nothing is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rich.console import Console

from .config import DistillConfig
from .memory import MemoryEstimate, estimate_peak_memory, free_memory
from .setup import read_inputs, read_model_files
from .timing import cut_config, cut_layers, time_bake


@dataclass
class Plan:
    model: str
    device: str
    dtype: str
    quant: str
    rollout_dtype: str
    prompts: dict  # read, train, heldout, dropped {reason: n}
    system_prompt_tokens: int  # what the teacher's input has and the student's doesn't
    teacher_prefix_tokens: int  # leading teacher tokens shared by every prompt (the reusable KV cache)
    prefix_reuse: bool
    prefix_reuse_reason: str
    response_tokens_per_step: int  # at most: batch x max_new_tokens
    parameters: int
    lora_parameters: int
    memory_mb: dict  # part -> MiB, "total" (the estimated peak), "largest_phase", "free" (this machine's; or None)
    wall_seconds: dict | None  # part -> seconds, "total", and "how"; None when not timed (wall_why says why)
    bake_key: str
    out: str
    out_status: str  # absent, up_to_date or different
    out_why: str
    will_bake: bool
    wall_why: str = ""  # why wall_seconds is None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def make_plan(cfg: DistillConfig, console: Console, *, force: bool = False) -> Plan:
    """Check cfg as distill would before loading weights, and estimate what the bake needs.

    Raises what distill raises, with the same messages: the checks are the same functions.
    """
    inputs = read_inputs(cfg, force=force)
    from .setup import quiet_libraries

    quiet_libraries()
    from .models import load_config, pick_device_and_dtype, resolve_quant
    from .sampling import rollout_dtype

    device, dtype = pick_device_and_dtype()
    quant = resolve_quant(cfg.quant, device)
    tok, renderer, config, prompt_set, train, heldout, vocab = read_model_files(cfg, inputs, console)
    probe = [{"role": "user", "content": "?"}]
    system_tokens = len(renderer.teacher_ids(probe)) - len(renderer.student_ids(probe))
    prefix = renderer.system_prefix()
    reuse, reason = _prefix_reuse(cfg, config, renderer, prefix, train + heldout)
    params, lora = count_parameters(config, cfg)
    samp_dtype = dtype if quant != "none" or cfg.rollout != "fast" else rollout_dtype(dtype, device)
    longest = (max(len(renderer.student_ids(m)) for m in train), max(len(renderer.teacher_ids(m)) for m in train))
    memory = estimate_memory(cfg, config, longest, device=device, quant=quant, dtype=dtype, samp_dtype=samp_dtype)
    free = free_memory(device)
    notes = []
    if inputs.out_status == "up_to_date" and force:
        notes.append("--force: distill bakes again and replaces --out")
    if free is not None and not memory.fits(free):
        where = "GPU memory" if device.type == "cuda" else "memory"
        notes.append(f"the estimated peak, {_mib(memory.peak)} MiB, is more than the {_mib(free)} MiB of {where} "
                     f"free on this machine; to lower it: " + "; ".join(memory.advice(free) or ["-"]))
    wall, wall_why = None, "--out is up to date, so distill skips the bake"  # and a CI plan stays quick
    if not inputs.up_to_date:
        cuts = cut_layers(config)
        deepest = estimate_memory(cfg, cut_config(config, cuts[-1]), longest, device=device, quant="none",
                                  dtype=dtype, samp_dtype=samp_dtype)
        if free is not None and not deepest.fits(free):
            wall_why = (f"not timed: the copy cut to {cuts[-1]} layers it would time needs ~{_mib(deepest.peak)} MiB, "
                        f"more than the {_mib(free)} MiB free")
        else:
            teacher_config = load_config(inputs.teacher_src, trust_remote_code=cfg.trust_remote_code) \
                if inputs.teacher_src else None
            layers = config.get_text_config().num_hidden_layers
            with console.status(f"timing the bake's step on copies of the model cut to "
                                f"{' and '.join(map(str, cuts))} of its {layers} layers"):
                wall = time_bake(cfg, config, renderer, train, len(heldout), vocab=vocab, device=device, dtype=dtype,
                                 quant=quant, teacher_config=teacher_config)
            wall_why = ""
    return Plan(
        model=cfg.model, device=device.type, dtype=_name(dtype), quant=quant, rollout_dtype=_name(samp_dtype),
        prompts=dict(source=cfg.prompts, read=prompt_set.rows, train=len(train), heldout=len(heldout),
                     dropped=dict(prompt_set.dropped)),
        system_prompt_tokens=system_tokens, teacher_prefix_tokens=len(prefix), prefix_reuse=reuse,
        prefix_reuse_reason=reason, response_tokens_per_step=cfg.batch_size * cfg.max_new_tokens,
        parameters=params, lora_parameters=lora, memory_mb=memory_parts(memory, free), wall_seconds=wall,
        bake_key=inputs.key.key, out=str(cfg.out), out_status=inputs.out_status, out_why=inputs.out_why,
        will_bake=not inputs.up_to_date, wall_why=wall_why, notes=notes,
    )


def _prefix_reuse(cfg: DistillConfig, config, renderer, prefix: list[int], prompts) -> tuple[bool, str]:
    """Whether the teacher's system-prompt KV cache will be reused, by the checks scoring.PrefixCache makes."""
    from transformers import DynamicCache

    if not cfg.prefix_reuse:
        return False, "--no-prefix-reuse"
    if len(prefix) < 2:
        return False, "the chat template renders no common system-prompt prefix"
    if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers):
        return False, "the model has sliding-window layers, which would evict the prefix"
    P = len(prefix)
    misses = sum(1 for m in prompts if renderer.teacher_ids(m)[:P] != prefix)
    if misses:
        return False, f"{misses} prompts don't start with the same {P} prefix tokens (the tokenizer merges across it)"
    return True, f"the first {P} teacher tokens are computed once and reused at every step"


def count_parameters(config, cfg: DistillConfig) -> tuple[int, int]:
    """(model parameters, LoRA parameters) from an empty copy of the model on the meta device: no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    from .setup import add_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    lora = add_lora(model, cfg)  # also refuses an --lora-targets that matches nothing, as distill would
    return params, sum(p.numel() for p in lora.parameters() if p.requires_grad)


def estimate_memory(cfg: DistillConfig, config, longest: tuple[int, int], *, device, quant: str, dtype, samp_dtype):
    """memory.estimate_peak_memory for this bake: its settings, its longest (student, teacher) prompts in tokens,
    the rollout copy it keeps. Upper bounds where the size depends on the samples (responses run full length)."""
    from .pair import use_checkpointing

    copy = samp_dtype if cfg.rollout == "fast" and quant == "none" else None  # a quantised base is sampled as is
    return estimate_peak_memory(
        config, quant=quant, dtype=_name(dtype), batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
        max_new_tokens=cfg.max_new_tokens, prompt_tokens=longest[0], teacher_prompt_tokens=longest[1],
        lora_rank=cfg.lora_rank,
        lora_targets=cfg.lora_targets, chunk_size=cfg.chunk_size,
        gradient_checkpointing=use_checkpointing(cfg.gradient_checkpointing, device),
        rollout_copy=None if copy is None else _name(copy))


def memory_parts(est: MemoryEstimate, free: int | None) -> dict:
    """The estimate in MiB: what stays resident, each phase (only the largest counts to the peak), the peak."""
    parts = {"weights": est.weights, "rollout_copy": est.rollout_copy, "lora_and_optimizer": est.adapter,
             "rollout_kv_cache": est.rollout, "teacher_pass": est.teacher, "activations": est.activations,
             "loss_chunk": est.loss_chunk, "total": est.peak}
    mib = {k: _mib(v) for k, v in parts.items()}
    return {**mib, "largest_phase": est.largest_phase, "free": None if free is None else _mib(free)}


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def _resident(m: dict) -> float:
    return m["weights"] + m["rollout_copy"] + m["lora_and_optimizer"]


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def print_plan(plan: Plan, out: Console) -> None:
    from rich.table import Table

    table = Table(title="promptbake plan", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    p = plan.prompts
    dropped = ", ".join(f"{n} {reason}" for reason, n in p["dropped"].items()) or "none"
    table.add_row("model", f"{plan.model} ({plan.parameters / 1e6:.1f} M parameters)")
    table.add_row("device", f"{plan.device}, {plan.dtype}, quant {plan.quant}; rollouts in {plan.rollout_dtype}")
    table.add_row("prompts", f"{p['train']} train, {p['heldout']} held out ({p['read']} read; dropped: {dropped})")
    table.add_row("system prompt", f"{plan.system_prompt_tokens} tokens in the teacher's input")
    table.add_row("prefix reuse", f"{'yes' if plan.prefix_reuse else 'no'}: {plan.prefix_reuse_reason}")
    table.add_row("per step", f"up to {plan.response_tokens_per_step} response tokens")
    table.add_row("LoRA", f"{plan.lora_parameters / 1e6:.2f} M trainable parameters")
    m = plan.memory_mb
    free = f" ({m['free']:,.0f} free here)" if m["free"] is not None else ""
    phases = {"rollout": f"rollout KV cache {m['rollout_kv_cache']:,.0f}",
              "teacher pass": f"teacher pass {m['teacher_pass']:,.0f}",
              "student backward": f"student backward {m['activations'] + m['loss_chunk']:,.0f} (activations "
                                  f"{m['activations']:,.0f}, loss chunk {m['loss_chunk']:,.0f})"}
    largest = phases.pop(m["largest_phase"])
    table.add_row("peak memory (est.)", f"{m['total']:,.0f} MiB{free}: resident {_resident(m):,.0f} (weights "
                  f"{m['weights']:,.0f}, rollout copy {m['rollout_copy']:,.0f}, LoRA and optimizer "
                  f"{m['lora_and_optimizer']:,.0f}) + the largest phase, {largest}; the others: "
                  + ", ".join(phases.values()))
    w = plan.wall_seconds
    if w is None:
        table.add_row("wall time (est.)", f"none: {plan.wall_why}")
    else:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in w["per_step_phases"].items())
        table.add_row("wall time (est.)", f"{w['total'] / 60:.1f} min: {w['per_step']:.1f} s per step ({phases}), "
                      f"held-out KL {w['heldout_kl']:.0f} s, closing eval {w['closing_eval']:.0f} s; {w['how']}")
    table.add_row("bake key", plan.bake_key)
    verdict = "will bake" if plan.will_bake else "up to date: distill will skip the bake"
    table.add_row("--out", f"{plan.out_why}; {verdict}")
    for note in plan.notes:
        table.add_row("note", note)
    out.print(table)
