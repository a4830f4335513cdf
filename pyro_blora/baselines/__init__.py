"""The methods Bayesian-LoRA is compared against, each registered in :data:`pyro_blora.methods.METHODS`.

* :mod:`.mc_dropout`: dropout on the LoRA path kept on at prediction;
* :mod:`.ensemble`: k MAP adapters on one frozen base;
* :mod:`.temperature`: post-hoc temperature scaling on validation data;
* :mod:`.blob`: BLoB (mean-field Gaussian A, Flipout, B a point estimate);
* :mod:`.laplace`: last-layer Laplace on the answer head;
* :mod:`.tfb`: training-free Bayesianization of a MAP adapter (Shi et al. 2025).

Importing this package registers them all.
"""

from pyro_blora.baselines import blob, ensemble, laplace, mc_dropout, temperature, tfb

__all__ = ["blob", "ensemble", "laplace", "mc_dropout", "temperature", "tfb"]
