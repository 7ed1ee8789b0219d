"""Build script: the pure-Python package always; the CUDA/C++ extension when csrc/ has sources and a
toolchain is present (see csrc/README and the issue on fused kernels)."""

from setuptools import setup

setup()
