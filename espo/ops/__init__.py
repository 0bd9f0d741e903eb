"""The op: ``espo.sample`` (one fused draw per row, its statistics and the ESPO stop update) and its homes.

``sample`` checks the arguments and dispatches (``backends`` says which backend runs here); ``sampling_params``
holds the sampling settings (``SamplingParams``), checked once where they are built; ``reference`` is the
plain PyTorch definition every backend is held to; ``torch_backend`` computes the reference's tokens in fewer
passes; ``cuda`` binds the compiled extension ``espo._C``; the Triton kernels are ``espo.kernels``. ``philox``
gives each row its uniform and ``stopper`` holds the ESPO stop rule's settings and per-row state.
"""
