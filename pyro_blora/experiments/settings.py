"""The settings of a ``compare`` / ``fit`` / ``evaluate`` run, checked before any model or data is loaded.

:class:`ExperimentConfig` is flat, because each field is also a CLI flag
(``--kl-weight``) and a config-file key (``kl_weight``). The fields that belong
to the library's :class:`~pyro_blora.config.BLoRAConfig` and
:class:`~pyro_blora.config.TrainConfig` are generated from those dataclasses
(:func:`_library_field`): their help text is the library's, only the default
may differ (the pipeline's demo needs a larger learning rate, a wider prior and
more epochs than the library's defaults). Every check here runs when the config
is built, so a typo costs nothing: no model is loaded before the config is valid.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pyro_blora.config import BLoRAConfig, TrainConfig

__all__ = [
    "ADAPTER_FIELDS", "DRUG_REVIEW_TEMPLATE", "ExperimentConfig", "FILE_TASK_PREFIXES", "TRAIN_FIELDS", "check_device",
    "file_task", "task_kind", "task_names",
]

DRUG_REVIEW_TEMPLATE = "Drug review: {text}\nIs the review positive, negative or neutral? Answer:"
FILE_TASK_PREFIXES = ("csv", "tsv", "jsonl")
ADAPTER_FIELDS = ("target_modules", "bayesian_modules", "r", "alpha", "prior", "prior_sd", "prior_scale", "lambda_max",
                  "lambda_prior")
TRAIN_FIELDS = ("epochs", "num_steps", "batch_size", "lr", "kl_weight", "variance_lr_multiplier", "seed")
# the short forms load_benchmark documents (its alias table is private)
_BENCHMARK_SHORT_FORMS = ("arc_e", "arc_c", "obqa", "wg_s", "wg_m")
_TEMPLATE_FIELDS = {"classification": ({"text"}, {"text", "context"}),
                    "multiple_choice": ({"question"}, {"question", "choices", "context"})}


def _library_field(cls: type, name: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A field with ``cls.name``'s help text and default, or the pipeline's own default (named in the help)."""
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    text = spec.metadata.get("help", "")
    if default is dataclasses.MISSING and factory is dataclasses.MISSING:
        default, factory = spec.default, spec.default_factory
    else:
        library = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        text = f"{text} [{cls.__name__}.{name}; the library's default: {library!r}]"
    metadata = {"help": text, "library": cls.__name__}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _help(text: str, default: Any = None, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def task_names() -> list[str]:
    """The task names the pipeline knows (a CSV/JSONL file is ``csv:PATH`` / ``jsonl:PATH``)."""
    from pyro_blora.tasks.benchmarks import BENCHMARKS

    return ["drug_reviews", "drug_reviews_binary", *sorted(BENCHMARKS)]


def file_task(task: str) -> Optional[Path]:
    """The file of a ``csv:PATH`` / ``tsv:PATH`` / ``jsonl:PATH`` task (or a bare path with that suffix), else None."""
    prefix, sep, rest = task.partition(":")
    if sep and prefix.lower() in FILE_TASK_PREFIXES:
        return Path(rest).expanduser()
    if Path(task).suffix.lower().lstrip(".") in (*FILE_TASK_PREFIXES, "json"):
        return Path(task).expanduser()
    return None


def task_kind(task: str) -> str:
    """``classification`` or ``multiple_choice``: what the task's examples look like; unknown names are refused."""
    if file_task(task) is not None or task in ("drug_reviews", "drug_reviews_binary"):
        return "classification"
    key = task.strip().lower().replace("-", "_")
    if key in task_names() or key in _BENCHMARK_SHORT_FORMS:
        return "multiple_choice"
    raise ValueError(f"unknown task {task!r}; choose from {task_names()} or give your own file as csv:PATH / jsonl:PATH")


def _check_task_file(path: Path) -> None:
    """The file exists and its first row has the ``text`` and ``label`` columns (read before any model loads)."""
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            if path.suffix.lower() in (".jsonl", ".json"):
                import json

                first = next((line for line in f if line.strip()), None)
                columns = set(json.loads(first)) if first is not None else set()
            else:
                delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
                columns = set(next(csv.reader(f, delimiter=delimiter), []))
    except (UnicodeDecodeError, ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"task file {path} could not be read as {path.suffix or 'CSV'}: {err}") from err
    missing = sorted({"text", "label"} - columns)
    if missing:
        raise ValueError(f"task file {path} has no {missing} column(s); it needs 'text' and 'label' (found {sorted(columns)})")


def check_device(device: str) -> None:
    """Refuse a device this torch cannot use (a CUDA device on a CPU-only build, a missing GPU index)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:0, mps): {err}") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch" if torch.version.cuda is None else "no CUDA GPU visible"
            raise ValueError(f"device {device!r} asked for, but this machine has {build} ({torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")


def _check_template(template: str, kind: str) -> None:
    """The template names only fields the task's examples have, and the one it cannot do without."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a format string: {err}") from err
    required, allowed = _TEMPLATE_FIELDS[kind]
    if not required <= used or not used <= allowed:
        raise ValueError(f"a {kind} template must use {{{sorted(required)[0]}}} and only fields {sorted(allowed)}; got {sorted(used)}")


@dataclass
class ExperimentConfig:
    """Settings of a ``compare`` run; each field is also a CLI option and a config-file key.

    The defaults are the embedded demo, sized to run in about ten minutes on two
    CPU cores: binary Drugs.com sentiment (the 3-way task stays at the class
    prior for SmolLM2-135M within that budget), the top 2 blocks and the LM head
    adapted on cached activations of the 28 frozen blocks below, 64-token
    prompts, 10 epochs at lr 1e-2, and prior_sd 1 (at the paper's 0.1 the prior
    holds the adapters near zero in so short a run: the MAP model stays at the
    class prior). Every module is Bayesian for the Bayesian methods, plain LoRA
    for MAP and what is built on it, and the KL is weighted 0.1: at the proper
    ELBO's 1 the 1,620 inducing dimensions cost more than 491 reviews pay back
    and flow stays at the class prior (validation ACC 0.709 against 0.782 at 0.1,
    docs/benchmarks.md).
    """

    model: str = _help("'smollm2' (embedded default), a local folder or a hub id.", "smollm2")
    task: str = _help("drug_reviews | drug_reviews_binary | arc_easy | arc_challenge | openbookqa | boolq | winogrande_s | "
                      "winogrande_m, or your own file: csv:PATH / tsv:PATH / jsonl:PATH with 'text' and 'label' columns.",
                      "drug_reviews_binary")
    scoring: str = _help("answer_token (answer words) | choice_likelihood (lm-eval-harness acc).", "answer_token")
    normalize: str = _help("choice_likelihood only: none (harness acc) | chars (harness acc_norm) | tokens (per-token mean).", "none")
    template: Optional[str] = _help("Prompt template (none: the task's own); classification uses {text}, multiple choice "
                                    "{question}, {choices}, {context}.")
    methods: list[str] = _help("Methods to fit.", factory=lambda: ["delta", "flow"])
    prior: str = _library_field(BLoRAConfig, "prior")
    flow: list[str] = _help("Flow chain of the flow guide (FlowOptions.transforms).", factory=lambda: ["affine_autoregressive"])
    r: int = _library_field(BLoRAConfig, "r")
    alpha: float = _library_field(BLoRAConfig, "alpha")
    lambda_max: float = _library_field(BLoRAConfig, "lambda_max")
    scale_max: float = _help("Cap of the sd of q(U_w) of the normal/mvn/flow guides (NormalOptions.scale_max; paper: 0.1).", 0.1)
    prior_sd: float = _library_field(BLoRAConfig, "prior_sd", 1.0)
    prior_scale: str = _library_field(BLoRAConfig, "prior_scale")
    lambda_prior: Optional[float] = _library_field(BLoRAConfig, "lambda_prior")
    target_modules: list[str] = _library_field(BLoRAConfig, "target_modules", factory=lambda: ["q_proj", "v_proj", "lm_head"])
    bayesian_modules: Optional[list[str]] = _library_field(BLoRAConfig, "bayesian_modules")
    map_bayesian_modules: Optional[list[str]] = _help(
        "bayesian_modules of the point-estimate methods (delta, mc_dropout, ensemble, and laplace, laplace_lora, tfb "
        "on top of them): [] = plain LoRA on every target, the peft baseline (no prior on its factors, AdamW weight "
        "decay); give names to score MAP under the inducing prior instead.", factory=list,
    )
    trainable_layers: Optional[int] = _help("Adapt only the top k blocks and cache the rest (none: every block, no cache).", 2)
    max_length: int = _help("Prompt tokens at most (longer texts lose their start, never the question).", 64)
    train_size: Optional[int] = _help("Subsample the training split to this many examples (none: all).")
    validation_size: Optional[int] = _help("Subsample the validation split (none: all).")
    test_size: Optional[int] = _help("Subsample the test split (none: all).")
    epochs: int = _library_field(TrainConfig, "epochs", 10)
    num_steps: Optional[int] = _library_field(TrainConfig, "num_steps")
    batch_size: int = _library_field(TrainConfig, "batch_size")
    lr: float = _library_field(TrainConfig, "lr", 1e-2)
    kl_weight: float = _library_field(TrainConfig, "kl_weight", 0.1)
    variance_lr_multiplier: float = _library_field(TrainConfig, "variance_lr_multiplier")
    preset: Optional[str] = _help(
        "Training recipe applied to every method alike (pyro_blora.training.presets): proper (the ELBO) | paper "
        "(the released code: label smoothing 0.05, entropy bonus 0.05, KL from epoch 2 at 0.1 / batches per "
        "epoch, lr 7.39e-4, weight decay 0.027, step decay, 6 epochs); its fields override epochs, lr and "
        "kl_weight. None: the fields as given.")
    num_samples: int = _help("Posterior samples per prediction.", 4)
    seed: int = _library_field(TrainConfig, "seed")
    data_dir: Optional[str] = _help("Folder of the benchmark JSONL files (default ../shared/data).")
    output: str = _help("Output folder.", "runs/compare")
    checkpoint_dir: Optional[str] = _help("Where Ctrl-C writes a resumable checkpoint, one folder per method "
                                          "(default <output>/checkpoint).")
    resume: Optional[str] = _help("Continue an interrupted run from its checkpoint folder (what Ctrl-C printed).")
    device: str = _help("Where the model runs: cpu, cuda, cuda:1, mps.", "cpu")
    activation_cache: Optional[str] = _help("Folder that keeps the frozen blocks' cached activations between runs, "
                                            "keyed by model, task and examples (none: recomputed in every run).")

    def __post_init__(self) -> None:
        _check_types(self)
        self._check_choices()
        _check_ranges(self)
        # the library's own checks of r, alpha, lambda_max, epochs, lr, ... (messages name the field)
        self.blora_config()
        self.train_options()
        check_device(self.device)
        self._check_paths()

    def _check_choices(self) -> None:
        if self.scoring not in ("answer_token", "choice_likelihood"):
            raise ValueError(f"scoring must be answer_token or choice_likelihood, got {self.scoring!r}")
        if self.normalize not in ("none", "chars", "tokens"):
            raise ValueError(f"normalize must be none, chars or tokens, got {self.normalize!r}")
        kind = task_kind(self.task)
        if self.scoring == "choice_likelihood" and kind != "multiple_choice":
            raise ValueError(f"choice_likelihood scoring needs a multiple-choice task; {self.task} is {kind}")
        if self.template is not None:
            _check_template(self.template, kind)
        from pyro_blora.experiments.method_setup import check_methods

        check_methods(self.methods)

    def _check_paths(self) -> None:
        path = file_task(self.task)
        if path is not None:
            _check_task_file(path)
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise FileNotFoundError(f"data_dir {self.data_dir} is not a folder")
        if self.resume is not None and not Path(self.resume).is_dir():
            raise FileNotFoundError(f"resume: checkpoint folder {self.resume} not found")
        model = Path(self.model).expanduser()
        looks_local = self.model.startswith((".", "/", "~")) or self.model.count("/") > 1 or "\\" in self.model
        if self.model.lower() not in ("smollm2",) and looks_local and not model.is_dir():
            raise FileNotFoundError(f"model folder {self.model} not found (give 'smollm2', a local folder or a hub id org/name)")

    def blora_config(self) -> BLoRAConfig:
        """The :class:`BLoRAConfig` these settings describe (targets not yet cut to the top blocks)."""
        values = {name: getattr(self, name) for name in ADAPTER_FIELDS}
        values["target_modules"] = list(values["target_modules"])
        if values["bayesian_modules"] is not None:
            values["bayesian_modules"] = list(values["bayesian_modules"])
        return BLoRAConfig(**values)

    def train_options(self) -> dict[str, Any]:
        """The :class:`TrainConfig` fields of these settings, checked by TrainConfig itself."""
        from pyro_blora.training.presets import with_preset

        values = with_preset(self.preset, {name: getattr(self, name) for name in TRAIN_FIELDS})
        TrainConfig(**values)
        return values

    def checkpoint_root(self) -> Path:
        """The folder of the Ctrl-C checkpoints (one subfolder per method)."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir is not None else Path(self.output) / "checkpoint"


def _unwrap(hint: Any) -> tuple[bool, Any]:
    """``(optional, inner type)`` of ``Optional[X]`` / ``X``."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return True, args[0]
    return False, hint


def _check_types(cfg: ExperimentConfig) -> None:
    """Each value has its field's type (a config file can hold anything); ints pass for floats, a string for a list."""
    hints = typing.get_type_hints(type(cfg))
    for spec in dataclasses.fields(cfg):
        value, (optional, inner) = getattr(cfg, spec.name), _unwrap(hints[spec.name])
        if value is None:
            if not optional:
                raise ValueError(f"{spec.name} must not be none")
            continue
        if typing.get_origin(inner) is list:
            value = [value] if isinstance(value, str) else value
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            value = list(value) if ok else value
            what = "a list of names"
        elif inner is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value, what = (float(value) if ok else value), "a finite number"
        elif inner is int:
            ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            value = os.fspath(value) if inner is str and isinstance(value, os.PathLike) else value
            ok, what = isinstance(value, inner), f"a {inner.__name__}"
        if not ok:
            raise ValueError(f"{spec.name} must be {what}, got {value!r}")
        setattr(cfg, spec.name, value)


def _check_ranges(cfg: ExperimentConfig) -> None:
    """The pipeline's own fields (the library's are checked by BLoRAConfig / TrainConfig)."""
    for name in ("trainable_layers", "train_size", "validation_size", "test_size"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or none, got {value}")
    if cfg.max_length < 8:  # below this the template's tail alone fills the prompt: the text is cut away entirely
        raise ValueError(f"max_length must be >= 8 tokens (room for the text besides the template), got {cfg.max_length}")
    if cfg.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {cfg.num_samples}")
    if cfg.seed < 0:
        raise ValueError(f"seed must be >= 0, got {cfg.seed}")
    if cfg.scale_max <= 0:
        raise ValueError(f"scale_max must be positive, got {cfg.scale_max}")
    if not cfg.flow:
        raise ValueError("flow is empty: name at least one flow transform")
