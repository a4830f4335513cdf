"""Tasks turn raw examples into class logits (see :mod:`pyro_blora.tasks.base`),
and loaders give the examples (:mod:`pyro_blora.tasks.datasets`)."""

from pyro_blora.tasks.base import Task, TensorTask, model_inputs
from pyro_blora.tasks.language_modeling import LanguageModelingTask
from pyro_blora.tasks.causal_lm import (
    CLASSIFICATION_TEMPLATE,
    MASKED_LOGIT,
    MC_CONTEXT_TEMPLATE,
    MC_TEMPLATE,
    AnswerTokenTask,
    ChoiceLikelihoodTask,
)
from pyro_blora.tasks.classification import SequenceClassificationTask
from pyro_blora.tasks.benchmarks import load_benchmark, load_drug_reviews
from pyro_blora.tasks.datasets import DatasetSplits, carve_splits, load_classification, split_train_validation, subsample

__all__ = [
    "Task",
    "TensorTask",
    "model_inputs",
    "AnswerTokenTask",
    "ChoiceLikelihoodTask",
    "LanguageModelingTask",
    "SequenceClassificationTask",
    "MC_TEMPLATE",
    "MC_CONTEXT_TEMPLATE",
    "CLASSIFICATION_TEMPLATE",
    "MASKED_LOGIT",
    "DatasetSplits",
    "carve_splits",
    "load_benchmark",
    "load_classification",
    "load_drug_reviews",
    "split_train_validation",
    "subsample",
]
