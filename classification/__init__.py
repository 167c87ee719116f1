"""Image classification with timm: the scripts (``train_timm.py``, ``validate.py``, ``benchmark.py``) and
what they share (``cls_common``); each script is also importable as ``classification.NAME``."""
