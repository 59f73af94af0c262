"""Packaging details pyproject.toml cannot say: the program folder `train/` installs as the package
`lora_jax_train` (never as a global `train` module that would shadow a user's own train.py); the
`lora-jax` command is `lora_jax_train.cli:main`. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["lora_jax", "lora_jax.*"]) + ["lora_jax_train"],
    package_dir={"lora_jax_train": "train"},
)
