"""Settings for every command, each option declared once.

Options shared by several commands live in small groups (`ModelOptions`,
`SamplingOptions`, `GateOptions`) that `DistillConfig`, `EvalConfig` and
`ChatConfig` compose. A field's `help` metadata is its documentation: the CLI
builds its options from these fields, and `promptbake.json` records
`DistillConfig.to_record()`. Where a command needs another default for the same
option (eval samples 32 prompts, chat answers greedily), the field is redeclared
with that default and the reason in its help; its meaning stays the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InputError

QUANT_CHOICES = ("auto", "4bit", "8bit", "none")
ROLLOUT_CHOICES = ("fast", "exact", "generate")
CHECKPOINTING_CHOICES = ("auto", "on", "off")
METHOD_CHOICES = ("opcd", "offpolicy", "sft")
LR_SCHEDULE_CHOICES = ("constant", "cosine")
SAMPLER_CHOICES = ("exact", "fast")
EXPORT_CHOICES = ("none", "gguf")
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, argument: bool = False):
    """A config field: its default, its help text, and (optionally) its choices or that it is positional."""
    return field(default=default, metadata={"help": help, "choices": choices, "argument": argument})


def flag(name: str) -> str:
    """The CLI flag for a config field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------- shared option groups


@dataclass
class ModelOptions:
    """Where the model comes from and what it may do."""

    model: str = _opt(None, "Student model: a Hugging Face hub id, a local model folder, or a .gguf file.")
    chat_template: Path | None = _opt(
        None, "Jinja chat template file, for tokenizers that have none, or the name of one bundled with promptbake "
        "(gemma3).")
    trust_remote_code: bool = _opt(False, "Allow the model repository to run its own Python code.")
    allow_pickle: bool = _opt(
        False, "Load weights stored only as pickle (pytorch_model.bin), which can run code: only for sources you trust."
    )


@dataclass
class SamplingOptions:
    """How responses are drawn, and how many at a time."""

    max_new_tokens: int = _opt(64, "Longest sampled response, in tokens.")
    temperature: float = _opt(1.0, "Sampling temperature (0 = greedy).")
    seed: int = _opt(0, "Seed for the prompt shuffle and split, prompt order, sampling and LoRA init.")
    batch_size: int = _opt(8, "Prompts per step (distill) or per batch sampled and scored (eval).")
    chunk_size: int = _opt(
        128, "Response tokens per chunk through the LM head and loss: peak loss memory is about 5 x chunk x vocab floats."
    )

    def _check_sampling(self) -> None:
        for name in ("max_new_tokens", "batch_size", "chunk_size"):
            _at_least_one(self, name)
        _check_temperature(self.temperature)


@dataclass
class GateOptions:
    """Quality gates: a missed threshold exits with code 4."""

    min_gap_closed: float | None = _opt(
        None, "Exit with code 4 if the bake closes less than this fraction of the base-to-teacher reverse-KL gap."
    )
    min_pass_rate: float | None = _opt(
        None, "Exit with code 4 if a check's baked pass rate is below this fraction of the teacher's."
    )

    def _check_gates(self) -> None:
        check_thresholds(self.min_gap_closed, self.min_pass_rate, getattr(self, "max_drift", None))


@dataclass
class ComparisonOptions:
    """What eval and chat compare: a bake against the model it started from, with its system prompt."""

    force: bool = _opt(
        False, "Compare even when --model, --prompt or the tokenizer differ from what the bake's promptbake.json "
        "records (a deliberate cross-comparison)."
    )
    sampler: str = _opt(
        "exact",
        "How baked, teacher and base sample. exact: promptbake's decode loop on the models as loaded (fp32 on CPU). "
        "fast: the same loop on fused copies of the weights, bf16 on CPUs that have it: about twice as fast an "
        "evaluation on CPU, with answers that differ by rounding (and more memory: the copies).",
        choices=SAMPLER_CHOICES,
    )

    def _check_compared(self) -> None:
        for name in ("baked", "model", "prompt"):
            if not getattr(self, name):
                raise InputError(f"{flag(name)} is required.")


# ---------------------------------------------------------------- the commands


@dataclass
class DistillConfig(GateOptions, SamplingOptions, ModelOptions):
    # What to bake.
    prompt: Path = _opt(None, "UTF-8 text file holding the system prompt to bake in.")
    out: Path = _opt(Path("baked"), "Folder for the merged checkpoint (written atomically).")
    teacher: str | None = _opt(
        None, "A different teacher model (same tokenizer). Default: the student's own base weights."
    )
    prompts: str = _opt(
        "default",
        "User prompts to practise on: a bundled set (default, eval, ood), a .txt/.jsonl/.json/.csv/.parquet file, "
        "a datasets save_to_disk folder, or a hub dataset id. Check one first with `promptbake prompts SOURCE`.",
    )
    prompt_field: str = _opt(
        "prompt", "Field holding each prompt (a string, or a chat `messages` list) in json/csv/parquet/dataset sources."
    )
    split: str = _opt("train", "Split to read from a dataset folder or hub dataset.")
    max_prompts: int = _opt(0, "Use at most this many prompts, drawn after shuffling with --seed (0 = all).")
    overwrite: bool = _opt(
        False, "Replace --out if it is a finished promptbake output or an empty folder (anything else is refused)."
    )
    resume: bool = _opt(
        False,
        "Continue the interrupted bake kept in OUT.work/ (re-running the same command also does). "
        "Without a work folder this is an error.",
    )
    save_every: int = _opt(
        10, "Save a checkpoint to OUT.work/ every N steps (and at least every 10 minutes) so a stopped bake can resume."
    )

    # Training.
    method: str = _opt(
        "opcd",
        "What the student learns from. opcd: it samples without the system prompt and learns the exact reverse "
        "KL(student || teacher) on its own samples (on-policy context distillation). offpolicy: the prompted teacher "
        "samples and the student learns the forward KL(teacher || student) on those samples. sft: cross-entropy on "
        "the prompted teacher's samples. The held-out KL is the reverse KL on student samples for every method.",
        choices=METHOD_CHOICES,
    )
    steps: int = _opt(45, "Optimizer steps; each samples a fresh batch of prompts.")
    lr: float = _opt(5e-4, "AdamW learning rate for the LoRA weights: at every step, or the peak of a cosine "
                     "--lr-schedule.")
    lr_schedule: str = _opt(
        "constant",
        "constant: --lr at every step, no warm-up (the paper's). cosine: a linear warm-up to --lr over the first "
        "tenth of --steps, then a cosine decay to a tenth of --lr at the last step.",
        choices=LR_SCHEDULE_CHOICES,
    )
    samples_per_prompt: int = _opt(
        1,
        "Responses sampled per prompt at each step: a step draws --batch-size / N prompts and samples each N "
        "times, so the optimizer still sees --batch-size rollouts. Must divide --batch-size.",
    )
    teacher_rollouts: float = _opt(
        0.0,
        "opcd only: the share of each batch's rollouts that the prompted teacher samples instead of the student; "
        "the student still learns the reverse KL(student || teacher) at their tokens, so it also practises on "
        "answers it does not yet give itself. 0: every rollout is the student's (the paper's OPCD).",
    )
    top_p: float = _opt(1.0, "Nucleus sampling threshold for student rollouts (1 = off).")
    holdout: float = _opt(0.1, "Fraction of the prompt set kept apart for before/after evaluation.")
    heldout_prompts: int = _opt(
        32, "Held-out prompts the before/after KL is measured on, spread over the held-out split (0 = all of them)."
    )

    # LoRA and precision.
    lora_rank: int = _opt(16, "LoRA rank r.")
    lora_alpha: float = _opt(32.0, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = _opt(0.0, "LoRA dropout. 0 keeps the trained policy equal to the sampled one.")
    lora_targets: str = _opt(
        "all-linear", "Comma-separated module names to adapt, or 'all-linear' (every linear projection)."
    )
    quant: str = _opt(
        "auto",
        "Base weights while training: auto (4bit on CUDA, none on CPU), 4bit (NF4, double quant), 8bit, none.",
        choices=QUANT_CHOICES,
    )

    # Loss and speed.
    kl_topk: int = _opt(
        0, "0: exact KL over the full vocabulary. K>0: KL over the sampling model's top-K tokens (the student's for "
        "opcd and the held-out KL, the teacher's for offpolicy) plus one bucket for all the others: a lower bound "
        "of the exact KL."
    )
    rollout: str = _opt(
        "fast",
        "Sampler. fast: own decode loop on a merged copy of the weights (bf16 on CPUs that have it). "
        "exact: own loop on the training weights. generate: Hugging Face generate (for debugging).",
        choices=ROLLOUT_CHOICES,
    )
    prefix_reuse: bool = _opt(True, "Compute the teacher's system-prompt KV cache once and reuse it.")

    # Memory.
    micro_batch_size: int = _opt(
        None,
        "Run the student pass and its backward N rollouts at a time, accumulating gradients: the optimizer "
        "still sees --batch-size and the result is the same. Default: the whole batch at once.",
    )
    gradient_checkpointing: str = _opt(
        "auto",
        "Recompute each decoder layer in the student's backward instead of keeping its activations "
        "(about one extra student forward per step). auto: on on CUDA, off on CPU.",
        choices=CHECKPOINTING_CHOICES,
    )

    # Privacy.
    record_prompt: bool = _opt(
        False, "Store the system prompt's text in promptbake.json. By default only its SHA-256 is recorded anywhere."
    )

    # Evaluation of the merged checkpoint (a short `promptbake eval`), recorded in promptbake.json.
    eval: bool = _opt(
        True, "After the bake, compare baked, teacher and base on up to 16 held-out prompts: checks and KL gap closed."
    )
    checks: Path | None = _opt(
        None, "Checks file (TOML) for that evaluation. Default: NAME.checks.toml beside --prompt, if there is one."
    )

    # Deployment: written into --out with the checkpoint, so it is published with it or not at all.
    export: str = _opt(
        "none", "Also write the bake as one GGUF file (llama.cpp, Ollama) with an Ollama Modelfile, in --out. "
        "The same as `promptbake export OUT` afterwards.", choices=EXPORT_CHOICES,
    )
    export_outtype: str = _opt("f16", "Weight type of that GGUF file (norms and biases stay f32).",
                               choices=GGUF_OUTTYPES)

    def validate(self) -> None:
        """Check values that need no file or model; raise InputError naming the option."""
        if not self.model:
            raise InputError("--model is required: a hub id, a local model folder or a .gguf file.")
        if self.prompt is None:
            raise InputError("--prompt is required: a text file holding the system prompt.")
        for name in ("steps", "lora_rank", "save_every"):
            _at_least_one(self, name)
        self._check_sampling()
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be a positive number (got {self.lr}).")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise InputError(f"--lora-alpha must be a positive number (got {self.lora_alpha}).")
        if not (0 < self.top_p <= 1):
            raise InputError(f"--top-p must be in (0, 1] (got {self.top_p}).")
        if not (0 <= self.lora_dropout < 1):
            raise InputError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout}).")
        if not (0 < self.holdout < 1):
            raise InputError(f"--holdout must be a fraction between 0 and 1 (got {self.holdout}).")
        if self.heldout_prompts < 0:
            raise InputError(f"--heldout-prompts must be 0 (all) or a positive number (got {self.heldout_prompts}).")
        if self.max_prompts < 0:
            raise InputError(f"--max-prompts must be 0 (all) or a positive number (got {self.max_prompts}).")
        if self.micro_batch_size is not None:
            check_micro_batch(self.micro_batch_size, self.batch_size)
        check_samples_per_prompt(self.samples_per_prompt, self.batch_size, self.temperature)
        if not (0 <= self.teacher_rollouts <= 1):
            raise InputError(f"--teacher-rollouts must be a share between 0 and 1 (got {self.teacher_rollouts}).")
        if self.teacher_rollouts and self.method != "opcd":
            raise InputError(f"--teacher-rollouts applies to --method opcd only (--method {self.method} trains on "
                             "the teacher's samples already).")
        if self.kl_topk < 0:
            raise InputError(f"--kl-topk must be 0 (full vocabulary) or a positive K (got {self.kl_topk}).")
        if not self.eval and (self.min_gap_closed is not None or self.min_pass_rate is not None):
            raise InputError("--min-gap-closed and --min-pass-rate need the evaluation: drop --no-eval.")
        self._check_gates()
        _check_choices(self)

    def to_record(self) -> dict[str, Any]:
        """JSON-safe settings for promptbake.json (paths as strings)."""
        return _json_safe(self)


@dataclass
class EvalConfig(ComparisonOptions, GateOptions, SamplingOptions, ModelOptions):
    # What to compare.
    baked: Path = _opt(None, "The baked checkpoint folder (the --out of promptbake distill).")
    model: str = _opt(None, "The base model the bake started from: a hub id, a local model folder or a .gguf file.")
    prompt: Path = _opt(None, "The system prompt file that was baked in (the teacher gets it).")
    prompts: str = _opt("eval", "Held-out user prompts: a bundled set name (eval, default, ood) or a .txt/.jsonl file.")
    ood: str = _opt("ood", "Unrelated prompts to measure drift on: a bundled set name or a .txt/.jsonl file.")
    checks: Path | None = _opt(
        None, "Checks file (TOML). Default: NAME.checks.toml beside --prompt, if there is one."
    )
    report: Path | None = _opt(None, "Folder to write eval.json, eval.md and plots into (created if missing).")
    # Eval reads a fixed share of each set rather than shuffling: the bundled sets are grouped by kind.
    max_prompts: int = _opt(32, "Use at most this many prompts of each set, spread evenly across it.")
    seed: int = _opt(0, "Sampling seed, the same for all three systems.")
    max_drift: float | None = _opt(None, "Exit with code 4 if KL(baked || base) per token on the drift prompts is above this.")

    def validate(self) -> None:
        self._check_compared()
        _at_least_one(self, "max_prompts")
        self._check_sampling()
        self._check_gates()
        if self.report is not None and Path(self.report).exists() and not Path(self.report).is_dir():
            raise InputError(f"--report {self.report} exists and is a file; choose a folder path.")

    def to_record(self) -> dict[str, Any]:
        """JSON-safe settings for eval.json (paths as strings)."""
        return _json_safe(self)


@dataclass
class ChatConfig(ComparisonOptions, ModelOptions):
    baked: Path = _opt(None, "The baked checkpoint folder (the --out of promptbake distill).", argument=True)
    model: str = _opt(None, "The base model the bake started from.")
    prompt: Path = _opt(None, "The system prompt file that was baked in.")
    message: str | None = _opt(
        None, "One user message. Without it: a prompt loop on a terminal, else stdin is the message."
    )
    # Chat answers one message at a time: longer answers, and greedy so the three are comparable.
    max_new_tokens: int = _opt(128, "Longest answer, in tokens.")
    temperature: float = _opt(0.0, "Sampling temperature (0 = greedy: each system's most likely answer).")
    seed: int = _opt(0, "Sampling seed, the same for all three systems.")

    def validate(self) -> None:
        self._check_compared()
        _at_least_one(self, "max_new_tokens")
        _check_temperature(self.temperature)


def check_thresholds(min_gap_closed: float | None, min_pass_rate: float | None, max_drift: float | None = None) -> None:
    """Quality-gate thresholds: fractions in [0, 1], and a non-negative KL for drift."""
    for name, value in (("min_gap_closed", min_gap_closed), ("min_pass_rate", min_pass_rate)):
        if value is not None and not (0 <= value <= 1):
            raise InputError(f"{flag(name)} must be a fraction between 0 and 1 (got {value}).")
    if max_drift is not None and not (math.isfinite(max_drift) and max_drift >= 0):
        raise InputError(f"--max-drift must be a KL per token of 0 or more (got {max_drift}).")


def check_micro_batch(micro: int, batch: int) -> None:
    """1 <= --micro-batch-size <= --batch-size. It needn't divide the batch: the loss is a mean over
    the whole batch's tokens, so uneven parts add up to the same gradient."""
    if not 1 <= micro <= batch:
        raise InputError(f"--micro-batch-size must be between 1 and --batch-size ({batch}); got {micro}. "
                         "Leave it out to run the whole batch at once.")


def check_samples_per_prompt(n: int, batch: int, temperature: float) -> None:
    """--samples-per-prompt N: at least 1, a divisor of --batch-size, and above 1 only when sampling
    (greedy copies of a prompt would all get the same answer)."""
    if n < 1:
        raise InputError(f"--samples-per-prompt must be at least 1 (got {n}).")
    if batch % n:
        fit = n * max(1, round(batch / n))
        raise InputError(f"--batch-size must be a multiple of --samples-per-prompt: got --batch-size {batch} and "
                         f"--samples-per-prompt {n}. Try --batch-size {fit}.")
    if n > 1 and temperature == 0:
        raise InputError(f"--samples-per-prompt {n} needs sampling: with --temperature 0 every copy of a prompt gets "
                         "the same answer. Raise --temperature or use --samples-per-prompt 1.")


def _check_temperature(value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"--temperature must be 0 (greedy) or positive (got {value}).")


def _at_least_one(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if value < 1:
        raise InputError(f"{flag(name)} must be at least 1 (got {value}).")


def _check_choices(cfg) -> None:
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise InputError(f"{flag(f.name)} must be one of {', '.join(choices)} (got {getattr(cfg, f.name)!r}).")


def _json_safe(cfg) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
