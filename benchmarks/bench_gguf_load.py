"""Seconds to load a .gguf model's tokenizer, config and weights: straight from the file, and through
promptbake's cache (first load converts, second reads the cache). Each load runs in a fresh process,
as distill, eval and chat do.

    python benchmarks/bench_gguf_load.py                 # SmolLM2 and Gemma 3 270M, when installed
    python benchmarks/bench_gguf_load.py --model F.gguf  # one file
    python benchmarks/bench_gguf_load.py --no-direct     # skip the (slow) straight-from-file baseline

The cache used is a fresh temporary folder (PROMPTBAKE_CACHE), so "first" really converts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import smollm2_path  # noqa: E402

_CHILD = r"""
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from promptbake.models import load_config, load_model, load_tokenizer, resolve_model
path, mode = sys.argv[1], sys.argv[2]
t_import = time.perf_counter()
times = {}
if mode == "direct":  # what promptbake did before the cache: transformers parses the file for each
    kw = dict(gguf_file=Path(path).name, local_files_only=True)
    folder = str(Path(path).parent)
    t = time.perf_counter(); AutoTokenizer.from_pretrained(folder, **kw); times["tokenizer"] = time.perf_counter() - t
    t = time.perf_counter(); AutoConfig.from_pretrained(folder, **kw); times["config"] = time.perf_counter() - t
    t = time.perf_counter(); AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    times["model"] = time.perf_counter() - t
else:
    src = resolve_model(path)
    t = time.perf_counter(); load_tokenizer(src); times["tokenizer"] = time.perf_counter() - t
    t = time.perf_counter(); load_config(src); times["config"] = time.perf_counter() - t
    t = time.perf_counter(); load_model(src, quant="none", device=torch.device("cpu"), dtype=torch.float32)
    times["model"] = time.perf_counter() - t
times["total"] = sum(times.values())
print("RESULT " + json.dumps({k: round(v, 1) for k, v in times.items()}))
"""


def run(path: str, mode: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, path, mode], env=env, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        sys.exit(f"{mode} load of {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="a .gguf file (repeatable); default: the installed ones")
    parser.add_argument("--no-direct", action="store_true", help="skip loading straight from the file")
    args = parser.parse_args()
    models = args.model
    if not models:
        from promptbake.gguf_cache import gemma3_270m_gguf, gemma3_270m_parts

        models = [smollm2_path()] + ([str(gemma3_270m_gguf())] if gemma3_270m_parts() else [])
    root = Path(__file__).resolve().parent.parent
    for path in models:
        with tempfile.TemporaryDirectory(prefix="promptbake-bench-cache-") as cache:
            env = {**os.environ, "PROMPTBAKE_CACHE": cache, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
            rows = [] if args.no_direct else [("straight from the file", run(path, "direct", env))]
            rows.append(("promptbake, first load (converts)", run(path, "cache", env)))
            rows.append(("promptbake, second load (cache)", run(path, "cache", env)))
        print(f"\n{Path(path).name}  (seconds; tokenizer + config + model)")
        for name, t in rows:
            print(f"  {name:<36} {t['tokenizer']:7.1f} {t['config']:7.1f} {t['model']:7.1f}   total {t['total']:6.1f}")


if __name__ == "__main__":
    main()
