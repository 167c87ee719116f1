"""Parameters and FLOPs of a whole detector, as in the seed's COCO table (one 1280x800 image).

    python detection/get_flops.py CONFIG [--shape 1280 800] [--cfg-options KEY=VALUE ...]

FLOPs are multiply-adds of the tensor-mode forward (backbone, FPN, RPN and RoI heads), counted by
mmengine.analysis with the SDPA handle of models/flops.py.
"""
from runtime.openmmlab import flops_main

if __name__ == "__main__":
    flops_main(default_scope="mmdet", task="detection")
