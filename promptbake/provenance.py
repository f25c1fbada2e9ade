"""Is `eval` / `chat` comparing a bake with what it was baked from? Checked against its promptbake.json.

A baked folder's record names its base model (and, since this check exists, that model's
`models.model_fingerprint`) and the SHA-256 of the baked system prompt. Comparing the bake with
another base, or with another prompt, gives figures that mean nothing (a gap closed of -1115%),
so it is an error naming both sides, unless the user passes --force for a deliberate
cross-comparison. A folder without a finished record (not made by `distill`, or the one
`distill` evaluates before writing its record) is not checked.
"""

from __future__ import annotations

import os
from pathlib import Path

from .data import sha256_text
from .errors import InputError
from .output import read_record

FORCE = "--force"  # the option that compares anyway


def check_bake_inputs(baked: Path, *, model: str, system: str, fingerprint: dict | None = None,
                      force: bool = False, what: str = "--baked", note=lambda message: None) -> dict | None:
    """Refuse a --model other than the bake's base, or a --prompt other than the baked one; return the record.

    model: --model as given; fingerprint: `model_fingerprint` of it, compared with the recorded one
    when both exist (a copy of the base elsewhere passes; another model at the recorded path fails),
    else the paths (resolved) or hub ids are compared. system: the --prompt file's text.
    force: report the mismatch through `note` instead of refusing.
    """
    record = read_record(Path(baked))
    if record is None:
        return None
    problems = []
    base = _model_problem(record, model, fingerprint)
    if base:
        problems.append(base)
    digest = sha256_text(system)
    if digest != record["system_prompt_sha256"]:
        problems.append(f"--prompt is not the prompt baked in (its SHA-256 is {digest[:12]}…, the baked one's "
                        f"{str(record['system_prompt_sha256'])[:12]}…)")
    if not problems:
        return record
    if force:
        note(f"comparing anyway ({FORCE}): {'; '.join(problems)}.")
        return record
    raise InputError(f"{what} {baked} doesn't match: {'; '.join(problems)}. Pass the --model and --prompt the bake "
                     f"was made from, or {FORCE} to compare them anyway.")


def check_same_tokenizer(baked_tok, base_tok, *, baked: Path, model: str, force: bool = False,
                         what: str = "--baked", note=lambda message: None) -> None:
    """Refuse a baked folder whose tokenizer maps text to other ids than --model's: its logits can't be compared."""
    problem = _tokenizer_difference(baked_tok, base_tok)
    if problem is None:
        return
    text = f"the tokenizer of {what} {baked} differs from that of --model {model} ({problem})"
    if force:
        note(f"comparing anyway ({FORCE}): {text}.")
        return
    raise InputError(f"{text}, so their answers can't be scored against each other. Pass the --model the bake "
                     f"was made from, or {FORCE} to compare them anyway.")


# How a differing part of `models.model_fingerprint` is named in messages, and whether that name is plural.
PARTS = {"config": ("config", False), "tokenizer": ("tokenizer files", True), "chat_template": ("chat template", False),
         "weights": ("weights files (sizes or modification times)", True),
         "gguf": (".gguf file (size or modification time)", False)}


def _model_problem(record: dict, model: str, fingerprint: dict | None) -> str | None:
    recorded = str(record["base_model"])
    old = record.get("base_fingerprint")
    if isinstance(old, dict) and fingerprint is not None:
        shared = sorted(set(old) & set(fingerprint))  # a bake with --chat-template records no model template
        parts = [PARTS.get(k, (k, False)) for k in shared if old[k] != fingerprint[k]]
        if shared and not parts:
            return None
        if parts and _same_place(recorded, model, record.get("base_model_path")):
            verb = "differs" if len(parts) == 1 and not parts[0][1] else "differ"
            names = " and ".join(name for name, _ in parts)
            return f"--model {model} changed since the bake: its {names} {verb}"
        return f"--model {model} is not the bake's base {recorded}"
    if _same_place(recorded, model, record.get("base_model_path")):
        return None
    return f"--model {model} is not the bake's base {recorded}"


def _same_place(recorded: str, model: str, recorded_path: str | None) -> bool:
    if recorded == model:
        return True
    here = Path(model).expanduser()
    if not here.exists():
        return False
    there = recorded_path or recorded  # an older record holds --model as typed, maybe relative to another cwd
    return os.path.realpath(here) == os.path.realpath(Path(there).expanduser())


def _tokenizer_difference(a, b) -> str | None:
    if len(a) != len(b):
        return f"{len(a)} tokens vs {len(b)}"
    for name in ("bos_token", "eos_token", "unk_token"):  # not pad: padding is masked everywhere
        if getattr(a, name, None) != getattr(b, name, None):
            return f"{name} {getattr(a, name, None)!r} vs {getattr(b, name, None)!r}"
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        token = next(k for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k))
        return f"token {token!r} has id {va.get(token)} vs {vb.get(token)}"
    return None
