"""mmseg extensions for PaCa-ViT, loaded by the configs through ``custom_imports``.

Importing it registers the PaCa-ViT backbones (``pacavit_*_downstream``, via ``models``), the
``PaCaSegHead`` decode head and the ``PaCaEncoderDecoder`` segmentor.
"""
import models  # noqa: F401  (registers the backbones)

from .paca_head import PaCaSegHead
from .segmentor import PaCaEncoderDecoder

__all__ = ["PaCaSegHead", "PaCaEncoderDecoder"]
