"""One checkpoint loader for classification, detection and segmentation.

Two functions, one policy:

* :func:`read_checkpoint` turns a source (a path, an ``http(s)://`` or ``file://`` URL, or a
  released file's URL, redirected to ``$PACAVIT_CHECKPOINT_BASE_URL``) into the checkpoint dict.
  It uses ``torch.load(..., weights_only=True)`` with an allow-list of plain data types that
  training pipelines write next to the weights: ``argparse.Namespace`` (timm's CheckpointSaver
  stores the run's arguments), numpy scalars / arrays / dtypes and, when mmengine is installed,
  its ``HistoryBuffer`` (a Runner's ``message_hub``).  A pickle that reaches for anything else
  (code) is refused.  Every failure is one ``CheckpointError`` naming the file and what to do.
* :func:`load_checkpoint` puts the weights into a model.  The match is exact, except for the
  layers the caller names in ``reinit`` (``"head"``: the classifier; ``"clustering"``: the
  cluster output layers, whose output size is the number of clusters; or any module path): those are
  loaded where they fit and otherwise keep their fresh initialisation, and the checkpoint's
  tensors for them that the model has no place for are dropped.  Both are logged and returned in
  a :class:`LoadReport`.  Any other missing, unexpected or resized tensor raises.

Every project entry point uses them: ``timm.create_model(name, pretrained=True)`` (also with
``pretrained_cfg_overlay=dict(file=...)``), the backbones' ``init_weights``, validate.py, the
OpenMMLab test scripts and the tools.  timm's own ``create_model(..., checkpoint_path=...)`` is not
routed here: it loads strictly and prefers EMA weights when a file has them.

``PACAVIT_CHECKPOINT_BASE_URL`` replaces the release prefix: an ``http(s)://`` or ``file://`` URL
or a plain folder (mirrors, air-gapped sites, tests).  ``PACAVIT_CHECKPOINT_CACHE`` moves the
download cache (default: ``$TORCH_HOME/hub/checkpoints``).

Integrity (:func:`verify_checkpoint`, applied to every file before it is unpickled): the file must
start as a checkpoint does (not as an error page, JSON or text), and each record of a zip-format
checkpoint must match the CRC32 stored beside it.  Downloads are cached under the whole URL
(``<cache>/<hash of the URL>/<file name>``), one process per machine fetches a file while the
others wait on a lock beside it, a download shorter than its Content-Length or stalled for
``$PACAVIT_DOWNLOAD_TIMEOUT`` seconds is refused and never cached, and a cached file that fails the
check is removed and fetched again.
"""
import argparse
import codecs
import fcntl
import functools
import hashlib
import http.client
import logging
import os
import pickle
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from torch import nn

from .layers.clustering import find_cluster_output_layers

_logger = logging.getLogger(__name__)

RELEASE_BASE_URL = "https://github.com/iVMCL/PaCaViT/releases/download/pacavit"
BASE_URL_ENV = "PACAVIT_CHECKPOINT_BASE_URL"
CACHE_ENV = "PACAVIT_CHECKPOINT_CACHE"
TIMEOUT_ENV = "PACAVIT_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
# A torch.save file is a zip archive (PK local header) or, in the legacy format, a pickle (protocol opcode).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"

STATE_DICT_KEYS = ("state_dict", "model")
EMA_STATE_DICT_KEYS = ("state_dict_ema", "model_ema")
# Wrapper prefixes: DDP (``module.``) and torch.compile (``_orig_mod.``), in either order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Named groups for ``reinit``: the module paths they stand for in a given model.  Any other name
# is a module path itself (``stage4.0.attn.clustering``).  "clustering" is every cluster output
# layer, found by module (models/layers/clustering.py), whatever the clustering kind.
REINIT_GROUPS = {
    "head": lambda model: ["head"],
    "clustering": lambda model: [path for path, _, _ in find_cluster_output_layers(model)],
}

Source = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint could not be fetched, read or matched to the model."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did.  ``reinitialised``: model tensors left at their fresh
    initialisation; ``dropped``: checkpoint tensors not used; ``adapted``: tensors converted to
    fit (the first conv for another number of input channels)."""

    source: str
    loaded: List[str]
    reinitialised: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    adapted: List[str] = field(default_factory=list)
    use_ema: bool = False
    checkpoint: Mapping = field(default_factory=dict, repr=False)  # the whole checkpoint as read


# ---------------------------------------------------------------------------------------------
# Where a checkpoint comes from


def release_url(filename: str) -> str:
    """Location of a released file, under ``$PACAVIT_CHECKPOINT_BASE_URL`` when that is set."""
    return mirror_url(f"{RELEASE_BASE_URL}/{filename}")


def mirror_url(url: str) -> str:
    """Point an official release URL at ``$PACAVIT_CHECKPOINT_BASE_URL`` (a URL or a folder)."""
    base = os.environ.get(BASE_URL_ENV)
    if not base or not url.startswith(RELEASE_BASE_URL + "/"):
        return url
    filename = url[len(RELEASE_BASE_URL) + 1:]
    if _scheme(base):
        return f"{base.rstrip('/')}/{filename}"
    return os.path.join(os.path.expanduser(base), filename)


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(torch.hub.get_dir(), "checkpoints")


def _scheme(source: str) -> str:
    """The URL scheme of ``source``, or '' for a path (a one-letter scheme is a Windows drive)."""
    scheme = urlparse(source).scheme
    return scheme if len(scheme) > 1 else ""


def is_url(source: Source) -> bool:
    return _scheme(os.fspath(source)) in ("http", "https", "file")


def _describe_non_checkpoint(head: bytes) -> str:
    """What a file that does not start like a checkpoint holds, for the error message."""
    text = head.removeprefix(codecs.BOM_UTF8).lstrip()
    try:
        words = text.decode("utf-8")
    except UnicodeDecodeError as e:  # binary data, or a character cut at the end of ``head``
        words = text[:e.start].decode("utf-8")
    if not words or "\0" in words:
        return f"binary data, neither a zip archive nor a pickle (it begins with {head[:8].hex(' ')})"
    kind = {"<": "an HTML/XML page", "{": "a JSON document", "[": "a JSON document"}.get(words[0], "a text file")
    return f"{kind} beginning {words.splitlines()[0].strip()[:120]!r}"


def _check_looks_like_checkpoint(path: str, origin: str):
    """Catch the usual non-checkpoints (empty files, error pages, JSON or text answers) before
    anything tries to unpickle them."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{origin} is empty. Delete {path} and download or save it again.")
    if head.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        return
    raise CheckpointError(
        f"{origin} is {_describe_non_checkpoint(head)}, not a PyTorch checkpoint (torch.save writes a zip "
        f"archive or a pickle; a server that answers with an error or login page leaves such a file). "
        f"Check the URL, or download the file by hand and pass its path; set {BASE_URL_ENV} to use a mirror."
    )


def verify_checkpoint(path: Source, origin: Optional[str] = None) -> None:
    """Raise ``CheckpointError`` naming the file unless ``path`` looks like a PyTorch checkpoint and,
    for the zip format that ``torch.save`` writes, every record matches its stored CRC32.

    Reads the file once without unpickling anything.  Records saved without a checksum
    (``torch.serialization.set_crc32_options(False)`` writes 0) and legacy pickle files, which carry
    none, pass on their structure alone.  Used for downloads, cached files and every file that
    :func:`read_checkpoint` opens (hence for the resume candidates of a run folder too).
    """
    path = os.fspath(path)
    origin = origin or path
    _check_looks_like_checkpoint(path, origin)
    with open(path, "rb") as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return
        try:
            with zipfile.ZipFile(f) as archive:
                for record in archive.infolist():
                    if record.CRC == 0 and record.file_size:
                        continue
                    with archive.open(record) as data:  # zipfile raises BadZipFile at the end on a CRC mismatch
                        while data.read(CHUNK_BYTES):
                            pass
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
            raise _unreadable(origin, e) from e


def _unreadable(origin: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{origin} is not a readable PyTorch checkpoint (corrupt or truncated: {e}). If it was downloaded, "
        f"delete it and download it again; if a run was writing it, that run was interrupted while "
        f"saving: use an earlier checkpoint of the run."
    )


def download_timeout() -> float:
    """Seconds a download may wait to connect or for the next bytes: ``$PACAVIT_DOWNLOAD_TIMEOUT``."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise CheckpointError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds above 0; set e.g. {TIMEOUT_ENV}=300")
    return seconds


def cache_path(url: str) -> str:
    """Where ``url`` is cached: ``<cache>/<16 hex digits of the URL's SHA-256>/<file name>``, so files
    of the same name from different URLs (``runA/model_best.pth.tar``, ``runB/...``) stay apart."""
    filename = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    return os.path.join(cache_dir(), hashlib.sha256(url.encode()).hexdigest()[:16], filename)


class _DownloadLock:
    """An exclusive flock on ``<cache entry>.lock``: one download of a file per machine (per shared
    filesystem); the other processes say that they wait, then find the file in the cache."""

    def __init__(self, dst: str, url: str):
        self.path, self.url = dst + ".lock", url

    def __enter__(self):
        self.file = open(self.path, "a+b")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _logger.warning("another process is downloading %s; waiting for it (lock %s)", self.url, self.path)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the flock; the lock file stays for the next ones


def _fetch(url: str, dst: str):
    """Download ``url`` to a partial file of this process, check it, then rename it to ``dst``."""
    from tqdm import tqdm

    timeout = download_timeout()
    folder = os.path.dirname(dst)
    fd, partial = tempfile.mkstemp(dir=folder, prefix=f"{os.path.basename(dst)}.", suffix=".partial")
    _logger.info("downloading %s to %s", url, dst)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "pacavit-checkpoint-loader"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                expected = response.headers.get("Content-Length")
                expected = int(expected) if expected and expected.isdigit() else None
                received = 0
                with tqdm(total=expected, unit="B", unit_scale=True, disable=None, desc=os.path.basename(dst)) as bar:
                    while chunk := response.read(CHUNK_BYTES):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
        if expected is not None and received != expected:
            raise _cut_short(url, received, expected)
        verify_checkpoint(partial, origin=url)
        os.replace(partial, dst)
    except http.client.IncompleteRead:  # raised by some Python versions instead of a short read
        raise _cut_short(url, received, expected) from None
    except (TimeoutError, urllib.error.URLError) as e:
        if isinstance(getattr(e, "reason", e), TimeoutError):
            raise CheckpointError(
                f"{url} did not answer for {timeout:g} s (the server stalled); nothing was cached. Try again, "
                f"set {BASE_URL_ENV} to a mirror, or allow more time with {TIMEOUT_ENV}=<seconds>."
            ) from e
        raise _network_error(url, e) from e
    except (http.client.HTTPException, OSError) as e:
        raise _network_error(url, e) from e
    finally:
        if os.path.exists(partial):  # a failed or rejected download must not be reused
            os.remove(partial)


def _cut_short(url: str, received: int, expected: int) -> CheckpointError:
    return CheckpointError(
        f"the download of {url} ended after {received} of {expected} bytes (the connection was cut); "
        f"nothing was cached: run again to download it anew."
    )


def _network_error(url: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"could not download {url}: {e}. Check the network, set {BASE_URL_ENV} to a mirror (a URL "
        f"or a folder), or download the file by hand and pass its local path."
    )


def download(url: str) -> str:
    """Download ``url`` into the cache (once per machine) and return the local, verified path.

    A cached file that fails :func:`verify_checkpoint` is removed and fetched again.  Only the
    holder of the lock removes or replaces a cache entry; a rename is atomic, so readers see
    either the old file or the new one."""
    dst = cache_path(url)
    if _intact_cache_entry(dst, url, remove=False):
        return dst
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with _DownloadLock(dst, url):
        # another process may have fetched it while this one waited
        if not _intact_cache_entry(dst, url, remove=True):
            _fetch(url, dst)
    return dst


def _intact_cache_entry(dst: str, url: str, remove: bool) -> bool:
    """Whether the cache holds an intact ``dst``; with ``remove`` (under the lock) a broken one goes."""
    try:
        verify_checkpoint(dst, origin=f"{dst} (cached from {url})")
        return True
    except FileNotFoundError:
        return False
    except CheckpointError as e:
        if remove:
            _logger.warning("%s; removing it and downloading it again", e)
            os.remove(dst)
        return False


def resolve_checkpoint(source: Source) -> str:
    """A local, verified (:func:`verify_checkpoint`) file for ``source``: a path, a ``file://`` URL,
    or an http(s) URL (downloaded into the cache); release URLs go to the mirror first."""
    requested = os.fspath(source)
    source = mirror_url(requested)
    scheme = _scheme(source)
    if scheme in ("http", "https"):
        return download(source)
    if scheme == "file":
        parsed = urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            raise CheckpointError(f"{source}: a file:// URL must name a local file (file:///path/to/file.pth)")
        path = url2pathname(parsed.path)
    elif scheme:
        raise CheckpointError(f"{source}: unsupported URL scheme {scheme!r}; use a path, file://, http:// or https://")
    else:
        path = os.path.expanduser(source)
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pth.tar", ".pt")))
        hint = f" (it holds {', '.join(found[:5])})" if found else ""
        raise CheckpointError(f"{source} is a directory, not a checkpoint file: pass a file inside it{hint}")
    if not os.path.isfile(path):
        mirrored = f" ({BASE_URL_ENV} mirrors {requested} there)" if source != requested else ""
        raise CheckpointError(f"checkpoint file not found: {source}{mirrored}")
    verify_checkpoint(path)
    return path


# ---------------------------------------------------------------------------------------------
# Reading: weights_only=True plus an allow-list of plain data


_HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")


def _history_buffer_getattr(obj, name: str):
    """Stands in for ``builtins.getattr`` while unpickling: mmengine pickles HistoryBuffer's
    statistics methods as ``getattr(HistoryBuffer, 'mean')``; any other lookup is refused, since an
    unrestricted getattr would let a pickle reach arbitrary callables."""
    from mmengine.logging import HistoryBuffer

    if (obj is HistoryBuffer or isinstance(obj, HistoryBuffer)) and name in _HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"checkpoint asks for getattr({obj!r}, {name!r}), which is not allowed")


@functools.lru_cache(maxsize=None)
def safe_globals() -> tuple:
    """The non-tensor types allowed in a checkpoint: data, never code.

    ``argparse.Namespace`` (timm's CheckpointSaver writes ``args``), numpy scalars, arrays and
    dtypes, and with mmengine installed its ``HistoryBuffer`` and the ``getattr`` references to
    HistoryBuffer's statistics methods that a Runner's ``message_hub`` pickles.  Objects inside an
    allowed type are unpickled under the same rules, so a payload hidden in a Namespace is refused.
    """
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    allowed = [argparse.Namespace, np.ndarray, np.dtype, *{type(np.dtype(t)) for t in np.sctypeDict.values()}]
    # numpy >= 2 pickles these as numpy._core.multiarray.*, numpy 1 as numpy.core.multiarray.*
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    try:
        from mmengine.logging import HistoryBuffer
    except ImportError:  # classification-only installs
        return tuple(allowed)
    return (*allowed, HistoryBuffer, (_history_buffer_getattr, "builtins.getattr"))


def _unsafe_globals(path: str) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # only for the message; the refusal itself stands
        return ""
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in safe_globals()}
    names = [n for n in names if n not in allowed]
    return f" (it asks for {', '.join(names)})" if names else ""


def read_checkpoint(source: Source, map_location="cpu") -> dict:
    """The checkpoint dict of ``source`` (path, URL, ``file://`` URL, released file or mirror).

    Loaded with ``torch.load(weights_only=True)`` and the allow-list of :func:`safe_globals`,
    whatever was imported before.  Failures raise ``CheckpointError`` naming the file.
    """
    path = resolve_checkpoint(source)
    # the context removes what it added on exit: only the types not allowed process-wide already
    # (runtime.openmmlab registers them for mmengine's own loading, which must keep them)
    allowed = torch.serialization.get_safe_globals()
    try:
        with torch.serialization.safe_globals([g for g in safe_globals() if g not in allowed]):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and plain data{_unsafe_globals(path)}, so it was "
            f"not loaded: weights_only=True refuses code that a file could run. Only if you trust the file, "
            f"re-save its weights: ckpt = torch.load({path!r}, weights_only=False); "
            f"torch.save(ckpt['state_dict'], 'weights.pth'). Details: {e}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise _unreadable(path, e) from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict or state_dict")
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Matching a checkpoint to a model


def extract_state_dict(checkpoint: Mapping, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of a raw / timm / OpenMMLab checkpoint (EMA ones with ``use_ema``), without
    DDP / torch.compile prefixes."""
    if use_ema:
        key = next((k for k in EMA_STATE_DICT_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if key is None:
            raise CheckpointError(
                f"use_ema=True, but the checkpoint has no EMA weights (no {' or '.join(EMA_STATE_DICT_KEYS)}; "
                f"it holds {sorted(map(str, checkpoint))[:8]}): drop the EMA option"
            )
    else:
        key = next((k for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    state_dict = checkpoint[key] if key else checkpoint
    tensors = {}
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            while name.startswith(WRAPPER_PREFIXES):
                name = name.split(".", 1)[1]
            tensors[name] = value
    if not tensors:
        raise CheckpointError(f"no tensors found in the checkpoint (its keys: {sorted(map(str, checkpoint))[:10]})")
    return tensors


def _reinit_matcher(reinit: Tuple[str, ...], model: nn.Module):
    prefixes = tuple(f"{path}." for name in reinit for path in (REINIT_GROUPS[name](model) if name in REINIT_GROUPS else [name]))
    return lambda key: key.startswith(prefixes)


def _backbone_subset(state_dict: Dict[str, torch.Tensor], own: Mapping, dropped: List[str]):
    """A detector / segmentor checkpoint loaded into a bare backbone: keep ``backbone.*``."""
    if any(k.startswith("backbone.") for k in own) or not any(k.startswith("backbone.") for k in state_dict):
        return state_dict
    dropped.extend(k for k in state_dict if not k.startswith("backbone."))
    return {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}


def refuse_bare_backbone(checkpoint: Mapping, source: str, model_name: str) -> None:
    """A detector / segmentor (``model_name``) cannot start from a classification or bare backbone
    checkpoint (no ``backbone.*`` tensors): raise one ``CheckpointError`` that says so.  Cheap
    enough to run on the config's model name before the model is built."""
    if not any(k.startswith("backbone.") for k in extract_state_dict(checkpoint)):
        raise CheckpointError(
            f"{source} holds the weights of a bare backbone or classifier (no backbone.* tensors), not of a "
            f"whole {model_name}: evaluate a checkpoint of the detector / segmentor itself; an ImageNet "
            f"classifier initialises the backbone when training (model.backbone.init_cfg or pretrained)."
        )


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _but_input_channels(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same conv weight shape apart from the input channels (dim 1)?"""
    return _shape(a)[:1] + _shape(a)[2:] == _shape(b)[:1] + _shape(b)[2:]


def fit_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: nn.Module,
    reinit: Sequence[str] = (),
    first_conv: Optional[str] = None,
    source: str = "the checkpoint",
) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """Match ``state_dict`` to ``model`` under the policy of :func:`load_checkpoint` without
    loading it: returns the tensors to load and the report.  Raises on a mismatch."""
    own = model.state_dict()
    reinit = (reinit,) if isinstance(reinit, str) else tuple(reinit)
    in_reinit = _reinit_matcher(reinit, model)
    report = LoadReport(source=source, loaded=[])
    state_dict = _backbone_subset(dict(state_dict), own, report.dropped)
    fitted = {}
    unexpected, resized, reinit_log = [], [], []
    for key, value in state_dict.items():
        if key not in own:
            (report.dropped if in_reinit(key) else unexpected).append(key)
        elif _shape(value) == _shape(own[key]):
            fitted[key] = value
        elif first_conv and key == f"{first_conv}.weight" and value.ndim == 4 and _but_input_channels(value, own[key]):
            from timm.models import adapt_input_conv

            fitted[key] = adapt_input_conv(own[key].shape[1], value, base_chans=value.shape[1])
            report.adapted.append(f"{key} {_shape(value)}->{_shape(own[key])}")
        elif in_reinit(key):
            report.reinitialised.append(key)
            reinit_log.append(f"{key} {_shape(value)}->{_shape(own[key])}")
        else:
            resized.append(f"{key}: checkpoint {_shape(value)} vs model {_shape(own[key])}")
    missing = []
    for key in own:
        if key in state_dict:
            continue
        if in_reinit(key):
            report.reinitialised.append(key)
            reinit_log.append(f"{key} (not in the checkpoint)")
        else:
            missing.append(key)
    if missing and not fitted and any(k.startswith("backbone.") for k in own):
        refuse_bare_backbone(state_dict, source, type(model).__name__)
    if missing or unexpected or resized:
        def sample(keys: List[str]) -> str:
            return f"{len(keys)}" + (f" (e.g. {'; '.join(keys[:3])})" if keys else "")

        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: missing {sample(missing)}, unexpected "
            f"{sample(unexpected)}, shape differs {sample(resized)}. It is a checkpoint of another "
            f"architecture: pick the model (or config) that matches the file"
            + (f"; only {', '.join(reinit)} may differ here." if reinit else ".")
        )
    report.loaded = list(fitted)
    if reinit_log:
        _logger.warning("%s: re-initialised (named in reinit=%s): %s", source, reinit, ", ".join(reinit_log))
    if report.adapted:
        _logger.info("%s: adapted to the input channels: %s", source, ", ".join(report.adapted))
    if report.dropped:
        _logger.info("%s: %d checkpoint tensors not used (e.g. %s)", source, len(report.dropped), report.dropped[:3])
    return fitted, report


def load_checkpoint(
    model: nn.Module,
    source: Union[Source, Mapping],
    reinit: Sequence[str] = (),
    use_ema: bool = False,
    first_conv: Optional[str] = None,
    name: Optional[str] = None,
) -> LoadReport:
    """Load ``source`` (anything :func:`read_checkpoint` takes, or a dict it returned) into ``model``.

    The state_dict must match the model exactly, except for:

    * ``reinit``: names of layers that may differ (``"head"``, ``"clustering"``, module paths).
      Their tensors load where the shapes fit; the others keep the model's initialisation, and
      checkpoint tensors for them that the model lacks (an ImageNet classifier given to a
      backbone) are dropped.  Both are logged in one line and listed in the report.
    * ``first_conv``: the model's stem conv (timm's ``pretrained_cfg['first_conv']``); a checkpoint
      trained on another number of input channels is adapted with timm's ``adapt_input_conv``.
    * wrapper prefixes (``module.``, ``_orig_mod.``) and, for a model without a ``backbone``, the
      ``backbone.`` part of a detector / segmentor checkpoint (the rest is dropped).

    ``use_ema`` takes the EMA weights of a training checkpoint.  ``name`` is what messages call a
    dict ``source`` (its file).  Anything else raises ``CheckpointError`` naming the tensors and what to do.
    """
    name = name or ("the checkpoint" if isinstance(source, Mapping) else os.fspath(source))
    checkpoint = source if isinstance(source, Mapping) else read_checkpoint(source)
    try:
        state_dict = extract_state_dict(checkpoint, use_ema)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from e
    fitted, report = fit_state_dict(state_dict, model, reinit, first_conv, source=name)
    model.load_state_dict(fitted, strict=False)
    report.use_ema, report.checkpoint = use_ema, checkpoint
    _logger.info("loaded %d tensors%s from %s", len(report.loaded), " (EMA)" if use_ema else "", name)
    return report
