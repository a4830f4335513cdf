"""Quickstart: Bayesian-LoRA on SmolLM2 for binary sentiment of drug reviews, in a few minutes on a CPU.

The same code as the README's "Use it in code" section. Fits a normalizing-flow
posterior over the LoRA factors of the top 2 of SmolLM2's 30 transformer blocks,
then predicts by averaging the class probabilities of a few posterior samples.
The frozen bottom blocks never change, so ``split_decoder`` cuts the model in two
and ``cached_task`` runs the bottom once per review; every training step and
posterior sample only pays for the top 2 blocks.

    python examples/quickstart.py --output runs/quickstart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import pyro_blora
from pyro_blora.tasks import AnswerTokenTask, load_drug_reviews, subsample
from pyro_blora.tasks.cached import cached_task, split_decoder
from pyro_blora.experiments.zoo import load_smollm2


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/quickstart"), help="folder for the adapter and metrics")
    parser.add_argument("--steps", type=int, default=150, help="training steps of 8 reviews (150: about 2.5 epochs)")
    parser.add_argument("--smoke", action="store_true", help="a few reviews and steps, to check the script runs")
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2()
    sizes = {"train": 4, "test": 4} if args.smoke else {}
    # 491 train / 55 validation / 343 test reviews in full (neutral ones dropped)
    splits = subsample(load_drug_reviews(binary=True), **sizes)
    task = AnswerTokenTask(tokenizer, [" negative", " positive"],
                           template="Review: {text}\nSentiment:", max_length=24 if args.smoke else 64)
    # Adapters on the top blocks only: run the frozen bottom once and cache its hidden states.
    bottom, top = split_decoder(model, trainable_layers=1 if args.smoke else 2)
    cached = cached_task(task, bottom)
    train, test = cached.cache(splits.train), cached.cache(splits.test)

    config = pyro_blora.BLoRAConfig(target_modules=["q_proj", "v_proj"], r=8)
    steps = {"num_steps": 2, "batch_size": 2} if args.smoke else {"num_steps": args.steps, "batch_size": 8}
    result = pyro_blora.fit(top, train, guide="flow", task=cached, config=config, lr=1e-3, **steps)

    prediction = result.predict(test, num_samples=4)  # .probs (N, 2); .sample_probs (S, N, 2)
    print("first test review, p(negative, positive):", prediction.probs[0].tolist())
    metrics = prediction.metrics()  # from this prediction: result.evaluate(test) would predict all over again
    print(json.dumps(metrics, indent=2))

    result.save(args.output / "adapter")
    (args.output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
