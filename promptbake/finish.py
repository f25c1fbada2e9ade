"""After training: merge, closing evaluation, record, model card, then publish the output folder.

Everything is built in a hidden folder beside --out and renamed into place only when
complete, so an earlier --out survives any failure and a failed write can be retried
from the work folder without retraining.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from . import __version__, merge
from .bakekey import recorded_bake
from .config import DistillConfig
from .configfile import SETTINGS_FILE, resolved_toml
from .data import sha256_text
from .eval import evaluate_bake
from .output import is_write_error, make_staging, output_files, publish, write_error, write_json, write_model_card
from .setup import Inputs, Run
from .train import HeldoutKL, diverged


@dataclass
class DistillResult:
    out: Path
    kl_before: float
    kl_after: float
    steps: int
    wall_seconds: float
    peak_memory_mb: float
    record: dict = field(repr=False)
    up_to_date: bool = False  # True: --out already held this bake and nothing was baked


def finish(cfg: DistillConfig, inputs: Inputs, run: Run, before: HeldoutKL, after: HeldoutKL, started: float,
           console: Console) -> DistillResult:
    """Write the merged checkpoint, adapter, tokenizer, metrics, evaluation and record to cfg.out."""
    if not math.isfinite(after.value):  # never merge weights whose outputs are inf/nan
        raise diverged(f"after training the held-out KL is {after.value}", cfg, f"{run.work.path} is kept")
    console.print("merging the adapter into the full-precision base")
    kept = f"The trained adapter is kept in {run.work.path}"
    staging = make_staging(cfg.out)
    try:
        run.student.save_pretrained(staging / "adapter")
        merge.save_merged(run.student, staging / "adapter", staging, src=inputs.src, quantised=run.quant != "none",
                          dtype=run.dtype, trust_remote_code=cfg.trust_remote_code,
                          stop_ids=run.pair.sampling.eos_ids)  # the baked model stops where its rollouts did
        run.tok.save_pretrained(staging)
        shutil.copyfile(run.work.path / "metrics.jsonl", staging / "metrics.jsonl")
        prefix = run.pair.prefix  # read before the training model is released
        reused = prefix.length if prefix is not None and prefix.usable and not run.pair.prefix_misses else 0
        release_training(run)  # the evaluation loads fresh copies: never hold those and the training model at once
        evaluation = evaluate_bake(cfg, staging, run.heldout, inputs.checks, console) if cfg.eval else None
        wall, processes = whole_wall_seconds(run.work, started)
        peak_mb = peak_memory_mb(run.device)
        results = dict(heldout_kl_before=before.value, heldout_kl_after=after.value,
                       heldout={"prompts": after.prompts, "tokens_before": before.tokens, "tokens_after": after.tokens,
                                "stderr_before": round(before.stderr, 6), "stderr_after": round(after.stderr, 6),
                                "seconds": round(before.seconds + after.seconds, 1)},
                       steps=cfg.steps, wall_seconds=round(wall, 1), processes=processes,
                       peak_memory_mb=round(peak_mb, 1), eval=evaluation.to_json() if evaluation else None)
        record = bake_record(cfg, inputs, run, results, prefix_tokens_reused=reused)
        write_settings(staging / SETTINGS_FILE, cfg, inputs)  # before the file list below, which must name it
        record["files"] = output_files(staging)  # what a later --overwrite may replace: nothing else
        write_json(staging / "promptbake.json", record)
        write_model_card(staging, record)
        if cfg.export == "gguf":  # inside staging: published with the checkpoint, or not at all
            from .export import export_gguf

            export_gguf(staging, staging / f"model-{cfg.export_outtype}.gguf", outtype=cfg.export_outtype,
                        console=console, name=Path(cfg.out).name)
        publish(staging, cfg.out, cfg.overwrite, kept=kept)
    except Exception as err:
        if not is_write_error(err):
            raise
        raise write_error(err, cfg.out, kept=kept) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published
    return DistillResult(cfg.out, before.value, after.value, cfg.steps, wall, peak_mb, record)


def already_baked(cfg: DistillConfig, inputs: Inputs, console: Console) -> DistillResult:
    """--out holds this very bake (same bake key): report it from its record instead of baking again."""
    record = recorded_bake(cfg.out)
    r = record["results"]
    console.print(f"up to date: {inputs.out_why}; nothing to bake. Pass --force to bake again.",
                  highlight=False, soft_wrap=True)
    return DistillResult(cfg.out, r["heldout_kl_before"], r["heldout_kl_after"], r["steps"], r["wall_seconds"],
                         r["peak_memory_mb"], record, up_to_date=True)


def release_training(run: Run) -> None:
    """Drop the training model, its pair (samplers hold a merged copy) and optimizer, and return their memory."""
    import gc

    import torch

    run.student = run.pair = run.optimizer = None
    run.params = []
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def whole_wall_seconds(work, started: float) -> tuple[float, int]:
    """(seconds, processes) over every process of this bake: earlier ones from the work folder, this one to now.

    An earlier process counts from its work folder opening to its last checkpoint or Ctrl-C/SIGTERM;
    one killed outright (SIGKILL, out of memory) loses the time after its last checkpoint.
    """
    earlier = work.earlier_seconds()
    return time.time() - started + sum(earlier), len(earlier) + 1


def write_settings(path: Path, cfg: DistillConfig, inputs: Inputs) -> None:
    """promptbake.toml: the resolved settings, which `--config` reads back to make this same bake."""
    model = inputs.key.parts["model"]
    text = resolved_toml(cfg, system_sha256=sha256_text(inputs.system), key=inputs.key.key,
                         model_note=model if model.startswith("hub:") else None)
    path.write_text(text, encoding="utf-8")


def bake_record(cfg: DistillConfig, inputs: Inputs, run: Run, results: dict, *, prefix_tokens_reused: int) -> dict:
    """promptbake.json: what was baked from what, with which settings and versions, and the figures."""
    import peft
    import torch
    import transformers

    config, ps = run.config, run.prompt_set
    probe = [{"role": "user", "content": "?"}]
    return {
        "promptbake_version": __version__,
        "base_model": cfg.model,
        # Where and what the base was, so eval and chat can tell another model from it (provenance.py).
        **({"base_model_path": str(Path(cfg.model).resolve())} if Path(cfg.model).exists() else {}),
        "base_fingerprint": run.fingerprints["model"],
        "teacher_model": cfg.teacher or cfg.model,
        "method": cfg.method,  # what the student learned from (config.METHOD_CHOICES)
        "system_prompt_sha256": sha256_text(inputs.system),
        **({"system_prompt": inputs.system} if cfg.record_prompt else {}),  # confidential unless asked
        # Prompt tokens a deployed request no longer carries: teacher input minus student input.
        "system_prompt_tokens": len(run.renderer.teacher_ids(probe)) - len(run.renderer.student_ids(probe)),
        "architecture": (config.architectures or [config.model_type])[0],
        "vocab_size": config.get_text_config().vocab_size,
        "settings": cfg.to_record(),
        "settings_file": SETTINGS_FILE,
        "bake": inputs.key.to_record(),
        "resolved": {
            "device": run.device.type, "dtype": str(run.dtype).removeprefix("torch."), "quant": run.quant,
            "system_role": run.renderer.system_role,
            "prefix_reuse": prefix_tokens_reused > 0,
            "prefix_tokens_reused": prefix_tokens_reused,  # teacher tokens per row taken from the cached system prefix
        },
        "prompts": dict(source=cfg.prompts, read=ps.rows, dropped=ps.dropped, train=len(run.train),
                        heldout=len(run.heldout), dropped_too_long=ps.dropped.get("too_long", 0)),
        "results": results,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def print_summary(console: Console, r: DistillResult, device) -> None:
    from rich.table import Table

    table = Table(title="promptbake distill", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    change = (1 - r.kl_after / r.kl_before) * 100 if r.kl_before > 0 else 0.0
    table.add_row("held-out KL/token before", f"{r.kl_before:.4f}")
    table.add_row("held-out KL/token after", f"{r.kl_after:.4f} ({change:.0f}% lower)" if change >= 0
                  else f"{r.kl_after:.4f} ({-change:.0f}% higher)")
    held = r.record["results"]["heldout"]
    table.add_row("held-out measurement", f"{held['prompts']} prompts, ± {held['stderr_after']:.4f}, "
                  f"{held['seconds']:.0f} s before + after")
    reused = r.record["resolved"]["prefix_tokens_reused"]
    table.add_row("teacher prefix cache", f"{reused} tokens reused per prompt" if reused else "not used")
    table.add_row("steps", str(r.steps))
    table.add_row("wall time", f"{r.wall_seconds / 60:.1f} min")
    table.add_row("peak memory", f"{r.peak_memory_mb:,.0f} MiB ({'GPU' if device.type == 'cuda' else 'RSS'})")
    table.add_row("checkpoint", str(r.out))
    console.print(table)
