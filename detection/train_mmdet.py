"""Train an mmdet model from a config (run through ./train_mmdet.sh, or directly for one process).

    python detection/train_mmdet.py CONFIG [--work-dir DIR] [--resume CKPT] [--amp] [--auto-scale-lr]
                                           [--cfg-options KEY=VALUE ...]

Resumes automatically from the work dir's latest checkpoint.  See runtime/openmmlab.py.
"""
from runtime.openmmlab import train_main

if __name__ == "__main__":
    train_main(default_scope="mmdet", task="detection")
