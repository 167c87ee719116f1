"""Export a PaCa-ViT model to ONNX, check the file against PyTorch with onnxruntime, say where it went.

    python tools/export_onnx.py pacavit_tiny_p2cconv_100_0 --checkpoint pretrained
    python tools/export_onnx.py pacavit_tiny_p2cconv_100_0 --checkpoint work_dirs/.../model_best.pth.tar
    python tools/export_onnx.py pacavit_small_p2cconv_100_0_downstream --checkpoint pretrained --img-size 512

The graph comes from ``torch.onnx.export(..., dynamo=True)`` (that is, from ``torch.export``) with
batch size, height and width left dynamic: the file runs on any batch and image size, the example
input of ``--img-size`` only drives the export.  Right after writing, the file runs in
onnxruntime at two input sizes and must agree with the PyTorch model; otherwise the command fails.

A classifier gives ``logits`` (B, classes); its class count is taken from the checkpoint, the
``class_names`` that training checkpoints store go into the file's metadata, and ``--use-ema``
exports a training checkpoint's EMA weights.  A ``_downstream``
backbone gives ``stage1`` .. ``stage4`` (NCHW, strides 4 to 32).  The input is ``images``
(B, 3, H, W), normalised with the ImageNet mean and std.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import models

REPO = Path(__file__).resolve().parents[1]

DOWNSTREAM = "_downstream"
# ONNX Runtime and PyTorch sum in different orders: float32 outputs differ by ~1e-6 in practice
RTOL, ATOL = 1e-3, 1e-4
# torch.export takes a dynamic size to be at least 2 (0 and 1 are specialised), so the last stage
# (stride 32) must be at least 2x2: the exported graph is valid for inputs of 33 pixels and more
MIN_SIZE = 33
# torch.onnx's dynamo exporter writes opset 18 and up; lower ones would go through onnx's version
# converter, which cannot convert this model
MIN_OPSET = 18


def build_model(name: str, checkpoint: str = None, use_ema: bool = False):
    """The model ``name`` (a ``pacavit_*`` classifier or a ``*_downstream`` backbone) in eval mode with
    ``checkpoint`` loaded (a path, a URL, or ``pretrained`` for the released ImageNet file), and the
    class names that the checkpoint stores (or None)."""
    variant = name.removesuffix(DOWNSTREAM)
    if variant not in models.VARIANTS:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(models.VARIANTS)} (or <name>{DOWNSTREAM})")
    if name.endswith(DOWNSTREAM):
        if use_ema:
            raise SystemExit("--use-ema is for classifier checkpoints; a backbone loads as in detection/segmentation")
        backbone = models.create_downstream(variant, pretrained=checkpoint)
        backbone.init_weights()  # the backbone's own loading policy, as in detection / segmentation
        return backbone.eval(), None
    model, weights = models.create_classifier(name, checkpoint, use_ema=use_ema)
    return model.eval(), weights.class_names


def output_names(model: torch.nn.Module) -> list:
    if isinstance(model, models.PaCaViTDownstream):
        return [f"stage{i + 1}" for i in model.out_indices]
    return ["logits" if model.num_classes else "features"]


def export(model: torch.nn.Module, out: Path, img_size: int = 224, opset: int = None, metadata: dict = None) -> Path:
    """Write ``model`` as ONNX to ``out`` with dynamic batch, height and width; ``metadata`` (str to str)
    goes into the file's metadata_props."""
    Dim = torch.export.Dim
    dynamic = {"x": {0: Dim("batch"), 2: Dim("height", min=MIN_SIZE), 3: Dim("width", min=MIN_SIZE)}}
    # batch 2: an example batch of 1 would let the exporter treat the batch size as a constant
    example = torch.randn(2, 3, img_size, img_size)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=dynamic,
        input_names=["images"],
        output_names=output_names(model),
        opset_version=opset,
        verbose=False,
    )
    written = program.model.opset_imports.get("")
    if opset is not None and written != opset:
        raise SystemExit(f"error: torch.onnx wrote opset {written}, not the {opset} asked for; nothing was written")
    program.model.metadata_props.update(metadata or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))
    return out


def check(model: torch.nn.Module, path: Path, shapes) -> float:
    """Run ``path`` in onnxruntime on random inputs of each shape; returns the largest absolute
    difference to PyTorch, or raises AssertionError naming the shape where they disagree."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    largest = 0.0
    for shape in shapes:
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = model(images)
        expected = expected if isinstance(expected, (list, tuple)) else [expected]
        got = session.run(None, {"images": images.numpy()})
        assert len(got) == len(expected), f"{path} gives {len(got)} outputs, PyTorch {len(expected)}"
        for name, ort_out, torch_out in zip(output_names(model), got, expected):
            where = f"{path} output {name!r} at input {'x'.join(map(str, shape))}"
            np.testing.assert_allclose(ort_out, torch_out.numpy(), rtol=RTOL, atol=ATOL, err_msg=where)
            largest = max(largest, float(np.abs(ort_out - torch_out.numpy()).max()))
    return largest


def check_shapes(img_size: int):
    """Two batch sizes and two image sizes, the second one not square, so the dynamic axes are exercised."""
    return [(1, 3, img_size, img_size), (3, 3, img_size + 32, img_size + 64)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL_NAME", help="a pacavit_* name, or <name>_downstream for the backbone")
    parser.add_argument(
        "--checkpoint", metavar="PATH|URL|pretrained", help="the weights; 'pretrained': the released ImageNet file"
    )
    parser.add_argument("--use-ema", action="store_true", help="export the EMA weights of a training checkpoint")
    parser.add_argument("--out", type=Path, help="the ONNX file (default: work_dirs/onnx/MODEL_NAME.onnx)")
    parser.add_argument("--img-size", type=int, default=224, help="example input size for the export (default 224)")
    parser.add_argument("--opset", type=int,
                        help=f"ONNX opset, {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (default: torch.onnx's)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.img_size < MIN_SIZE:
        parser.error(f"--img-size must be at least {MIN_SIZE}: the last stage (stride 32) needs at least 2x2 tokens")
    if args.out is not None and args.out.is_dir():  # found before the export, not after it
        parser.error(f"--out {args.out} is a folder; give the file to write, e.g. --out {args.out / args.model}.onnx")
    if args.out is not None and args.out.suffix != ".onnx":  # never writes over a file of another kind
        parser.error(f"--out {args.out} is not an .onnx file name, e.g. --out {args.out.with_suffix('.onnx')}")
    if args.opset is not None and not MIN_OPSET <= args.opset <= onnx.defs.onnx_opset_version():
        parser.error(f"--opset must be {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (torch.onnx writes opset "
                     f"{MIN_OPSET} and up; this onnx knows up to {onnx.defs.onnx_opset_version()}), got {args.opset}")

    try:
        model, class_names = build_model(args.model, args.checkpoint, args.use_ema)
    except models.CheckpointError as err:  # a missing, broken or mismatched file: one line naming it
        raise SystemExit(f"error: {err}") from err
    out = (args.out or REPO / "work_dirs" / "onnx" / f"{args.model}.onnx").resolve()
    metadata = {"model_name": args.model}
    if class_names:
        metadata["class_names"] = json.dumps(list(class_names))
    # written beside the target and moved there once onnxruntime agrees: a failed export or check
    # leaves no file, and an earlier good one stays
    partial = out.with_name(out.name + ".partial")
    try:
        export(model, partial, args.img_size, args.opset, metadata)
        shapes = check_shapes(args.img_size)
        difference = check(model, partial, shapes)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    sizes = " and ".join("x".join(map(str, shape)) for shape in shapes)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    print(f"onnxruntime {onnxruntime.__version__} agrees with PyTorch at {sizes} (max abs difference {difference:.1e})")


if __name__ == "__main__":
    main()
