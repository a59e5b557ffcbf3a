"""The `cnn` commands that take a trained network out of training: predict (image files) and export (ONNX).
Each parses its options, calls the library (`cnncli/run/predict.py`, `cnncli/run/onnx_export.py`) and renders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnncli.cli.kit import (
    LayersOpt,
    TtaOpt,
    check_output,
    check_tta,
    err,
    load_layers,
    out,
    shape_text,
    user_errors,
)
from cnncli.cli.text import json_text, safe

CheckpointArg = Annotated[
    Path, typer.Argument(metavar="CHECKPOINT", help="A .npz checkpoint (best.npz, last.npz, or exported weights).")
]


@user_errors
def predict(
    checkpoint: CheckpointArg,
    images: Annotated[
        list[str],
        typer.Argument(metavar="IMAGE…", help="Image files (PNG or JPEG), folders of them, or glob patterns "
                       "('photos/**/*.jpg')."),
    ],
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, metavar="K", help="Classes shown per image (at most all).")
    ] = 5,
    json_out: Annotated[
        bool, typer.Option("--json", help='One JSON object per line and image: {"file": …, "top": [{"class": …, '
                           '"p": …}, …]}.')
    ] = False,
    layers: LayersOpt = None,
    tta: TtaOpt = None,
) -> None:
    r"""The most probable classes of each image, with their probabilities (needs Pillow: pip install
    'cnncli\[images]'). Each image is decoded (EXIF orientation applied), converted to the network's channels,
    scaled to cover its input and centre-cropped, normalised with the checkpoint's statistics, and run in
    evaluation mode. A file that cannot be read gives one line naming it; the others are still classified, and
    the exit code is 1."""
    from cnncli.data.images import require_pillow
    from cnncli.run.predict import Classifier, Failure, image_inputs

    require_pillow()
    check_tta(tta)
    load_layers(layers)
    classifier = Classifier.from_checkpoint(checkpoint)
    if tta is not None:
        classifier.tta = tta
    failed = 0
    for result in classifier.classify_files(image_inputs(images), top_k):
        if isinstance(result, Failure):
            failed += 1
            err.print(f"[red]error:[/red] {safe(result.message)}", soft_wrap=True, emoji=False)
        elif json_out:
            out.print(json_text(result.to_dict()), markup=False, highlight=False,
                      soft_wrap=True, emoji=False)
        else:
            ranked = "  ".join(f"{safe(c)} {100 * p:.1f}%" for c, p in result.top)
            out.print(f"{safe(result.file)}: {ranked}", soft_wrap=True, emoji=False)
    if failed:
        raise typer.Exit(code=1)



@user_errors
def export(
    checkpoint: CheckpointArg,
    onnx_path: Annotated[
        Path, typer.Option("--onnx", metavar="FILE", help="The ONNX file to write (replaced atomically).")
    ],
    layers: LayersOpt = None,
) -> None:
    r"""Write the network as an ONNX file (standard operators, opset 17; needs pip install 'cnncli\[onnx]').
    The checkpoint's normalisation is folded into the graph: its input "pixels" is float32 (N, C, H, W), the
    image's pixels divided by 255 (values in [0, 1]), channels first; its outputs are "logits" and
    "probabilities" (N, classes). The class names, mean and std are in the model's metadata."""
    from cnncli.run.onnx_export import export_onnx, require_onnx
    from cnncli.run.predict import Classifier

    require_onnx()
    check_output(onnx_path, "--onnx")
    load_layers(layers)
    classifier = Classifier.from_checkpoint(checkpoint)
    info = export_onnx(classifier.model, classifier.normalize, onnx_path, classifier.classes)
    k = len(info.classes)
    out.print(
        f"wrote {safe(str(info.path))}: ONNX opset {info.opset}, {info.nodes} operators, {info.bytes / 1e3:,.0f} kB; "
        f"input pixels N×{shape_text(info.input_shape)} float32 in [0, 1] (pixel / 255; normalisation included); "
        f"outputs logits and probabilities N×{k}",
        soft_wrap=True,
    )
