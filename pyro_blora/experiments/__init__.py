"""Experiments on top of the library: the compare pipeline (:mod:`.pipeline`), its report and
plots (:mod:`.report`, :mod:`.plots`), the embedded default model and data (:mod:`.zoo`) and the
command line (:mod:`.cli`). Nothing below this package imports it."""
