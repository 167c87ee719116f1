"""PaCa-ViT: Learning Patch-to-Cluster Attention in Vision Transformers (CVPR 2023).

A four-stage pyramid (stem /4, transitions /2) of PaCa blocks.  In a PaCa block the N patch
tokens attend to M learned clusters instead of to each other: a clustering module predicts
assignment logits (B, M, N), their softmax over the patches pools the tokens into M cluster
tokens, and queries from the patches attend to keys/values from the clusters (O(N*M)).

Parameter names follow the official implementation so that its released checkpoints load
unchanged.  Every variant is one row of ``VARIANTS``; ``<name>_downstream`` builds the
dense-prediction backbone (four NCHW outputs) used by the mmdet / mmseg configs.
"""
import contextlib
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, calculate_drop_path_rates, get_device_dtype, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    register_notrace_function,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices

from .builder import PRETRAINED
from .checkpoint import RELEASE_BASE_URL, CheckpointError, load_checkpoint, release_url
from .layers import CLUSTERING_LAYERS, ConvDownsample, ConvMixerTeacher, ConvMlp, PaCaAttention, PaCaStage

__all__ = [
    "PaCaViT", "PaCaViTDownstream", "PaCaStage", "PaCaBlock", "VARIANTS", "IMAGENET_DROP_PATH_RATE",
    "create_downstream",
]

_logger = logging.getLogger(__name__)

LN_EPS = 1e-6
NUM_STAGES = 4


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


TeacherOutput = Tuple[List[Optional[torch.Tensor]], List[torch.Tensor]]


def _from_teacher(teacher: Optional[TeacherOutput], stage: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Stage ``stage``'s (cluster logits, features) from the teacher's output, (None, None) without one."""
    if teacher is None:
        return None, None
    return teacher[0][stage], teacher[1][stage]


@register_notrace_function  # a leaf for torch.fx (which wraps only public names): it branches on the rank
def check_image_batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        raise ValueError(
            "PaCa-ViT takes a batch of images (B, C, H, W) but got one image of shape {}: the batch dimension "
            "is missing, pass x.unsqueeze(0)".format(list(x.shape))
        )
    if x.dim() != 4:
        raise ValueError("PaCa-ViT takes a batch of images (B, C, H, W), got a tensor of shape {}".format(list(x.shape)))
    return x


class PaCaViT(nn.Module):
    """PaCa-ViT for classification (``num_classes > 0``) or as a dense-prediction backbone.

    Args:
        img_size: accepted for timm compatibility; the model works for any input size.
        in_chans: input image channels.
        embed_dims / depths / num_heads / mlp_ratios: widths, block counts, heads and MLP ratios of
            the four stages.
        num_clusters: clusters M per stage; 0 gives ordinary patch-to-patch attention in that stage.
        clustering: how blocks compute assignments: ``'conv'``, ``'mlp'`` or ``'linear'``; ignored
            when a ``teacher_depths`` teacher provides them.
        cluster_every: 0 = stage-wise (first block of a stage, shared by the rest); k > 0 = every
            k-th block recomputes them (1 = block-wise).
        teacher_depths: depths of the ConvMixer clustering teacher, or None for on-site clustering.
        device / dtype: where and in which precision the parameters are created (``'meta'``
            builds the structure without allocating weights).

    ``forward_features`` returns the normalised last-stage map as (B, H, W, C): ``output_fmt``.
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
        device=None,
        dtype=None,
    ):
        super().__init__()
        if clustering not in CLUSTERING_LAYERS:
            raise ValueError(f"clustering must be one of {sorted(CLUSTERING_LAYERS)}, got {clustering!r}")
        _check_global_pool(global_pool)
        per_stage = dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios,
                         num_clusters=num_clusters)
        if any(len(v) != NUM_STAGES for v in per_stage.values()):
            raise ValueError(f"PaCa-ViT has {NUM_STAGES} stages; got {per_stage}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = "NHWC"  # forward_features returns (B, H, W, C)
        self.feature_dim = -1
        self.num_stages = NUM_STAGES
        self.embed_dims = tuple(embed_dims)
        self.num_clusters = tuple(num_clusters)
        self.num_features = self.head_hidden_size = embed_dims[-1]

        # The layers take no device argument: they are created under the requested default device.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            # registered before the stem, as in the official code: parameter order decides how an
            # optimizer state from an official training checkpoint maps onto the parameters
            self.paca_teacher = None
            if teacher_depths is not None:
                self.paca_teacher = ConvMixerTeacher(embed_dims, teacher_depths, num_clusters, teacher_kernel_size)
            self.patch_embed = ConvDownsample(in_chans, embed_dims[0], stride=4, eps=LN_EPS)

            block_dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=False)
            self.feature_info = []
            for i in range(NUM_STAGES):
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
                setattr(self, f"stage{i + 1}", PaCaStage(blocks))
                setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=LN_EPS))
                self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"norm{i + 1}"))

            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
            self.apply(self._init_weights)
        if dtype is not None:
            self.to(dtype=dtype)

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
        for stage in self._stage_modules():
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_global_pool(global_pool)
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _stage_modules(self) -> List[PaCaStage]:
        return [getattr(self, f"stage{i + 1}") for i in range(self.num_stages)]

    # -- forward ------------------------------------------------------------------------------
    def _forward_stages(self, x: torch.Tensor, last_stage: int) -> List[torch.Tensor]:
        """The normalised outputs (B, H, W, C) of stages 0..``last_stage``.

        Written out stage by stage, with the official module names, so that TorchScript compiles
        it; the ``hasattr`` checks skip stages removed by ``prune_intermediate_layers``.
        """
        # channels_last input: every conv then returns NHWC memory and the token views are free
        x = self.patch_embed(check_image_batch(x).contiguous(memory_format=torch.channels_last))
        teacher: Optional[TeacherOutput] = None
        if self.paca_teacher is not None:
            teacher = self.paca_teacher(x.permute(0, 3, 1, 2))
        logits, shortcut = _from_teacher(teacher, 0)
        x = self.norm1(self.stage1(x, logits, shortcut))
        outs = [x]
        if hasattr(self, "stage2") and last_stage >= 1:
            logits, shortcut = _from_teacher(teacher, 1)
            x = self.norm2(self.stage2(self.transition1(x.permute(0, 3, 1, 2)), logits, shortcut))
            outs.append(x)
        if hasattr(self, "stage3") and last_stage >= 2:
            logits, shortcut = _from_teacher(teacher, 2)
            x = self.norm3(self.stage3(self.transition2(x.permute(0, 3, 1, 2)), logits, shortcut))
            outs.append(x)
        if hasattr(self, "stage4") and last_stage >= 3:
            logits, shortcut = _from_teacher(teacher, 3)
            x = self.norm4(self.stage4(self.transition3(x.permute(0, 3, 1, 2)), logits, shortcut))
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the normalised last-stage map, (B, H, W, C)."""
        return self._forward_stages(x, self.num_stages - 1)[-1]

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
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: the outputs of the selected stages.

        Each intermediate is a stage's output after its own ``norm{i}``: in PaCa-ViT every stage
        ends with a LayerNorm whose output feeds the next stage and the dense-prediction heads (the
        official backbone's features).  There is no separate final norm, so ``norm`` changes
        nothing.

        Args:
            x: images (B, C, H, W).
            indices: the last n stages if an int, all if None, else the stage indices (0-3).
            norm: accepted for timm's API; the outputs are always normalised (see above).
            stop_early: stop after the last selected stage; the returned final map is then that
                stage's output.
            output_fmt: ``'NCHW'`` or ``'NHWC'`` for the intermediates.
            intermediates_only: return only the list of intermediates.

        Returns:
            ``(final, intermediates)``: ``final`` as ``forward_features`` returns it (B, H, W, C),
            or only ``intermediates``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC', got {}".format(output_fmt))
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        outs = self._forward_stages(x, max_index if stop_early or intermediates_only else self.num_stages - 1)
        intermediates = [nhwc_to_contiguous_nchw(outs[i]) if output_fmt == "NCHW" else outs[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return outs[-1], intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Remove what the stages in ``indices`` do not need: the later stages (with their
        transitions, norms and the teacher's cluster heads for them) and, with ``prune_head`` or
        when stages were removed, the classifier.  The features then end at the last kept stage.

        ``prune_norm`` has nothing to remove: each kept stage's norm produces that stage's output.
        """
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        prune_end = max_index < self.num_stages - 1
        for i in range(max_index + 1, self.num_stages):
            for name in (f"transition{i}", f"stage{i + 1}", f"norm{i + 1}"):
                delattr(self, name)
            if self.paca_teacher is not None and hasattr(self.paca_teacher, f"to_clusters{i + 1}"):
                delattr(self.paca_teacher, f"to_clusters{i + 1}")
        if prune_end:
            self.num_stages = max_index + 1
            self.feature_info = self.feature_info[: self.num_stages]
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


def nhwc_to_contiguous_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) stage output -> contiguous (B, C, H, W) feature map.

    A bare ``permute`` would hand out a channels_last view, and mmcv's ops (RoIAlign's CPU kernel
    and CUDA launcher among them) index their input's memory as contiguous NCHW without checking
    the strides: Mask R-CNN then pools scrambled features.  One copy here serves every consumer.
    """
    return x.permute(0, 3, 1, 2).contiguous()


def _check_global_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
    return global_pool


class PaCaViTDownstream(PaCaViT):
    """Dense-prediction backbone: no classifier, returns the stage outputs in ``out_indices`` as NCHW.

    Accepts the keyword arguments of the official mmdet / mmseg configs: ``pretrained`` (a
    checkpoint path or URL), ``downstream_cluster_num`` (per-stage cluster numbers replacing the
    ImageNet ones; the clustering output layers are then re-initialised when loading), and the
    OpenMMLab ``init_cfg=dict(type='Pretrained', checkpoint=...)``.  The checkpoint ``'pretrained'``
    names the variant's released ImageNet file (the word of the tools' ``--checkpoint``).  Weights are loaded by ``init_weights()``, which
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
        self.out_indices = tuple(feature_take_indices(self.num_stages, list(out_indices))[0])
        if init_cfg is not None and init_cfg.get("type") != "Pretrained":
            raise ValueError(f"only init_cfg=dict(type='Pretrained', checkpoint=...) is supported, got {init_cfg}")
        self.pretrained = pretrained or (init_cfg or {}).get("checkpoint")
        self.is_init = False

    def checkpoint_source(self) -> Optional[str]:
        """The file or URL ``init_weights`` loads; ``'pretrained'`` resolves to the released file."""
        if self.pretrained == "imagenet":  # the word of earlier configs
            raise CheckpointError("the backbone checkpoint 'imagenet' is now spelled 'pretrained': "
                                  "write init_cfg=dict(type='Pretrained', checkpoint='pretrained') in the config")
        if self.pretrained != PRETRAINED:
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
        outs = self._forward_stages(x, max(self.out_indices))
        return [nhwc_to_contiguous_nchw(outs[i]) for i in self.out_indices]


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

# The stochastic-depth rate each variant is trained with on ImageNet: the official model table fixes
# it per variant (Base 0.5, every other row 0.1).  train_timm.py uses it unless --drop-path is given;
# the models themselves default to 0 (timm's convention: the recipe sets it).
IMAGENET_DROP_PATH_RATE = {name: 0.5 if name == "pacavit_base_p2cconv_100_0" else 0.1 for name in VARIANTS}

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
        # the smallest input at which every stage has its nominal reduction (stage 4 is 1x1); any
        # size runs.  timm's model tests use it instead of their larger default test sizes.
        "min_input_size": (3, 32, 32),
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
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")).to_dict()

    def build(**model_kwargs) -> PaCaViT:
        # the weights load into the whole model, before timm's features_only wrapper prunes it
        model = PaCaViT(**model_kwargs)
        if pretrained:
            source = cfg.get("file") or cfg.get("url")
            if not source:
                raise RuntimeError(f"{variant} has no released ImageNet checkpoint; pass a local file instead")
            # like timm's pretrained loading: another num_classes / num_clusters re-initialises those
            # layers, another in_chans adapts the stem conv
            load_checkpoint(model, source, reinit=("head", "clustering"), first_conv=cfg.get("first_conv"))
        return model

    return build_model_with_cfg(
        build,
        variant,
        pretrained=False,  # loaded by ``build`` with the project's loader (mirror URL, clear errors)
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**VARIANTS[variant], **kwargs},
    )


def create_downstream(variant: str, **kwargs) -> PaCaViTDownstream:
    """Build ``<variant>_downstream``: the backbone that the detection/segmentation configs name."""
    if variant.endswith("_downstream"):
        variant = variant[: -len("_downstream")]
    if variant not in VARIANTS:
        raise KeyError(f"unknown PaCa-ViT variant {variant!r}; choose from {sorted(VARIANTS)}")
    return PaCaViTDownstream(variant=variant, **{**VARIANTS[variant], **kwargs})


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
