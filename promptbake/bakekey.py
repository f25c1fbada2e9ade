"""The bake key: one hash of everything that decides a bake's weights, so an unchanged bake is skipped.

    key = SHA-256 of {model identity, teacher identity, system prompt SHA-256, prompt set SHA-256,
                      chat template SHA-256, every setting that changes the weights, device class,
                      promptbake version}

Model identity is the content hash of a local folder's files or of a .gguf file (cached by
path, size and modification time, so an unchanged 5 GB model isn't read again at every start),
or a hub id with its commit. Settings that don't change the weights (where the output goes,
how often to checkpoint, --chunk-size, trust flags, the closing evaluation) are left out; the
closing evaluation's settings are compared separately, since a skipped bake reports the gates
it recorded. The device class (cpu or cuda) stands for the resolved precision and quantisation
(fp32 / none on CPU, bf16 / 4bit by default on CUDA) without importing torch, which takes
seconds: an up-to-date check answers in about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .config import DistillConfig
from .models import ModelSource

# Settings that don't change the trained weights. The files behind prompt / prompts / chat_template
# and model / teacher enter the key by content instead of by name.
_NOT_WEIGHTS = {"out", "overwrite", "resume", "save_every", "record_prompt", "allow_pickle", "trust_remote_code",
                "chunk_size", "eval", "checks", "min_gap_closed", "min_pass_rate",
                "prompt", "prompts", "chat_template", "model", "teacher"}
_CLOSING_EVAL = ("eval", "min_gap_closed", "min_pass_rate")
_PART_NAMES = {"model": "the model's files", "teacher": "the teacher model's files",
               "system_prompt_sha256": "the system prompt", "prompts_sha256": "the prompt set",
               "chat_template_sha256": "the chat template", "device": "the device (cpu or cuda)",
               "promptbake_version": "promptbake's version"}
_CHUNK = 1 << 20


@dataclass
class BakeKey:
    key: str  # hex SHA-256 of `parts`
    parts: dict  # what went into it, so a difference can be named
    closing_eval: dict = field(default_factory=dict)  # compared beside the key: a skip reports recorded gates
    pinned: bool = True  # False when a hub model's commit is unknown: then nothing is ever up to date

    def to_record(self) -> dict:
        return {"key": self.key, "parts": self.parts, "closing_eval": self.closing_eval}


def bake_key(cfg: DistillConfig, *, system: str, prompts: list, template: str | None, src: ModelSource,
             teacher_src: ModelSource | None, checks: list | None = None) -> BakeKey:
    """The key of the bake `cfg` describes, from the inputs `setup.read_inputs` has read."""
    settings = {k: v for k, v in cfg.to_record().items() if k not in _NOT_WEIGHTS}
    model, pinned = model_identity(src)
    teacher, teacher_pinned = model_identity(teacher_src) if teacher_src else (None, True)
    parts = {
        "model": model, "teacher": teacher,
        "system_prompt_sha256": _sha(system.encode("utf-8")),
        "prompts_sha256": _sha(json.dumps(prompts, sort_keys=True).encode("utf-8")),
        "chat_template_sha256": _sha(template.encode("utf-8")) if template is not None else None,
        "settings": settings,
        "device": device_class(),
        "promptbake_version": __version__,
    }
    parts = json.loads(json.dumps(parts))  # as it reads back from promptbake.json
    closing = {k: getattr(cfg, k) for k in _CLOSING_EVAL}
    # The checks the closing evaluation ran (parsed, so comments and layout don't matter).
    closing["checks_sha256"] = _sha(json.dumps([asdict(c) for c in checks or []], default=str).encode("utf-8"))
    key = _sha(json.dumps(parts, sort_keys=True).encode("utf-8"))
    return BakeKey(key, parts, closing, pinned and teacher_pinned)


def model_identity(src: ModelSource) -> tuple[str, bool]:
    """('gguf:SHA', True), ('folder:SHA', True) or ('hub:ID@COMMIT', pinned?) for a resolved model."""
    if src.gguf_file:
        return f"gguf:{file_sha256(Path(src.path) / src.gguf_file)}", True
    folder = Path(src.path)
    if folder.is_dir():
        return f"folder:{folder_sha256(folder)}", True
    commit = hub_commit(src.path, offline=src.local_files_only)
    return f"hub:{src.path}@{commit or 'unknown'}", commit is not None


def folder_sha256(folder: Path) -> str:
    """Hash of every file's relative path and contents (hidden files and folders left out: .cache, .git)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        h.update(f"{rel.as_posix()}\0{file_sha256(p)}\n".encode("utf-8"))
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """A file's SHA-256, remembered by (path, size, mtime) in the user cache so big files are read once."""
    path = Path(path).absolute()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    cache = _read_cache()
    hit = cache.get(str(path))
    if hit and hit[:2] == stamp:
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if st.st_size >= _CHUNK:  # small files are quicker to hash than to look up
        cache[str(path)] = [*stamp, digest]
        _write_cache(cache)
    return digest


def hub_commit(repo_id: str, *, offline: bool) -> str | None:
    """The commit a hub model resolves to now: asked of the hub when reachable, else the cached `main`."""
    if not offline:
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo_id, timeout=5).sha
        except Exception:  # unreachable or unknown: fall back to the cache
            pass
    try:
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
        return ref.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def device_class() -> str:
    """'cuda' when torch would find a GPU (an NVIDIA or ROCm device node, not hidden), else 'cpu'; no torch import."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")
    nodes = any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()
    return "cuda" if nodes and not hidden else "cpu"


# ---------------------------------------------------------------- is --out already this bake?


def recorded_bake(out: Path) -> dict | None:
    """The promptbake.json of a complete bake in `out` (published whole, so the record means complete), else None."""
    out = Path(out)
    try:
        record = json.loads((out / "promptbake.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
        return None
    return record


def compare(out: Path, key: BakeKey) -> tuple[str, str]:
    """('absent' | 'up_to_date' | 'different', why) for --out against the bake `key` describes."""
    out = Path(out)
    if not out.exists():
        return "absent", f"--out {out} doesn't exist yet"
    record = recorded_bake(out)
    if record is None:
        return "different", f"--out {out} doesn't hold a complete promptbake bake"
    old = record.get("bake") or {}
    if not key.pinned:
        return "different", f"the hub commit of {key.parts['model']} is unknown, so a change can't be ruled out"
    if old.get("key") != key.key:
        return "different", f"--out {out} holds another bake: {_difference(old.get('parts') or {}, key.parts)}"
    if old.get("closing_eval") != json.loads(json.dumps(key.closing_eval)):
        return "different", (f"--out {out} holds this bake, but its closing evaluation had other settings "
                             "(--eval, --checks or the gates)")
    return "up_to_date", f"--out {out} already holds this bake (bake key {key.key[:12]})"


def _difference(old: dict, new: dict) -> str:
    if not old:
        return "it has no bake key (made by an older promptbake)"
    for name in _PART_NAMES:
        if old.get(name) != new.get(name):
            return f"{_PART_NAMES[name]} changed"
    a, b = old.get("settings") or {}, new.get("settings") or {}
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if changed:
        name = changed[0]
        return f"--{name.replace('_', '-')} was {a.get(name)}, now {b.get(name)}"
    return "its bake key differs"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a cache: the next start hashes again


def _cache_path() -> Path:
    root = os.environ.get("PROMPTBAKE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "promptbake")
    return Path(root) / "file-sha256.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
