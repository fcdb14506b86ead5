"""Benchmark of the merge library on a locally built ~125M-parameter Llama.

Prints, for each method: the CLI (streaming) merge's wall time and peak memory against the
size of one source model; the in-memory per-candidate merge time; and that time as a ratio to
one pass over all resident source tensors (summing them into a buffer: the memory-bound
limit). Targets: <= 3x for linear and task_arithmetic, <= 10x for ties; CLI peak memory below
one source model. When mergekit is installed (bench extra), it runs the same recipe too.

    PYTHONPATH=workflow python bench/merge.py [--layers 12 --hidden 768 ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"linear": 3.0, "task_arithmetic": 3.0, "ties": 10.0}


def build_models(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """A random base Llama and two "fine-tunes" (base + small noise), float32 safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    paths = {}
    for index, name in enumerate(["base", "math", "lang"]):
        if index:
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=generator), alpha=0.002)
        paths[name] = root / name
        model.save_pretrained(paths[name], safe_serialization=True)
    return paths


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def recipe_for(method: str, paths: dict[str, Path]) -> dict:
    density = {} if method in ("linear", "task_arithmetic") else {"density": 0.5}
    return {
        "merge_method": method, "base_model": str(paths["base"]),
        "models": [{"model": str(paths["math"]), "parameters": {"weight": 0.6, **density}},
                   {"model": str(paths["lang"]), "parameters": {"weight": 0.4, **density}}],
        "seed": 1,
    }


CLI_SNIPPET = """
import sys, time
from mergeflow import cli
cli.COMMAND_MODULES = ["mergeflow.commands.merge"]  # only the command under test

def status(field):
    # kB values from /proc: VmHWM is this process's own peak RSS (ru_maxrss would also count
    # what the parent held when it forked us)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

import torch  # imported before timing: we measure the merge, not the import
after_imports = status("VmRSS")
start = time.perf_counter()
code = cli.main(sys.argv[1:])
print(f"{time.perf_counter() - start} {status('VmHWM')} {after_imports}")
sys.exit(code)
"""


def run_cli_merge(recipe_path: Path, out_dir: Path) -> tuple[float, int, int]:
    """Wall time, peak RSS and RSS after imports (bytes) of a CLI merge in a child process."""
    result = subprocess.run(
        [sys.executable, "-c", CLI_SNIPPET, "merge", str(recipe_path), str(out_dir),
         "--max-shard-size", str(256 * 1024**2)],
        env={"PYTHONPATH": str(REPO / "workflow"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    seconds, peak, after_imports = result.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(peak), int(after_imports)


def summing_pass(merger) -> float:
    """Seconds for one pass over all resident source tensors, summed into a buffer."""
    names = list(merger.resident[merger.template])
    buffers = {name: torch.empty_like(merger.resident[merger.template][name]) for name in names}
    sources = list(merger.resident.values())

    def one_pass():
        for name in names:
            out = buffers[name]
            torch.add(sources[0][name], sources[1][name], out=out)
            for source in sources[2:]:
                out.add_(source[name])

    return best_time(one_pass, repeats=5)


def best_time(function, repeats: int) -> float:
    function()  # warm-up: first-touch page faults and allocator growth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def run_mergekit(recipe: dict, root: Path) -> float | str | None:
    """mergekit's wall time on the same recipe (None when not installed, a message when it
    fails: mergekit is an optional bench extra, never a dependency)."""
    executable = shutil.which("mergekit-yaml")
    if executable is None:
        return None
    mergekit_recipe = {k: v for k, v in recipe.items() if k != "seed"}
    path = root / "mergekit.yaml"
    path.write_text(yaml.safe_dump(mergekit_recipe))
    start = time.perf_counter()
    result = subprocess.run([executable, str(path), str(root / "mergekit-out")],
                            capture_output=True, text=True)
    shutil.rmtree(root / "mergekit-out", ignore_errors=True)
    if result.returncode != 0:
        return "failed: " + (result.stderr.strip().splitlines() or ["?"])[-1][:60]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 16 layers, vocabulary 8192: ~113M parameters with the embedding a realistic share of
    # them (CLI peak memory grows with the largest tensor; --vocab 32000 makes the embedding
    # and lm_head 40% of this small model)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="kept when given; else a temp dir")
    args = parser.parse_args()

    from mergeflow.merge import InMemoryMerger, recipe_from_dict

    root = Path(args.workdir or tempfile.mkdtemp(prefix="mergeflow-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        paths = build_models(root, args)
        size = model_bytes(paths["base"])
        n_params = size // 4
        print(f"models: 3 x {n_params / 1e6:.0f}M parameters, float32, {size / 2**20:.0f} MiB each "
              f"(built in {time.perf_counter() - start:.0f}s); largest tensor "
              f"{args.vocab * args.hidden * 4 / 2**20:.0f} MiB; torch threads {torch.get_num_threads()}")

        recipes = {method: recipe_for(method, paths) for method in args.methods.split(",")}
        cli_results = {}
        for method, recipe_data in recipes.items():  # before the merger fills this process
            recipe_path = root / f"{method}.yaml"
            recipe_path.write_text(yaml.safe_dump(recipe_data))
            cli_results[method] = run_cli_merge(recipe_path, root / f"out-{method}")
            shutil.rmtree(root / f"out-{method}")

        start = time.perf_counter()
        merger = InMemoryMerger(recipe_from_dict(recipes[next(iter(recipes))]))
        print(f"in-memory merger: sources loaded in {time.perf_counter() - start:.1f}s")
        reference = summing_pass(merger)
        print(f"one pass summing all resident source tensors: {reference * 1000:.0f} ms")
        rows = []
        for method, recipe_data in recipes.items():
            recipe = recipe_from_dict(recipe_data)
            merge_seconds = best_time(lambda: merger.merge(recipe), args.repeats)
            mergekit_seconds = run_mergekit(recipe_data, root)
            rows.append((method, *cli_results[method], merge_seconds, merge_seconds / reference,
                         mergekit_seconds))

        print()
        print(f"{'method':<16}{'CLI s':>8}{'CLI peak MiB':>14}{'(imports)':>11}{'peak/model':>12}"
              f"{'mem ms':>9}{'mem/pass':>10}{'target':>8}  mergekit")
        for method, cli_s, peak, baseline, mem_s, ratio, mk in rows:
            target = TARGETS.get(method)
            verdict = "" if target is None else ("ok" if ratio <= target else "MISSED")
            target_text = f"<={target:.0f}x {verdict}" if target else "-"
            if mk is None or isinstance(mk, str):
                mk_text = mk or "not installed"
            else:
                mk_text = f"{mk:.1f}s ({mk / cli_s:.1f}x our CLI)"
            print(f"{method:<16}{cli_s:>8.1f}{peak / 2**20:>14.0f}{baseline / 2**20:>11.0f}"
                  f"{peak / size:>12.2f}{mem_s * 1000:>9.0f}{ratio:>9.1f}x  {target_text:<11} {mk_text}")
        print("\nCLI peak = the merge process's peak RSS (VmHWM), including the python+torch "
              "imports (RSS after them in parentheses); peak/model < 1 meets the target. "
              "mem ms = best of the repeats after a warm-up merge.")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
