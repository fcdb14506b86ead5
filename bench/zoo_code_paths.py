"""Is the embedded zoo the same on every CPU code path of one machine?

Trains the default config's zoo (`snakemake results/zoo/{base,math,lang} --cores 1`) in fresh
working directories under each code path this x86-64 machine offers, and compares the weights:

- `default`: what torch picks here (its CPU capability, MKL's and oneDNN's own ISA dispatch);
- `default again`: the same, a second time (the control: training is deterministic on one path);
- `aten avx2`: `ATEN_CPU_CAPABILITY=avx2` (torch's own vectorised kernels at AVX2);
- `all avx2`: that, plus `MKL_ENABLE_INSTRUCTIONS=AVX2` (MKL's BLAS) and `ONEDNN_MAX_CPU_ISA=AVX2`.

Prints, per path and model, the weights' fingerprint (mergeflow.check.weights_fingerprint, what
results/README.md lists) and the largest |difference| from `default` over every tensor:

    python bench/zoo_code_paths.py --workdir /tmp/zoo-paths
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

PATHS = {
    "default": {},
    "default again": {},
    "aten avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "all avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
MODELS = ("base", "math", "lang")


def train(workdir: Path, env: dict[str, str]) -> float:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                    "--configfile", str(REPO / "config" / "config.yaml"), "--cores", "1", "--quiet",
                    *[f"results/zoo/{m}" for m in MODELS]], check=True, env={**os.environ, **env})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    from mergeflow.check import weights_fingerprint

    walls = {name: train(args.workdir / name.replace(" ", "-"), env) for name, env in PATHS.items()}
    weights = {name: {m: load_file(args.workdir / name.replace(" ", "-") / "results" / "zoo" / m / "model.safetensors")
                      for m in MODELS} for name in PATHS}
    print(f"torch {torch.__version__}, CPU capability here: {torch.backends.cpu.get_cpu_capability()}")
    print("| code path | env | model | fingerprint | max abs diff from default | zoo wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, env in PATHS.items():
        for model in MODELS:
            ref, mine = weights["default"][model], weights[name][model]
            diff = max(float((mine[k].double() - ref[k].double()).abs().max()) for k in ref)
            fingerprint = weights_fingerprint(model, args.workdir / name.replace(" ", "-") / "results" / "zoo" / model)
            print(f"| {name} | {' '.join(f'{k}={v}' for k, v in env.items()) or '-'} | {model} | `{fingerprint[:16]}` "
                  f"| {diff:.3g} | {walls[name]:.0f} |")


if __name__ == "__main__":
    main()
