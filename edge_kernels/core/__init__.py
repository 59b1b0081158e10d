"""Building blocks below every backend (torch only; imports nothing else of the package): streaming softmax
statistics (:mod:`.stats`), elementwise tiles and the logits gradient (:mod:`.tiles`), capability probes
(:mod:`.probes`), launch parameters and default chunk sizes (:mod:`.params`).
"""
