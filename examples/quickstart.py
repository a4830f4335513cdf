"""Quickstart: Bayesian-LoRA on SmolLM2 for 3-way sentiment of drug reviews.

Fits a normalizing-flow posterior over the LoRA factors of the top transformer
blocks (and the LM head), then predicts by averaging the class probabilities of
a few posterior samples. The frozen bottom blocks never change, so
``split_decoder`` cuts the model in two and ``CachedPrefixTask`` runs the bottom
once per review; every training step and posterior sample only pays for the top.

    python examples/quickstart.py --output runs/quickstart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import pyro_blora
from pyro_blora.tasks import AnswerTokenTask, load_drug_reviews, subsample
from pyro_blora.tasks.cached import CachedPrefixTask, split_decoder
from pyro_blora.experiments.zoo import load_smollm2


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/quickstart"), help="folder for the adapter and metrics")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a few reviews and steps, to check the script runs")
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2()
    sizes = {"train": 4, "test": 4} if args.smoke else {}
    splits = subsample(load_drug_reviews(), **sizes)  # 540 train / 60 validation / 379 test reviews in full

    # Adapters on the top blocks only: run the frozen bottom once and cache its hidden states.
    task = AnswerTokenTask(tokenizer, [" negative", " neutral", " positive"],
                           template="Review: {text}\nSentiment:", max_length=24 if args.smoke else 96)
    bottom, top = split_decoder(model, trainable_layers=1 if args.smoke else 4)
    cached = CachedPrefixTask(task, bottom)
    train, test = cached.cache(splits.train), cached.cache(splits.test)

    config = pyro_blora.BLoRAConfig(target_modules=["q_proj", "v_proj", "lm_head"], bayesian_modules=["q_proj", "lm_head"])
    steps = {"num_steps": 2, "batch_size": 2} if args.smoke else {"epochs": args.epochs}
    result = pyro_blora.fit(top, train, guide="flow", task=cached, config=config, lr=1e-3, **steps)

    prediction = result.predict(test, num_samples=4)  # .probs (N, C); .sample_probs (S, N, C)
    print("first test review, p(negative, neutral, positive):", prediction.probs[0].tolist())
    metrics = result.evaluate(test)
    print(json.dumps(metrics, indent=2))

    result.save(args.output / "adapter")
    (args.output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
