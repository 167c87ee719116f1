"""PaCa-ViT models.  Importing this package registers the models with timm (``pacavit_*``) and,
when mmengine is installed, the dense-prediction backbones (``pacavit_*_downstream``) with
mmengine's MODELS registry."""
from .checkpoint import CheckpointError, LoadReport, load_checkpoint, read_checkpoint, release_url
from .layers import cpu_fusion_support, fuse_for_cpu_inference
from .maps import capture_maps
from .paca_vit import VARIANTS, PaCaViT, PaCaViTDownstream, checkpoint_filter_fn, create_downstream
