"""Training: the SVI loop (:mod:`.svi`), its ELBO (:mod:`.elbo`), checkpoints (:mod:`.checkpoint`),
scale-out through accelerate (:mod:`.distributed`) and the built-in callbacks (:mod:`.callbacks`).

Nothing here knows a baseline: the baselines call :func:`~pyro_blora.training.svi.fit_svi` themselves.
"""
