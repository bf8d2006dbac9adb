"""The package list, which pyproject.toml cannot state: every rotary_gguf* package found in the tree (so new
subpackages need no edit here) plus the two that pyproject.toml's package-dir maps from other folders."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["rotary_gguf", "rotary_gguf.*"]), "rotary_gguf.profiles", "rotary_gguf.native"])
