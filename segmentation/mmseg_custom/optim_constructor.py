"""Learning-rate multiplier for the backbone's cluster output layers, found by module.

``paramwise_cfg.cluster_output = dict(lr_mult=..., decay_mult=..., kinds=(...))`` applies to the
cluster output layers (``models.layers.find_cluster_output_layers``) of the given clustering
kinds (``conv``, ``mlp``, ``linear``, ``teacher``), wherever they sit in the model; the rest of
``paramwise_cfg`` is mmengine's.  Each layer becomes a ``custom_keys`` entry under its full
module path, which is longer than any short key such as ``'head'`` or ``'norm'``, so it takes
precedence over them as mmengine orders keys (longest first).
"""
from mmengine.model import is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS

from models.layers import CLUSTERING_LAYERS, find_cluster_output_layers

KINDS = (*CLUSTERING_LAYERS, "teacher")


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ClusterOutputOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        cluster_output = dict(paramwise_cfg.pop("cluster_output", {}))
        self.cluster_kinds = tuple(cluster_output.pop("kinds", KINDS))
        unknown = sorted(set(self.cluster_kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"paramwise_cfg.cluster_output.kinds: unknown {unknown}; choose from {list(KINDS)}")
        self.cluster_output = cluster_output  # lr_mult / decay_mult
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def __call__(self, model):
        if self.cluster_output:
            module = model.module if is_model_wrapper(model) else model
            custom_keys = dict(self.paramwise_cfg.get("custom_keys", {}))
            for path, kind, _ in find_cluster_output_layers(module):
                if kind in self.cluster_kinds:
                    custom_keys[f"{path}."] = dict(self.cluster_output)
            self.paramwise_cfg = {**self.paramwise_cfg, "custom_keys": custom_keys}
        return super().__call__(model)
