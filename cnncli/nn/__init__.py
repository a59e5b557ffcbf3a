"""The reference network: the math a learner reads beside docs/derivations.md.

`layer` (the `Layer` base class), `options` (declaring a layer's config keys), `registry` (type names -> classes,
and users' `--layers` files), `layers` (the built-in layers, forward and backward side by side), `residual`
(the residual block), `build` (layers from config entries, the parameter budget), `model` (`Sequential`, the
network, run layer by layer), `gradcheck` (finite differences) and `trace` (one image through the network in the
article's notation). Nothing here imports the engine, the data sets, the training loop or the CLI: the fused
engine (`cnncli/engine/`) takes a `Sequential` and runs it faster.
"""

from cnncli.nn import layers, layers_extra, residual  # noqa: F401  (importing them registers the built-in layer types)
from cnncli.nn.layer import Layer, Shape
from cnncli.nn.options import LayerOptions, option

__all__ = ["Layer", "LayerOptions", "Shape", "option"]
