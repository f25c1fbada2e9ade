"""The output folder: built in a hidden sibling, moved into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InputError, OutputExistsError, WriteError


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work if `out` can't be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is a file; choose a folder path.")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--out {out} already exists; pass --overwrite to replace it, or choose another path.")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise InputError(f"can't write to {probe}: choose an --out folder you can write to.")


def make_staging(out: Path) -> Path:
    """An empty hidden folder beside `out` to build the result in."""
    out = Path(out)
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    except OSError as err:
        raise WriteError(f"can't create a folder beside --out {out} ({err.strerror or err}).") from None


def is_write_error(err: BaseException) -> bool:
    """An OSError, or a library's wrapping of one: safetensors raises SafetensorError('... I/O error: ...')."""
    return isinstance(err, OSError) or (type(err).__name__ == "SafetensorError" and "I/O error" in str(err))


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished `staging` folder to `out`, replacing an old one only with `overwrite`.

    Renames within one folder are atomic: at every moment `out` is either the old
    complete result or the new complete one.
    """
    out = Path(out)
    apply_umask(staging)
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"--out {out} appeared while baking; pass --overwrite and run the same command "
                                    "again to write the result from the saved checkpoint.")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
        os.replace(out, old / out.name)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(old / out.name, out)  # put the earlier output back
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain `open`/`mkdir` would have had.

    mkdtemp makes folders 0700 and safetensors writes files 0600; a checkpoint others
    should be able to read (or a CI artifact) wants the user's umask instead.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# How each --method trained the adapter, for the model card.
METHOD_TEXT = {
    "opcd": "on-policy context distillation (`--method opcd`): a LoRA adapter was trained on the token-level "
            "reverse KL between the model without the system prompt (student), on its own samples, and the same "
            "model with it (teacher)",
    "offpolicy": "off-policy context distillation (`--method offpolicy`): the model with the system prompt "
                 "(teacher) sampled answers, and a LoRA adapter was trained on the token-level forward KL from "
                 "the teacher to the model without the prompt (student) on those answers",
    "sft": "supervised fine-tuning on the prompted model's answers (`--method sft`): the model with the system "
           "prompt sampled answers, and a LoRA adapter was trained on the cross-entropy of the model without "
           "the prompt on those answers",
}


def write_model_card(folder: Path, record: dict) -> None:
    r = record["results"]
    method = record.get("method", "opcd")
    before, after = r.get("heldout_kl_before"), r.get("heldout_kl_after")
    figures = ""
    if before is not None and after is not None:
        figures = (
            f"| held-out reverse KL per token (student ‖ prompted teacher) | {before:.4f} | {after:.4f} |\n"
        )
    stored = ("The system prompt was recorded in `promptbake.json` (--record-prompt)" if "system_prompt" in record
              else "The system prompt itself is not stored here")
    card = f"""---
base_model: {record["base_model"]}
library_name: transformers
tags:
- promptbake
- context-distillation
---

# Baked model

This checkpoint is `{record["base_model"]}` with a system prompt baked into its weights by
[promptbake](https://pypi.org/project/promptbake/) using {METHOD_TEXT[method]}, then merged into the
full-precision base. Use it with **no system prompt**.

{stored}; its SHA-256 is
`{record["system_prompt_sha256"]}`.

| figure | before | after |
|---|---|---|
{figures}
Training: {record["settings"]["steps"]} steps of {record["settings"]["batch_size"]} prompts,
lr {record["settings"]["lr"]}, LoRA r={record["settings"]["lora_rank"]}, quantisation while training:
{record["resolved"]["quant"]}. Settings, versions and figures: `promptbake.json`; per-step
metrics: `metrics.jsonl`; the unmerged adapter: `adapter/`.
"""
    (folder / "README.md").write_text(card, encoding="utf-8")
