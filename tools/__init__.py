"""Command-line tools: predict, the cluster explorer and visualiser, ONNX export, and the generators of
the README's tables and drawings.  Each module is a script (``python tools/NAME.py``) and importable as
``tools.NAME``."""
