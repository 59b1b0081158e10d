"""The Triton backend: one kernel module per op (:mod:`.logprob_entropy`, :mod:`.linear_logprob_entropy`), their
shared building blocks (:mod:`.common`) and the ahead-of-time compile check (:mod:`.aot`).

Every module here imports triton (an optional dependency: Linux only), so nothing imports this package at
``import edge_kernels``; :func:`edge_kernels.backends.get` loads it on the first ``impl="triton"`` call.
"""
