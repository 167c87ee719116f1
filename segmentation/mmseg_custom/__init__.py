"""The project's mmseg plug-in, pulled in by every config through ``custom_imports``.

Importing it registers the PaCa-ViT backbones (``pacavit_*_downstream``, in mmengine's root
MODELS registry, where mmseg's registry finds them by parent lookup), the ``PaCaSegHead`` decode
head and the ``PaCaEncoderDecoder`` segmentor, and allows the data types that mmengine writes
into its own checkpoints under ``torch.load(weights_only=True)`` (see
``models.openmmlab.register_checkpoint_safe_globals``).
"""
import models  # noqa: F401  (registers the backbones)
from models.openmmlab import register_checkpoint_safe_globals

from .paca_head import PaCaSegHead
from .segmentor import PaCaEncoderDecoder

register_checkpoint_safe_globals()

__all__ = ["PaCaSegHead", "PaCaEncoderDecoder"]
