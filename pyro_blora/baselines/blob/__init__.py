"""BLoB (Wang et al., 2024) on the Bayesian-LoRA harness: the layer (:mod:`.layer`), its guide
(:mod:`.guide`) and the method (:mod:`.fit`)."""

from pyro_blora.baselines.blob.fit import BLoBOptions, BLoBResult, fit_blob, load_blob
from pyro_blora.baselines.blob.guide import BLoBGuide
from pyro_blora.baselines.blob.layer import BLoBLinear, flipout_project

__all__ = ["BLoBGuide", "BLoBLinear", "BLoBOptions", "BLoBResult", "fit_blob", "flipout_project", "load_blob"]
