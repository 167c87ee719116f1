"""PaCa-ViT: Learning Patch-to-Cluster Attention in Vision Transformers (CVPR 2023).

A four-stage pyramid (stem /4, transitions /2) of PaCa blocks.  In a PaCa block the N patch
tokens attend to M learned clusters instead of to each other: a clustering module predicts
assignment logits (B, M, N), their softmax over the patches pools the tokens into M cluster
tokens, and queries from the patches attend to keys/values from the clusters (O(N*M)).

Parameter names follow the official implementation so that its released checkpoints load
unchanged.  Every variant is one row of ``VARIANTS``; ``<name>_downstream`` builds the
dense-prediction backbone (four NCHW outputs) used by the mmdet / mmseg configs.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .checkpoint import RELEASE_BASE_URL, CheckpointError, fit_state_dict, load_checkpoint, release_url
from .layers import CLUSTERING_LAYERS, ConvDownsample, ConvMixerTeacher, ConvMlp, PaCaAttention, nchw_to_tokens

__all__ = ["PaCaViT", "PaCaViTDownstream", "PaCaBlock", "VARIANTS", "checkpoint_filter_fn", "create_downstream"]

_logger = logging.getLogger(__name__)

LN_EPS = 1e-6


class PaCaBlock(nn.Module):
    """Pre-norm PaCa attention + pre-norm conv-MLP, each with drop-path and optional layer scale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_clusters: int = 0,
        clustering: Optional[nn.Module] = None,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: Optional[float] = None,
        use_xformers: bool = False,
    ):
        super().__init__()
        norm_layer = lambda d: nn.LayerNorm(d, eps=LN_EPS)  # noqa: E731
        self.norm1_before = norm_layer(dim)
        self.attn = PaCaAttention(
            dim, num_heads, num_clusters, clustering, attn_drop, drop, norm_layer, use_xformers=use_xformers
        )
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2_before = norm_layer(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], assignments: Optional[torch.Tensor] = None):
        attn, assignments = self.attn(self.norm1_before(x), hw, assignments)
        x = x + self.drop_path(self.ls1(attn))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2_before(x), hw)))
        return x, assignments


class PaCaViT(nn.Module):
    """PaCa-ViT for classification (``num_classes > 0``) or as a dense-prediction backbone.

    Args:
        img_size: accepted for timm compatibility; the model works for any input size.
        embed_dims / depths / num_heads / mlp_ratios: per-stage widths, block counts, heads, MLP ratios.
        num_clusters: clusters M per stage; 0 gives ordinary patch-to-patch attention in that stage.
        clustering: how blocks compute assignments: ``'conv'``, ``'mlp'`` or ``'linear'``; ignored
            when a ``teacher_depths`` teacher provides them.
        cluster_every: 0 = stage-wise (first block of a stage, shared by the rest); k > 0 = every
            k-th block recomputes them (1 = block-wise).
        teacher_depths: depths of the ConvMixer clustering teacher, or None for on-site clustering.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (96, 192, 320, 384),
        depths: Sequence[int] = (2, 2, 4, 2),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        num_clusters: Sequence[int] = (100, 100, 100, 0),
        clustering: str = "conv",
        cluster_every: int = 0,
        teacher_depths: Optional[Sequence[int]] = None,
        teacher_kernel_size: int = 7,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale: Optional[float] = None,
        use_xformers: bool = False,
    ):
        super().__init__()
        if clustering not in CLUSTERING_LAYERS:
            raise ValueError(f"clustering must be one of {sorted(CLUSTERING_LAYERS)}, got {clustering!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_stages = len(embed_dims)
        self.embed_dims = tuple(embed_dims)
        self.num_clusters = tuple(num_clusters)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        self.patch_embed = ConvDownsample(in_chans, embed_dims[0], stride=4, eps=LN_EPS)
        self.paca_teacher = None
        if teacher_depths is not None:
            self.paca_teacher = ConvMixerTeacher(embed_dims, teacher_depths, num_clusters, teacher_kernel_size)

        block_dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.feature_info = []
        for i in range(self.num_stages):
            dim, m = embed_dims[i], num_clusters[i]
            if i > 0:
                setattr(self, f"transition{i}", ConvDownsample(embed_dims[i - 1], dim, stride=2, eps=LN_EPS))
            blocks = []
            for j in range(depths[i]):
                computes = m > 0 and self.paca_teacher is None and j % (cluster_every or depths[i]) == 0
                blocks.append(
                    PaCaBlock(
                        dim,
                        num_heads[i],
                        num_clusters=m,
                        clustering=CLUSTERING_LAYERS[clustering](dim, m) if computes else None,
                        mlp_ratio=mlp_ratios[i],
                        drop=proj_drop_rate,
                        attn_drop=attn_drop_rate,
                        drop_path=block_dpr[sum(depths[:i]) + j],
                        layer_scale=layer_scale,
                        use_xformers=use_xformers,
                    )
                )
            setattr(self, f"stage{i + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=LN_EPS))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"norm{i + 1}"))

        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- timm model interface -------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^patch_embed|^paca_teacher",
            blocks=r"^stage(\d+)" if coarse else [(r"^stage(\d+)\.(\d+)", None), (r"^(?:norm|transition)(\d+)", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- forward ------------------------------------------------------------------------------
    def _stages(self, x: torch.Tensor, last_stage: Optional[int] = None):
        """Yield (stage index, normalised stage output as (B, H, W, C)) for each stage."""
        # channels_last input: every conv then returns NHWC memory and the token views are free
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))  # B H W C
        teacher_logits, teacher_feats = [None] * self.num_stages, None
        if self.paca_teacher is not None:
            teacher_logits, teacher_feats = self.paca_teacher(x.permute(0, 3, 1, 2))
        for i in range(self.num_stages if last_stage is None else last_stage + 1):
            if i > 0:
                x = getattr(self, f"transition{i}")(x.permute(0, 3, 1, 2))
            B, H, W, C = x.shape
            tokens = x.reshape(B, H * W, C)
            assignments = None if teacher_logits[i] is None else teacher_logits[i].softmax(dim=-1)
            for blk in getattr(self, f"stage{i + 1}"):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    tokens, assignments = checkpoint(blk, tokens, (H, W), assignments, use_reentrant=False)
                else:
                    tokens, assignments = blk(tokens, (H, W), assignments)
            if teacher_feats is not None:
                tokens = tokens + nchw_to_tokens(teacher_feats[i])
            x = getattr(self, f"norm{i + 1}")(tokens).view(B, H, W, C)
            yield i, x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the normalised last-stage tokens, (B, H, W, C)."""
        for _, x in self._stages(x):
            pass
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's feature API.  Stage outputs are already normalised (``norm`` has no effect)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC'")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        intermediates = []
        for i, feat in self._stages(x, last_stage=max_index if (stop_early or intermediates_only) else None):
            if i in take_indices:
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return feat, intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        take_indices, _ = feature_take_indices(self.num_stages, indices)
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


class PaCaViTDownstream(PaCaViT):
    """Dense-prediction backbone: no classifier, returns the stage outputs in ``out_indices`` as NCHW.

    Accepts the keyword arguments of the official mmdet / mmseg configs: ``pretrained`` (a
    checkpoint path or URL), ``downstream_cluster_num`` (per-stage cluster numbers replacing the
    ImageNet ones; the clustering output layers are then re-initialised when loading), and the
    OpenMMLab ``init_cfg=dict(type='Pretrained', checkpoint=...)``.  The checkpoint ``'imagenet'``
    names the variant's released ImageNet file.  Weights are loaded by ``init_weights()``, which
    mmengine's Runner calls before training.
    """

    def __init__(
        self,
        variant: Optional[str] = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained: Optional[str] = None,
        init_cfg: Optional[dict] = None,
        downstream_cluster_num: Optional[Sequence[int]] = None,
        **kwargs,
    ):
        if downstream_cluster_num is not None:
            kwargs["num_clusters"] = tuple(downstream_cluster_num)
        kwargs.pop("num_classes", None)
        super().__init__(num_classes=0, global_pool="", **kwargs)
        self.variant = variant
        self.out_indices = tuple(out_indices)
        if init_cfg is not None and init_cfg.get("type") != "Pretrained":
            raise ValueError(f"only init_cfg=dict(type='Pretrained', checkpoint=...) is supported, got {init_cfg}")
        self.pretrained = pretrained or (init_cfg or {}).get("checkpoint")
        self.is_init = False

    def checkpoint_source(self) -> Optional[str]:
        """The file or URL ``init_weights`` loads; ``'imagenet'`` resolves to the released file."""
        if self.pretrained != "imagenet":
            return self.pretrained
        if self.variant not in RELEASED_IMAGENET:
            raise CheckpointError(
                f"{self.variant} has no released ImageNet checkpoint: give a local file as "
                f"init_cfg=dict(type='Pretrained', checkpoint=PATH), or train from scratch with init_cfg=None"
            )
        return release_url(RELEASED_IMAGENET[self.variant])

    def init_weights(self):
        """Load the checkpoint: the ImageNet classifier is dropped, and clustering layers resized by
        ``downstream_cluster_num`` are re-initialised (both named in the log); nothing else may differ."""
        source = self.checkpoint_source()
        if source and not self.is_init:
            load_checkpoint(self, source, reinit=("head", "clustering"))
        self.is_init = True

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Fit an official / timm / OpenMMLab state_dict to ``model``: the classifier and clustering
    layers may differ (re-initialised), anything else must match (see ``models.checkpoint``)."""
    return fit_state_dict(state_dict, model, reinit=("head", "clustering"))[0]


# ---------------------------------------------------------------------------------------------
# The variant table: one row per released model.  Names are the public interface.
_ARCHS = {
    "tiny": dict(embed_dims=(96, 192, 320, 384), depths=(2, 2, 4, 2), num_heads=(2, 4, 8, 16)),
    "small": dict(embed_dims=(96, 192, 320, 384), depths=(3, 3, 10, 3), num_heads=(2, 4, 8, 16)),
    "base": dict(embed_dims=(96, 192, 384, 512), depths=(3, 3, 18, 3), num_heads=(2, 4, 8, 16)),
}


def _row(arch: str, **settings) -> dict:
    return {**_ARCHS[arch], **settings}


VARIANTS: Dict[str, dict] = {
    "pacavit_tiny_p2cconv_100_0": _row("tiny", num_clusters=(100, 100, 100, 0)),
    "pacavit_small_p2cconv_100_0": _row("small", num_clusters=(100, 100, 100, 0)),
    "pacavit_base_p2cconv_100_0": _row("base", num_clusters=(100, 100, 100, 0)),
    "pacavit_small_p2cmlp_100_0": _row("small", num_clusters=(100, 100, 100, 0), clustering="mlp"),
    "pacavit_small_p2clinear_100_0": _row("small", num_clusters=(100, 100, 100, 0), clustering="linear"),
    "pacavit_small_p2cconv_2_0": _row("small", num_clusters=(2, 2, 2, 0)),
    "pacavit_small_p2cconv_49_0": _row("small", num_clusters=(49, 49, 49, 0)),
    "pacavit_small_p2cconv_49_100": _row("small", num_clusters=(49, 64, 81, 100)),
    "pacavit_small_p2cconv_100_49": _row("small", num_clusters=(100, 81, 64, 49)),
    "pacavit_small_p2cconv_100": _row("small", num_clusters=(100, 100, 100, 100)),
    "pacavit_small_p2cconv_100_blockwise": _row("small", num_clusters=(100, 100, 100, 100), cluster_every=1),
    "pacavit_convmixer_tiny_100": _row(
        "tiny", depths=(2, 2, 2, 2), num_clusters=(100, 100, 100, 100), teacher_depths=(2, 2, 2, 2)
    ),
    "pacavit_convmixer_small_100": _row(
        "small", depths=(3, 3, 7, 3), num_clusters=(100, 100, 100, 100), teacher_depths=(2, 2, 2, 2)
    ),
    "pacavit_convmixer_base_100": _row(
        "base", depths=(3, 3, 16, 3), num_clusters=(100, 100, 100, 100), teacher_depths=(2, 2, 4, 2)
    ),
}

# Released ImageNet checkpoints (file names under the release URL).  The seed README lists the
# [100,81,64,49] file for the [100,100,100,100] row too; that link is kept as published.
RELEASED_IMAGENET = {
    "pacavit_tiny_p2cconv_100_0": "IMNET_224_pacavit_tiny_p2cconv_100_0.pth",
    "pacavit_small_p2cconv_100_0": "IMNET_224_pacavit_small_p2cconv_100_0.pth",
    "pacavit_small_p2cmlp_100_0": "IMNET_224_pacavit_small_p2cmlp_100_0.pth",
    "pacavit_convmixer_small_100": "IMNET_224_pacavit_convmixer_small_100.pth",
    "pacavit_base_p2cconv_100_0": "IMNET_224_pacavit_base_p2cconv_100_0.pth",
    "pacavit_convmixer_base_100": "IMNET_224_pacavit_convmixer_base_100.pth",
    "pacavit_small_p2cconv_2_0": "IMNET_224_pacavit_small_p2cconv_2_0.pth",
    "pacavit_small_p2cconv_49_0": "IMNET_224_pacavit_small_p2cconv_49_0.pth",
    "pacavit_small_p2cconv_49_100": "IMNET_224_pacavit_small_p2cconv_49_100.pth",
    "pacavit_small_p2cconv_100_49": "IMNET_224_pacavit_small_p2cconv_100_49.pth",
    "pacavit_small_p2cconv_100": "IMNET_224_pacavit_small_p2cconv_100_49.pth",
    "pacavit_small_p2cconv_100_blockwise": "IMNET_224_pacavit_small_p2cconv_100_blockwise.pth",
}


def _cfg(name: str) -> dict:
    filename = RELEASED_IMAGENET.get(name)
    return {
        "url": f"{RELEASE_BASE_URL}/{filename}" if filename else "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0",
        "classifier": "head",
        "license": "mit",
    }


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in VARIANTS})


def _create_pacavit(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    model = build_model_with_cfg(
        PaCaViT,
        variant,
        pretrained=False,  # loaded below by the project's loader (mirror URL, clear errors)
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**VARIANTS[variant], **kwargs},
    )
    if pretrained:
        cfg = getattr(model, "pretrained_cfg", None) or model.model.pretrained_cfg
        source = cfg.get("file") or cfg.get("url")
        if not source:
            raise RuntimeError(f"{variant} has no released ImageNet checkpoint; pass a local file instead")
        # like timm's pretrained loading: another num_classes / num_clusters re-initialises those
        # layers, another in_chans adapts the stem conv
        target = getattr(model, "model", model)  # features_only wraps the model
        load_checkpoint(target, source, reinit=("head", "clustering"), first_conv=cfg.get("first_conv"))
    return model


def create_downstream(variant: str, **kwargs) -> PaCaViTDownstream:
    """Build ``<variant>_downstream``: the backbone that the detection/segmentation configs name."""
    if variant.endswith("_downstream"):
        variant = variant[: -len("_downstream")]
    if variant not in VARIANTS:
        raise KeyError(f"unknown PaCa-ViT variant {variant!r}; choose from {sorted(VARIANTS)}")
    return PaCaViTDownstream(variant=variant, **{**VARIANTS[variant], **kwargs})


def _register_downstream_backbones():
    """Register ``<name>_downstream`` in mmengine's root MODELS registry; mmdet and mmseg find
    them there through their registries' parent lookup (no edits in those packages)."""
    try:
        from mmengine.registry import MODELS
    except ImportError:  # classification-only installs
        return
    for variant in VARIANTS:
        def build(variant=variant, **kwargs):
            return create_downstream(variant, **kwargs)

        build.__name__ = build.__qualname__ = f"{variant}_downstream"
        MODELS.register_module(name=build.__name__, module=build, force=True)


_register_downstream_backbones()


@register_model
def pacavit_tiny_p2cconv_100_0(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_tiny_p2cconv_100_0", pretrained, **kwargs)


@register_model
def pacavit_small_p2cconv_100_0(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_small_p2cconv_100_0", pretrained, **kwargs)


@register_model
def pacavit_base_p2cconv_100_0(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_base_p2cconv_100_0", pretrained, **kwargs)


@register_model
def pacavit_small_p2cmlp_100_0(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_small_p2cmlp_100_0", pretrained, **kwargs)


@register_model
def pacavit_small_p2clinear_100_0(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_small_p2clinear_100_0", pretrained, **kwargs)


@register_model
def pacavit_small_p2cconv_2_0(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_small_p2cconv_2_0", pretrained, **kwargs)


@register_model
def pacavit_small_p2cconv_49_0(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_small_p2cconv_49_0", pretrained, **kwargs)


@register_model
def pacavit_small_p2cconv_49_100(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_small_p2cconv_49_100", pretrained, **kwargs)


@register_model
def pacavit_small_p2cconv_100_49(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_small_p2cconv_100_49", pretrained, **kwargs)


@register_model
def pacavit_small_p2cconv_100(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_small_p2cconv_100", pretrained, **kwargs)


@register_model
def pacavit_small_p2cconv_100_blockwise(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_small_p2cconv_100_blockwise", pretrained, **kwargs)


@register_model
def pacavit_convmixer_tiny_100(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_convmixer_tiny_100", pretrained, **kwargs)


@register_model
def pacavit_convmixer_small_100(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_convmixer_small_100", pretrained, **kwargs)


@register_model
def pacavit_convmixer_base_100(pretrained=False, **kwargs):
    return _create_pacavit("pacavit_convmixer_base_100", pretrained, **kwargs)
