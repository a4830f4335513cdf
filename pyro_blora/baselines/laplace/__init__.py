"""Last-layer Laplace on the answer head: the head and its features (:mod:`.head`), the GGN
curvature (:mod:`.curvature`) and the method with its GLM predictive (:mod:`.posterior`)."""

from pyro_blora.baselines.laplace.posterior import LaplaceResult, fit_laplace, laplace_from_map, load_laplace

__all__ = ["LaplaceResult", "fit_laplace", "laplace_from_map", "load_laplace"]
