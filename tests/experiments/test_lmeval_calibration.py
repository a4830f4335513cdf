"""The calibration command on a synthetic harness log, and one lm-eval CLI run end to end on a tiny model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'pyro-blora[lmeval]')")

from pyro_blora.experiments import lmeval_calibration as cal  # noqa: E402
from pyro_blora.metrics import classification_metrics, expected_calibration_error  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "ARC-Easy" / "test.jsonl"


def _synthetic_run(folder: Path, num_docs: int = 40, S: int = 3, seed: int = 0) -> tuple[Path, list]:
    """A samples file as lm-eval writes it and the matching side file; returns the side file and the docs' truth."""
    generator = torch.Generator().manual_seed(seed)
    samples, side, truth = [], [], []
    for doc_id in range(num_docs):
        choices = [f"choice {'x' * (c + 1)}" for c in range(3 + doc_id % 2)]
        context = f"Question: q{doc_id}\nAnswer:"
        loglik = torch.randn(S, len(choices), generator=generator, dtype=torch.float64) * 2
        label = doc_id % len(choices)
        truth.append((loglik, torch.tensor([float(len(c)) for c in choices]), label))
        args = {f"gen_args_{i}": {"arg_0": context, "arg_1": " " + c} for i, c in enumerate(choices)}
        samples.append({"doc_id": doc_id, "target": label, "arguments": args, "filter": "none"})
        for idx, c in enumerate(choices):
            side.append({"task": "toy", "doc_id": doc_id, "idx": idx, "request_type": "loglikelihood",
                         "context_hash": hashlib.sha256(context.encode()).hexdigest(), "continuation": " " + c,
                         "sample_loglikelihoods": loglik[:, idx].tolist()})
    run = folder / "model"
    run.mkdir(parents=True)
    (run / "samples_toy_2026-01-01T00-00-00.000000.jsonl").write_text("\n".join(map(json.dumps, samples)))
    (folder / "side.jsonl").write_text("\n".join(map(json.dumps, side)))
    return folder / "side.jsonl", truth


def test_calibration_metrics_equal_ours_on_a_synthetic_log(tmp_path) -> None:
    side, truth = _synthetic_run(tmp_path)
    table = cal.calibrate([tmp_path], side, output=tmp_path / "out", n_bins=10)
    for variant, normalize in (("acc", False), ("acc_norm", True)):
        probs = torch.zeros(len(truth), 4, dtype=torch.float64)
        for n, (loglik, lengths, _) in enumerate(truth):
            scores = loglik / lengths if normalize else loglik
            probs[n, : scores.shape[1]] = torch.softmax(scores, -1).mean(0)
        labels = torch.tensor([label for *_, label in truth])
        row = table["toy"][f"posterior/{variant}"]
        assert row["ece"] == pytest.approx(expected_calibration_error(probs, labels, 10), abs=1e-12)
        for key, value in classification_metrics(probs, labels, n_bins=10).items():
            assert row[key] == pytest.approx(value, abs=1e-12), key
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"calibration.json", "calibration.md", "reliability_toy.png"}


def test_calibration_refuses_a_side_file_of_another_run(tmp_path) -> None:
    side, _ = _synthetic_run(tmp_path / "a")
    other, _ = _synthetic_run(tmp_path / "b", num_docs=10)
    records = [json.loads(line) for line in other.read_text().splitlines()]
    records[0]["continuation"] = " something else"
    other.write_text("\n".join(map(json.dumps, records)))
    with pytest.raises(ValueError, match="disagree on the text"):
        cal.calibrate([tmp_path / "a"], other)
    with pytest.raises(ValueError, match="both --map-samples and --map-side-file"):
        cal.calibrate([tmp_path / "a"], side, map_samples=[tmp_path / "a"])
    with pytest.raises(ValueError, match="not named like lm-eval's samples"):
        cal.calibrate([tmp_path / "b" / "side.jsonl"], side)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--log_samples"):
        cal.calibrate([tmp_path / "empty"], side)



@pytest.mark.skipif(not DATA.is_file(), reason=f"the shared ARC-Easy data is absent ({DATA}); see shared/data/README.md")
def test_lm_eval_cli_end_to_end_on_a_tiny_model(tiny_llama, smollm2_tokenizer, one_thread, tmp_path, monkeypatch) -> None:
    import pyro_blora
    from pyro_blora.config import BLoRAConfig
    from pyro_blora.experiments.lmeval import main
    from pyro_blora.tasks import ChoiceLikelihoodTask

    tiny_llama.save_pretrained(tmp_path / "base")
    smollm2_tokenizer.save_pretrained(tmp_path / "base")
    example = [{"question": "2 + 2 =", "choices": ["3", "4", "5"], "label": 1}]
    config = BLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, inducing_rows=3, inducing_cols=3)
    result = pyro_blora.fit(tiny_llama, example, "flow", task=ChoiceLikelihoodTask(smollm2_tokenizer), config=config,
                            num_steps=1, batch_size=1, progress=False)
    result.save(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    main(["--model", "pyro_blora", "--model_args",
          f"pretrained={tmp_path / 'base'},adapter={tmp_path / 'adapter'},num_samples=2,side_file={out / 'side.jsonl'}",
          "--tasks", "arc_easy_local", "--limit", "3", "--batch_size", "4", "--device", "cpu",
          "--output_path", str(out), "--log_samples", "--data_root", str(DATA.parents[1])])
    side = [json.loads(line) for line in (out / "side.jsonl").read_text().splitlines()]
    assert len(side) >= 9 and all(len(r["sample_loglikelihoods"]) == 2 for r in side)
    table = cal.main(["--samples", str(out), "--side-file", str(out / "side.jsonl"), "--output", str(out / "cal")])
    assert table["arc_easy_local"]["posterior/acc"]["num_docs"] == 3
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["arc_easy_local"]
    assert table["arc_easy_local"]["posterior/acc"]["acc"] == pytest.approx(results["acc,none"])
    assert (out / "cal" / "reliability_arc_easy_local.png").is_file()
