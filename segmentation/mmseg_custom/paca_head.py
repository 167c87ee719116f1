"""The PaCa segmentation head: patch-to-cluster attention with one cluster per class.

The four backbone levels are projected to ``channels``, upsampled to the finest level and
concatenated (C = 4 * channels).  A clustering branch predicts one assignment map per class;
its softmax over the pixels pools the concatenated features into ``num_classes`` cluster
tokens.  Every pixel (query) attends to those clusters (keys, values), and the result is
classified per pixel.  In training the raw assignment logits are returned as well: they are
supervised directly by the segmentation labels (``aux_loss_decode``), since with M equal to
the number of classes each cluster has a known meaning.

Parameter names follow the official implementation, so its released ADE20K checkpoints load.
"""
from typing import List

import torch
from mmcv.cnn import ConvModule, build_activation_layer, build_norm_layer
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.losses import accuracy
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.utils import ConfigType, SampleList, add_prefix
from torch import Tensor, nn


def token_norm_cfg(norm_cfg: ConfigType) -> ConfigType:
    """The norm for (B, C, M) tokens: mmcv's ``BN`` is BatchNorm2d, its 1d twin is ``BN1d``
    (SyncBN accepts any rank)."""
    return dict(norm_cfg, type="BN1d") if norm_cfg["type"] in ("BN", "BN2d") else norm_cfg


class ChannelsFirst(nn.Module):
    """(B, M, C) -> (B, C, M), the layout BatchNorm1d normalises."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


@MODELS.register_module()
class PaCaSegHead(BaseDecodeHead):
    """PaCa segmentation head (a multi-level decode head, ``in_index`` lists the levels).

    Args:
        aux_loss_decode: loss of the cluster-assignment logits against the labels.
        Other arguments as ``BaseDecodeHead``; the number of clusters is ``num_classes``.

    ``models.capture_maps`` records its cluster assignments (the softmax over the pixels of the
    ``clustering`` output, as computed below).
    """

    cluster_logits_layer = "clustering"  # the (B, M, H, W) assignment logits, for capture_maps

    def __init__(
        self,
        aux_loss_decode: ConfigType = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
        **kwargs,
    ):
        super().__init__(input_transform="multiple_select", **kwargs)
        conv = dict(conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
        fused = self.channels * len(self.in_channels)
        self.convs = nn.ModuleList(ConvModule(c, self.channels, 1, **conv) for c in self.in_channels)
        self.q = nn.Sequential(ConvModule(fused, self.channels, 1, **conv))
        self.clustering = nn.Sequential(
            ConvModule(fused, self.channels, 1, **conv),
            nn.Conv2d(self.channels, self.num_classes, 1),
        )
        self.k = self._cluster_projection(fused)
        self.v = self._cluster_projection(fused)
        self.proj = ConvModule(self.channels, self.channels, 1, **conv)
        self.aux_loss_decode = MODELS.build(aux_loss_decode)

    def _cluster_projection(self, in_features: int) -> nn.Sequential:
        """Linear -> norm -> activation over the cluster tokens; returns (B, channels, M)."""
        return nn.Sequential(
            nn.Linear(in_features, self.channels),
            ChannelsFirst(),
            build_norm_layer(token_norm_cfg(self.norm_cfg), self.channels)[1] if self.norm_cfg else nn.Identity(),
            build_activation_layer(self.act_cfg) if self.act_cfg else nn.Identity(),
        )

    def forward(self, inputs: List[Tensor]):
        """Segmentation logits (B, num_classes, H, W) at the finest input level; in training
        also the cluster-assignment logits of the same shape."""
        feats = self._transform_inputs(inputs)
        size = feats[0].shape[2:]
        fused = torch.cat(
            [
                resize(conv(x), size=size, mode="bilinear", align_corners=self.align_corners)
                for conv, x in zip(self.convs, feats)
            ],
            dim=1,
        )
        cluster_logits = self.clustering(fused)  # B M H W
        assignments = cluster_logits.flatten(2).softmax(dim=-1)  # B M N, softmax over the pixels
        clusters = assignments @ fused.flatten(2).transpose(1, 2)  # B M C
        keys, values = self.k(clusters), self.v(clusters)  # B channels M
        queries = self.q(fused).flatten(2).transpose(1, 2)  # B N channels
        # unscaled single-head attention, as in the official head; its logits sum `channels` products,
        # which overflow float16 under autocast (--amp), so they and their softmax are at least float32
        with torch.autocast(device_type=queries.device.type, enabled=False):
            precision = torch.promote_types(queries.dtype, torch.float32)
            attention = (queries.to(precision) @ keys.to(precision)).softmax(dim=-1).to(values.dtype)  # B N M
        out = (values @ attention.transpose(1, 2)).unflatten(-1, tuple(size))  # B channels H W
        seg_logits = self.cls_seg(self.proj(out))
        if self.training:
            return seg_logits, cluster_logits
        return seg_logits

    def loss(self, inputs: List[Tensor], batch_data_samples: SampleList, train_cfg: ConfigType) -> dict:
        """Segmentation losses, plus the clustering losses under ``paca.`` names."""
        seg_logits, cluster_logits = self.forward(inputs)
        losses = self.loss_by_feat(seg_logits, batch_data_samples)
        losses.update(add_prefix(self.clustering_loss_by_feat(cluster_logits, batch_data_samples), "paca"))
        return losses

    def clustering_loss_by_feat(self, cluster_logits: Tensor, batch_data_samples: SampleList) -> dict:
        """``aux_loss_decode`` (and accuracy) of the assignment logits, upsampled to the labels."""
        labels = self._stack_batch_gt(batch_data_samples)
        logits = resize(cluster_logits, size=labels.shape[2:], mode="bilinear", align_corners=self.align_corners)
        labels = labels.squeeze(1)
        return {
            self.aux_loss_decode.loss_name: self.aux_loss_decode(logits, labels, ignore_index=self.ignore_index),
            "acc_seg": accuracy(logits, labels, ignore_index=self.ignore_index),
        }
