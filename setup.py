"""Build script: the pure-Python package today; the CUDA extension espo._C joins it in its own issue."""
from setuptools import setup

setup()
