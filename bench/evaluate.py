"""Evaluator throughput: items per second, as a ratio to a bare batched forward pass.

The bare pass runs the same model over exactly the same padded token batches the evaluator
builds (same lengths, same batch size) and does nothing else; the ratio says how much the
evaluator's tokenization, batching and log-likelihood gathering cost on top of the model.

    python bench/evaluate.py [--model DIR] [--items N] [--batch-size B]

Without --model it builds a Llama of the embedded zoo's shape (random weights: speed does not
depend on training) and uses the zoo's target task.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mergeflow.evaluate import EvalSettings, _context_ids, _encode, evaluate_items, load_causal_lm
from mergeflow.zoo import language
from mergeflow.zoo.build import build_tokenizer, new_model, save_model


def zoo_shaped_model(out: Path, hidden: int, layers: int) -> Path:
    tok = build_tokenizer()
    model = new_model(tok, hidden, 3 * hidden, layers, 4, 128, seed=0)
    save_model(model, tok, out)
    return out


def items_frame(n: int) -> pd.DataFrame:
    frame = pd.DataFrame(language.task_items("math_l2", n, np.random.default_rng(0)))
    return frame.assign(prompt=frame["question"])


def bare_forward(model, batches: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = EvalSettings.from_config({"batch_size": args.batch_size})
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or zoo_shaped_model(Path(tmp) / "model", args.hidden, args.layers)
        model, tok = load_causal_lm(path, settings)
        items = items_frame(args.items)

        # The same sequences the evaluator scores: prompt + each choice minus the last token,
        # sorted longest first and cut into batches of the same size.
        seqs = []
        for prompt, choices in zip(items["prompt"], items["choices"]):
            ctx = _context_ids(tok, prompt, settings)
            seqs += [(ctx + _encode(tok, " " + c))[:-1] for c in choices]
        seqs.sort(key=len, reverse=True)
        batches = []
        for b in range(0, len(seqs), args.batch_size):
            chunk = seqs[b:b + args.batch_size]
            ids = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, :len(s)] = torch.tensor(s)
            batches.append(ids)

        evaluate_items(model, tok, items.iloc[:64], "mc_loglik", settings)  # warm-up
        bare_forward(model, batches[:2])
        t_eval, t_bare = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            evaluate_items(model, tok, items, "mc_loglik", settings)
            t_eval.append(time.perf_counter() - t0)
            t_bare.append(bare_forward(model, batches))
        n_params = sum(p.numel() for p in model.parameters())
        te, tb = min(t_eval), min(t_bare)
        print(f"model: {path if args.model else 'zoo-shaped Llama'} ({n_params / 1e6:.2f}M parameters), "
              f"{args.items} items x 4 choices, batch {args.batch_size}, {args.threads} thread(s)")
        print(f"evaluator:    {te:.3f} s  {args.items / te:,.0f} items/s")
        print(f"bare forward: {tb:.3f} s  {args.items / tb:,.0f} items/s (same token batches)")
        print(f"ratio evaluator/bare throughput: {tb / te:.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()
