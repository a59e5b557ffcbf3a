"""The Python API: train a network from a config and classify images with a checkpoint, in a few lines.

    import cnncli
    result = cnncli.fit("configs/seed.yaml", out="runs/x", train={"epochs": 1})
    clf = cnncli.load(result.best_path)
    p = clf.predict_proba(images)          # images: uint8 (N, C, H, W), or floats in [0, 1]

`fit` runs what `cnn train` runs (run folder, checkpoints, test evaluation) and returns its
`cnncli.run.train.TrainResult`; `load` gives a `cnncli.run.predict.Classifier`. (`fit`, not `train`: `cnncli.run.train`
is the training module, which a function of that name would shadow.) docs/python-api.md has a runnable
example. Errors are `cnncli.host.errors.CnnError` subclasses with one-line messages, as the CLI prints them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnncli import data
from cnncli.config import Config, build_config, config_to_dict, read_yaml
from cnncli.host.errors import ConfigError
from cnncli.host.safeload import MAX_DEPTH, too_deep
from cnncli.nn.registry import load_layer_file
from cnncli.run.predict import Classifier
from cnncli.run.train import Callbacks, TrainResult, default_run_dir, refuse_earlier_run
from cnncli.run.train import train as _train_run

__all__ = ["Classifier", "TrainResult", "fit", "load"]


def load(checkpoint: str | Path, layers: Sequence[str | Path] = ()) -> Classifier:
    """The network of a `.npz` checkpoint, ready to classify.

    Parameters
    ----------
    checkpoint : path
        A checkpoint written by `cnn train` / `fit` (best.npz, last.npz) or a parameters-only one.
    layers : paths
        Python files of your own layer types the checkpoint uses (what ``--layers`` takes; runs them).

    Returns
    -------
    Classifier
        ``.predict_proba(x)`` (N, K) probabilities, ``.predict(x)`` (N,) class indices, ``.logits(x)`` (N, K),
        ``.classes`` (K names), ``.input_shape`` (C, H, W), ``.predict_files(paths, top_k)``; x is uint8
        (N, C, H, W) pixels or floats in [0, 1], normalised with the checkpoint's statistics for you.
    """
    for path in layers:
        load_layer_file(path)
    return Classifier.from_checkpoint(checkpoint)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in: mappings merge key by key (recursively), anything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def fit(
    config: str | Path | Mapping[str, Any] | Config,
    out: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    layers: Sequence[str | Path] = (),
    callbacks: Callbacks | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a network as `cnn train` does, and return the run's result.

    Parameters
    ----------
    config : path, mapping or Config
        A YAML config file, a mapping with the same content (``{"model": {"layers": [...]}, ...}``), or a
        `cnncli.config.Config`.
    out : path, optional
        The run folder (default ``runs/<config name>-<timestamp>``). A folder that holds a run is refused
        unless `overwrite`.
    data_dir : path, optional
        Where the data set is, as ``--data-dir`` (default: ``$CNNCLI_DATA``, ``data.dir``, the cache); a
        missing downloadable data set is downloaded first.
    layers : paths
        Python files of your own layer types the config uses.
    callbacks : cnncli.run.train.Callbacks, optional
        Progress hooks (``on_epoch_end(metrics, is_best)``, …); nothing is printed.
    **overrides
        Top-level config keys merged into the config: ``seed=3``, ``train={"epochs": 1}``,
        ``data={"limit": 2000, "val_size": 500}`` (mappings merge key by key, lists and values replace).

    Returns
    -------
    TrainResult
        ``run_dir``, ``best_path`` / ``last_path`` (checkpoints for `load`), ``history`` (one `EpochMetrics`
        per epoch: train_loss, train_acc, val_loss, val_acc, lr, …), ``best_epoch``, ``best_val_acc`` and
        ``test`` (an `EvalResult` of best.npz on the test split: ``accuracy``, ``loss``, ``confusion`` (K, K);
        None when the data set has no test split).

    Raises
    ------
    cnncli.host.errors.CnnError
        ConfigError (a key path and value), DataError, CheckpointError, TrainingDiverged; one-line messages.
    """
    for path in layers:
        load_layer_file(path)
    for key, value in [("config", config), *overrides.items()]:  # before anything copies or merges them
        deep = too_deep(dict(value) if isinstance(value, Mapping) else value, MAX_DEPTH, 1 + (key != "config"))
        if deep:
            raise ConfigError(f"{key}: {deep}")
    source = ""
    if isinstance(config, Config):
        raw, name = config_to_dict(config), config.name
    elif isinstance(config, Mapping):
        raw, name = copy.deepcopy(dict(config)), str(config.get("name", "config"))
    else:
        source = str(config)
        raw, name = read_yaml(Path(config)), Path(config).stem
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        cfg = build_config(_merge(raw or {}, overrides), name=name)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    run_dir = Path(out) if out is not None else default_run_dir(cfg)
    if not overwrite:
        refuse_earlier_run(run_dir)
    target = data.resolve_data_dir(Path(data_dir) if data_dir is not None else None, cfg.data.dir, cfg.data.dataset)
    folder = data.ensure_dataset(cfg.data, target)
    return _train_run(cfg, run_dir, folder, callbacks=callbacks)
