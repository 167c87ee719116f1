"""Evaluate an mmseg checkpoint (file or URL) with the config's metric (mIoU for ADE20K).

    python segmentation/test_mmseg.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR]
                                                        [--cfg-options KEY=VALUE ...]

``--show-dir`` writes one PNG per test image: the ground truth beside the prediction.
"""
from runtime.openmmlab import test_main

if __name__ == "__main__":
    test_main(default_scope="mmseg", task="segmentation")
