"""Is the embedded zoo the same on every CPU code path of one machine?

Trains the default config's zoo (`snakemake results/zoo/{base,math,lang} --cores 1`) in fresh
working directories, per zoo.kernels setting and per CPU code path this x86-64 machine can show,
and compares the weights:

- `zoo.kernels: native` (the default) with the environment as it is; again (the control:
  training is deterministic on one path); and with `ATEN_CPU_CAPABILITY=avx2`, torch's kernels
  as an AVX2 machine would run them (MKL's and oneDNN's dispatch too: `MKL_ENABLE_INSTRUCTIONS`,
  `ONEDNN_MAX_CPU_ISA`);
- `zoo.kernels: avx2` with the environment as it is, and as an AVX2 machine would run it.

Prints, per path and model, the weights' fingerprint (mergeflow.check.weights_fingerprint, what
results/README.md lists) and the largest |difference| from the first row of its setting; with
`--history`, also the hash of the `full` search's history.parquet on each zoo:

    python bench/zoo_code_paths.py --workdir /tmp/zoo-paths [--history] [--kernels avx2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# (zoo.kernels, environment) per row
PATHS = {
    "native": ("native", {}),
    "native again": ("native", {}),
    "native, AVX2 machine": ("native", AVX2_MACHINE),
    "avx2": ("avx2", {}),
    "avx2, AVX2 machine": ("avx2", AVX2_MACHINE),
}
MODELS = ("base", "math", "lang")


def train(workdir: Path, kernels: str, env: dict[str, str], history: bool) -> float:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    overlay = workdir / "kernels.yaml"
    overlay.write_text(f"zoo: {{kernels: {kernels}}}\n")
    targets = [f"results/zoo/{m}" for m in MODELS] + (["results/runs/full/evolve/history.parquet"] if history else [])
    start = time.perf_counter()
    # targets first: --configfile and --quiet take every word after them
    subprocess.run([sys.executable, "-m", "snakemake", *targets, "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                    "--cores", "1", "--quiet", "progress", "--configfile", str(REPO / "config" / "config.yaml"),
                    str(overlay)], check=True, env={**os.environ, **env})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--history", action="store_true", help="also run the full search on each zoo")
    parser.add_argument("--kernels", choices=["native", "avx2"], nargs="+", default=["native", "avx2"],
                        help="the zoo.kernels settings to compare (default both)")
    args = parser.parse_args()
    paths = {name: path for name, path in PATHS.items() if path[0] in args.kernels}
    import torch
    from safetensors.torch import load_file

    from mergeflow.check import weights_fingerprint

    dirs = {name: args.workdir / name.replace(" ", "-").replace(",", "") for name in paths}
    walls = {name: train(dirs[name], kernels, env, args.history) for name, (kernels, env) in paths.items()}
    print(f"torch {torch.__version__}, CPU capability here: {torch.backends.cpu.get_cpu_capability()}")
    print("| zoo.kernels | code path | model | fingerprint | max abs diff from the setting's first row | wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, (kernels, env) in paths.items():
        first = next(n for n, (k, _) in paths.items() if k == kernels)
        for model in MODELS:
            ref = load_file(dirs[first] / "results" / "zoo" / model / "model.safetensors")
            mine = load_file(dirs[name] / "results" / "zoo" / model / "model.safetensors")
            diff = max(float((mine[k].double() - ref[k].double()).abs().max()) for k in ref)
            fingerprint = weights_fingerprint(model, dirs[name] / "results" / "zoo" / model)
            print(f"| {kernels} | {name} | {model} | `{fingerprint[:16]}` | {diff:.3g} | {walls[name]:.0f} |")
    if args.history:
        import hashlib

        print("\n| zoo.kernels | code path | full search history.parquet (sha256) |\n|---|---|---|")
        for name, (kernels, _) in paths.items():
            path = dirs[name] / "results" / "runs" / "full" / "evolve" / "history.parquet"
            print(f"| {kernels} | {name} | `{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}` |")


if __name__ == "__main__":
    main()
