"""Evaluate an mmdet checkpoint (file or URL) with the config's COCO metric (bbox and segm mAP).

    python detection/test_mmdet.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR]
                                                     [--cfg-options KEY=VALUE ...]

``--show-dir`` writes one PNG per test image with the predicted boxes and masks.
"""
from runtime.openmmlab import test_main

if __name__ == "__main__":
    test_main(default_scope="mmdet", task="detection")
