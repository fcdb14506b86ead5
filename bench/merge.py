"""Benchmark of `mergeflow merge` against `mergekit-yaml` run in the same script.

On a locally built Llama (default: the issue's 134M-parameter float32 shape, vocabulary 32,000,
hidden 768, 12 layers) and three "fine-tunes" of it (base + noise), merges one recipe per method
(weights 0.5/0.3/0.2, density 0.5) with both tools, each as its own process at torch's default
threads, best of ``--repeats``, quiet and with ``--busy`` processes spinning on the cores.
Prints per method: wall time of each whole process and its ratio, the time spent importing
(process start and imports, reported apart, like the source read time: the I/O floor of reading
every source and writing one model), peak RSS above the imports as a fraction of one source
model, and the largest |difference| between the two outputs' tensors for the deterministic
methods. Then the in-memory merger's per-candidate time as a ratio to one pass over the resident
sources (the search's merges).

mergekit is never a mergeflow dependency: the bench creates (or reuses) a virtualenv at
``--peer-venv`` with the CPU torch of this environment and mergekit pinned.

    PYTHONPATH=workflow python bench/merge.py [--modes quiet,busy] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PEER = "mergekit==0.1.5"
DEFAULT_PEER_VENV = Path.home() / ".cache" / "mergeflow" / "bench" / "mergekit-0.1.5"
# Speed targets against mergekit (issue 13), by method; in-memory targets against one pass.
# (issue 31: >= 1.5x for the whole-tensor methods and the methods mergekit 0.1.5 added too).
SPEED_TARGETS = {"ties": 5.0, "task_arithmetic": 1.5, "linear": 1.5, "dare_ties": 1.5, "della": 1.5,
                 **{m: 1.5 for m in ("slerp", "model_stock", "breadcrumbs", "breadcrumbs_ties", "nuslerp",
                                     "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram",
                                     "ramplus_tl")}}
MEMORY_TARGET = 0.40  # peak RSS above imports, as a fraction of one source model
PARITY_TOLERANCE = 1e-5
IN_MEMORY_TARGETS = {"linear": 3.0, "task_arithmetic": 3.0, "ties": 10.0}
TIMED = ["linear", "task_arithmetic", "ties", "dare_ties", "della"]
# Deterministic methods both implement: compared once for parity, not timed.
PARITY_ONLY = ["breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock", "ties-argsort", "breadcrumbs-argsort",
               "breadcrumbs_ties-argsort", "nuslerp", "multislerp", "karcher", "sce", "nearswap", "ram", "ramplus_tl"]
# Not arcee_fusion: on tensors above 1M entries mergekit takes its quartiles from a random sample
# (unseeded), mergeflow from the whole tensor; tests/test_merge_peer.py compares it on tiny models
# (``--parity arcee_fusion`` shows how far apart they are here).
# The methods mergekit 0.1.5 added: (fine-tunes with their weights, None: no parameters), method
# parameters, whether the base is named; parameters sized to the fine-tunes' noise (sd 0.002).
NEW_METHOD_RECIPES = {
    "nuslerp": ((("ft1", 0.6), ("ft2", 0.4)), {}, True),
    "multislerp": ((("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.2)), {}, True),
    "karcher": ((("ft1", None), ("ft2", None), ("ft3", None)), {}, False),
    "sce": ((("ft1", None), ("ft2", None), ("ft3", None)), {"select_topk": 0.5}, True),
    "nearswap": ((("ft1", None),), {"t": 0.002}, True),
    "arcee_fusion": ((("ft1", None),), {}, True),
    "ram": ((("ft1", None), ("ft2", None), ("ft3", None)), {"epsilon": 0.002}, True),
    "ramplus_tl": ((("ft1", None), ("ft2", None), ("ft3", None)), {"epsilon": 0.002}, True),
}
# Rows that are a method with mergeflow-only parameters: TIES with the opt-in ``tie_break:
# argsort`` (mergekit's order among tied entries); mergekit runs the plain method.
VARIANTS = {"ties-argsort": ("ties", {"tie_break": "argsort"}),
            "breadcrumbs-argsort": ("breadcrumbs", {"tie_break": "argsort"}),
            "breadcrumbs_ties-argsort": ("breadcrumbs_ties", {"tie_break": "argsort"})}
RANDOM = {"dare_ties", "della"}
# timed, not compared: arcee_fusion's quartiles come from mergekit's unseeded sample at this size
NO_PARITY = RANDOM | {"arcee_fusion"}


# --------------------------------------------------------------------------------------------
# Models and recipes


def build_models(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """A random base Llama (or ``--base-model``) and three "fine-tunes" (base + small noise),
    float32 safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergeflow.zoo.build import build_tokenizer

    names = ["base", "ft1", "ft2", "ft3"]
    if args.base_model:
        return real_models(root, Path(args.base_model), names)
    if all((root / name / "config.json").is_file() for name in names):
        for name in names:  # models built before the bench saved a tokenizer: mergeflow needs one
            if not (root / name / "tokenizer.json").is_file():
                build_tokenizer().save_pretrained(root / name)
        return {name: root / name for name in names}
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for index, name in enumerate(names):
        if index:
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    param.copy_(base[key] + 0.002 * torch.randn(param.shape, generator=generator))
        paths[name] = root / name
        model.save_pretrained(paths[name], safe_serialization=True)
        build_tokenizer().save_pretrained(paths[name])  # copied with the merge, never used here
    return paths


def real_models(root: Path, source: Path, names: list[str]) -> dict[str, Path]:
    """``source`` (an HF directory, e.g. SmolLM2-135M converted from its GGUF) as the base, in
    float32, and three fine-tunes of it (base + noise of sd 0.002), as a new user would merge."""
    from safetensors.torch import load_file, save_file

    paths = {name: root / name for name in names}
    if all((path / "config.json").is_file() for path in paths.values()):
        return paths
    tensors = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update({key: value.float() for key, value in load_file(file).items()})
    for index, name in enumerate(names):
        paths[name].mkdir(parents=True, exist_ok=True)
        for extra in source.iterdir():
            if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != "model.safetensors.index.json":
                shutil.copyfile(extra, paths[name] / extra.name)
        generator = torch.Generator().manual_seed(index)
        weights = tensors if not index else {
            key: value + 0.002 * torch.randn(value.shape, generator=generator) for key, value in tensors.items()}
        save_file(weights, paths[name] / "model.safetensors", metadata={"format": "pt"})
    return paths


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def recipe_for(method: str, paths: dict[str, Path]) -> dict:
    """The recipe of ``method``: the three fine-tunes on the base, weights 0.5/0.3/0.2 and
    density 0.5 where the method reads them (slerp: base and the first, t = 0.5)."""
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(paths["base"]),
                "models": [{"model": str(paths["base"])}, {"model": str(paths["ft1"])}],
                "parameters": {"t": 0.5}, "dtype": "float32"}
    if method in NEW_METHOD_RECIPES:
        models, parameters, with_base = NEW_METHOD_RECIPES[method]
        recipe = {"merge_method": method, "dtype": "float32", "models": [
            {"model": str(paths[n]), **({} if w is None else {"parameters": {"weight": w}})} for n, w in models]}
        recipe.update({"parameters": dict(parameters)} if parameters else {})
        recipe.update({"base_model": str(paths["base"])} if with_base else {})
        return recipe
    if method == "model_stock":
        return {"merge_method": method, "base_model": str(paths["base"]),
                "models": [{"model": str(paths[n])} for n in ("ft1", "ft2", "ft3")], "dtype": "float32"}
    dense = method in ("linear", "task_arithmetic")
    models = [{"model": str(paths[n]), "parameters": {"weight": w, **({} if dense else {"density": 0.5})}}
              for n, w in (("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.2))]
    recipe = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":
        recipe["base_model"] = str(paths["base"])
    return recipe


# --------------------------------------------------------------------------------------------
# Running each side as its own process

# Imports first, then the timed merge; prints seconds, peak RSS (VmHWM: this process's own
# peak, unlike ru_maxrss, which counts what a forking parent held) and RSS after the imports.
RUNNER = """
import sys, time
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
started = float(sys.argv[1])
tool, args = sys.argv[2], sys.argv[3:]
import torch
if tool == "mergeflow":
    from mergeflow import cli
    run = lambda: cli.main(["merge", *args]) == 0 or sys.exit("mergeflow merge failed")
else:
    from mergekit.scripts.run_yaml import main as mergekit_main
    run = lambda: mergekit_main(args, standalone_mode=False)
after_imports = status("VmRSS")
imported = time.time()
start = time.perf_counter()
run()
print("RESULT", time.perf_counter() - start, status("VmHWM"), after_imports, imported - started)
"""


def peer_python(venv: Path) -> Path:
    """The peer virtualenv's python, creating the venv with this torch and mergekit pinned."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "mergekit-yaml").is_file():
        print(f"creating the peer virtualenv {venv} ({PEER}, torch {torch.__version__})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        torch_pin = "torch==" + torch.__version__.split("+")[0]
        subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin, PEER], check=True)
    return python


def versions(python: Path) -> str:
    code = ("import torch, importlib.metadata as m; "
            "print(f\"mergekit {m.version('mergekit')}, torch {torch.__version__}\")")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def run_side(tool: str, python: Path, recipe: Path, out: Path, extra: list[str]) -> dict:
    """One merge as its own process: wall time of the process, in-process merge time, import
    time, peak RSS and RSS after imports."""
    shutil.rmtree(out, ignore_errors=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    if tool == "mergeflow":
        env["PYTHONPATH"] = str(REPO / "workflow")
    start = time.time()
    result = subprocess.run([str(python), "-c", RUNNER, str(start), tool, str(recipe), str(out), *extra],
                            env=env, capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{result.stderr[-3000:]}")
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT")][-1].split()
    return {"wall": wall, "merge": float(line[1]), "peak": int(line[2]), "imports_rss": int(line[3]),
            "import_s": float(line[4])}


def best_of(runs: list[dict]) -> dict:
    """The run with the least wall time; peak RSS is the largest seen over the runs."""
    best = dict(min(runs, key=lambda r: r["wall"]))
    best["peak_above"] = max(r["peak"] - r["imports_rss"] for r in runs)
    return best


def io_floor(paths: dict[str, Path], out: Path) -> float:
    """Seconds for a process to read every source file and write one model's bytes (the
    source-load cost both tools pay, reported apart)."""
    code = """
import sys, time, pathlib
start = time.perf_counter()
data = None
for path in sys.argv[2:]:
    for file in sorted(pathlib.Path(path).glob("*.safetensors")):
        data = file.read_bytes()
pathlib.Path(sys.argv[1]).write_bytes(data)
print(time.perf_counter() - start)
"""
    result = subprocess.run([sys.executable, "-c", code, str(out), *map(str, paths.values())],
                            capture_output=True, text=True, check=True)
    out.unlink()
    return float(result.stdout)


# --------------------------------------------------------------------------------------------
# Parity


def tensor_files(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            files.update({name: file for name in handle.keys()})
    return files


def compare(ours: Path, theirs: Path) -> tuple[float, int, int]:
    """Largest |difference| over every tensor, the entries differing by more than the parity
    tolerance and the entries in all."""
    from safetensors import safe_open

    mine, peer = tensor_files(ours), tensor_files(theirs)
    if set(mine) != set(peer):
        raise RuntimeError(f"tensor names differ: {sorted(set(mine) ^ set(peer))[:5]}")
    worst, differing, total = 0.0, 0, 0
    for name, file in mine.items():
        with safe_open(file, framework="pt") as a, safe_open(peer[name], framework="pt") as b:
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
        diff = (x - y).abs()
        worst = max(worst, float(diff.max()))
        differing += int(torch.count_nonzero(diff > PARITY_TOLERANCE))
        total += diff.numel()
    return worst, differing, total


# --------------------------------------------------------------------------------------------
# In-memory merges (the search's)


def best_time(function, repeats: int) -> float:
    function()  # warm-up: first-touch page faults and allocator growth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def in_memory(recipes: dict[str, dict], repeats: int) -> None:
    from mergeflow.merge import InMemoryMerger, recipe_from_dict

    start = time.perf_counter()
    merger = InMemoryMerger(recipe_from_dict(recipes["task_arithmetic"]))
    print(f"\nin-memory merger (the search's): sources loaded in {time.perf_counter() - start:.1f}s")
    names = list(merger.resident[merger.template])
    buffers = {name: torch.empty_like(merger.resident[merger.template][name]) for name in names}
    sources = list(merger.resident.values())

    def one_pass():
        for name in names:
            torch.add(sources[0][name], sources[1][name], out=buffers[name])
            for source in sources[2:]:
                buffers[name].add_(source[name])

    reference = best_time(one_pass, 5)
    print(f"one pass summing all resident source tensors: {reference * 1000:.0f} ms")
    for method, target in IN_MEMORY_TARGETS.items():
        recipe = recipe_from_dict(recipes[method])
        seconds = best_time(lambda: merger.merge(recipe), repeats)
        verdict = "ok" if seconds / reference <= target else "MISSED"
        print(f"  {method:<16}{seconds * 1000:>7.0f} ms  {seconds / reference:>5.1f}x one pass "
              f"(target <= {target:.0f}x: {verdict})")


# --------------------------------------------------------------------------------------------


def spin(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run_mode(mode: str, args, python: Path, recipes: dict[str, Path], root: Path, size: int) -> None:
    busy = spin(args.busy) if mode == "busy" else []
    try:
        load = os.getloadavg()
        print(f"\n## {mode}: {len(busy)} busy process(es) beside the merges; load average "
              f"{load[0]:.2f} at start", flush=True)
        header = (f"{'method':<18}{'mergekit s':>11}{'mergeflow s':>12}{'ratio':>7}{'target':>12}"
                  f"{'(merge only)':>13}{'imports s':>11}{'peak/model':>16}{'max |diff|':>12}")
        print(header)
        for method in args.timed:
            runs: dict[str, list[dict]] = {"mergekit": [], "mergeflow": []}
            for _ in range(args.repeats):  # alternating, so load changes hit both sides alike
                for tool in runs:
                    runs[tool].append(run_side(tool, python if tool == "mergekit" else Path(sys.executable),
                                               recipes[(tool, method)], root / f"out-{tool}",
                                               args.mergekit_args if tool == "mergekit" else []))
            rows = {tool: best_of(tool_runs) for tool, tool_runs in runs.items()}
            parity = ""
            if method not in NO_PARITY:
                worst, differing, _ = compare(root / "out-mergeflow", root / "out-mergekit")
                parity = f"{worst:.1e}" + (f" ({differing} entries)" if differing else "")
            mk, mf = rows["mergekit"], rows["mergeflow"]
            ratio = mk["wall"] / mf["wall"]
            target = SPEED_TARGETS.get(method)
            verdict = "" if target is None else f">={target:.1f} {'ok' if ratio >= target else 'MISSED'}"
            memory = mf["peak_above"] / size
            mem_text = f"{mk['peak_above'] / size:.2f}/{memory:.2f}" + (" ok" if memory <= MEMORY_TARGET else " MISSED")
            print(f"{method:<18}{mk['wall']:>11.1f}{mf['wall']:>12.1f}{ratio:>6.1f}x{verdict:>12}"
                  f"{mk['merge'] / mf['merge']:>12.1f}x{mk['import_s']:>5.1f}/{mf['import_s']:<5.1f}"
                  f"{mem_text:>16}  {parity}", flush=True)
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    finally:
        for process in busy:
            process.kill()
            process.wait()


def parity_only(args, python: Path, recipes: dict, root: Path) -> None:
    print("\n## parity of the other deterministic methods both implement (one run each)")
    for method in args.parity:
        theirs = run_side("mergekit", python, recipes[("mergekit", method)], root / "out-mergekit", args.mergekit_args)
        ours = run_side("mergeflow", Path(sys.executable), recipes[("mergeflow", method)], root / "out-mergeflow", [])
        worst, differing, total = compare(root / "out-mergeflow", root / "out-mergekit")
        verdict = "ok" if worst <= PARITY_TOLERANCE else "MISSED"
        print(f"  {method:<18} max |diff| {worst:.1e} ({differing} of {total} entries differ by more "
              f"than {PARITY_TOLERANCE:g}): {verdict}; wall mergekit {theirs['wall']:.1f} s, "
              f"mergeflow {ours['wall']:.1f} s", flush=True)


# Float64 references of the spherical methods, written from their definitions as vectors (not
# mergeflow's coefficient form): where the two tools differ on a large tensor, which is right.
def _multislerp64(models: list[torch.Tensor], base: torch.Tensor, weights: list[float], eps: float = 1e-8) -> torch.Tensor:
    deltas = [m - base for m in models]
    total = sum(weights)
    weights = [w / total for w in weights]
    norms = [torch.linalg.vector_norm(d) for d in deltas]
    units = [d / (n + eps) for d, n in zip(deltas, norms)]
    mean = sum(w * u for w, u in zip(weights, units))
    mean = mean / torch.linalg.vector_norm(mean)
    tangent = sum(w * (u - torch.dot(u, mean) * mean) for w, u in zip(weights, units))
    length = torch.linalg.vector_norm(tangent) + eps
    direction = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    return direction * sum(w * n for w, n in zip(weights, norms)) + base


def _karcher64(models: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(m) for m in models]
    units = [m / n for m, n in zip(models, norms)]
    mean = sum(units) / len(units)
    mean = mean / torch.linalg.vector_norm(mean)
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for unit in units:
            cosine = torch.dot(mean, unit).clamp(-1.0, 1.0)
            theta = torch.acos(cosine)
            if theta < tol:
                continue
            step += (theta / torch.sin(theta)) * (unit - cosine * mean) / len(units)
        length = torch.linalg.vector_norm(step)
        if length < tol:
            break
        mean = mean * torch.cos(length) + step * (torch.sin(length) / length)
        mean = mean / torch.linalg.vector_norm(mean)
    return mean * (sum(norms) / len(norms))


REFERENCES = {"multislerp": lambda t: _multislerp64([t["ft1"], t["ft2"], t["ft3"]], t["base"], [0.5, 0.3, 0.2]),
              "karcher": lambda t: _karcher64([t["ft1"], t["ft2"], t["ft3"]])}


def reference_rows(args, python: Path, recipes: dict, root: Path, paths: dict[str, Path]) -> None:
    """For the spherical methods, both tools' embedding matrix against a float64 reference."""
    from safetensors import safe_open

    name = "model.embed_tokens.weight"
    print(f"\n## against float64 references ({name}, the largest tensor)")
    for method in args.reference:
        run_side("mergekit", python, recipes[("mergekit", method)], root / "out-mergekit", args.mergekit_args)
        run_side("mergeflow", Path(sys.executable), recipes[("mergeflow", method)], root / "out-mergeflow", [])
        sources = {}
        for model, path in paths.items():
            with safe_open(tensor_files(path)[name], framework="pt") as handle:
                sources[model] = handle.get_tensor(name).double().reshape(-1)
        reference = REFERENCES[method](sources)
        errors = {}
        for tool in ("mergeflow", "mergekit"):
            out = root / f"out-{tool}"
            with safe_open(tensor_files(out)[name], framework="pt") as handle:
                errors[tool] = float((handle.get_tensor(name).double().reshape(-1) - reference).abs().max())
        print(f"  {method:<18} max |x - float64 reference|: mergeflow {errors['mergeflow']:.1e}, "
              f"mergekit {errors['mergekit']:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default=None,
                        help="an HF model directory to merge fine-tunes of (default: a random Llama of the shape below)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--timed", type=lambda s: [m for m in s.split(",") if m], default=TIMED)
    parser.add_argument("--parity", type=lambda s: [m for m in s.split(",") if m], default=PARITY_ONLY)
    parser.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m], default=["quiet", "busy"])
    parser.add_argument("--reference", type=lambda s: [m for m in s.split(",") if m], default=list(REFERENCES),
                        help="spherical methods compared with a float64 reference on the embedding matrix")
    parser.add_argument("--busy", type=int, default=1, help="spinning processes in the busy mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-in-memory", action="store_true", help="skip the in-memory merger's figures")
    parser.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV,
                        help=f"virtualenv with {PEER} (created when missing; default {DEFAULT_PEER_VENV})")
    parser.add_argument("--mergekit-args", type=lambda s: s.split(), default=["--no-cuda", "--quiet"])
    parser.add_argument("--workdir", default=None, help="kept (and models reused) when given; else a temp dir")
    args = parser.parse_args()

    python = peer_python(args.peer_venv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="mergeflow-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        paths = build_models(root, args)
        size = model_bytes(paths["base"])
        shape = (f"{args.base_model}" if args.base_model else
                 f"vocabulary {args.vocab}, hidden {args.hidden}, {args.layers} layers")
        print(f"models: base + 3 fine-tunes, {size // 4 / 1e6:.0f}M parameters, float32, "
              f"{size / 1e6:.0f} MB each (ready in {time.perf_counter() - start:.0f}s); {shape}")
        print(f"peer: {versions(python)} in {args.peer_venv}; mergekit-yaml {' '.join(args.mergekit_args)}")
        print(f"mergeflow: torch {torch.__version__}; both at torch's default threads "
              f"({torch.get_num_threads()}), {os.cpu_count()} cores")
        recipes = {}
        for method in dict.fromkeys(args.timed + args.parity + args.reference):
            base_method, ours = VARIANTS.get(method, (method, {}))
            data = recipe_for(base_method, paths)
            sides = {"mergeflow": {**data, "seed": 1}, "mergekit": data}
            if ours:  # added to the method's own parameters (slerp's t), not in their place
                sides["mergeflow"]["parameters"] = {**data.get("parameters", {}), **ours}
            for tool, recipe in sides.items():
                path = root / f"{tool}-{method}.yaml"
                path.write_text(yaml.safe_dump(recipe))
                recipes[(tool, method)] = path
        floor = io_floor(paths, root / "floor.bin")
        print(f"source load (I/O floor: read the 4 sources, write one model): {floor:.1f}s")
        for mode in args.modes:
            run_mode(mode, args, python, recipes, root, size)
        print("\nwall = the whole process (start, imports, merge, writing), best of "
              f"{args.repeats}; ratio = mergekit / mergeflow; (merge only) = the same ratio without "
              "process start and imports; imports s = mergekit/mergeflow start and imports; "
              "peak/model = peak RSS above the imports / one source model's bytes, "
              f"mergekit/mergeflow (target <= {MEMORY_TARGET:.2f}); max |diff| over every "
              f"tensor (target <= {PARITY_TOLERANCE:g}; in parentheses the entries beyond it; seeded "
              "methods: speed only)")
        if args.parity:
            parity_only(args, python, recipes, root)
        if args.reference:
            reference_rows(args, python, recipes, root, paths)
        if not args.no_in_memory:
            in_memory({m: recipe_for(m, paths) | {"seed": 1} for m in IN_MEMORY_TARGETS}, args.repeats)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
