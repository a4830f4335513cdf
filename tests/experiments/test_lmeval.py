"""The lm-eval harness model ``pyro_blora`` against our own choice scoring, on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'pyro-blora[lmeval]')")

import pyro_blora  # noqa: E402
from pyro_blora.config import BLoRAConfig  # noqa: E402
from pyro_blora.experiments.lmeval import PosteriorLM  # noqa: E402
from pyro_blora.tasks import ChoiceLikelihoodTask  # noqa: E402

MC = [
    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium", "neon"],
     "choice_labels": ["A", "B", "C", "D"], "label": 1},
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "choice_labels": ["1", "2", "3"], "label": 1},
]
CONFIG = BLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, inducing_rows=3, inducing_cols=3)


def _fit(net, tokenizer, guide: str):
    task = ChoiceLikelihoodTask(tokenizer)
    return pyro_blora.fit(net, MC, guide, task=task, config=CONFIG, num_steps=1, batch_size=2, progress=False), task


def _requests(task: ChoiceLikelihoodTask) -> list:
    from lm_eval.api.instance import Instance

    return [
        Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=c, metadata=("mc", d, None))
        for d, example in enumerate(MC) for c, (context, continuation, _) in enumerate(task.pairs(example))
    ]


def test_map_loglikelihoods_equal_choice_likelihood_task(tiny_llama, smollm2_tokenizer, one_thread, tmp_path) -> None:
    result, task = _fit(tiny_llama, smollm2_tokenizer, "delta")
    lm = PosteriorLM(result=result, tokenizer=smollm2_tokenizer, num_samples=4, device="cpu",
                     side_file=str(tmp_path / "side.jsonl"), batch_size=3)
    assert lm.num_samples == 1  # a MAP adapter has one draw whatever num_samples says
    answers = lm.loglikelihood(_requests(task))
    with torch.no_grad():
        ours = task.class_logits(result.net, task.collate(MC))
    flat = [float(ours[d, c]) for d, example in enumerate(MC) for c in range(len(example["choices"]))]
    assert [a for a, _ in answers] == pytest.approx(flat, abs=1e-5)
    # the posterior predictive of our own predict is the softmax of the same scores
    probs = result.predict(MC, num_samples=1, batch_size=2).probs
    assert torch.softmax(torch.tensor([a for a, _ in answers[:4]]), 0) == pytest.approx(probs[0].tolist(), abs=1e-5)
    side = [json.loads(line) for line in (tmp_path / "side.jsonl").read_text().splitlines()]
    assert [(r["task"], r["doc_id"], r["idx"]) for r in side] == [("mc", 0, c) for c in range(4)] + [("mc", 1, c) for c in range(3)]
    assert [r["sample_loglikelihoods"][0] for r in side] == pytest.approx(flat, abs=1e-5)


def test_stacked_samples_average_single_sample_runs(tiny_llama, smollm2_tokenizer, one_thread) -> None:
    result, task = _fit(tiny_llama, smollm2_tokenizer, "flow")
    requests = _requests(task)
    lm = PosteriorLM(result=result, tokenizer=smollm2_tokenizer, num_samples=4, seed=3, device="cpu")
    stacked = [a for a, _ in lm.loglikelihood(requests)]
    again = PosteriorLM(result=result, tokenizer=smollm2_tokenizer, num_samples=4, seed=3, device="cpu")
    assert [a for a, _ in again.loglikelihood(requests)] == stacked  # seeded: deterministic
    assert not torch.equal(lm.weights[next(iter(lm.weights))][0], lm.weights[next(iter(lm.weights))][1])
    # draws this close to the prior barely move a random network: spread them so the average is a real test
    generator = torch.Generator().manual_seed(0)
    draws = {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in lm.weights.items()}
    lm.set_draws(draws)
    stacked = [a for a, _ in lm.loglikelihood(requests)]
    singles = []
    for s in range(4):
        lm.set_draws({k: v[s:s + 1] for k, v in draws.items()})
        singles.append([a for a, _ in lm.loglikelihood(requests)])
    per_sample = torch.tensor(singles, dtype=torch.float64)
    assert not torch.allclose(per_sample[0], per_sample[1])  # the draws differ
    expected = torch.logsumexp(per_sample, 0) - math.log(4)
    assert stacked == pytest.approx(expected.tolist(), abs=1e-5)
    # the MAP row: one sample at E_q[W]
    mean = PosteriorLM(result=result, tokenizer=smollm2_tokenizer, num_samples=4, posterior_mean=True, device="cpu")
    assert mean.num_samples == 1
    for key, value in result.guide.mean_weights().items():
        torch.testing.assert_close(mean.weights[key][0], value)


def test_rolling_loglikelihood_is_the_token_sum(tiny_llama, smollm2_tokenizer, one_thread) -> None:
    from lm_eval.api.instance import Instance

    text = "The quick brown fox jumps over the lazy dog near the river bank."
    request = Instance("loglikelihood_rolling", {}, (text,), 0, ("ppl", 0, None))
    whole = PosteriorLM(net=tiny_llama, tokenizer=smollm2_tokenizer, device="cpu", max_length=64)
    tokens = [whole.prefix_token_id, *whole.tok_encode(text)]
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_llama(ids).logits[0, :-1].float(), -1)
    direct = float(logp.gather(-1, ids[0, 1:, None]).sum())
    assert whole.loglikelihood_rolling([request]) == pytest.approx([direct], abs=1e-4)
    # short windows: every token is still predicted once, with less context, so the value is close but not equal
    [windowed] = PosteriorLM(net=tiny_llama, tokenizer=smollm2_tokenizer, device="cpu", max_length=6).loglikelihood_rolling([request])
    assert len(tokens) > 7 and math.isfinite(windowed) and windowed != pytest.approx(direct, abs=1e-4)


def test_registered_beside_lm_evals_own_models() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("pyro_blora") is PosteriorLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours must not hide the built-in ones


def test_generation_is_refused_and_bad_args_are_named(tiny_llama, smollm2_tokenizer) -> None:
    lm = PosteriorLM(net=tiny_llama, tokenizer=smollm2_tokenizer, device="cpu")
    with pytest.raises(NotImplementedError, match="log-likelihoods only"):
        lm.generate_until([])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        PosteriorLM(net=tiny_llama, tokenizer=smollm2_tokenizer, num_samples=0)
    with pytest.raises(ValueError, match="pretrained="):
        PosteriorLM()
    with pytest.raises(ValueError, match="batch_size"):
        PosteriorLM(net=tiny_llama, tokenizer=smollm2_tokenizer, batch_size="many")
