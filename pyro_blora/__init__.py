"""pyro_blora: Bayesian-LoRA (Lin et al., 2026) on Pyro.

Fine-tune a language model with low-rank adapters whose factors come from
inducing matrices under a Gaussian-process-style prior, with a normalizing-flow
posterior, and get calibrated class probabilities::

    result = pyro_blora.fit(model, data, guide="flow", task=task)
    prediction = result.predict(test_data, num_samples=4)
    metrics = pyro_blora.evaluate(result, test_data)
"""

from .api import evaluate, fit, load
from .baselines.ensemble import EnsembleResult
from .baselines.laplace import LaplaceResult, laplace_from_map
from .baselines.mc_dropout import MCDropoutResult
from .baselines.temperature import TemperatureScaledResult, apply_temperature, fit_temperature, temperature_scale
from .config import BLoRAConfig, TrainConfig
from .diagnostics import Diagnostics, diagnose
from .inject import adapted_layers, inject_adapters, remove_adapters
from .io import save
from .model import BayesianLoRAModel
from .result import FitResult, Posterior, Prediction, combine_predictions

__version__ = "0.1.0"


__all__ = [
    "BLoRAConfig",
    "BayesianLoRAModel",
    "Diagnostics",
    "diagnose",
    "Posterior",
    "EnsembleResult",
    "FitResult",
    "LaplaceResult",
    "MCDropoutResult",
    "Prediction",
    "TemperatureScaledResult",
    "TrainConfig",
    "adapted_layers",
    "apply_temperature",
    "combine_predictions",
    "evaluate",
    "fit",
    "fit_temperature",
    "inject_adapters",
    "laplace_from_map",
    "load",
    "remove_adapters",
    "save",
    "temperature_scale",
]
