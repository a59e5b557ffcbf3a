"""`cnn saliency`, `cnn attack` and `cnn show` (registered on the app in cnncli/cli.py): what δX says about an
image, adversarial images made from it, and a layer's filters and feature maps. Parse, call the library
(cnncli/run/saliency.py, cnncli/run/attack.py), render; pictures need the viz extra (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cnncli.cli.kit import (
    DataDirOpt,
    JsonOpt,
    LayersOpt,
    SplitOpt,
    check_output,
    check_split,
    load_layers,
    out,
    prepare_data,
    print_json,
    split_images,
    user_errors,
)
from cnncli.cli.text import safe

CheckpointArg = Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A .npz checkpoint (best.npz, last.npz).")]
ImagesArg = Annotated[
    list[str] | None,
    typer.Argument(metavar="IMAGE…", help="PNG/JPEG files, folders of them, or glob patterns. Default: images of "
                   "--split."),
]
IndexOpt = Annotated[
    list[int] | None,
    typer.Option("--index", "-i", metavar="I", help="Image I of --split (0-based); repeat for more. Default: 0–7."),
]


class _Images:
    """The images a command works on: pixels (N, C, H, W) in [0, 1], names, true labels (None: unknown)."""

    def __init__(self, pixels: Any, names: list[str], labels: list[int | None]) -> None:
        self.pixels, self.names, self.labels = pixels, names, labels


def _load(checkpoint: Path, layers: list[Path] | None, dtype: Any = None) -> tuple[Any, Any, Any, tuple[str, ...]]:
    """(checkpoint, model in evaluation mode as `dtype` (default float64), PixelScale, class names)."""
    import numpy as np

    from cnncli.config import NormalizeConfig
    from cnncli.host.errors import CheckpointError
    from cnncli.run.checkpoint import open_checkpoint
    from cnncli.run.saliency import PixelScale

    load_layers(layers)
    ckpt, model = open_checkpoint(checkpoint)
    norm = ckpt.config.data.normalize
    if not isinstance(norm, NormalizeConfig):
        raise CheckpointError(f"{checkpoint}: data.normalize is {norm!r}, not resolved to a mean and std")
    model = model.astype(dtype or np.float64).eval()
    k = int(model.output_shape[0])
    classes = tuple(ckpt.classes) if ckpt.classes else tuple(str(i) for i in range(k))
    return ckpt, model, PixelScale.of(norm, model.input_shape[0]), classes


def _images(ckpt: Any, model: Any, images: list[str] | None, split: str, index: list[int] | None,
            data_dir: Path | None, quiet: bool, default_count: int = 8) -> _Images:
    """Files when IMAGE… is given (labels unknown), else the --split images at --index (default 0…count−1)."""
    import numpy as np

    from cnncli.host.errors import CnnError, ConfigError

    if images:
        if index:
            raise ConfigError("give IMAGE… or --index, not both (--index picks images of --split)")
        from cnncli.data.images import decode_image, require_pillow
        from cnncli.run.predict import Failure, image_inputs

        require_pillow()
        c, h, w = model.input_shape
        if c not in (1, 3):
            raise CnnError(f"the network takes {c}-channel images; image files give 1 (grey) or 3 (RGB)")
        pixels, names = [], []
        for item in image_inputs(images):
            if isinstance(item, Failure):
                raise CnnError(item.message)
            pixels.append(decode_image(item, (c, h, w)))
            names.append(str(item))
        return _Images(np.stack(pixels).astype(np.float64) / 255.0, names, [None] * len(names))
    check_split(split)
    folder = prepare_data(data_dir, ckpt.config, quiet=quiet)
    xs, ys, _ = split_images(ckpt.config, folder, split)
    picks = list(index) if index else list(range(min(default_count, len(xs))))
    for i in picks:
        if not 0 <= i < len(xs):
            raise ConfigError(f"--index: must be in 0..{len(xs) - 1} for the {split} split ({len(xs):,} images), "
                              f"got {i}")
    if tuple(xs.shape[1:]) != tuple(model.input_shape):
        raise ConfigError(f"the network takes {list(model.input_shape)} images, the {split} split has "
                          f"{list(xs.shape[1:])}")
    return _Images(xs[picks].astype(np.float64) / 255.0, [f"{split}[{i}]" for i in picks],
                   [int(ys[i]) for i in picks])


def _class_index(value: str | None, classes: tuple[str, ...]) -> int | None:
    from cnncli.host.errors import ConfigError

    if value is None:
        return None
    if value in classes:
        return classes.index(value)
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    raise ConfigError(f"--class: {value!r} is neither a class name nor an index 0..{len(classes) - 1} "
                      f"(classes: {', '.join(classes)})")


@user_errors
def saliency(
    checkpoint: CheckpointArg,
    images: ImagesArg = None,
    index: IndexOpt = None,
    split: SplitOpt = "test",
    class_: Annotated[
        str | None,
        typer.Option("--class", metavar="NAME|K", help="Take δX of L = −log p for this class (name or index). "
                     "Default: each image's predicted class."),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", min=0, metavar="K", help="SmoothGrad: also average δX over K noisy copies.")
    ] = 0,
    noise: Annotated[
        float, typer.Option("--noise", min=0.0, metavar="SIGMA",
                            help="SmoothGrad's noise standard deviation, on the [0, 1] pixel scale.")
    ] = 0.15,
    png: Annotated[Path, typer.Option("--png", metavar="FILE", help="The grid picture to write.")] = Path(
        "saliency.png"),
    no_png: Annotated[bool, typer.Option("--no-png", help="Write no picture (numbers only).")] = False,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
    layers: LayersOpt = None,
) -> None:
    r"""Saliency maps: δX = ∂L/∂X from the network's own backward pass (evaluation mode), taken back through the
    normalisation to the pixels (δU = δX/σ, docs/derivations.md#input-gradient-and-pixels). For each image:
    max over channels of |δU| beside and over the image, optionally SmoothGrad (--samples) and gradient × input.
    Writes a grid PNG (needs the viz extra: pip install 'cnncli\[viz]'); --json prints the numbers."""
    import numpy as np

    from cnncli.run.saliency import saliency as run_saliency

    if not no_png:
        from cnncli.run.plot import require_matplotlib

        require_matplotlib()
        check_output(png, "--png")
    ckpt, model, scale, classes = _load(checkpoint, layers)
    imgs = _images(ckpt, model, images, split, index, data_dir, json_out)
    t = _class_index(class_, classes)
    target = None if t is None else np.full(len(imgs.pixels), t)
    s = run_saliency(model, scale, imgs.pixels, target, samples=samples, noise=noise)
    written = None
    if not no_png:
        from cnncli.run.plot_gradients import saliency_png

        written = saliency_png(s, imgs.names, classes, imgs.labels, png,
                               title=f"{checkpoint}: saliency δU = ∂L/∂U = δX/σ, L = −log p_t "
                               f"(pixels U ∈ [0, 1], evaluation mode)")
    rows = []
    for i, name in enumerate(imgs.names):
        pred = int(np.argmax(s.p[i]))
        heat = s.heat[i]
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        row: dict[str, Any] = {
            "image": name, "label": imgs.labels[i],
            "class": None if imgs.labels[i] is None else classes[imgs.labels[i]],
            "predicted": classes[pred], "p_predicted": float(s.p[i, pred]), "target": classes[int(s.target[i])],
            "p_target": float(s.p[i, int(s.target[i])]), "loss": float(s.loss[i]),
            "grad_abs_max": float(np.abs(s.grad[i]).max()), "grad_l2": float(np.linalg.norm(s.grad[i])),
            "peak": [int(peak[0]), int(peak[1])],
        }  # fmt: skip
        if json_out:
            row["saliency"] = np.round(heat, 9).tolist()
            row["grad_x_input"] = np.round(s.grad_x_input[i], 9).tolist()
            if s.smooth_heat is not None:
                row["smoothgrad"] = np.round(s.smooth_heat[i], 9).tolist()
        rows.append(row)
    if json_out:
        print_json({"checkpoint": str(checkpoint), "samples": samples, "noise": noise,
                    "png": None if written is None else str(written), "images": rows})
        return
    out.print(f"[bold]saliency[/bold] {safe(str(checkpoint))}: δU = ∂L/∂U = δX/σ, L = −log p_t, "
              f"{len(rows)} image{'s' if len(rows) > 1 else ''}" + (f", SmoothGrad {samples} × σ = {noise:g}"
                                                                     if samples else ""), soft_wrap=True)
    for r in rows:
        truth = f"true {safe(r['class'])}, " if r["class"] is not None else ""
        out.print(f"  {safe(r['image'])}: {truth}predicted {safe(r['predicted'])} (p = {r['p_predicted']:.3f}); "
                  f"t = {safe(r['target'])}, L = {r['loss']:.4g}, max |δU| = {r['grad_abs_max']:.3g} at row "
                  f"{r['peak'][0]}, column {r['peak'][1]}, ‖δU‖ = {r['grad_l2']:.3g}", soft_wrap=True)
    if written is not None:
        out.print(f"wrote {safe(str(written))}")


@user_errors
def attack(
    checkpoint: CheckpointArg,
    images: ImagesArg = None,
    eps: Annotated[
        str, typer.Option("--eps", metavar="E[,E…]", help="L∞ radius on the [0, 1] pixel scale: 2/255, 0.01, or a "
                          "comma list (0,1/255,2/255,4/255) for a table.")
    ] = "2/255",
    steps: Annotated[
        str, typer.Option("--steps", metavar="K[,K…]", help="1: FGSM; K > 1: PGD with K steps. A comma list runs "
                          "each (1,10).")
    ] = "1",
    step_size: Annotated[
        str | None, typer.Option("--step-size", metavar="A", help="PGD's step on the pixel scale (a number or a "
                                 "fraction). Default: 2.5·ε/K.")
    ] = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, metavar="N", help="Images of --split, from the first.")
                     ] = 1000,
    split: SplitOpt = "test",
    examples: Annotated[int, typer.Option("--examples", min=0, metavar="M", help="Images drawn in the PNG.")] = 6,
    png: Annotated[Path, typer.Option("--png", metavar="FILE", help="Examples of the strongest attack.")] = Path(
        "attack.png"),
    no_png: Annotated[bool, typer.Option("--no-png", help="Write no picture (the table only).")] = False,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
    layers: LayersOpt = None,
) -> None:
    r"""Adversarial images from δX (docs/derivations.md#adversarial-examples): FGSM, U + ε·sign(δU) clipped to
    [0, 1], or PGD, K signed steps each projected back to the ε-ball around U and to [0, 1]. Accuracy on N
    images before and after, for every ε and K asked; a PNG of examples (image, perturbation magnified,
    adversarial image, predictions) of the strongest attack (needs the viz extra: pip install 'cnncli\[viz]').
    Image files have no label: each is attacked against the network's own prediction on it."""
    import numpy as np

    from cnncli.host.errors import ConfigError
    from cnncli.run.attack import attack as run_attack
    from cnncli.run.attack import parse_eps
    from cnncli.run.saliency import predict_proba

    eps_list = parse_eps(eps)
    try:
        steps_list = [int(s) for s in steps.split(",")]
    except ValueError:
        raise ConfigError(f"--steps: {steps!r} is not a whole number or a comma list of them") from None
    if any(k < 1 for k in steps_list):
        raise ConfigError(f"--steps: every K must be at least 1, got {steps}")
    a = parse_eps(step_size, "--step-size")[0] if step_size is not None else None
    if not no_png and examples:
        from cnncli.run.plot import require_matplotlib

        require_matplotlib()
        check_output(png, "--png")
    ckpt, model, scale, classes = _load(checkpoint, layers, np.float32)  # float32: the sign of δU is all FGSM needs
    imgs = _images(ckpt, model, images, split, None, data_dir, json_out) if images else \
        _split_head(ckpt, model, split, count, data_dir, json_out)
    p_clean = predict_proba(model, scale, imgs.pixels)
    labels = np.array([lab if lab is not None else int(np.argmax(p_clean[i])) for i, lab in enumerate(imgs.labels)])
    clean_acc = float(np.mean(p_clean.argmax(axis=1) == labels))
    if not json_out:
        out.print(f"[bold]attack[/bold] {safe(str(checkpoint))}: {len(labels):,} images of "
                  f"{'the files (labels: the network’s own predictions)' if images else 'the ' + split + ' split'}, "
                  f"clean accuracy {100 * clean_acc:.2f}%", soft_wrap=True)
    from cnncli.cli.progress import count_progress

    results = []
    total = len(labels) * sum(k for k in steps_list for e in eps_list if e > 0)  # image gradients to take
    done = 0
    with count_progress("attack", "image gradients δX", quiet=json_out) as progress:
        def step(k_images: int) -> None:
            nonlocal done
            done += k_images
            progress(done, total)

        for k in steps_list:
            for e in eps_list:
                r = run_attack(model, scale, imgs.pixels, labels, e, k, a if k > 1 or a is not None else None,
                               on_batch=step)
                results.append(r)
                if not json_out:
                    out.print(f"  {r.method:7} ε = {e * 255:5.3g}/255  accuracy {100 * r.accuracy:6.2f}%  "
                              f"(step {r.step_size * 255:.3g}/255)")
    written = None
    strongest = results[-1]
    if not no_png and examples:
        from cnncli.run.plot_gradients import attack_png

        flipped = [i for i in range(len(labels)) if p_clean[i].argmax() == labels[i]
                   and strongest.p[i].argmax() != labels[i]]
        rest = [i for i in range(len(labels)) if i not in flipped]
        picks = (flipped + rest)[:examples]
        if picks:
            written = attack_png(imgs.pixels, p_clean, strongest, picks, labels, classes, png,
                                 title=f"{checkpoint}: {strongest.method}, ε = {strongest.eps * 255:g}/255 "
                                 f"(pixels U ∈ [0, 1]); accuracy {100 * clean_acc:.1f}% → "
                                 f"{100 * strongest.accuracy:.1f}% on {len(labels):,} images")
    table = [{"method": r.method, "eps": r.eps, "eps_255": r.eps * 255, "steps": r.steps, "step_size": r.step_size,
              "accuracy": r.accuracy} for r in results]
    if json_out:
        print_json({"checkpoint": str(checkpoint), "images": len(labels), "labels": "files: the clean prediction"
                    if images else f"{split} labels", "clean_accuracy": clean_acc, "attacks": table,
                    "png": None if written is None else str(written)})
        return
    if written is not None:
        out.print(f"wrote {safe(str(written))}")


def _split_head(ckpt: Any, model: Any, split: str, count: int, data_dir: Path | None, quiet: bool) -> _Images:
    """The first `count` images of --split (all of them when there are fewer)."""
    import numpy as np

    from cnncli.host.errors import ConfigError

    check_split(split)
    folder = prepare_data(data_dir, ckpt.config, quiet=quiet)
    xs, ys, _ = split_images(ckpt.config, folder, split)
    if tuple(xs.shape[1:]) != tuple(model.input_shape):
        raise ConfigError(f"the network takes {list(model.input_shape)} images, the {split} split has "
                          f"{list(xs.shape[1:])}")
    n = min(count, len(xs))
    return _Images(xs[:n].astype(np.float64) / 255.0, [f"{split}[{i}]" for i in range(n)],
                   [int(v) for v in ys[:n]])


def _find_layer(model: Any, name: str) -> int:
    """The index of the layer `name` names: its name (conv2, bn1, fc1), its tensor's key in the article's
    notation (S2, A2, P1, Y1: cnn trace's names), or its 0-based index. ConfigError listing the choices."""
    from cnncli.host.errors import ConfigError
    from cnncli.nn.trace import name_tensors

    names = name_tensors(model)
    for i, layer in enumerate(model.layers):
        if layer.name == name or names[i].output.key == name or names[i].output.text == name:
            return i
    if name.isdigit() and int(name) < len(model.layers):
        return int(name)
    choices = ", ".join(f"{layer.name or i}/{names[i].output.key}" for i, layer in enumerate(model.layers))
    raise ConfigError(f"--layer: no layer {name!r} in this network (layers, by name or index / tensor: {choices})")


@user_errors
def show(
    checkpoint: CheckpointArg,
    layer: Annotated[str, typer.Option("--layer", "-l", metavar="NAME",
                                       help="conv2, bn1, … (cnn summary's names), the tensor's symbol as cnn trace "
                                       "names it (S2, A2, P1), or the layer's 0-based index.")],
    images: ImagesArg = None,
    index: Annotated[int, typer.Option("--index", "-i", metavar="I", help="Image I of --split (0-based).")] = 0,
    split: SplitOpt = "test",
    png: Annotated[Path, typer.Option("--png", metavar="FILE", help="The picture to write.")] = Path("layer.png"),
    data_dir: DataDirOpt = None,
    layers: LayersOpt = None,
) -> None:
    r"""Draw a layer: a conv layer's filters W[c, c′, u, v] (the first layer on RGB as colour patches; a deeper
    one per filter at its strongest input channel) and the feature maps one image gives at that layer's output
    (needs the viz extra: pip install 'cnncli\[viz]')."""
    import numpy as np

    from cnncli.host.errors import ConfigError
    from cnncli.nn.trace import name_tensors
    from cnncli.run.plot import require_matplotlib
    from cnncli.run.plot_gradients import layer_png

    require_matplotlib()
    check_output(png, "--png")
    ckpt, model, scale, classes = _load(checkpoint, layers)
    i = _find_layer(model, layer)
    if images and len(images) != 1:
        raise ConfigError(f"cnn show draws one image; got {len(images)} IMAGE arguments")
    imgs = _images(ckpt, model, images, split, None if images else [index], data_dir, False)
    if len(imgs.pixels) != 1:
        raise ConfigError(f"{images[0] if images else '--index'}: gives {len(imgs.pixels)} images; cnn show draws one")
    names = name_tensors(model)
    a = scale.to_input(imgs.pixels, model.dtype)
    for lay in model.layers[: i + 1]:
        a = lay.forward(a)
    maps = np.asarray(a[0], dtype=np.float64)
    target = model.layers[i]
    sym = names[i].output
    if maps.ndim != 3:
        image_layers = [f"{lay.name or j}/{names[j].output.key}" for j, lay in enumerate(model.layers)
                        if len(lay.output_shape(_in_shape(model, j))) == 3]
        raise ConfigError(f"--layer {layer}: {target.name or target.kind} gives a vector of {maps.size} values, "
                          f"not feature maps; image layers: {', '.join(image_layers)}")
    w = strongest = None
    w_tex = ""
    if target.kind == "conv":
        w = np.asarray(target.params["W"], dtype=np.float64)
        w_tex = names[i].params["W"].tex
        if w.shape[1] != 3:  # not RGB: per filter, its strongest input channel
            strongest = np.sqrt((w ** 2).sum(axis=(2, 3))).argmax(axis=1)
    label = f", true {classes[imgs.labels[0]]}" if imgs.labels[0] is not None else ""
    written = layer_png(w, w_tex, maps, sym.tex, imgs.pixels[0], target.name or f"layer {i} ({target.kind})", png,
                        title=f"{checkpoint} · {imgs.names[0]}{label} · layer {i}: {target.describe()}",
                        strongest=strongest)
    what = f"{w.shape[0]} filters and " if w is not None else ""
    out.print(f"wrote {safe(str(written))}: {what}{sym.text} {'×'.join(map(str, maps.shape))} of "
              f"{safe(imgs.names[0])}", soft_wrap=True)


def _in_shape(model: Any, j: int) -> tuple[int, ...]:
    shape = tuple(model.input_shape)
    for lay in model.layers[:j]:
        shape = tuple(lay.output_shape(shape))
    return shape
