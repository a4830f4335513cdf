"""Laplace baselines. Last-layer Laplace on the answer head: the head and its features (:mod:`.head`), laplace-torch's
posterior over that head (:mod:`.curvature`), the GLM predictive's probabilities (:mod:`.glm`) and the method
(:mod:`.posterior`). Laplace-LoRA over all
LoRA weights on laplace-torch (K-FAC): the wrapper (:mod:`.lora`) and the method (:mod:`.lora_posterior`)."""

from pyro_blora.baselines.laplace.lora_posterior import (
    LaplaceLoRAResult,
    fit_laplace_lora,
    laplace_lora_from_map,
    load_laplace_lora,
)
from pyro_blora.baselines.laplace.posterior import LaplaceResult, fit_laplace, laplace_from_map, load_laplace

__all__ = [
    "LaplaceLoRAResult", "LaplaceResult", "fit_laplace", "fit_laplace_lora", "laplace_from_map", "laplace_lora_from_map",
    "load_laplace", "load_laplace_lora",
]
