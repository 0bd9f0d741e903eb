"""Triton kernels of espo, installed as ``espo.kernels``. Import them through ``espo``, which dispatches."""
