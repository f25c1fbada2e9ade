"""What a bake needs before it trains: checked inputs, then tokenizer, renders, model, LoRA and pair.

`read_inputs` reads and checks every file and option without importing torch, so bad
input fails in about a second. `prepare` then loads what the run needs, still checking
lengths and vocabularies before the weights load. `add_lora` and `build_pair` are the
public way to build the student/teacher pair (benchmarks and tests use them too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from .bakekey import BakeKey, bake_key, compare
from .checkpoint import WorkFolder, run_settings
from .checks import Check, checks_for
from .config import DistillConfig
from .data import (BUNDLED_SETS, Messages, PromptSet, bundled_dir, load_prompt_set, read_system_prompt, read_text_file,
                   split_holdout)
from .errors import ContextTooLongError, InputError, OutputExistsError, first_line, note
from .lock import lock_output
from .models import (ModelSource, check_tokenizers_match, context_length, load_config, load_model, load_tokenizer,
                     model_fingerprint, pick_device_and_dtype, resolve_model, resolve_quant)
from .output import check_output
from .preflight import check_kl_topk, check_lora_targets, layer_names
from .render import Renderer, check_teacher_sees_prompt


@dataclass
class Inputs:
    """Everything distill reads from the user's files, checked, before torch is imported."""

    out: Path  # --out made absolute once, at the start: nothing later depends on the working directory
    system: str
    prompt_set: PromptSet
    checks: list[Check]
    template: str | None
    src: ModelSource
    teacher_src: ModelSource | None
    key: BakeKey  # what decides the weights; recorded, and compared with what --out holds
    out_status: str  # bakekey.compare: absent, up_to_date or different
    out_why: str  # that status in words
    replace_out: bool  # publishing may replace --out (--overwrite, or --force on this same bake)
    forced: bool  # --force: bake even if --out is up to date

    @property
    def up_to_date(self) -> bool:
        """--out already holds this bake and --force wasn't given: distill has nothing to do (--overwrite or not)."""
        return self.out_status == "up_to_date" and not self.forced


def read_inputs(cfg: DistillConfig, *, force: bool = False) -> Inputs:
    cfg.validate()
    # --out first: one that is, holds or lies inside an input (or the working directory), or an
    # existing folder --overwrite may not replace, is refused before anything else is read; an
    # existing one is refused only once the bake key says it isn't this same bake.
    try:
        out, exists = check_output(cfg.out, cfg.overwrite, inputs=input_paths(cfg)), None
    except OutputExistsError as err:
        out, exists = None, err
    system = read_system_prompt(cfg.prompt)
    prompt_set = load_prompt_set(cfg.prompts, prompt_field=cfg.prompt_field, split=cfg.split,
                                 max_prompts=cfg.max_prompts, seed=cfg.seed)
    checks = checks_for(cfg.checks, cfg.prompt, cfg.min_pass_rate) if cfg.eval else []
    template = read_template(cfg.chat_template)
    src = resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
    teacher_src = resolve_model(cfg.teacher, "teacher model", allow_pickle=cfg.allow_pickle) if cfg.teacher else None
    key = bake_key(cfg, system=system, prompts=prompt_set.prompts, template=template, src=src,
                   teacher_src=teacher_src, checks=checks)
    status, why = compare(cfg.out, key)
    replace_out = cfg.overwrite or (status == "up_to_date" and force)
    if exists is not None:
        if status != "up_to_date":
            raise exists
        # This same bake: left alone, or (--force) replaced as --overwrite would.
        out = check_output(cfg.out, True, inputs=input_paths(cfg)) if force else Path(cfg.out).absolute()
    return Inputs(out, system, prompt_set, checks, template, src, teacher_src, key, status, why, replace_out, force)


def input_paths(cfg: DistillConfig) -> dict[str, Path | None]:
    """The local paths a bake reads, by option, for `output.check_output` (hub ids and bundled sets aren't paths)."""
    prompts = None if cfg.prompts in BUNDLED_SETS else Path(cfg.prompts)
    return {"--model": Path(cfg.model), "--teacher": Path(cfg.teacher) if cfg.teacher else None,
            "--prompt": cfg.prompt, "--prompts": prompts, "--chat-template": cfg.chat_template,
            "--checks": cfg.checks}


@contextlib.contextmanager
def hold_output(cfg: DistillConfig, console: Console) -> Iterator[None]:
    """The bake's claim on cfg.out (absolute): its lock, held until the output is published and the work
    folder gone. Taking it cleans what bakes killed on this output left, after which --out is checked again
    (an earlier output may have been put back)."""
    with lock_output(cfg.out, note=lambda message: note(console, message)):
        check_output(cfg.out, cfg.overwrite, inputs=input_paths(cfg))
        yield


@dataclass
class Run:
    """A bake ready to train: the loaded pieces and the prompt split."""

    device: Any  # torch.device
    dtype: Any  # torch.dtype
    quant: str  # resolved: 4bit, 8bit or none
    work: WorkFolder
    tok: Any
    renderer: Any  # render.Renderer
    config: Any  # the model's transformers config
    prompt_set: PromptSet  # after the context-length filter
    train: list[Messages]
    heldout: list[Messages]
    student: Any  # peft model
    pair: Any  # pair.StudentTeacher
    params: list  # the trainable (LoRA) parameters
    optimizer: Any
    fingerprints: dict  # {"model": ..., "teacher": ... or None}: models.model_fingerprint, for the record


def prepare(cfg: DistillConfig, inputs: Inputs, console: Console) -> Run:
    """Tokenizer, renders and length checks, then the weights: the base once, frozen, with LoRA on top."""
    quiet_libraries()
    import torch

    device, dtype = pick_device_and_dtype()
    quant = resolve_quant(cfg.quant, device)
    trust = cfg.trust_remote_code
    tok, renderer, config, prompt_set, train, heldout, vocab = read_model_files(cfg, inputs, console)

    # A stopped bake left OUT.work/: resume it if the settings match, refuse (naming one) if not. The
    # models' fingerprints are taken now that a hub model's config and tokenizer are in the cache.
    fingerprints = model_fingerprints(inputs)
    settings = run_settings(cfg, system=inputs.system, prompts=inputs.prompt_set.prompts, template=inputs.template,
                            quant=quant, dtype=dtype, fingerprints=fingerprints)
    work = WorkFolder.open(cfg.out, settings, steps=cfg.steps, resume=cfg.resume, console=console)
    console.print(f"prompts: {prompt_set.describe()}", markup=False, highlight=False, soft_wrap=True)

    console.print(f"loading {cfg.model} ({device.type}, {str(dtype).removeprefix('torch.')}, quant {quant})",
                  markup=False, highlight=False, soft_wrap=True)
    torch.manual_seed(cfg.seed)  # the LoRA init
    load = dict(quant=quant, device=device, dtype=dtype, trust_remote_code=trust)
    student = add_lora(load_model(inputs.src, **load), cfg)
    teacher = load_model(inputs.teacher_src, **load) if inputs.teacher_src else None
    pair = build_pair(student, renderer, cfg, vocab=vocab, quant=quant, teacher=teacher)
    console.print(f"rollouts: {pair.sampler.description}", markup=False, highlight=False, soft_wrap=True)
    params, optimizer = lora_optimizer(student, cfg)
    return Run(device, dtype, quant, work, tok, renderer, config, prompt_set, train, heldout, student, pair,
               params, optimizer, fingerprints)


def model_fingerprints(inputs: Inputs) -> dict[str, dict | None]:
    """`models.model_fingerprint` of the model and the teacher. A --chat-template replaces the model's own
    template, so the model's is left out then: changing it changes nothing."""
    fingerprints = {"model": model_fingerprint(inputs.src),
                    "teacher": model_fingerprint(inputs.teacher_src) if inputs.teacher_src else None}
    if inputs.template is not None:
        for fingerprint in filter(None, fingerprints.values()):
            fingerprint.pop("chat_template", None)
    return fingerprints


def read_model_files(cfg: DistillConfig, inputs: Inputs, console: Console):
    """Tokenizer, renders and config, and every check that needs them but not the weights (`plan` stops here).

    Returns (tok, renderer, config, prompt_set after the context filter, train, heldout, vocab).
    """
    trust = cfg.trust_remote_code
    tok = load_tokenizer(inputs.src, chat_template=inputs.template, trust_remote_code=trust)
    renderer = Renderer(tok, inputs.system, cfg.model)
    check_teacher_sees_prompt(renderer, f"--chat-template {cfg.chat_template}" if cfg.chat_template
                              else f"the chat template of {cfg.model}")
    if not renderer.system_role:
        console.print("[yellow]note:[/] the chat template has no system role; the teacher gets the system prompt "
                      "at the start of the first user turn.")
    config = load_config(inputs.src, trust_remote_code=trust)
    # Options the config alone can refute, before a minute of loading weights.
    if cfg.export == "gguf":
        from .export import check_exportable

        check_exportable(config.model_type)
    vocab = config.get_text_config().vocab_size
    check_kl_topk(cfg.kl_topk, vocab)
    if cfg.lora_targets != "all-linear":
        check_lora_targets(cfg.lora_targets, layer_names(config, trust_remote_code=trust))
    if inputs.teacher_src:
        teacher_tok = load_tokenizer(inputs.teacher_src, chat_template=inputs.template, trust_remote_code=trust)
        teacher_config = load_config(inputs.teacher_src, trust_remote_code=trust)
        vocab = check_tokenizers_match(tok, teacher_tok, vocab, teacher_config.get_text_config().vocab_size)
    prompt_set = fit_context(inputs.prompt_set, renderer, context_length(config), cfg.max_new_tokens)
    train, heldout = split_holdout(prompt_set.prompts, cfg.holdout, cfg.seed)
    return tok, renderer, config, prompt_set, train, heldout, vocab


def add_lora(base, cfg: DistillConfig):
    """Wrap the frozen base in a fresh LoRA adapter as cfg says (rank, alpha, dropout, target modules)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(base, lora)
    except ValueError as err:
        raise InputError(f"--lora-targets {cfg.lora_targets}: {first_line(err)}") from None


def lora_optimizer(student, cfg: DistillConfig):
    """(the trainable LoRA parameters, the AdamW that updates them) for a LoRA-wrapped model."""
    import torch

    params = [p for p in student.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)


def build_pair(student, renderer, cfg: DistillConfig, *, vocab: int, quant: str, teacher=None):
    """The StudentTeacher for `student` (a LoRA-wrapped model) with cfg's sampling, loss and speed settings."""
    from .pair import StudentTeacher, use_checkpointing

    return StudentTeacher(
        student, renderer, teacher=teacher, vocab=vocab, quantised=quant != "none",
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        kl_topk=cfg.kl_topk, chunk_size=cfg.chunk_size, rollout=cfg.rollout, prefix_reuse=cfg.prefix_reuse,
        micro_batch_size=cfg.micro_batch_size,
        gradient_checkpointing=use_checkpointing(cfg.gradient_checkpointing, next(student.parameters()).device),
    )


def quiet_libraries() -> None:
    """Silence library chatter (progress bars, deprecation notes) that would bury promptbake's own output."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.cextension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def read_template(path: Path | None) -> str | None:
    """The --chat-template file's text (None when not given). A bare name that is no file here names a
    template bundled with promptbake (`gemma3`: prompts/templates/gemma3.jinja), so it works outside a clone."""
    if path is None:
        return None
    path = Path(path)
    bundled = bundled_dir() / "templates" / f"{path.name}.jinja"
    if not path.exists() and len(path.parts) == 1 and not path.suffix and bundled.is_file():
        path = bundled
    elif not path.exists() and not os.path.islink(path):
        names = ", ".join(sorted(p.stem for p in (bundled_dir() / "templates").glob("*.jinja")))
        raise InputError(f"--chat-template {path} does not exist (bundled templates, by name: {names}).")
    text = read_text_file(path, "--chat-template")  # a regular file, at most 1 MiB
    if not text.strip():
        raise InputError(f"--chat-template {path} is empty.")
    return text


def fit_context(prompt_set: PromptSet, renderer, ctx: int | None, max_new: int) -> PromptSet:
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
