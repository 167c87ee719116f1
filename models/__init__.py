"""PaCa-ViT models and the loading of their weights.  Importing this package registers the models with
timm (``pacavit_*``); the dense-prediction backbones (``create_downstream``) are registered with
mmengine by the detection and segmentation plug-ins (``mmdet_custom``, ``mmseg_custom``)."""
from .builder import PRETRAINED, ClassifierWeights, UnknownModelError, check_model_name, create_classifier
from .checkpoint import CheckpointError, LoadReport, load_checkpoint, read_checkpoint, release_url
from .layers import cpu_fusion_support, fuse_for_cpu
from .maps import capture_maps
from .paca_vit import VARIANTS, PaCaViT, PaCaViTDownstream, create_downstream
