"""`distill`: one bake, top to bottom.

    inputs (setup.read_inputs) -> setup (setup.prepare) -> train (train.py, methods.py) -> finish (finish.py)

While it runs, OUT.work/ beside the output keeps checkpoints so a stopped bake
resumes where it stopped (checkpoint.py); a finished bake removes it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, replace

from rich.console import Console

from .config import DistillConfig
from .errors import TrainingError, describe, is_out_of_memory
from .finish import DistillResult, already_baked, finish, print_summary
from .setup import hold_output, prepare, read_inputs
from .train import HeldoutKL, diverged, heldout_kl, train


def distill(cfg: DistillConfig, console: Console | None = None, *, force: bool = False) -> DistillResult:
    """Bake cfg.prompt into cfg.model; write the merged checkpoint to cfg.out.

    An --out that already holds this bake (same bake key, bakekey.py) is left as it is and its
    record returned, unless `force`: then it is baked again and replaced.
    """
    console = console or Console(stderr=True)
    started = time.time()

    # 1. Inputs: every file and option checked without torch, in about a second; --out made absolute.
    inputs = read_inputs(cfg, force=force)
    if inputs.up_to_date:
        return already_baked(cfg, inputs, console)
    cfg = replace(cfg, out=inputs.out, overwrite=cfg.overwrite or inputs.replace_out)
    # One bake per output: the lock beside it is held until the output is published and the work folder gone.
    with hold_output(cfg, console):
        # 2. Setup: tokenizer, renders, prompt split, work folder, the base weights once (frozen) + LoRA.
        run = prepare(cfg, inputs, console)
        with failures_explained(cfg, run.work.path):
            # 3. Train. The held-out KL before is kept in the work folder, so a resumed bake doesn't
            #    measure it again on trained weights; after, the same prompts with the same sampling seed.
            kl_before = HeldoutKL(**run.work.once(
                "heldout_before", lambda: asdict(heldout_kl(run, run.heldout, cfg, console, "before"))))
            train(cfg, run, console)
            kl_after = heldout_kl(run, run.heldout, cfg, console, "after")
            # 4. Finish: merged checkpoint, closing evaluation, record and model card, published atomically.
            result = finish(cfg, inputs, run, kl_before, kl_after, started, console)
        run.work.remove()  # the output holds everything now
    print_summary(console, result, run.device)
    return result


@contextlib.contextmanager
def failures_explained(cfg: DistillConfig, work_path):
    """Out-of-memory and inf/nan sampling errors from anywhere in the bake, as one TrainingError line."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if "probability tensor contains" in str(err):  # sampling met inf/nan logits: the weights diverged
            raise diverged("the model's outputs became inf or nan", cfg, f"{work_path} is kept") from None
        if not is_out_of_memory(err):
            raise
        raise TrainingError(
            f"out of memory ({describe(err)}). To use less: lower --batch-size (now {cfg.batch_size}), "
            f"--max-new-tokens (now {cfg.max_new_tokens}) or --chunk-size (now {cfg.chunk_size}), or train on a "
            f"quantised base with --quant 4bit. Only --chunk-size can change when resuming from {work_path}."
        ) from None
