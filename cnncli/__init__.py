"""cnncli: train convolutional networks on CIFAR-10 in pure NumPy, every pass written by hand."""

__version__ = "0.1.0"
