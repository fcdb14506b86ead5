"""A ``results/`` directory ready to publish with a paper: its ``README.md`` (what was run, on
what, the results, the figures, how to reproduce it) and the exact-version ``requirements.txt``
of the environment that ran; and the final merge's Hugging Face model card."""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml

from mergeflow.evolve.search import GRADIENT_OPTIMIZERS
from mergeflow.outputs import staged_dir
from mergeflow.report import MERGED

RESULTS = "results"
# A local build of torch (e.g. 2.13.0+cpu) comes from PyTorch's own index, not PyPI.
TORCH_INDEX = "https://download.pytorch.org/whl/{variant}"


def _relative(path: str | Path) -> str:
    return str(Path(path).relative_to(RESULTS)) if Path(path).is_relative_to(RESULTS) else str(path)


def requirements(out: str | Path) -> list[str]:
    """``name==version`` of every installed distribution (mergeflow itself, installed from the
    checkout, left out), sorted; a local torch build gets its index as a pip option."""
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "mergeflow":
            pins[name.lower()] = f"{name}=={dist.version}"
    lines = [pins[k] for k in sorted(pins)]
    header = ["# The exact packages of the environment that produced these results (mergeflow itself is the",
              "# checkout named in README.md): pip install -r requirements.txt"]
    torch = pins.get("torch", "")
    if "+" in torch:
        variant = torch.split("+", 1)[1]
        header.append(f"--extra-index-url {TORCH_INDEX.format(variant=variant)}")
    Path(out).write_text("\n".join(header + lines) + "\n")
    return lines


def _table(frame: pd.DataFrame) -> list[str]:
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return lines


def _runs_table(provenance: list[dict]) -> list[str]:
    rows = []
    for record in provenance:
        run = record["run"]
        rcfg = record["config"]["runs"][run]
        ecfg = rcfg.get("evolve")
        if ecfg is None:
            rows.append({"run": run, "tasks": ", ".join(rcfg.get("tasks") or []), "objectives": "", "fitness": "",
                         "optimizer": "", "candidates": "", "seed": record["seeds"]["run_seed"]})
            continue
        fitness = dict(ecfg["fitness"])
        kind = fitness.pop("kind")
        detail = ", ".join(f"{k} {v}" for k, v in sorted(fitness.items()) if not isinstance(v, dict))
        rows.append({"run": run, "tasks": ", ".join(rcfg.get("tasks") or []),
                     "objectives": ", ".join(f"{t} ({w})" for t, w in ecfg["objectives"].items()),
                     "fitness": f"{kind}" + (f" ({detail})" if detail else ""),
                     "optimizer": _optimizer(ecfg),
                     "candidates": f"{ecfg['population']} × {ecfg['generations']} generations",
                     "seed": record["seeds"]["run_seed"]})
    return _table(pd.DataFrame(rows))


def _optimizer(ecfg: dict) -> str:
    """The optimizer with the setting it reads: a gradient optimizer's learning rate, a Nevergrad
    optimizer's sigma (never the other's, which the run did not apply)."""
    if ecfg["optimizer"] in GRADIENT_OPTIMIZERS:
        return f"{ecfg['optimizer']}, learning rate {ecfg.get('learning_rate')}"
    return f"{ecfg['optimizer']}, sigma {ecfg.get('sigma')}"


def _models_table(provenance: list[dict]) -> list[str]:
    """Which weights the results were built on: every model's fingerprint (its check's), and the
    embedded zoo's, which differs between machines (CPU kernels)."""
    models: dict[str, dict] = {}
    for record in provenance:
        models.update(record.get("models", {}))
    if not models:
        return ["Not recorded (provenance.json predates model fingerprints)."]
    rows = [{"model": name, "location": f"`{entry['location']}`", "parameters": f"{entry['parameters']:,}",
             "fingerprint": f"`{entry['fingerprint'][:16]}`"} for name, entry in sorted(models.items())]
    zoo = next((r["zoo_fingerprint"] for r in provenance if r.get("zoo_fingerprint")), None)
    lines = _table(pd.DataFrame(rows))
    if zoo:
        lines += ["", f"The embedded zoo's fingerprint: `{zoo}`. The zoo is trained here, and its weights differ "
                  "between machines (CPU kernels): a rerun whose zoo fingerprint differs measures other models."]
    return lines


def _cost_table(tables: dict[str, str | Path]) -> list[str]:
    rows = []
    for run, path in tables.items():
        merged = pd.read_parquet(path)
        merged = merged[merged["model"] == MERGED]
        if merged.empty or "search_items" not in merged.columns:
            continue
        first = merged.iloc[0]
        rows.append({"run": run, "candidates": int(first["candidates"]),
                     "items evaluated": f"{int(first['search_items']):,}",
                     "search wall time (s)": f"{first['search_wall_s']:.0f}"})
    return _table(pd.DataFrame(rows)) if rows else ["No run searched."]


def results_readme(runs: list[str], provenance_paths: list[str], tables: dict[str, str | Path],
                   summary_path: str | None, figures: list[str], models: list[str], configfiles: list[str],
                   out: str | Path, requirements_out: str | Path) -> str:
    """Write ``results/README.md`` and ``results/requirements.txt``."""
    provenance = [json.loads(Path(p).read_text()) for p in provenance_paths]
    first = provenance[0]
    git, hw, packages = first["git"], first.get("hardware", {}), first["packages"]
    commit = git.get("commit") or "unknown"
    requirements(requirements_out)
    gpus = ", ".join(hw.get("gpus") or []) or "none"
    machine = (f"{hw['cpu']} ({hw['cpu_count']} cores, {hw['machine']}), GPUs: {gpus}" if hw
               else "not recorded (provenance.json predates hardware records)")
    config_args = "".join(f" --configfile {c}" for c in configfiles if Path(c).name != "config.yaml"
                          or Path(c).parent.name != "config")
    lines = ["# mergeflow results", "",
             f"Produced by mergeflow {packages.get('mergeflow')} at commit `{commit}`"
             + (" (with uncommitted changes)" if git.get("dirty") else "") + ", config "
             + ", ".join(f"`{c}`" for c in configfiles) + f", seed {first['seeds']['seed']}"
             + (f", zoo seed {first['seeds']['zoo_seed']}" if "zoo_seed" in first["seeds"] else "") + ".", "",
             f"**Hardware:** {machine}; device `{first['config']['evaluation']['device']}`, "
             f"dtype `{first['config']['evaluation']['dtype']}`. Float results differ across hardware (CPU and "
             "GPU kernels): compare figures measured on one machine.", "",
             "## What was run", ""] + _runs_table(provenance) + [
             "", "Each run's `runs/{run}/provenance.json` holds the whole validated config, the seeds, the "
             "commit, the package versions and the fingerprints of the weights it read.", "",
             "## Which weights", ""] + _models_table(provenance) + [""]
    if summary_path:
        body = Path(summary_path).read_text().splitlines()
        lines += ["## Test accuracy", ""] + [line.replace("## ", "### ") for line in body[1:]]
    named = {Path(f).stem: f for f in figures}
    if "accuracy" in named:
        lines += ["", f"![Test accuracy of every model on every task]({_relative(named['accuracy'])})", ""]
    lines += ["## Search cost", ""] + _cost_table(tables)
    if "search_cost" in named:
        lines += ["", f"![Search cost against test accuracy]({_relative(named['search_cost'])})", ""]
    lines += ["## Runs", ""]
    for run in runs:
        mine = [f for f in figures if f"/runs/{run}/" in f"/{f}"]
        model = next((m for m in models if f"/runs/{run}/" in f"/{m}"), None)
        lines += [f"### {run}", "", f"Table: [`runs/{run}/final/summary.md`](runs/{run}/final/summary.md)."
                  + (f" Final merge: [`{_relative(model)}/`]({_relative(model)}/README.md) (a Hugging Face "
                     "model directory with its card)." if model else ""), ""]
        for figure in mine:  # a paragraph each: one under the other
            lines += [f"![{Path(figure).stem.replace('_', ' ')} of run {run}]({_relative(figure)})", ""]
    irt = [f for f in figures if Path(f).stem.startswith("irt_")]
    if irt:
        lines += ["## IRT fits", ""]
        for figure in irt:
            lines += [f"![IRT fit of {Path(figure).stem[4:]}]({_relative(figure)})", ""]
    lines += ["## Package versions", "", f"Python {first['python']}.", ""]
    lines += _table(pd.DataFrame({"package": list(packages), "version": [v or "" for v in packages.values()]}))
    lines += ["", "Every installed package with its exact version: [`requirements.txt`](requirements.txt).", "",
              "## How to reproduce", "", "```bash",
              "git clone <this repository> mergeflow && cd mergeflow", f"git checkout {commit}",
              "pip install -r results/requirements.txt   # the exact environment that ran",
              "pip install --no-deps -e .",
              f"snakemake --cores 1{config_args}", "```", "",
              "On the same hardware this reproduces the histories, anchor sets, IRT fits, merged models and "
              "accuracies byte for byte (wall times and logs differ); on other hardware expect small float "
              "differences.", ""]
    text = "\n".join(lines)
    Path(out).write_text(text)
    return text


# ---- the final merge's model card ---------------------------------------------------------------


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system: copy
        shutil.copyfile(source, target)


def final_model(run: str, merge_dir: str | Path, table_path: str | Path, model_ids: list[str],
                out_dir: str | Path) -> Path:
    """The published final merge: the scored merge's files (hard links) and a model card in the
    Hugging Face conventions — YAML metadata (``base_model``, ``tags``, ``library_name``), the
    recipe, the lineage and the test-split evaluation table."""
    merge_dir = Path(merge_dir)
    body = (merge_dir / "README.md").read_text()
    if body.startswith("---\n"):  # the merge's own front matter is replaced by the fuller one below
        body = body.split("\n---\n", 1)[1]
    meta = {"base_model": model_ids, "base_model_relation": "merge", "library_name": "transformers",
            "tags": ["merge", "mergeflow"]}
    table = pd.read_parquet(table_path)
    wide = table.pivot_table(index="task", columns="model", values="accuracy", sort=False)
    models = [MERGED] + [m for m in wide.columns if m != MERGED]
    items = table.groupby("task")["items"].first()
    evaluation = ["", "## Evaluation", "",
                  f"Test-split accuracy of this merge (run `{run}`) beside its sources and the uniform baseline "
                  "merge, scored by mergeflow's evaluator (agrees item for item with lm-evaluation-harness).", "",
                  "| task | test items | " + " | ".join("**this merge**" if m == MERGED else m for m in models) + " |",
                  "|---|---|" + "---|" * len(models)]
    for task, row in wide.iterrows():
        evaluation.append(f"| {task} | {int(items[task])} | " + " | ".join(f"{row[m]:.3f}" for m in models) + " |")
    card = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body.rstrip("\n") + "\n" + "\n".join(evaluation)
    with staged_dir(out_dir, force=True, protected=[merge_dir]) as stage:
        for path in sorted(merge_dir.iterdir()):
            # hidden files are not the model's (Snakemake's .snakemake_timestamp: a shared inode
            # would make touching one output touch the other)
            if path.name != "README.md" and not path.name.startswith("."):
                _link_or_copy(path, stage / path.name)
        (stage / "README.md").write_text(card + "\n")
    return Path(out_dir)
