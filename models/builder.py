"""The one way to get a classifier with weights: :func:`create_classifier`.

validate.py, tools/predict.py (and the explorer through it), tools/export_onnx.py and
tools/visualize_clusters.py call it, so ``pretrained``, a file and a URL mean the same everywhere.
"""
import difflib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import timm
import torch.nn as nn

from .checkpoint import CheckpointError, extract_state_dict, load_checkpoint, read_checkpoint

# The one word for the released ImageNet weights (command lines, ``weights=``, configs' init_cfg).
PRETRAINED = "pretrained"


class UnknownModelError(ValueError):
    """A model name that timm does not know; the message suggests close names."""


@dataclass
class ClassifierWeights:
    """What the weights given to :func:`create_classifier` say besides their tensors.

    ``source``: the file or URL loaded (``pretrained`` resolved), None for random weights;
    ``class_names``: the names a training run stored (train_timm.py writes them), else None;
    ``data_config``: the evaluation input (timm's data config: ``input_size``, ``crop_pct``, ...) a
    training run stored, else None;
    ``checkpoint``: the whole checkpoint dict ({} for random weights)."""

    source: Optional[str] = None
    class_names: Optional[List[str]] = None
    data_config: Optional[dict] = None
    checkpoint: dict = field(default_factory=dict)


def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown model {name!r}.{hint} PaCa-ViT models: "
                            f"{', '.join(timm.list_models('pacavit_*'))} (or any timm model name)")


def released_weights(name: str, num_classes: Optional[int] = None) -> str:
    """The URL of ``name``'s released ImageNet weights; a CheckpointError, before any download, when
    there are none or they classify another number of classes than ``num_classes``."""
    released = timm.get_pretrained_cfg(name)
    url = released.url if released else None
    if not url:
        raise CheckpointError(f"{name} has no released ImageNet weights: give a checkpoint file or URL "
                              f"instead of {PRETRAINED!r}")
    if num_classes is not None and num_classes != released.num_classes:
        raise CheckpointError(f"the released {name} weights classify {released.num_classes} classes, not the "
                              f"{num_classes} asked for: fine-tune them first, or give a checkpoint trained on these")
    return url


def _classifier_width(name: str, checkpoint: dict, source: str, use_ema: bool, num_classes: Optional[int]) -> int:
    """The number of classes of the checkpoint's classifier; one without a classifier is refused
    unless the caller asked for none (``num_classes=0``: a feature extractor)."""
    released = timm.get_pretrained_cfg(name)
    classifier = (released.classifier if released else None) or "head"
    weight = extract_state_dict(checkpoint, use_ema).get(f"{classifier}.weight")
    if weight is None and num_classes != 0:
        raise CheckpointError(f"{source} has no classifier ({classifier}.weight): it is not a {name} classifier "
                              f"(a detection or segmentation checkpoint?); give a classifier checkpoint")
    return 0 if weight is None else weight.shape[0]


def create_classifier(
    name: str,
    weights: Optional[str] = None,
    num_classes: Optional[int] = None,
    use_ema: bool = False,
    **kwargs,
) -> Tuple[nn.Module, ClassifierWeights]:
    """The timm model ``name`` with ``weights`` loaded, and what the checkpoint says.

    ``weights``: None (random), ``'pretrained'`` (the released ImageNet file), a path or a URL.
    ``num_classes``: the classes the caller needs (0: a feature extractor); by default the classifier
    is sized from the checkpoint, or timm's default without one.  A checkpoint
    whose classifier has another size is a ``CheckpointError``, as is any tensor that does not fit
    (the model-name check comes first: ``UnknownModelError``).  ``use_ema`` takes a training
    checkpoint's EMA weights; ``kwargs`` go to ``timm.create_model``.
    """
    check_model_name(name)
    if weights is None:
        model = timm.create_model(name, **({} if num_classes is None else dict(num_classes=num_classes)), **kwargs)
        return model, ClassifierWeights()
    source = released_weights(name, num_classes) if weights == PRETRAINED else weights
    checkpoint = read_checkpoint(source)
    width = _classifier_width(name, checkpoint, source, use_ema, num_classes)
    if num_classes is not None and width != num_classes:
        raise CheckpointError(f"the classifier in {source} does not fit the {num_classes} classes asked for (it has "
                              f"{width}): it was trained on another set of classes; give a checkpoint trained on these")
    model = timm.create_model(name, num_classes=width, **kwargs)
    load_checkpoint(model, checkpoint, use_ema=use_ema, name=source)  # exact: the classifier is sized from the file
    class_names = checkpoint.get("class_names")
    if class_names is not None and len(class_names) != width:
        raise CheckpointError(f"{source} stores {len(class_names)} class names for a {width}-class classifier")
    names = None if class_names is None else [str(n) for n in class_names]
    return model, ClassifierWeights(source=source, class_names=names, data_config=checkpoint.get("data_config"),
                                    checkpoint=checkpoint)
