"""A pyro_blora posterior as an lm-evaluation-harness model (``--model pyro_blora``).

lm-eval 0.4 has no plugin entry points, so ``pyro-blora-harness`` (or
``python -m pyro_blora.experiments.lmeval``) registers :class:`PosteriorLM` under
the name ``pyro_blora`` and hands its arguments to lm-eval's own CLI::

    pyro-blora-harness --model pyro_blora \\
        --model_args pretrained=smollm2,adapter=runs/arc,num_samples=4,side_file=out/side.jsonl \\
        --tasks arc_easy_local --output_path out --log_samples
    pyro-blora-harness calibrate --samples out --side-file out/side.jsonl --output out/calibration

``loglikelihood`` is answered by the posterior predictive. With ``S`` joint draws
``W_s ~ q(W)`` (drawn once, seeded, and used for every request) each request gets
``ll_s = log p(continuation | context, W_s)`` from one forward in which the batch
is repeated ``S`` times (sample-major, as :meth:`FitResult.predict` does), and the
harness receives ``log (1/S) sum_s exp(ll_s)``, the log of the sample-averaged
likelihood. The per-sample ``ll_s`` go to a JSONL side file keyed by
``(task, doc_id, idx)`` for :mod:`pyro_blora.experiments.lmeval_calibration`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: get_model fills an empty registry only)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, hash_string, make_disjoint_window
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "pyro_blora.experiments.lmeval needs lm-evaluation-harness: pip install 'pyro-blora[lmeval]'"
    ) from _err

from pyro_blora.tasks.causal_lm import _accepts_logits_to_keep, _left_pad

__all__ = ["LOCAL_TASKS", "PosteriorLM", "default_data_root", "local_task_dir", "main"]

LOCAL_TASKS = Path(__file__).with_name("lmeval_tasks")
"""Task YAMLs shipped with the package; ``__PYRO_BLORA_DATA__`` in them is the benchmark data folder."""
_DATA_PLACEHOLDER = "__PYRO_BLORA_DATA__"
logger = logging.getLogger(__name__)


@register_model("pyro_blora")
class PosteriorLM(TemplateLM):
    """Posterior-predictive log-likelihoods of a fitted Bayesian-LoRA adapter.

    Args (``--model_args``):
        pretrained: a model folder, or ``smollm2`` for the embedded SmolLM2-135M-Instruct.
        adapter: a folder saved by ``FitResult.save``; none scores the base model.
        num_samples: posterior draws ``S`` (a MAP / delta adapter has one whatever this says).
        posterior_mean: score with ``E_q[W]`` instead of draws (one sample: the "MAP row").
        seed: seeds the draws, so predictions are deterministic.
        side_file: JSONL of every request's per-sample log-likelihoods (truncated at start).
        batch_size: requests per forward (the forward holds ``S * batch_size`` rows).
        max_length: tokens fed per row; longer contexts lose their start, as in harness's ``hf``.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; default CUDA when available.

    ``result``/``tokenizer`` pass an in-memory fit instead of folders (tests, notebooks).
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        adapter: Optional[str] = None,
        num_samples: int = 4,
        posterior_mean: bool = False,
        seed: int = 0,
        side_file: Optional[str] = None,
        batch_size: Any = 8,
        max_length: int = 2048,
        device: Optional[str] = None,
        max_batch_size: Any = None,
        result: Any = None,
        net: Optional[nn.Module] = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.batch_size = _parse_batch_size(batch_size)
        self.max_length = int(max_length)
        self.result, self.net, self.tokenizer = _load(pretrained, adapter, result, net, tokenizer)
        self._device = _pick_device(device)
        self.net.to(self._device).eval()
        self.num_samples = self._fix_draws(int(num_samples), bool(posterior_mean), int(seed))
        self._keep = _accepts_logits_to_keep(self.net)
        self.side_file = Path(side_file) if side_file else None
        if self.side_file is not None:
            self.side_file.parent.mkdir(parents=True, exist_ok=True)
            self.side_file.write_text("")

    @torch.no_grad()
    def _fix_draws(self, num_samples: int, posterior_mean: bool, seed: int) -> int:
        """Draw the ``S`` joint weight samples once and put them into the layers; returns ``S``."""
        if self.result is None:
            return 1
        if not hasattr(self.result, "sample_weights") or not hasattr(self.result, "guide"):
            raise ValueError(
                f"adapter of type {type(self.result).__name__} has no weight posterior to draw from; "
                "the harness model takes Bayesian-LoRA / MAP adapters (FitResult)"
            )
        cuda = sorted({p.device.index or 0 for p in self.result.guide.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):  # seeded, leaving the caller's RNG as it was
            torch.manual_seed(seed)
            if posterior_mean:  # a flow's E_q[W] is a Monte Carlo mean, hence seeded too
                weights = {k: v.unsqueeze(0) for k, v in self.result.guide.mean_weights().items()}
            else:
                weights = self.result.sample_weights(1 if self.result.is_deterministic else num_samples)
        return self.set_draws(weights)

    def set_draws(self, weights: dict[str, Tensor]) -> int:
        """Score with these stacked draws (site ``*.W`` -> ``(S, rows, cols)``) from now on; returns ``S``."""
        if self.result is None:
            raise ValueError("the base model has no adapter to set draws of")
        self.weights = {k: v.to(self._device) for k, v in weights.items()}
        self.result.model.set_adapter_weights(self.weights)
        sizes = {v.shape[0] for v in self.weights.values()}
        if len(sizes) > 1:
            raise ValueError(f"the draws have different sample counts {sorted(sizes)}; stack the same S for every site")
        self.num_samples = sizes.pop() if sizes else 1
        return self.num_samples

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is conditioned on: BOS, else EOS (as harness's ``hf``)."""
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        """Token ids with the tokenizer's own special-token default (as :class:`ChoiceLikelihoodTask`)."""
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer(string, **extra)["input_ids"])

    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[Tensor, Tensor]:
        """Per-sample ``(S, R)`` continuation log-likelihoods and greediness of ``R`` token pairs.

        Each row is harness's ``(context + continuation)[-(max_length + 1):][:-1]``,
        left padded; the last ``K`` positions' logits predict the (right-aligned)
        continuation tokens. The ``R`` rows are repeated ``S`` times in one forward,
        matching the stacked draws in the layers sample-major.
        """
        S = self.num_samples
        if not pairs:
            return torch.zeros(S, 0), torch.zeros(S, 0, dtype=torch.bool)
        for _, cont in pairs:
            if not cont or len(cont) > self.max_length:
                raise ValueError(f"a continuation has {len(cont)} tokens; it must be 1 to max_length={self.max_length}")
        rows = [(list(ctx) + list(cont))[-(self.max_length + 1):][:-1] for ctx, cont in pairs]
        spans = torch.tensor([len(cont) for _, cont in pairs])
        K = int(spans.max())
        ids, mask, positions = _left_pad(rows, int(self.tokenizer.pad_token_id or 0))
        targets = torch.zeros(len(pairs), K, dtype=torch.long)
        for r, (_, cont) in enumerate(pairs):
            targets[r, K - len(cont):] = torch.tensor(list(cont))
        scored = torch.arange(K).unsqueeze(0) >= (K - spans).unsqueeze(1)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        inputs = {k: v.repeat(S, 1).to(self._device) for k, v in inputs.items()}
        if self._keep:
            inputs["logits_to_keep"] = K
        out = self.net(**inputs)
        logits = getattr(out, "logits", out)[:, -K:].float()
        targets, scored = targets.repeat(S, 1).to(self._device), scored.repeat(S, 1).to(self._device)
        token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        loglik = torch.where(scored, token_logp, torch.zeros_like(token_logp)).sum(-1)
        greedy = ((logits.argmax(-1) == targets) | ~scored).all(-1)
        return loglik.view(S, -1).cpu(), greedy.view(S, -1).cpu()

    def _batched(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[Tensor, Tensor]:
        """:meth:`score_tokens` over all pairs, longest first in batches of ``batch_size``, in the input order."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        loglik = torch.zeros(self.num_samples, len(pairs), dtype=torch.float64)
        greedy = torch.zeros(self.num_samples, len(pairs), dtype=torch.bool)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            ll, gr = self.score_tokens([pairs[i] for i in chunk])
            loglik[:, chunk], greedy[:, chunk] = ll.double(), gr
        return loglik, greedy

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Posterior-predictive ``(log mean_s exp(ll_s), greedy under every sample)`` per request."""
        loglik, greedy = self._batched([(list(ctx), list(cont)) for _, ctx, cont in requests])
        self._last_samples = loglik
        mixture = torch.logsumexp(loglik, 0) - math.log(self.num_samples)
        return [(float(m), bool(g)) for m, g in zip(mixture, greedy.all(0))]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Harness's context/continuation split (:class:`TemplateLM`), then :meth:`_loglikelihood_tokens`; logs to the side file."""
        answers = super().loglikelihood(requests, disable_tqdm=True)
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
        self._log(requests, answers, self._last_samples, "loglikelihood")
        return answers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood for perplexity: ``log mean_s exp(sum_windows ll_s)``.

        Windows as harness's ``hf`` (``get_rolling_token_windows``, context 1); the
        windows of one string are summed within a draw before averaging over draws,
        so the result is the predictive ``log E_q[p(string | W)]``.
        """
        pairs, owner = [], []
        for i, request in enumerate(requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((list(ctx), list(cont)))
                owner.append(i)
        loglik, _ = self._batched(pairs)
        per_doc = torch.zeros(self.num_samples, len(requests), dtype=torch.float64)
        per_doc.index_add_(1, torch.tensor(owner, dtype=torch.long), loglik)
        answers = [float(v) for v in torch.logsumexp(per_doc, 0) - math.log(self.num_samples)]
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, answer)
        self._log(requests, [(a, False) for a in answers], per_doc, "loglikelihood_rolling")
        return answers

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "the pyro_blora harness model scores log-likelihoods only (multiple-choice and perplexity tasks); "
            "generation tasks (generate_until) are not supported"
        )

    def _log(self, requests: list, answers: list, samples: Tensor, kind: str) -> None:
        """Append one JSON line per request: its ids, context hash, continuation and per-sample log-likelihoods."""
        if self.side_file is None:
            return
        with self.side_file.open("a", encoding="utf-8") as fh:
            for j, (request, (mixture, greedy)) in enumerate(zip(requests, answers)):
                args = request.args
                record = {
                    "task": request.task_name, "doc_id": request.doc_id, "idx": request.idx, "request_type": kind,
                    "context_hash": hash_string(args[0]) if kind == "loglikelihood" else None,
                    "continuation": args[1] if kind == "loglikelihood" else None,
                    "loglikelihood": mixture, "is_greedy": greedy,
                    "sample_loglikelihoods": [float(v) for v in samples[:, j]],
                }
                fh.write(json.dumps(record) + "\n")


def _pick_device(device: Optional[str]) -> torch.device:
    """The given device; lm-eval's default ``cuda`` falls back to the CPU (with a notice) where there is none."""
    if device and not (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return torch.device(device)
    if device:
        logger.warning("device %r is not available here; running on the CPU", device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _parse_batch_size(value: Any) -> int:
    """lm-eval passes ``--batch_size`` as given (``"8"``, ``8``, ``"auto"``); auto falls back to 8."""
    if isinstance(value, str) and value.startswith("auto"):
        return 8
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return size


def _load(pretrained: Optional[str], adapter: Optional[str], result: Any, net: Any, tokenizer: Any) -> tuple:
    """``(result or None, network, tokenizer)`` from folders or from in-memory objects."""
    if result is not None or net is not None:
        if tokenizer is None:
            raise ValueError("pass tokenizer= together with result= / net=")
        return result, (result.net if result is not None else net), tokenizer
    if not pretrained:
        raise ValueError("model_args needs pretrained=<model folder or 'smollm2'>")
    from pyro_blora.experiments import zoo

    model, tokenizer = zoo.load_model(str(pretrained), "causal_lm")
    if not adapter:
        return None, model, tokenizer
    if not Path(str(adapter)).is_dir():
        raise FileNotFoundError(f"adapter folder {adapter} does not exist")
    import pyro_blora

    return pyro_blora.load(str(adapter), model), model, tokenizer


def default_data_root() -> Path:
    """The benchmark data folder as the rest of pyro_blora finds it: ``$PYRO_BLORA_DATA_DIR``, else ``../shared/data``."""
    from pyro_blora.tasks.benchmarks import resolve_data_dir

    return resolve_data_dir(None)


def local_task_dir(data_root: Optional[Path] = None, destination: Optional[Path] = None) -> Path:
    """A folder of the shipped task YAMLs with ``__PYRO_BLORA_DATA__`` replaced by ``data_root`` (for ``--include_path``)."""
    root = Path(data_root) if data_root is not None else default_data_root()
    folder = Path(destination) if destination is not None else Path(tempfile.mkdtemp(prefix="pyro_blora_tasks_"))
    folder.mkdir(parents=True, exist_ok=True)
    for yaml_file in sorted(LOCAL_TASKS.glob("*.yaml")):
        text = yaml_file.read_text(encoding="utf-8").replace(_DATA_PLACEHOLDER, str(root.resolve()))
        (folder / yaml_file.name).write_text(text, encoding="utf-8")
    return folder


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``calibrate ...`` runs the calibration command; anything else goes to lm-eval's CLI.

    For lm-eval, ``--data_root DIR`` (ours; default :func:`default_data_root`) fills the
    shipped local tasks (``arc_easy_local``), which are added with ``--include_path``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "calibrate":
        from pyro_blora.experiments.lmeval_calibration import main as calibrate_main

        calibrate_main(args[1:])
        return
    data_root = None
    if "--data_root" in args:
        at = args.index("--data_root")
        if at + 1 >= len(args):
            raise SystemExit("--data_root needs a folder")
        data_root = Path(args[at + 1])
        del args[at:at + 2]
    if args and args[0] not in ("run", "ls", "validate", "-h", "--help"):
        args.insert(0, "run")  # lm-eval's legacy form: no subcommand means run
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    with tempfile.TemporaryDirectory(prefix="pyro_blora_tasks_") as tasks:
        if args and args[0] in ("run", "ls", "validate") and "--include_path" not in args:
            args[1:1] = ["--include_path", str(local_task_dir(data_root, Path(tasks)))]
        sys.argv = ["pyro-blora-harness", *args]
        try:
            cli_evaluate()
        finally:
            sys.argv = saved


if __name__ == "__main__":
    main()
