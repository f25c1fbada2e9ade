"""Rollout new tokens/s of each sampler on one loaded model, --quant as given (one process per run).

    python benchmarks/bench_rollouts.py --model FOLDER --quant 4bit    # fast (QuantDecoder), exact, generate
    python benchmarks/bench_rollouts.py --model FOLDER --quant none    # fast (merged copy), exact, generate
    python benchmarks/bench_rollouts.py --model gemma.gguf --quant none --chat-template prompts/templates/gemma3.jinja

The samplers take turns on the same prompts (batch 8 of the bundled `default` set, the chat
template's student render), each timed over --repeats rollouts after one untimed warm-up.
RSS is the process's resident set after each sampler's rollouts (samplers built lazily, in
order, so a growth is the sampler's own). Compare ratios from one run: machine speed drifts.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, gguf_as_folder, smollm2_path  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct, re-saved as a folder)")
    p.add_argument("--quant", default="4bit", choices=["4bit", "8bit", "none"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--samplers", default="fast,exact,generate")
    p.add_argument("--chat-template", help="Jinja chat template file, for models whose tokenizer has none (Gemma 3 GGUF)")
    args = p.parse_args()

    import torch

    from promptbake.config import DistillConfig
    from promptbake.data import load_prompts, read_system_prompt
    from promptbake.models import load_model, load_tokenizer, pick_device_and_dtype, resolve_model
    from promptbake.render import Renderer
    from promptbake.samplers import SamplingArgs, make_sampler
    from promptbake.setup import add_lora, quiet_libraries, read_template

    quiet_libraries()
    model = args.model or gguf_as_folder(smollm2_path(), Path("/tmp/promptbake-smollm2-folder"))
    device, dtype = pick_device_and_dtype()
    src = resolve_model(model)
    tok = load_tokenizer(src, chat_template=read_template(args.chat_template))
    renderer = Renderer(tok, read_system_prompt(ROOT / "prompts/system/pirate.txt"))
    prompts = [renderer.student_ids(m) for m in load_prompts("default")[: args.batch_size]]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    student = add_lora(load_model(src, quant=args.quant, device=device, dtype=dtype), DistillConfig(model="x", prompt="x"))
    with torch.no_grad():  # a trained-looking adapter: non-zero B, so LoRA really runs
        for n, w in student.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.01)
    load_s = time.perf_counter() - t0
    sargs = SamplingArgs.for_model(tok, student, max_new_tokens=args.max_new_tokens, temperature=1.0)
    out = {"model": Path(model).name, "quant": args.quant, "device": device.type, "load_s": round(load_s, 1),
           "rss_after_load_mib": round(rss_mib(), 1), "samplers": {}}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name in args.samplers.split(","):
        sampler = make_sampler(name, student, sargs, quantised=args.quant != "none")
        sampler.refresh()
        sampler.sample(prompts, torch.Generator(device).manual_seed(0))  # warm-up
        tokens, seconds = 0, 0.0
        for r in range(args.repeats):
            sync()
            t = time.perf_counter()
            sampler.refresh()
            responses = sampler.sample(prompts, torch.Generator(device).manual_seed(r + 1))
            sync()
            seconds += time.perf_counter() - t
            tokens += sum(map(len, responses))
        out["samplers"][name] = {"description": sampler.description, "new_tokens_per_s": round(tokens / seconds, 1),
                                 "rss_mib": round(rss_mib(), 1)}
        if device.type == "cuda":
            out["samplers"][name]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(json.dumps({name: out["samplers"][name]}), flush=True)
        del sampler
    s = out["samplers"]
    if "fast" in s and "generate" in s:
        out["fast_over_generate"] = round(s["fast"]["new_tokens_per_s"] / s["generate"]["new_tokens_per_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
