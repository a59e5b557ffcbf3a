"""cnncli: train convolutional networks on CIFAR-10 in pure NumPy, every pass written by hand.

The Python API (docs/python-api.md, `cnncli/run/api.py`): `fit(config, out=…, **overrides)` trains as `cnn train`
does and returns the run's result; `load(checkpoint)` gives a `Classifier` (`predict_proba`, `predict`,
`classes`). They are imported on first use, so `import cnncli` stays light. (`fit`, not `train`: `cnncli.run.train`
is the training module.)

The public layer API, for layers of your own (`cnn … --layers my_layers.py`, see docs/layers-api.md):
`Layer` (the base class), `LayerOptions` and `option` (declaring a layer's config keys).
"""

from typing import Any

from cnncli.host.version import __version__  # noqa: E402
from cnncli.nn import Layer  # noqa: E402  (importing cnncli.nn registers the built-in layer types)
from cnncli.nn.options import LayerOptions, option  # noqa: E402

_API = ("Classifier", "fit", "load")
__all__ = ["Classifier", "Layer", "LayerOptions", "fit", "load", "option", "__version__"]


def __getattr__(name: str) -> Any:
    """`cnncli.fit`, `cnncli.load`, `cnncli.Classifier`: imported from `cnncli.run.api` when first asked for."""
    if name in _API:
        from cnncli.run import api

        return getattr(api, name)
    raise AttributeError(f"module 'cnncli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
