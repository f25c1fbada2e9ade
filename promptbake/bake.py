"""`distill`: one bake, top to bottom.

inputs -> tokenizer and renders -> model + LoRA -> held-out KL before ->
OPCD steps (rollout, teacher pass, reverse KL, AdamW) -> held-out KL after ->
adapter, merged checkpoint, record -> publish the output folder.

While it runs, OUT.work/ beside the output keeps checkpoints so a stopped bake
resumes where it stopped (checkpoint.py); a finished bake removes it.
"""

from __future__ import annotations

import hashlib
import math
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from .checkpoint import WorkFolder, run_settings, work_path
from .config import DistillConfig
from .data import Messages, PromptSet, load_prompt_set, read_system_prompt, split_holdout
from .errors import ContextTooLongError, InputError, TrainingError, WriteError, describe, is_out_of_memory
from .evaluate import after_distill, find_eval_checks
from .models import resolve_model
from .output import check_output, is_write_error, make_staging, publish, write_json, write_model_card


@dataclass
class DistillResult:
    out: Path
    kl_before: float
    kl_after: float
    steps: int
    wall_seconds: float
    peak_memory_mb: float
    record: dict = field(repr=False)


def distill(cfg: DistillConfig, console: Console | None = None) -> DistillResult:
    """Bake cfg.prompt into cfg.model; write the merged checkpoint to cfg.out."""
    console = console or Console(stderr=True)
    started = time.time()

    # 1. Everything that can be checked without torch: fail in about a second.
    cfg.validate()
    system = read_system_prompt(cfg.prompt)
    prompt_set = load_prompt_set(cfg.prompts, prompt_field=cfg.prompt_field, split=cfg.split,
                                 max_prompts=cfg.max_prompts, seed=cfg.seed)
    checks = find_eval_checks(cfg)
    check_output(cfg.out, cfg.overwrite)
    template = _read_template(cfg.chat_template)
    src = resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
    teacher_src = resolve_model(cfg.teacher, "teacher model", allow_pickle=cfg.allow_pickle) if cfg.teacher else None

    # 2. Tokenizer, renders and length checks, still before any weights are loaded.
    quiet_libraries()
    import torch

    from .models import (check_tokenizers_match, context_length, load_config, load_model, load_tokenizer,
                         pick_device_and_dtype, resolve_quant)
    from .pair import StudentTeacher
    from .render import Renderer

    device, dtype = pick_device_and_dtype()
    quant = resolve_quant(cfg.quant, device)
    # A stopped bake left OUT.work/: resume it if the settings match, refuse (naming one) if not.
    settings = run_settings(cfg, system=system, prompts=prompt_set.prompts, template=template, quant=quant, dtype=dtype)
    work = WorkFolder.open(cfg.out, settings, steps=cfg.steps, resume=cfg.resume, console=console)
    tok = load_tokenizer(src, chat_template=template, trust_remote_code=cfg.trust_remote_code)
    renderer = Renderer(tok, system, cfg.model)
    if not renderer.system_role:
        console.print("[yellow]note:[/] the chat template has no system role; the teacher gets the system prompt "
                      "at the start of the first user turn.")
    config = load_config(src, trust_remote_code=cfg.trust_remote_code)
    prompt_set = _fit_context(prompt_set, renderer, context_length(config), cfg.max_new_tokens)
    console.print(f"prompts: {prompt_set.describe()}", markup=False, highlight=False, soft_wrap=True)
    train, heldout = split_holdout(prompt_set.prompts, cfg.holdout, cfg.seed)
    vocab = config.get_text_config().vocab_size
    if cfg.kl_topk > vocab:
        raise InputError(f"--kl-topk {cfg.kl_topk} is larger than the vocabulary ({vocab} tokens); use 0 for exact KL.")
    if teacher_src:
        teacher_tok = load_tokenizer(teacher_src, chat_template=template, trust_remote_code=cfg.trust_remote_code)
        teacher_config = load_config(teacher_src, trust_remote_code=cfg.trust_remote_code)
        vocab = check_tokenizers_match(tok, teacher_tok, vocab, teacher_config.get_text_config().vocab_size)

    # 3. Weights: the base once, frozen; the LoRA adapter on top is all that trains.
    console.print(f"loading {cfg.model} ({device.type}, {str(dtype).removeprefix('torch.')}, quant {quant})")
    torch.manual_seed(cfg.seed)
    base = load_model(src, quant=quant, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    student = _add_lora(base, cfg)
    teacher = None
    if teacher_src:
        teacher = load_model(teacher_src, quant=quant, device=device, dtype=dtype,
                             trust_remote_code=cfg.trust_remote_code)
    pair = StudentTeacher(
        student, renderer, teacher=teacher, vocab=vocab, quantised=quant != "none",
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        kl_topk=cfg.kl_topk, chunk_size=cfg.chunk_size, rollout=cfg.rollout, prefix_reuse=cfg.prefix_reuse,
    )
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)

    try:
        # 4. Held-out KL before training (the adapter starts at zero: student == base). Kept in the work
        #    folder, so a resumed bake doesn't measure it again on trained weights.
        kl_before = work.once("heldout_kl_before", lambda: _heldout_kl(pair, heldout, cfg, device, console, "before"))

        # 5. The OPCD loop: a fresh on-policy batch every step, one optimizer step each. `run` starts after the
        #    last checkpoint, saves new ones, and turns Ctrl-C / SIGTERM into a checkpoint and a clean exit.
        with (work.training(student, optimizer, steps=cfg.steps, save_every=cfg.save_every) as run,
              _StepLog(console, cfg.steps, run.done) as log):
            for step in range(run.done + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                batch = [train[i] for i in batch_indices(len(train), cfg.batch_size, step, cfg.seed)]
                torch.manual_seed(_step_seed(cfg.seed, step))  # LoRA dropout
                gen = torch.Generator(device).manual_seed(_step_seed(cfg.seed, step))
                ro = pair.rollout(batch, gen)
                t1 = time.perf_counter()
                t_hidden = pair.teacher_states(ro)  # (N, H), no grad
                t2 = time.perf_counter()
                kl = pair.student_kl(ro, t_hidden, train=True)  # (N,), gradient already accumulated
                t3 = time.perf_counter()
                loss = kl.mean().item()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    bad = loss if not math.isfinite(loss) else grad_norm
                    raise _diverged(f"step {step}: the loss or gradient became {bad}", cfg, run.kept())
                with run.update():  # Ctrl-C waits for this block: the update, its metrics row and checkpoint
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if not torch.stack([p.isfinite().all() for p in params]).all():  # never checkpoint inf weights
                        raise _diverged(f"step {step}: the update made the LoRA weights inf or nan", cfg, run.kept())
                    t4 = time.perf_counter()
                    row = {
                        "step": step, "kl": round(loss, 6), "response_tokens": ro.n_tokens,
                        "tokens_per_s": round(ro.n_tokens / (t1 - t0), 2), "grad_norm": round(grad_norm, 6),
                        "rollout_s": round(t1 - t0, 3), "teacher_s": round(t2 - t1, 3),
                        "student_s": round(t3 - t2, 3), "optim_s": round(t4 - t3, 3), "step_s": round(t4 - t0, 3),
                        "lr": cfg.lr,
                    }
                    run.finished(step, row)  # metrics.jsonl; a checkpoint every --save-every steps and at the end
                log.step(row)
                if step == 1 and pair.prefix is not None and pair.prefix_misses:
                    console.print("[yellow]note:[/] the system prompt doesn't render as the same leading tokens "
                                  "for every prompt; the teacher runs full passes instead of reusing its prefix cache.")

        # 6. Held-out KL after training, on the same prompts with the same sampling seed.
        kl_after = _heldout_kl(pair, heldout, cfg, device, console, "after")
        if not math.isfinite(kl_after):  # never merge weights whose outputs are inf/nan
            raise _diverged(f"after training the held-out KL is {kl_after}", cfg, f"{work.path} is kept")

        # 7. Adapter, merged full-precision checkpoint, tokenizer, record, model card: built in a hidden
        #    folder and renamed to --out only when complete, so an earlier --out survives any failure.
        console.print("merging the adapter into the full-precision base")
        staging = make_staging(cfg.out)
        try:
            student.save_pretrained(staging / "adapter")
            from .merge import save_merged

            save_merged(student, staging / "adapter", staging, src=src, quantised=quant != "none", dtype=dtype,
                        trust_remote_code=cfg.trust_remote_code)
            tok.save_pretrained(staging)
            shutil.copyfile(work.path / "metrics.jsonl", staging / "metrics.jsonl")
            evaluation = after_distill(cfg, staging, heldout, checks, console) if cfg.eval else None
            wall = time.time() - started
            peak_mb = _peak_memory_mb(device)
            record = _record(cfg, system, config, quant, device, dtype, renderer, pair,
                             dict(source=cfg.prompts, read=prompt_set.rows, dropped=prompt_set.dropped,
                                  train=len(train), heldout=len(heldout),
                                  dropped_too_long=prompt_set.dropped.get("too_long", 0)),
                             dict(heldout_kl_before=kl_before, heldout_kl_after=kl_after, steps=cfg.steps,
                                  wall_seconds=round(wall, 1), peak_memory_mb=round(peak_mb, 1),
                                  eval=evaluation.to_json() if evaluation else None))
            write_json(staging / "promptbake.json", record)
            write_model_card(staging, record)
            publish(staging, cfg.out, cfg.overwrite)
        except Exception as err:
            if not is_write_error(err):
                raise
            raise WriteError(
                f"can't write --out {cfg.out} ({describe(err)}); it was left as it was. The trained adapter is "
                f"kept in {work.path}: free some space and run the same command again to finish without retraining."
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when published
    except (MemoryError, RuntimeError) as err:
        if "probability tensor contains" in str(err):  # sampling met inf/nan logits: the weights diverged
            raise _diverged("the model's outputs became inf or nan", cfg, f"{work.path} is kept") from None
        if not is_out_of_memory(err):
            raise
        raise TrainingError(
            f"out of memory ({describe(err)}). To use less: lower --batch-size (now {cfg.batch_size}), "
            f"--max-new-tokens (now {cfg.max_new_tokens}) or --chunk-size (now {cfg.chunk_size}), or train on a "
            f"quantised base with --quant 4bit. Only --chunk-size can change when resuming from {work.path}."
        ) from None
    work.remove()  # the output holds everything now

    result = DistillResult(cfg.out, kl_before, kl_after, cfg.steps, wall, peak_mb, record)
    _print_summary(console, result, device)
    return result


def _diverged(what: str, cfg: DistillConfig, kept: str) -> TrainingError:
    return TrainingError(f"{what}; nothing was written to {cfg.out} and {kept}. Lower --lr (now {cfg.lr}) or use "
                         f"--quant none, and delete {work_path(cfg.out)} to start afresh.")


def quiet_libraries() -> None:
    """Silence library chatter (progress bars, deprecation notes) that would bury promptbake's own output."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.cextension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Prompt indices for `step` (1-based): walk seeded permutations of range(n), one epoch after another.

    A pure function of its arguments, so a resumed run draws exactly the same batches.
    """
    start = (step - 1) * batch_size
    out = []
    epoch, offset = divmod(start, n)
    while len(out) < batch_size:
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.extend(order[offset : offset + batch_size - len(out)])
        epoch, offset = epoch + 1, 0
    return out


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


def _read_template(path: Path | None) -> str | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--chat-template {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--chat-template {path} is not UTF-8 text.") from None
    if not text.strip():
        raise InputError(f"--chat-template {path} is empty.")
    return text


def _fit_context(prompt_set: PromptSet, renderer, ctx: int | None, max_new: int) -> PromptSet:
    """Keep prompts whose teacher input plus a full response fits; the system prompt itself must fit."""
    if ctx is None:
        return prompt_set
    shortest = len(renderer.teacher_ids([{"role": "user", "content": "?"}]))
    if shortest + max_new > ctx:
        raise ContextTooLongError(
            f"the system prompt renders to {shortest} tokens; with --max-new-tokens {max_new} that exceeds "
            f"the model's context of {ctx} tokens. Shorten the prompt or lower --max-new-tokens; "
            "promptbake never truncates the system prompt."
        )
    kept = prompt_set.keep(lambda m: len(renderer.teacher_ids(m)) + max_new <= ctx, "too_long")
    if not kept.prompts:
        raise ContextTooLongError(
            f"all {len(prompt_set)} prompts are too long for the context of {ctx} tokens with the system prompt "
            f"and {max_new} new tokens; lower --max-new-tokens or use shorter prompts."
        )
    return kept


def _add_lora(base, cfg: DistillConfig):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(base, lora)
    except ValueError as err:
        raise InputError(f"--lora-targets {cfg.lora_targets}: {str(err).splitlines()[0]}") from None


def _heldout_kl(pair, heldout: list[Messages], cfg: DistillConfig, device, console, when: str) -> float:
    """Mean per-token KL(student || teacher) on student samples of the held-out prompts, fixed seed."""
    import torch

    gen = torch.Generator(device).manual_seed(_step_seed(cfg.seed, 0) + 17)
    total, tokens = 0.0, 0
    with console.status(f"held-out KL {when} training ({len(heldout)} prompts)"):
        for i in range(0, len(heldout), cfg.batch_size):
            ro = pair.rollout(heldout[i : i + cfg.batch_size], gen)
            kl = pair.reverse_kl(ro, train=False)
            total, tokens = total + kl.sum().item(), tokens + kl.numel()
    value = total / max(tokens, 1)
    console.print(f"held-out reverse KL per token {when} training: {value:.4f} ({tokens} tokens)")
    return value


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _record(cfg, system, config, quant, device, dtype, renderer, pair, prompts, results) -> dict:
    import peft
    import torch
    import transformers

    from . import __version__

    return {
        "promptbake_version": __version__,
        "base_model": cfg.model,
        "teacher_model": cfg.teacher or cfg.model,
        "system_prompt_sha256": hashlib.sha256(system.encode("utf-8")).hexdigest(),
        **({"system_prompt": system} if cfg.record_prompt else {}),  # confidential unless asked
        "architecture": (config.architectures or [config.model_type])[0],
        "vocab_size": config.get_text_config().vocab_size,
        "settings": cfg.to_record(),
        "resolved": {
            "device": device.type, "dtype": str(dtype).removeprefix("torch."), "quant": quant,
            "system_role": renderer.system_role,
            "prefix_reuse": bool(pair.prefix and pair.prefix.usable and not pair.prefix_misses),
        },
        "prompts": prompts,
        "results": results,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


class _StepLog:
    """A live progress bar on a terminal; one plain line per step elsewhere (CI logs)."""

    def __init__(self, console: Console, steps: int, done: int = 0):
        self.console, self.steps = console, steps
        self.progress = None
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=console, transient=False,
            )
            self.task = self.progress.add_task("bake", total=steps, completed=done, info="sampling first batch")

    def __enter__(self):
        if self.progress:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)

    def step(self, row: dict) -> None:
        info = f"KL/token {row['kl']:.4f}  {row['tokens_per_s']:.0f} tok/s  {row['step_s']:.1f} s/step"
        if self.progress:
            self.progress.update(self.task, advance=1, info=info)
        else:
            self.console.print(f"step {row['step']}/{self.steps}  {info}", highlight=False)


def _print_summary(console: Console, r: DistillResult, device) -> None:
    from rich.table import Table

    table = Table(title="promptbake distill", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    change = (1 - r.kl_after / r.kl_before) * 100 if r.kl_before > 0 else 0.0
    table.add_row("held-out KL/token before", f"{r.kl_before:.4f}")
    table.add_row("held-out KL/token after", f"{r.kl_after:.4f} ({change:.0f}% lower)" if change >= 0
                  else f"{r.kl_after:.4f} ({-change:.0f}% higher)")
    table.add_row("steps", str(r.steps))
    table.add_row("wall time", f"{r.wall_seconds / 60:.1f} min")
    table.add_row("peak memory", f"{r.peak_memory_mb:,.0f} MiB ({'GPU' if device.type == 'cuda' else 'RSS'})")
    table.add_row("checkpoint", str(r.out))
    console.print(table)
