from .attention import PaCaAttention
from .clustering import CLUSTERING_LAYERS, ConvClustering, LinearClustering, MlpClustering, find_cluster_output_layers
from .downsample import ConvDownsample
from .fused import cpu_fusion_support, fuse_for_cpu
from .layout import nchw_to_tokens, tokens_to_nchw
from .mlp import ConvMlp, DWConv
from .stage import PaCaStage
from .teacher import ConvMixerTeacher
