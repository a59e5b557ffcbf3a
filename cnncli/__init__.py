"""cnncli: train convolutional networks on CIFAR-10 in pure NumPy, every pass written by hand.

The public layer API, for layers of your own (`cnn … --layers my_layers.py`, see docs/layers-api.md):
`Layer` (the base class), `LayerOptions` and `option` (declaring a layer's config keys).
"""

__version__ = "0.1.0"

from cnncli.layers import Layer  # noqa: E402  (importing the layers registers the built-in types)
from cnncli.options import LayerOptions, option  # noqa: E402

__all__ = ["Layer", "LayerOptions", "option", "__version__"]
