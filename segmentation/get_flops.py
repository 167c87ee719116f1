"""Parameters and FLOPs of a whole segmentor, as in the seed's ADE20K tables (one 512x512 image).

    python segmentation/get_flops.py CONFIG [--shape 512 512] [--cfg-options KEY=VALUE ...]

FLOPs are multiply-adds of the tensor-mode forward (backbone and decode head; the auxiliary head
of UperNet only runs in training), counted by mmengine.analysis with the SDPA handle of
models/flops.py.
"""
from runtime.openmmlab import flops_main

if __name__ == "__main__":
    flops_main(default_scope="mmseg", task="segmentation", default_shape=(512, 512))
