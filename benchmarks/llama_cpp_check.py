"""Run an exported bake in real llama.cpp and compare it with transformers on the safetensors folder.

    python benchmarks/llama_cpp_check.py BAKED [--outtype f16] [--max-new-tokens 32] [--site DIR]

Exports BAKED with `promptbake.export.export_gguf` to a temporary folder, then for a few chat prompts
(rendered with the bake's chat template, no system message: what a deployed bake sees) it compares
1. the prompt's token ids from llama.cpp's tokenizer (reading the GGUF) with the Hugging Face tokenizer's,
2. greedy continuations: llama.cpp (llama-cpp-python) on the GGUF vs transformers on the safetensors folder.
Prints one line per prompt and a JSON summary as the last line. Exits 0 with "skipped:" when
llama_cpp can't be imported. llama-cpp-python compiles llama.cpp on install, so it usually lives in
a venv of its own; `--site` appends that venv's site-packages to sys.path (after this venv's, so
torch and numpy stay this venv's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["Why is the sky blue?", "Write a haiku about the sea.", "How do I sort a list in Python?",
           "What should I pack for a day at the beach?"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baked", type=Path)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--site", action="append", default=[], help="site-packages folder holding llama_cpp")
    args = ap.parse_args()
    sys.path.extend(args.site)
    try:
        import llama_cpp
    except ImportError as err:
        print(f"skipped: llama_cpp is not importable ({err}); pip install llama-cpp-python (it compiles "
              "llama.cpp) and pass --site with its site-packages")
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from promptbake.export import export_gguf

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.baked)
    hf = AutoModelForCausalLM.from_pretrained(args.baked, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        path = export_gguf(args.baked, Path(tmp) / f"model-{args.outtype}.gguf", outtype=args.outtype)
        export_s = time.time() - t0
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, verbose=False, seed=0)
        rows = []
        for prompt in PROMPTS:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            hf_new = out[0, len(ids):].tolist()
            llm.reset()
            cpp_new = []
            for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                if t == tok.eos_token_id or len(cpp_new) == args.max_new_tokens:
                    break
                cpp_new.append(t)
            if hf_new and hf_new[-1] == tok.eos_token_id:  # generate keeps the EOS it stopped at
                hf_new = hf_new[:-1]
            same = next((i for i, (a, b) in enumerate(zip(hf_new, cpp_new)) if a != b), min(len(hf_new), len(cpp_new)))
            rows.append({"prompt": prompt, "prompt_tokens_equal": cpp_ids == ids, "hf_tokens": len(hf_new),
                         "llama_cpp_tokens": len(cpp_new), "first_divergence": same if hf_new != cpp_new else None,
                         "identical": hf_new == cpp_new,
                         "hf_text": tok.decode(hf_new), "llama_cpp_text": tok.decode(cpp_new)})
            mark = "same" if hf_new == cpp_new else f"differs from token {same}"
            print(f"{prompt!r}: prompt ids {'equal' if cpp_ids == ids else 'DIFFER'}; continuation {mark}\n"
                  f"  transformers: {tok.decode(hf_new)!r}\n  llama.cpp:    {tok.decode(cpp_new)!r}")
    summary = {"outtype": args.outtype, "export_seconds": round(export_s, 1),
               "llama_cpp_version": getattr(llama_cpp, "__version__", "?"),
               "prompts_identical": sum(r["identical"] for r in rows), "prompts": len(rows),
               "prompt_ids_equal": sum(r["prompt_tokens_equal"] for r in rows), "rows": rows}
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
