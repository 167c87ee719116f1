"""Encoder-decoder that reports the PaCa head's clustering losses next to the decode losses."""
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS


@MODELS.register_module()
class PaCaEncoderDecoder(EncoderDecoder):
    """``EncoderDecoder`` whose decode head may return auxiliary ``paca.*`` losses.

    The head's clustering losses are logged as ``paca.loss_ce`` / ``paca.acc_seg`` beside
    ``decode.loss_ce`` / ``decode.acc_seg`` (plain ``EncoderDecoder`` would still optimise them,
    as ``decode.paca.*``).
    """

    def _decode_head_forward_train(self, inputs, data_samples) -> dict:
        losses = self.decode_head.loss(inputs, data_samples, self.train_cfg)
        return {name if name.startswith("paca.") else f"decode.{name}": value for name, value in losses.items()}
