"""ClusterOutputOptimWrapperConstructor: the lr multiplier of the backbone's cluster output layers,
found by module for every clustering kind (no layer indices in the configs)."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmseg.registry import MODELS

from runtime.openmmlab import load_config

from .test_configs import CONFIG_DIR, SUFFIX

BASE_LR = 6e-5
# per kind: a PaCa-head config and one of its cluster output parameters
OUTPUT_PARAMETER = {
    "conv": ("pacahead_pacavit_tiny_p2cconv_100_0", "backbone.stage1.0.attn.clustering.clustering.4.weight"),
    "mlp": ("pacahead_pacavit_small_p2cmlp_100_0", "backbone.stage1.0.attn.clustering.clustering.2.weight"),
    "teacher": ("pacahead_pacavit_convmixer_tiny_100_0", "backbone.paca_teacher.to_clusters1.weight"),
}


def learning_rates(name, **cluster_output):
    cfg = load_config(str(CONFIG_DIR / "paca_head" / f"{name}{SUFFIX}.py"), "mmseg")
    cfg.optim_wrapper.paramwise_cfg.cluster_output.update(cluster_output)
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    wrapper = build_optim_wrapper(model, {**cfg.optim_wrapper, "type": "OptimWrapper"})
    return {names[id(p)]: group["lr"] for group in wrapper.optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("kind", OUTPUT_PARAMETER)
def test_official_default_is_conv_only_and_kinds_widen_it(kind):
    name, parameter = OUTPUT_PARAMETER[kind]
    assert learning_rates(name)[parameter] == pytest.approx(BASE_LR * (10 if kind == "conv" else 1))
    widened = learning_rates(name, kinds=["conv", "mlp", "linear", "teacher"])
    assert widened[parameter] == pytest.approx(BASE_LR * 10)
    # only the output layers: the layer before stays at the base lr, the head at 10x
    others = {n: lr for n, lr in widened.items() if n.startswith("backbone.") and "clustering" not in n
              and "to_clusters" not in n}
    assert others and list(others.values()) == pytest.approx([BASE_LR] * len(others))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match=r"cluster_output.kinds: unknown \['convolution'\]; choose from"):
        learning_rates("pacahead_pacavit_tiny_p2cconv_100_0", kinds=["convolution"])
