"""Runtime shared by the OpenMMLab tasks: detection (mmdet) and segmentation (mmseg).

Each task's entry scripts are one line on top of this module::

    train_main(default_scope='mmdet', task='detection')     # detection/train_mmdet.py
    test_main(default_scope='mmseg', task='segmentation')   # segmentation/test_mmseg.py
    flops_main(default_scope='mmdet', task='detection')     # detection/get_flops.py

What this adds on top of mmengine's Runner:

* work dirs under ``work_dirs/<task>/`` (root overridable with env ``PACAVIT_WORK_DIRS``);
* the launcher is read from torchrun's environment, and CPU processes use the gloo backend
  (mmengine would call ``torch.cuda.set_device`` and wrap DDP with a CUDA device id);
* automatic resume from the work dir, fp16 AMP on CUDA unless ``--no-amp`` (``--amp`` refused
  without CUDA), ``--auto-scale-lr``; rank 0
  chooses the checkpoint and tells the other ranks, so every node of a run resumes from the same one
  (``runtime.run_folder``), and marks the run ``FINISHED`` at the end;
* SIGTERM (a scheduler's preemption notice) saves a resumable checkpoint before the run stops, and an
  epoch-based run resumed from it goes on after the saved iteration (``MidEpochResumableTrainLoop``);
* loader worker processes end with the process they load for, whenever it is killed
  (``runtime.loader_workers``): no orphan keeps the launcher waiting or the run folder locked;
* checkpoints load with ``torch.load(weights_only=True)``: :func:`register_checkpoint_safe_globals`
  allows the plain data types that mmengine itself writes into checkpoints for the Runner's own
  loading (resume), while arbitrary pickled callables are still refused;
* a config's ``load_from`` (fine-tuning weights: a file, a URL or ``pretrained``) is fetched by the
  project's loader and loaded when no run resumes; a resume checkpoint
  must fit the config's model exactly, as in ``test_main`` (one ``error:`` line otherwise);
* checkpoints given to ``test_main`` (file, URL or ``pretrained``) go through ``models.checkpoint.load_checkpoint``
  (cached download, clear errors for corrupt files) and must fit the config's model exactly;
* FLOPs counted with ``mmengine.analysis`` including ``scaled_dot_product_attention``;
* a config with ``compile=True`` (mmengine's ``torch.compile``) keys the compile caches by the CPU's
  vector ISA first (``runtime.compile_cache``).
"""
import argparse
import os
import signal
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop, Runner

from models import PRETRAINED
from models.checkpoint import (
    CheckpointError, extract_state_dict, fit_state_dict, load_checkpoint, read_checkpoint, refuse_bare_backbone,
    release_url, resolve_checkpoint,
)
from runtime.compile_cache import key_compile_caches_by_cpu_isa
from runtime.loader_workers import end_workers_with_parent
from runtime.openmmlab_args import (check_auto_scale_lr, check_data_roots, config_arguments, evaluation_parser,
                                     read_config, train_parser)
from runtime.run_folder import (agreed_resume_point, check_shared_run_folder, claim_run_folder, mark_finished,
                                run_folder_path, work_dirs_root)


def register_plugin() -> None:
    """What the mmdet and mmseg plug-ins do on import: the backbones into the registry, the checkpoint types allowed."""
    register_backbones()
    register_checkpoint_safe_globals()


def register_backbones() -> None:
    """Register ``<variant>_downstream`` in mmengine's root MODELS registry, where mmdet's and mmseg's
    registries find them by parent lookup (the configs name them as ``type``)."""
    from mmengine.registry import MODELS

    from models import VARIANTS, create_downstream

    for variant in VARIANTS:
        MODELS.register_module(name=f"{variant}_downstream", module=partial(create_downstream, variant), force=True)


def register_checkpoint_safe_globals() -> None:
    """Allow the plain data types of ``models.checkpoint.safe_globals`` process-wide.

    The project's own loader (``read_checkpoint``) allows them by itself; this is for the
    ``torch.load(weights_only=True)`` calls inside mmengine's Runner (``--resume``, ``load_from``),
    which would otherwise refuse the ``message_hub`` and numpy values mmengine writes into its own
    checkpoints.  A pickle that reaches for any other callable is still rejected.
    """
    from models.checkpoint import safe_globals

    torch.serialization.add_safe_globals(list(safe_globals()))


# ---------------------------------------------------------------------------------------------
# Config and environment


def load_config(path: str, default_scope: str, cfg_options: Optional[dict] = None):
    """Read a config, apply ``--cfg-options`` and make ``default_scope`` the registry scope."""
    from mmengine.registry import init_default_scope

    cfg = read_config(path, cfg_options)
    cfg.setdefault("default_scope", default_scope)
    init_default_scope(cfg.default_scope)
    return cfg


def _launcher() -> str:
    """'pytorch' when started by torchrun with several processes, else 'none'."""
    return "pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"


def _prepare_environment(cfg, launcher: str) -> None:
    """Loaders that fit their worker count, and the process group, started here rather than in the
    Runner so that the ranks can agree on things before it is built.  On CPU processes: gloo and DDP
    without device ids (mmengine assumes CUDA)."""
    register_checkpoint_safe_globals()
    _fit_persistent_workers(cfg)
    if cfg.get("compile"):  # mmengine's Runner then runs torch.compile
        key_compile_caches_by_cpu_isa()
    if launcher == "none":
        return
    if torch.cuda.is_available():
        from mmengine.dist import init_dist, is_distributed
        from mmengine.utils.dl_utils import set_multi_processing

        # as Runner.setup_env does it (which then finds the group started)
        set_multi_processing(**cfg.env_cfg.get("mp_cfg", {}), distributed=True)
        if not is_distributed():
            init_dist(launcher, **cfg.env_cfg.get("dist_cfg", {}))
        return
    import torch.distributed as dist

    cfg.env_cfg.setdefault("dist_cfg", {})["backend"] = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    cfg.model_wrapper_cfg = dict(
        type="MMDistributedDataParallel",
        device_ids=None,
        broadcast_buffers=False,
        find_unused_parameters=cfg.get("find_unused_parameters", False),
    )
    # SyncBatchNorm runs on GPUs only; several CPU processes normalise their own batches instead
    _sync_bn_to_bn(cfg.model)


def _fit_persistent_workers(cfg) -> None:
    """``persistent_workers`` needs worker processes: the zoo configs set it for 2-4 workers, so
    ``--cfg-options train_dataloader.num_workers=0`` alone would make the DataLoader refuse."""
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(name)
        if loader and loader.get("persistent_workers") and not loader.get("num_workers", 0):
            loader["persistent_workers"] = False


def _sync_bn_to_bn(node) -> None:
    """Turn every ``type='SyncBN'`` of a (nested) config into ``'BN'``, in place."""
    if isinstance(node, dict):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
        for value in node.values():
            _sync_bn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _sync_bn_to_bn(value)


def _default_work_dir(task: str, *parts: str) -> str:
    return str(work_dirs_root() / task / Path(*parts))


# ---------------------------------------------------------------------------------------------
# Training


def amp_enabled(amp_flag: Optional[bool], cuda: bool) -> bool:
    """fp16 AMP by default where it runs (CUDA), as the official launchers (``--amp``) train;
    ``--amp`` / ``--no-amp`` decide otherwise."""
    return cuda if amp_flag is None else amp_flag


def train_main(default_scope: str, task: str, argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``train_<mm>.py``: train ``config`` with automatic resume; rank 0 marks the
    work dir ``FINISHED`` when training returns."""
    from mmengine.dist import is_main_process

    args = train_parser(task).parse_args(argv)
    if args.amp and not torch.cuda.is_available():
        raise SystemExit("error: --amp needs a CUDA device; drop --amp to train in float32 on CPU")
    cfg = load_config(args.config, default_scope, args.cfg_options)
    # a direct run without --work-dir: Exp_name and Tag 'default' in the launchers' layout
    cfg.work_dir = args.work_dir or str(run_folder_path(task, "default", Path(args.config).stem, "default"))
    cfg.launcher = _launcher()
    if amp_enabled(args.amp, torch.cuda.is_available()):
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if args.auto_scale_lr:
        check_auto_scale_lr(cfg, args.config)
        cfg.auto_scale_lr.enable = True
    check_data_roots(cfg, ("train_dataloader", "val_dataloader"))
    claim_run_folder(cfg.work_dir, "--work-dir")
    _prepare_environment(cfg, cfg.launcher)
    check_shared_run_folder(cfg.work_dir, "--work-dir")
    resume_from = agreed_resume_point("openmmlab", cfg.work_dir, args.resume)
    # a resume wins over the config's load_from (fine-tuning weights), which mmengine loads when no run resumes
    if resume_from:
        cfg.load_from = resume_from
    elif cfg.get("load_from"):
        cfg.load_from = fine_tuning_weights(cfg.load_from, args.config)
    cfg.resume = resume_from is not None
    if cfg.train_cfg.get("type") == "EpochBasedTrainLoop":
        cfg.train_cfg.type = "MidEpochResumableTrainLoop"  # CheckpointOnSigterm saves within epochs
    runner = RunnerWithBoundWorkers.from_cfg(cfg)
    if resume_from:
        refuse_unfit_resume(_unwrapped(runner.model), resume_from)
    runner.register_hook(CheckpointOnSigterm())
    runner.train()
    if is_main_process():
        mark_finished(cfg.work_dir)


def fine_tuning_weights(load_from: str, config: str) -> str:
    """The local file of a config's ``load_from`` (``pretrained``: the config's released file), fetched
    and checked by the project's loader (mirror, cache), so that a missing or broken file is one line
    before the Runner starts; mmengine then loads it, leniently as fine-tuning wants."""
    try:
        return resolve_checkpoint(weights_source(load_from, config))
    except CheckpointError as err:
        raise SystemExit(f"error: load_from in {config}: {err}") from err


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    from mmengine.model import is_model_wrapper

    return model.module if is_model_wrapper(model) else model


def refuse_unfit_resume(model: torch.nn.Module, checkpoint: str) -> None:
    """A resume checkpoint must fit ``model`` exactly, as ``test_main`` requires (mmengine's own resume
    would load a wrong file leniently): anything else is one ``error:`` line before training starts."""
    try:
        fit_state_dict(extract_state_dict(read_checkpoint(checkpoint)), model, source=str(checkpoint))
    except CheckpointError as err:
        raise SystemExit(f"error: cannot resume: {err}") from err


class RunnerWithBoundWorkers(Runner):
    """mmengine's Runner, except that its loaders' worker processes end when the training or test
    process is killed (``runtime.loader_workers``), whenever it dies."""

    @staticmethod
    def build_dataloader(dataloader, seed=None, diff_rank_seed=False):
        return end_workers_with_parent(Runner.build_dataloader(dataloader, seed=seed, diff_rank_seed=diff_rank_seed))


class CheckpointOnSigterm(Hook):
    """On SIGTERM (what SLURM sends before preempting a job, and what torchrun passes on when it is
    stopped), save a resumable checkpoint after the current iteration and end the run.

    The signal may reach the ranks at different iterations, so they agree each iteration (a max
    over a flag) and all stop after the same one: a rank that stopped alone would leave the others
    waiting in their next all-reduce.  The checkpoint is named by mmengine's ``last_checkpoint``
    pointer, where the launcher's resume looks first.
    """

    priority = "VERY_LOW"  # after the Runner's own checkpoint and logger hooks

    def __init__(self):
        self.signalled = False

    def before_train(self, runner) -> None:
        signal.signal(signal.SIGTERM, self._note_signal)

    def _note_signal(self, signum, frame) -> None:
        self.signalled = True

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        from mmengine.dist import all_reduce, is_main_process

        flag = torch.tensor([int(self.signalled)], device=_collective_device())
        all_reduce(flag, op="max")
        if not flag.item():
            return
        iteration = runner.iter + 1
        filename = f"iter_{iteration}.pth"
        runner.save_checkpoint(runner.work_dir, filename, by_epoch=False)
        if not is_main_process():
            raise SystemExit(128 + signal.SIGTERM)
        path = os.path.join(runner.work_dir, filename)
        with open(os.path.join(runner.work_dir, "last_checkpoint"), "w") as pointer:
            pointer.write(path)
        raise SystemExit(f"stopped by SIGTERM after iteration {iteration}; saved {path} to resume from")


@LOOPS.register_module()
class MidEpochResumableTrainLoop(EpochBasedTrainLoop):
    """mmengine's epoch loop, except that a run resumed from a checkpoint saved within an epoch
    (``CheckpointOnSigterm``'s) goes on after the saved iteration: mmengine's own loop would train
    that epoch again from its first batch, and the run would end with more iterations than one
    never interrupted.  The epoch's batches come in the same order again (the sampler is seeded by
    the epoch), and those trained before the stop are drawn and left out, as mmengine's
    iteration-based loop does on resume."""

    def run_epoch(self) -> None:
        done = self._iter - self._epoch * len(self.dataloader)
        if done <= 0:
            return super().run_epoch()
        self.runner.call_hook("before_train_epoch")
        self.runner.model.train()
        batches = iter(self.dataloader)
        for _ in range(done):
            next(batches)
        for idx, data_batch in enumerate(batches, start=done):
            self.run_iter(idx, data_batch)
        self.runner.call_hook("after_train_epoch")
        self._epoch += 1


def _collective_device() -> torch.device:
    """Where a tensor must live for the process group's collectives (NCCL: this rank's GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Testing


def _enable_visualization(cfg, show_dir: str) -> None:
    """Draw every test prediction with the config's visualisation hook; the visualizer's local
    backend writes them as PNG files under ``show_dir/vis_data/vis_image/``."""
    hook = cfg.get("default_hooks", {}).get("visualization")
    if hook is None:
        raise SystemExit("error: --show-dir needs default_hooks.visualization in the config")
    hook.update(draw=True, interval=1)
    cfg.visualizer["save_dir"] = str(Path(show_dir).resolve())


def weights_source(weights: str, config: str) -> str:
    """``weights`` as a file or URL: ``pretrained`` names the config's released COCO / ADE20K file
    (``<config name>.pth`` under the release URL)."""
    return release_url(f"{Path(config).stem}.pth") if weights == PRETRAINED else weights


def load_model_checkpoint(model: torch.nn.Module, source, name: Optional[str] = None):
    """Load a detector / segmentor checkpoint (file, URL or dict, called ``name`` in messages) that
    must fit ``model`` exactly, with its ``meta['dataset_meta']`` (class names, palette) when it has
    one; returns the LoadReport.  test_main, tools/predict.py (and the explorer) and the visualiser
    load their weights here, after :func:`weights_source`."""
    report = load_checkpoint(model, source, name=name)
    meta = report.checkpoint.get("meta")
    if isinstance(meta, dict) and "dataset_meta" in meta:
        model.dataset_meta = meta["dataset_meta"]
    return report


def test_main(default_scope: str, task: str, argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point of ``test_<mm>.py``: evaluate ``checkpoint`` with the config's test evaluator."""
    args = evaluation_parser(task).parse_args(argv)
    cfg = load_config(args.config, default_scope, args.cfg_options)
    cfg.work_dir = args.work_dir or _default_work_dir(task, "test", Path(args.config).stem)
    cfg.launcher = _launcher()
    cfg.load_from = None  # loaded below, strictly and with the safe loader
    cfg.resume = False
    if args.show_dir:
        _enable_visualization(cfg, args.show_dir)
    check_data_roots(cfg, ("test_dataloader",))
    # A wrong or broken file is one line, before the Runner logs its environment and config.
    source = weights_source(args.checkpoint, args.config)
    try:
        checkpoint = read_checkpoint(source)
        refuse_bare_backbone(checkpoint, source, cfg.model.type)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from err
    _prepare_environment(cfg, cfg.launcher)
    runner = RunnerWithBoundWorkers.from_cfg(cfg)
    try:
        load_model_checkpoint(_unwrapped(runner.model), checkpoint, name=source)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from err
    runner._has_loaded = True  # tells runner.test() not to look for another checkpoint
    return runner.test()


# ---------------------------------------------------------------------------------------------
# Parameters and FLOPs


class _TensorForward(torch.nn.Module):
    """Runs the model's tensor-mode forward (``_forward``) on fixed data samples, for tracing."""

    def __init__(self, model: torch.nn.Module, data_samples):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model._forward(inputs, self.data_samples)


def complexity(model: torch.nn.Module, height: int, width: int) -> dict:
    """Parameters and FLOPs (multiply-adds, fvcore convention) of ``model`` on one HxW image.

    The image goes through the model's own data preprocessor (normalisation, padding), then the
    tensor-mode forward is traced by ``mmengine.analysis.FlopAnalyzer``; attention computed with
    ``scaled_dot_product_attention`` is counted by the handle in ``models.flops``.
    """
    from mmengine.analysis import FlopAnalyzer, parameter_count
    from mmengine.structures import BaseDataElement

    from models.flops import flop_handles

    shape = (height, width)
    meta = dict(img_shape=shape, ori_shape=shape, pad_shape=shape, scale_factor=(1.0, 1.0))
    # a noise image: on a blank one the RPN keeps few proposals and the RoI heads would run on fewer
    # boxes than on a real image (up to rpn max_per_img, 1000 in the COCO configs)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = model.data_preprocessor(dict(inputs=[image], data_samples=[BaseDataElement(metainfo=meta)]), False)
    model.eval()
    analyzer = FlopAnalyzer(_TensorForward(model, data["data_samples"]), (data["inputs"],))
    analyzer.set_op_handle(**flop_handles())
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        flops = analyzer.total()
    return dict(
        params=parameter_count(model)[""],
        flops=flops,
        input_shape=tuple(data["inputs"].shape[-2:]),
        unsupported_ops=dict(analyzer.unsupported_ops()),
    )


MIN_FLOPS_SIDE = 32


def flops_main(
    default_scope: str, task: str, argv: Optional[Sequence[str]] = None, default_shape: Sequence[int] = (1280, 800)
) -> dict:
    """Entry point of ``get_flops.py``: print params and FLOPs of the config's whole model.

    ``default_shape`` (H, W) is the input size of the task's published FLOPs.
    """
    from mmengine.registry import MODELS

    parser = argparse.ArgumentParser(description=f"Parameters and FLOPs of a {task} model.")
    config_arguments(parser)
    parser.add_argument(
        "--shape", type=int, nargs="+", default=list(default_shape),
        help=f"input size: H W, or one number for a square image (default: {' '.join(map(str, default_shape))})",
    )
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2):
        parser.error("--shape takes one or two numbers")
    if min(args.shape) < MIN_FLOPS_SIDE:
        parser.error(f"--shape: each side must be at least {MIN_FLOPS_SIDE} (the backbone's stride), got {args.shape}")
    height, width = args.shape * 2 if len(args.shape) == 1 else args.shape
    if not Path(args.config).is_file():
        parser.error(f"config file not found: {args.config}")
    cfg = load_config(args.config, default_scope, args.cfg_options)
    model = MODELS.build(cfg.model)
    result = complexity(model, height, width)
    print(f"config: {args.config}")
    print(f"input shape: {height}x{width} (padded to {result['input_shape'][0]}x{result['input_shape'][1]})")
    print(f"params: {result['params'] / 1e6:.2f}M")
    print(f"FLOPs: {result['flops'] / 1e9:.1f}G (multiply-adds)")
    if result["unsupported_ops"]:
        ops = ", ".join(f"{name} x{count}" for name, count in sorted(result["unsupported_ops"].items()))
        print(f"not counted (no FLOP handle; elementwise or indexing ops): {ops}")
    return result
