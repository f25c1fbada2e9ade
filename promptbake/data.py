"""Prompt sets: read user prompts from a bundled set or a file, and split off a held-out slice.

A prompt is a list of chat messages ending with a user turn, e.g.
`[{"role": "user", "content": "Why is the sky blue?"}]`. The student sees those
messages as they are; the teacher sees the system prompt in front of them.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from .errors import InputError

Messages = list[dict[str, str]]

BUNDLED_SETS = {"default": "default.txt", "eval": "eval.txt", "ood": "ood.txt"}


def bundled_dir() -> Path:
    """The folder holding the prompt sets and example system prompts shipped with the package."""
    return Path(str(resources.files("promptbake.prompts")))


def resolve_source(source: str) -> Path:
    """A bundled set name or a path -> the file to read."""
    if source in BUNDLED_SETS:
        return bundled_dir() / BUNDLED_SETS[source]
    path = Path(source)
    if not path.exists():
        names = ", ".join(BUNDLED_SETS)
        raise InputError(f"prompt set {source!r} not found: give a file path or a bundled set ({names}).")
    return path


def load_prompts(source: str) -> list[Messages]:
    """Read every prompt of a set; raise InputError naming the line for malformed input."""
    path = resolve_source(source)
    if path.is_dir():
        raise InputError(f"prompt set {path} is a folder: give a .txt or .jsonl file.")
    text = _read_utf8(path, "prompt set")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _parse_jsonl(text, path)
    elif suffix == ".txt":
        prompts = [
            [{"role": "user", "content": line.strip()}]
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    else:
        raise InputError(f"prompt set {path}: unsupported file type {suffix or '(none)'}; use .txt or .jsonl.")
    if not prompts:
        raise InputError(f"prompt set {path} holds no prompts.")
    return prompts


def _parse_jsonl(text: str, path: Path) -> list[Messages]:
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {n}: not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {n}: expected a JSON object with a 'prompt' field.")
        if "messages" in row:
            prompts.append(check_messages(row["messages"], f"{path}, line {n}"))
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            prompts.append([{"role": "user", "content": row["prompt"].strip()}])
        else:
            fields = ", ".join(row) or "none"
            raise InputError(f"{path}, line {n}: no non-empty 'prompt' string (fields present: {fields}).")
    return prompts


def check_messages(messages: object, where: str) -> Messages:
    """Validate a chat-format prefix: user/assistant turns, ending with a user turn, no system turn."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: each message needs a 'role' and a string 'content'.")
        if m.get("role") == "system":
            raise InputError(f"{where}: has a system message, which would conflict with the baked prompt; remove it.")
        if m.get("role") not in ("user", "assistant"):
            raise InputError(f"{where}: unknown role {m.get('role')!r} (expected user or assistant).")
    if messages[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must be a user turn for the model to answer.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_system_prompt(path: Path) -> str:
    """The system prompt file's text, never truncated; InputError if missing, empty or not UTF-8."""
    text = _read_utf8(Path(path), "system prompt file")
    if not text.strip():
        raise InputError(f"system prompt file {path} is empty.")
    return text.strip()


def _read_utf8(path: Path, what: str) -> str:
    if not path.exists():
        raise InputError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (bad byte at offset {err.start}).") from None


def split_holdout(prompts: list[Messages], fraction: float, seed: int, minimum: int = 4) -> tuple[list, list]:
    """Shuffle with `seed` and keep `fraction` (at least `minimum`) apart: (train, heldout)."""
    n_held = max(minimum, round(fraction * len(prompts)))
    if len(prompts) - n_held < 1:
        raise InputError(
            f"prompt set has {len(prompts)} prompts: too few to keep {n_held} apart for evaluation "
            f"and still train; give at least {n_held + 1}."
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held = [prompts[i] for i in order[:n_held]]
    train = [prompts[i] for i in order[n_held:]]
    return train, held
