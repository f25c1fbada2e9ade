"""The work folder beside the output: what lets a stopped bake continue where it stopped.

A bake writing to OUT keeps OUT.work/ while it runs:

    OUT.work/
      work.json        settings a resumed bake must share (input hashes, never the prompt text), and
                       figures computed once (the held-out KL before training)
      metrics.jsonl    one row per finished step; a resumed bake continues it
      step-000020.pt   the last two checkpoints: LoRA weights, AdamW state, step, RNG states

Every file is written to a temporary name and renamed, so a kill at any moment leaves the
previous version whole. Ctrl-C or SIGTERM during training saves the last finished step and
exits 130 / 143; running the same command again (or with --resume) continues from there. A
bake that succeeds removes the folder: the output holds everything.

Batches and sampling are pure functions of (seed, step) (`bake.batch_indices`, `bake._step_seed`),
so a resumed bake ends with the same adapter as one that was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

from rich.console import Console

from .config import DistillConfig, flag
from .data import sha256_text
from .errors import InputError, Interrupted, Terminated, WriteError, describe, note

SAVE_SECONDS = 600  # a checkpoint at least every 10 minutes, whatever --save-every says
KEEP = 2  # checkpoints kept: if the newest is unreadable, the one before it still is

# Settings that may differ when resuming. Where the output goes, how often to save and what
# is trusted don't change the result; --chunk-size and --micro-batch-size only split the same sums
# differently, and --gradient-checkpointing recomputes the same activations.
# --steps may change (up or down to the checkpoint's step): with a constant learning rate and
# batches that depend only on (seed, step), a longer bake equals one started with the larger
# --steps. Not with --lr-schedule cosine, whose every step's rate depends on --steps: there it must
# stay. The files behind --prompt, --prompts and --chat-template are compared by content.
_MAY_DIFFER = {"out", "overwrite", "resume", "save_every", "record_prompt", "allow_pickle", "trust_remote_code",
               "eval", "checks", "min_gap_closed", "min_pass_rate",  # evaluation after training only
               "export", "export_outtype",  # written after training only
               "steps", "chunk_size", "prompt", "prompts", "chat_template",
               "micro_batch_size", "gradient_checkpointing"}  # the same sums, split or recomputed
_NAMES = {
    "system_prompt_sha256": "the system prompt (--prompt file contents)",
    "prompts_sha256": "the prompt set (--prompts contents)",
    "chat_template_sha256": "the --chat-template contents",
    "resolved_quant": "the quantisation (--quant as resolved on this machine)",
    "dtype": "the precision (it follows the device)",
}
# The parts of `models.model_fingerprint`, as said when a resumed bake's model changed at the same path.
_MODEL_PARTS = {"config": "config.json changed", "tokenizer": "tokenizer files changed",
                "chat_template": "chat template changed",
                "weights": "weights changed (a weights file's size or modification time)",
                "gguf": ".gguf file changed (its size or modification time)"}
_CHANGED = {f"{role}_{part}": f"the --{role} {said}" for role in ("model", "teacher")
            for part, said in _MODEL_PARTS.items()}


def work_path(out: Path) -> Path:
    """OUT.work, beside OUT."""
    out = Path(out).absolute()
    return out.parent / f"{out.name}.work"


def run_settings(cfg: DistillConfig, *, system: str, prompts: list, template: str | None, quant: str, dtype,
                 fingerprints: dict[str, dict | None] | None = None) -> dict:
    """What a resumed bake must share with the stopped one: its settings, input hashes, precision and the
    identity of its models (fingerprints: {"model": models.model_fingerprint(...), "teacher": ... or None}),
    so a model whose weights, tokenizer or template changed at the same path is refused by name."""
    may_differ = _MAY_DIFFER if cfg.lr_schedule == "constant" else _MAY_DIFFER - {"steps"}
    settings = {k: v for k, v in cfg.to_record().items() if k not in may_differ}
    for role, fingerprint in (fingerprints or {}).items():
        settings.update({f"{role}_{part}": digest for part, digest in (fingerprint or {}).items()})
    settings.update(
        system_prompt_sha256=sha256_text(system),
        prompts_sha256=sha256_text(json.dumps(prompts, sort_keys=True)),
        chat_template_sha256=sha256_text(template) if template is not None else None,
        resolved_quant=quant,
        dtype=str(dtype).removeprefix("torch."),
    )
    return json.loads(json.dumps(settings))  # as it will read back from work.json


class WorkFolder:
    """OUT.work/: created for a new bake, or checked and reused to resume a stopped one."""

    def __init__(self, path: Path, state: dict, console: Console):
        self.path, self.state, self.console = path, state, console
        # Each process of a bake adds its own entry, updated whenever the state or a checkpoint is written,
        # so the finished bake can report what all its processes cost together.
        self._started = time.time()
        self._process = len(state.setdefault("process_seconds", []))
        state["process_seconds"].append(0.0)

    @classmethod
    def open(cls, out: Path, settings: dict, *, steps: int, resume: bool, console: Console) -> WorkFolder:
        """Start a work folder, or resume the one left by a stopped bake if its settings match."""
        path = work_path(out)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path} is a file; promptbake keeps its work folder there: move it away.")
        fresh = cls(path, {"settings": settings}, console)  # the folder appears with its first file
        if not (path / "work.json").is_file():
            if resume:
                raise InputError(f"--resume: there is no stopped bake to continue for --out {out} ({path} doesn't exist).")
            return fresh
        try:
            state = json.loads((path / "work.json").read_text(encoding="utf-8"))
            old = state["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{path}/work.json can't be read; delete {path} to start afresh.") from None
        work = cls(path, state, console)
        if old != settings and not work.last_step() and not resume:
            # A bake with other settings stopped before its first checkpoint: nothing worth keeping.
            work.remove()
            note(console, f"discarded {path}: a bake with other settings stopped there before its first checkpoint.")
            return fresh
        _check_same(old, settings, path)
        for tmp in path.glob(".*.tmp-*"):  # left by a kill in the middle of a write
            tmp.unlink(missing_ok=True)
        last = work.last_step()
        if last > steps:
            raise InputError(f"{path} holds a checkpoint at step {last}, past --steps {steps}; pass --steps {last} "
                             f"or more to finish that bake, or delete {path} to start afresh.")
        where = f"from step {last}" if last else "(no checkpoint yet, from the start)"
        note(console, f"resuming the stopped bake kept in {path} {where}; delete that folder to start afresh instead.")
        return work

    def checkpoints(self) -> list[Path]:
        return sorted(self.path.glob("step-*.pt"))

    def last_step(self) -> int:
        files = self.checkpoints()
        return int(files[-1].stem.removeprefix("step-")) if files else 0

    def once(self, name: str, compute):
        """A figure computed once per bake (e.g. the held-out KL before training) and kept across resumes."""
        if name not in self.state:
            self.state[name] = compute()
            self._write_state()
        return self.state[name]

    def training(self, model, optimizer, *, steps: int, save_every: int) -> Training:
        """The guard around the training loop: see `Training`."""
        return Training(self, model, optimizer, steps, save_every)

    def save(self, step: int, model, optimizer) -> None:
        """Write checkpoint `step` atomically; keep the newest KEEP."""
        import torch

        ckpt = {
            "step": step,
            "adapter": {name: p.detach().to("cpu", copy=True) for name, p in _trainable(model)},
            "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        final = self.path / f"step-{step:06d}.pt"
        try:
            _atomic_write(final, lambda f: torch.save(ckpt, f))
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            last = self.last_step()
            kept = f"the checkpoint of step {last} is kept" if last else "no earlier checkpoint exists"
            raise WriteError(f"can't save the step {step} checkpoint in {self.path} ({describe(err)}); {kept}. "
                             "Free some space and run the same command again.") from None
        for old in self.checkpoints()[:-KEEP]:
            old.unlink(missing_ok=True)
        self._write_state()  # this process's seconds so far

    def restore(self, model, optimizer) -> int:
        """Load the newest readable checkpoint into model and optimizer; return its step (0: none)."""
        import torch

        for path in reversed(self.checkpoints()):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling
            except Exception as err:  # damaged: fall back to the one before
                note(self.console, f"skipping unreadable checkpoint {path.name} ({describe(err)}).")
                continue
            params = dict(_trainable(model))
            if set(params) != set(ckpt["adapter"]):
                raise InputError(f"{path} doesn't hold this model's LoRA weights; delete {self.path} to start afresh.")
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(ckpt["adapter"][name])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            random.setstate(ckpt["rng"]["python"])
            if ckpt["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            return ckpt["step"]
        return 0

    def metrics(self, step: int):
        """metrics.jsonl cut to the rows of steps up to `step` (later ones will be redone), open to append."""
        path = self.path / "metrics.jsonl"
        self.path.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # the last line, cut short by a kill
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    kept.append(line + "\n")
        _atomic_write(path, lambda f: f.write("".join(kept).encode("utf-8")))
        return path.open("a", encoding="utf-8")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def earlier_seconds(self) -> list[float]:
        """Wall seconds of each earlier process of this bake (up to its last write here); [] for a new bake."""
        return [float(s) for s in self.state["process_seconds"][:self._process]]

    def _write_state(self) -> None:
        self.state["process_seconds"][self._process] = round(time.time() - self._started, 1)
        text = json.dumps(self.state, indent=2) + "\n"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path / "work.json", lambda f: f.write(text.encode("utf-8")))
        except OSError as err:
            raise WriteError(f"can't write {self.path}/work.json ({describe(err)}); free some space and try again.") from None


class Training:
    """Guards the training loop.

    On entry: loads the last checkpoint (`done` is its step, 0 for a new bake) and opens metrics.jsonl.
    `finished(step, row)` records a completed step and saves a checkpoint every --save-every steps,
    every SAVE_SECONDS and at the last step. SIGINT and SIGTERM stop the step at once, except inside
    `update()`, which they wait for, so the weights on disk always come from whole optimizer steps.
    Leaving on a signal saves the last finished step and raises `Interrupted` (exit 130 / 143).
    """

    def __init__(self, work: WorkFolder, model, optimizer, steps: int, save_every: int):
        self.work, self.model, self.optimizer = work, model, optimizer
        self.steps, self.every = steps, save_every
        self.done = self.saved = 0
        self._holding = False
        self._pending: int | None = None
        self._old_handlers: dict = {}

    def __enter__(self) -> Training:
        self.done = self.saved = self.work.restore(self.model, self.optimizer)
        self._metrics = self.work.metrics(self.done)
        self._saved_at = time.monotonic()
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if self._holding:
            self._pending = self._pending or signum
            return
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    @contextlib.contextmanager
    def update(self):
        """A block that signals wait for: an optimizer update and its record happen whole or not at all."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._pending:
            signum, self._pending = self._pending, None
            self._on_signal(signum, None)

    def finished(self, step: int, row: dict) -> None:
        """Step `step` is complete: append its metrics row; checkpoint when due."""
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self.done = step
        due = step % self.every == 0 or time.monotonic() - self._saved_at >= SAVE_SECONDS
        if due or step == self.steps:
            self.save()

    def kept(self) -> str:
        """Where the last checkpoint is, for error messages."""
        if self.saved:
            return f"the last checkpoint (step {self.saved}) is kept in {self.work.path}"
        return "no checkpoint had been saved yet"

    def save(self) -> None:
        os.fsync(self._metrics.fileno())  # the rows of every saved step are on disk before the checkpoint
        self.work.save(self.done, self.model, self.optimizer)
        self.saved, self._saved_at = self.done, time.monotonic()

    def __exit__(self, kind, err, tb) -> None:
        try:
            if kind is not None and issubclass(kind, KeyboardInterrupt):
                self._holding = True  # a second Ctrl-C must not cut the checkpoint short
                if self.done > self.saved:
                    self.save()
                terminated = issubclass(kind, Terminated)
                kept = (f"saved step {self.saved} in {self.work.path}; run the same command again (or add --resume) "
                        f"to continue from step {self.saved + 1}" if self.saved else
                        f"no step had finished; running the same command again starts over, reusing {self.work.path}")
                raise Interrupted(f"stopped by {'SIGTERM' if terminated else 'Ctrl-C'} during step {self.done + 1}: "
                                  f"{kept}.", 143 if terminated else 130) from None
        finally:
            self._metrics.close()
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)


def _check_same(old: dict, new: dict, path: Path) -> None:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key in _CHANGED:
                what = _CHANGED[key]
            elif key in _NAMES:
                what = f"{_NAMES[key]} differs"
            else:
                what = f"{flag(key)} was {old.get(key)}, now {new.get(key)}"
                if key == "steps":
                    what += " (the cosine --lr-schedule's rate at every step depends on --steps)"
            raise InputError(f"{path} holds a stopped bake with other settings: {what}. Resume with the same "
                             f"settings, or delete {path} to start afresh.")


def _trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _atomic_write(path: Path, write) -> None:
    """write(file) into a temporary sibling, flush it to disk, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every platform)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
