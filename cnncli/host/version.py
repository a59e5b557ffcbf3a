"""The version of cnncli (the package and `cnn --version` say it; ONNX files carry it as their producer's)."""

__version__ = "0.1.0"
