"""What the tasks' entry points share, and nothing a model needs.

- ``openmmlab``: the mmengine Runner around detection and segmentation (train, test, FLOPs, the
  backbones' registration for the mmdet/mmseg plug-ins);
- ``openmmlab_args``: their command lines and the checks of a command that need no torch (the
  launchers run them before anything starts);
- ``run_folder``: run folders (locks, resume point, finished marker);
- ``compile_cache``: torch.compile's on-disk caches kept apart per CPU vector ISA;
- ``gpu_check``: whether torch (and mmcv) can use this node's GPUs;
- ``launch_common.sh``: the shell functions the launchers source (devices, nodes, run folders, torchrun).
"""
