"""The project's mmdet plug-in, pulled in by every config through ``custom_imports``.

Importing it registers the PaCa-ViT dense-prediction backbones (``pacavit_*_downstream``) in
mmengine's root MODELS registry, where mmdet's registry finds them by parent lookup, and allows
the data types that mmengine writes into its own checkpoints under ``torch.load(weights_only=True)``
(``runtime.openmmlab.register_plugin``).
"""
from runtime.openmmlab import register_plugin

register_plugin()
