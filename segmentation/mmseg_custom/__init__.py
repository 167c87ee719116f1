"""The project's mmseg plug-in, pulled in by every config through ``custom_imports``.

Importing it registers the PaCa-ViT backbones (``pacavit_*_downstream``, in mmengine's root
MODELS registry, where mmseg's registry finds them by parent lookup), the ``PaCaSegHead`` decode
head, the ``PaCaEncoderDecoder`` segmentor and the ``ClusterOutputOptimWrapperConstructor`` (lr
multiplier for the backbone's cluster output layers), and allows the data types that mmengine writes
into its own checkpoints under ``torch.load(weights_only=True)`` (
``runtime.openmmlab.register_plugin``).
"""
from runtime.openmmlab import register_plugin

from .optim_constructor import ClusterOutputOptimWrapperConstructor
from .paca_head import PaCaSegHead
from .segmentor import PaCaEncoderDecoder

register_plugin()

__all__ = ["ClusterOutputOptimWrapperConstructor", "PaCaSegHead", "PaCaEncoderDecoder"]
