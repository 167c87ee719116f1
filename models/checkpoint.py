"""One checkpoint loader for classification, detection and segmentation.

Sources can be a local file, a URL (downloaded once into a cache, with progress) or, through
``timm.create_model(name, pretrained=True)``, the released file of a model name.  Files are read
with ``torch.load(..., weights_only=True)``; a corrupt, truncated or HTML "checkpoint" becomes one
``CheckpointError`` that names the file and what to do about it.

``PACAVIT_CHECKPOINT_BASE_URL`` replaces the release prefix (mirrors, air-gapped sites, tests);
``PACAVIT_CHECKPOINT_CACHE`` moves the download cache (default: ``$TORCH_HOME/hub/checkpoints``).
"""
import logging
import os
import pickle
import re
import urllib.error
import zipfile
from typing import Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

_logger = logging.getLogger(__name__)

RELEASE_BASE_URL = "https://github.com/iVMCL/PaCaViT/releases/download/pacavit"
BASE_URL_ENV = "PACAVIT_CHECKPOINT_BASE_URL"
CACHE_ENV = "PACAVIT_CHECKPOINT_CACHE"

# Layers whose shape legitimately changes between pre-training and fine-tuning: the classifier
# (other class count) and the clustering output layers (``downstream_cluster_num``).  A mismatch
# there re-initialises the layer; anywhere else it means the checkpoint is another architecture.
REINITIALISABLE = re.compile(
    r"^head\.|\.clustering\.clustering\.4\.weight$|\.clustering\.clustering\.2\.(weight|bias)$"
    r"|\.clustering\.clustering\.0\.weight$|^paca_teacher\.to_clusters\d+\.(weight|bias)$"
)
STATE_DICT_KEYS = ("state_dict", "model")
EMA_STATE_DICT_KEYS = ("state_dict_ema", "model_ema")


class CheckpointError(RuntimeError):
    """A checkpoint could not be fetched, read or matched to the model."""


def release_url(filename: str) -> str:
    """URL of a released file, under ``$PACAVIT_CHECKPOINT_BASE_URL`` when that is set."""
    return f"{os.environ.get(BASE_URL_ENV, RELEASE_BASE_URL).rstrip('/')}/{filename}"


def mirror_url(url: str) -> str:
    """Point an official release URL at the mirror named by ``$PACAVIT_CHECKPOINT_BASE_URL``."""
    base = os.environ.get(BASE_URL_ENV)
    if base and url.startswith(RELEASE_BASE_URL + "/"):
        return base.rstrip("/") + url[len(RELEASE_BASE_URL):]
    return url


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(torch.hub.get_dir(), "checkpoints")


def is_url(source: str) -> bool:
    return urlparse(str(source)).scheme in ("http", "https", "file")


def _check_looks_like_checkpoint(path: str, origin: str):
    """Catch the usual non-checkpoints (empty files, HTML error pages) before unpickling."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{origin} is empty. Delete {path} and download it again.")
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
        raise CheckpointError(
            f"{origin} is an HTML/XML page, not a PyTorch checkpoint (a login, error or redirect page "
            f"was saved instead of the file). Check the URL, or download the file by hand and pass its "
            f"path; set {BASE_URL_ENV} to use a mirror."
        )


def download(url: str) -> str:
    """Download ``url`` into the cache (once) and return the local path."""
    url = mirror_url(url)
    filename = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    os.makedirs(cache_dir(), exist_ok=True)
    dst = os.path.join(cache_dir(), filename)
    if os.path.isfile(dst):
        return dst
    partial = dst + ".partial"
    _logger.info("downloading %s to %s", url, dst)
    try:
        torch.hub.download_url_to_file(url, partial, progress=True)
        _check_looks_like_checkpoint(partial, url)
        os.replace(partial, dst)
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointError(
            f"could not download {url}: {e}. Check the network, set {BASE_URL_ENV} to a mirror, "
            f"or download the file by hand and pass its local path."
        ) from e
    finally:
        if os.path.exists(partial):  # a failed or rejected download must not be reused
            os.remove(partial)
    return dst


def resolve_checkpoint(source: str) -> str:
    """A local path for ``source`` (a path or a URL), downloading URLs into the cache."""
    source = str(source)
    if is_url(source):
        if source.startswith("file://"):
            source = urlparse(source).path
        else:
            return download(source)
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {source}")
    return path


def load_checkpoint_file(source: str, map_location="cpu") -> dict:
    """``torch.load`` a checkpoint with ``weights_only=True``, turning failures into clear errors."""
    path = resolve_checkpoint(source)
    _check_looks_like_checkpoint(path, path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and plain containers, so it was not loaded "
            f"(weights_only=True protects against code in untrusted files). If you trust the file, "
            f"re-save just its state_dict: torch.save(ckpt['state_dict'], 'weights.pth'). Details: {e}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or truncated: {e}). "
            f"Delete it and download it again."
        ) from e


def extract_state_dict(checkpoint, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state_dict inside a raw / timm / OpenMMLab checkpoint, without a ``module.`` prefix."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"expected a dict checkpoint, got {type(checkpoint).__name__}")
    keys = (EMA_STATE_DICT_KEYS if use_ema else ()) + STATE_DICT_KEYS
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    else:
        if use_ema:
            raise CheckpointError("use_ema=True but the checkpoint has no EMA weights")
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found in the checkpoint (top-level keys: {sorted(checkpoint)[:10]})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}


def adapt_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Fit an official / timm / OpenMMLab state_dict to ``model``.

    Strips ``module.`` / ``backbone.`` prefixes where the model lacks them, drops the ImageNet
    classifier when the model is a backbone, and drops the re-initialisable layers whose shape
    changed (logged in one line).  Any other shape mismatch raises: the file is for another model.
    """
    own = model.state_dict()
    out, skipped, wrong = {}, [], []
    for key, value in state_dict.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix) and key not in own:
                key = key[len(prefix):]
        if key not in own:
            if key.startswith("head.") and not any(k.startswith("head.") for k in own):
                continue
            out[key] = value  # reported as unexpected by the caller
        elif own[key].shape == value.shape:
            out[key] = value
        elif REINITIALISABLE.search(key):
            skipped.append(f"{key} {tuple(value.shape)}->{tuple(own[key].shape)}")
        else:
            wrong.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    if wrong:
        raise CheckpointError(
            f"the checkpoint does not fit {type(model).__name__}: {len(wrong)} tensors have other shapes "
            f"(e.g. {'; '.join(wrong[:3])}). It was trained for another architecture: pick the model "
            f"name that matches the file."
        )
    if skipped:
        _logger.warning("re-initialised (shape changed): %s", ", ".join(skipped))
    return out


def load_pretrained(
    model: nn.Module, source: str, strict: bool = True, use_ema: bool = False
) -> Tuple[list, list]:
    """Load ``source`` (path or URL) into ``model``; returns (missing, unexpected) keys.

    Layers dropped by ``adapt_state_dict`` keep their initialisation and are not counted as
    missing.  With ``strict`` any other missing or unexpected key raises ``CheckpointError``.
    """
    state_dict = adapt_state_dict(extract_state_dict(load_checkpoint_file(source), use_ema), model)
    own = model.state_dict()
    matched = [k for k in own if k in state_dict]
    if own and len(matched) < len(own) // 2:
        raise CheckpointError(
            f"{source} matches only {len(matched)} of {len(own)} tensors of {type(model).__name__} "
            f"(e.g. it has {sorted(state_dict)[:3]}): it is a checkpoint for another architecture."
        )
    reinitialised = {k for k in own if k not in state_dict and REINITIALISABLE.search(k)}
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in reinitialised]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} does not match {type(model).__name__}: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}. It is probably a checkpoint for another "
            f"architecture: pick the model name that matches the file (or load with strict=False)."
        )
    if missing or unexpected:
        _logger.warning("loaded %s with missing keys %s and unexpected keys %s", source, missing, unexpected)
    _logger.info("loaded %d tensors from %s", len(matched), source)
    return missing, unexpected
