"""Installs the coatnet_jax package; dependencies come from requirements.txt."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent
_REQUIREMENTS = [
    line.split('#')[0].strip()
    for line in (_HERE / 'requirements.txt').read_text().splitlines()
    if line.split('#')[0].strip()
]

setuptools.setup(
    name='coatnet_jax',
    version='0.1.0',
    description='CoAtNet (Dai et al., 2021) in JAX/Flax: faithful models, sharded training, recipes.',
    long_description=(_HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    # configs/ too: recipes import configs.common, so --config works from any directory.
    packages=setuptools.find_packages(include=['coatnet_jax', 'coatnet_jax.*', 'configs']),
    python_requires='>=3.11',
    install_requires=_REQUIREMENTS,
)
