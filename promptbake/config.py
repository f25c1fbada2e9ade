"""The one description of a bake's settings.

`DistillConfig` is the single source of truth: the CLI builds its options from
these fields (the `help` metadata becomes the help text), and the record
written beside the output (`promptbake.json`) is `asdict()` of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InputError

QUANT_CHOICES = ("auto", "4bit", "8bit", "none")
ROLLOUT_CHOICES = ("fast", "exact", "generate")


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass
class DistillConfig:
    # What to bake.
    model: str = _opt(None, "Student model: a Hugging Face hub id, a local model folder, or a .gguf file.")
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
    overwrite: bool = _opt(False, "Replace --out if it already exists.")
    resume: bool = _opt(
        False,
        "Continue the interrupted bake kept in OUT.work/ (re-running the same command also does). "
        "Without a work folder this is an error.",
    )
    save_every: int = _opt(
        10, "Save a checkpoint to OUT.work/ every N steps (and at least every 10 minutes) so a stopped bake can resume."
    )

    # Training.
    steps: int = _opt(30, "Optimizer steps; each samples a fresh batch of prompts.")
    batch_size: int = _opt(8, "Prompts per step.")
    lr: float = _opt(5e-4, "AdamW learning rate for the LoRA weights (constant, no warm-up).")
    max_new_tokens: int = _opt(64, "Longest sampled response, in tokens.")
    temperature: float = _opt(1.0, "Sampling temperature for student rollouts (0 = greedy).")
    top_p: float = _opt(1.0, "Nucleus sampling threshold for student rollouts (1 = off).")
    seed: int = _opt(0, "Seed for the prompt shuffle and split, prompt order, sampling and LoRA init.")
    holdout: float = _opt(0.1, "Fraction of the prompt set kept apart for before/after evaluation.")

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
    kl_topk: int = _opt(0, "0: exact reverse KL over the full vocabulary. K>0: sum over the student's top-K tokens.")
    chunk_size: int = _opt(
        128, "Response tokens per chunk through the LM head and loss: peak loss memory is about 5 x chunk x vocab floats."
    )
    rollout: str = _opt(
        "fast",
        "Sampler. fast: own decode loop on a merged copy of the weights (bf16 on CPUs that have it). "
        "exact: own loop on the training weights. generate: Hugging Face generate (for debugging).",
        choices=ROLLOUT_CHOICES,
    )
    prefix_reuse: bool = _opt(True, "Compute the teacher's system-prompt KV cache once and reuse it.")

    # Templates and trust.
    chat_template: Path | None = _opt(None, "Jinja chat template file, for tokenizers that have none.")
    trust_remote_code: bool = _opt(False, "Allow the model repository to run its own Python code.")
    allow_pickle: bool = _opt(
        False, "Load weights stored only as pickle (pytorch_model.bin), which can run code: only for sources you trust."
    )
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
    min_gap_closed: float | None = _opt(
        None, "Exit with code 4 if the bake closes less than this fraction of the base-to-teacher reverse-KL gap."
    )
    min_pass_rate: float | None = _opt(
        None, "Exit with code 4 if a check's baked pass rate is below this fraction of the teacher's."
    )

    def validate(self) -> None:
        """Check values that need no file or model; raise InputError naming the option."""
        if not self.model:
            raise InputError("--model is required: a hub id, a local model folder or a .gguf file.")
        if self.prompt is None:
            raise InputError("--prompt is required: a text file holding the system prompt.")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens,
                    "lora_rank": self.lora_rank, "chunk_size": self.chunk_size,
                    "save_every": self.save_every}
        for name, value in positive.items():
            if value < 1:
                raise InputError(f"{flag(name)} must be at least 1 (got {value}).")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be a positive number (got {self.lr}).")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise InputError(f"--lora-alpha must be a positive number (got {self.lora_alpha}).")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"--temperature must be 0 (greedy) or positive (got {self.temperature}).")
        if not (0 < self.top_p <= 1):
            raise InputError(f"--top-p must be in (0, 1] (got {self.top_p}).")
        if not (0 <= self.lora_dropout < 1):
            raise InputError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout}).")
        if not (0 < self.holdout < 1):
            raise InputError(f"--holdout must be a fraction between 0 and 1 (got {self.holdout}).")
        if self.max_prompts < 0:
            raise InputError(f"--max-prompts must be 0 (all) or a positive number (got {self.max_prompts}).")
        if self.kl_topk < 0:
            raise InputError(f"--kl-topk must be 0 (full vocabulary) or a positive K (got {self.kl_topk}).")
        if not self.eval and (self.min_gap_closed is not None or self.min_pass_rate is not None):
            raise InputError("--min-gap-closed and --min-pass-rate need the evaluation: drop --no-eval.")
        check_thresholds(self.min_gap_closed, self.min_pass_rate)
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise InputError(f"{flag(f.name)} must be one of {', '.join(choices)} (got {getattr(self, f.name)!r}).")

    def to_record(self) -> dict[str, Any]:
        """JSON-safe settings for promptbake.json (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def check_thresholds(min_gap_closed: float | None, min_pass_rate: float | None, max_drift: float | None = None) -> None:
    """Quality-gate thresholds: fractions in [0, 1], and a non-negative KL for drift."""
    for name, value in (("min_gap_closed", min_gap_closed), ("min_pass_rate", min_pass_rate)):
        if value is not None and not (0 <= value <= 1):
            raise InputError(f"{flag(name)} must be a fraction between 0 and 1 (got {value}).")
    if max_drift is not None and not (math.isfinite(max_drift) and max_drift >= 0):
        raise InputError(f"--max-drift must be a KL per token of 0 or more (got {max_drift}).")


def flag(name: str) -> str:
    """The CLI flag for a config field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")
