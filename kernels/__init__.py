"""Triton kernels of espo, installed as ``espo.kernels``; in a source checkout ``import espo`` registers this
folder under that name (``espo.backends.register_checkout_kernels``). ``espo.sample`` dispatches to them."""
