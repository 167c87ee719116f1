"""The command lines of the OpenMMLab entry points (train / test) and the checks of a command that
need only its arguments and its config, with nothing heavier than argparse and mmengine's Config.

``runtime.openmmlab`` parses and checks with these.  The launchers run the same checks first, in
one light process (about a second, no torch), so that a mistyped option, a config that does not
load, a ``--cfg-options`` value of the wrong kind or a missing dataset folder is one ``error:``
line before any run folder is made or any process started::

    python -m runtime.openmmlab_args train detection CONFIG --work-dir DIR [options]   # non-zero exit: the error
    python -m runtime.openmmlab_args test segmentation CONFIG CHECKPOINT [options]
"""
import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

TASKS = {"detection": "mmdet", "segmentation": "mmseg"}  # task: its entry scripts' suffix


def cfg_options_action():
    """The argparse action of ``--cfg-options KEY=VALUE ...``: mmengine's DictAction, with an item
    lacking ``=`` a usage error instead of a traceback."""
    from mmengine.config import DictAction

    class KeyValueAction(DictAction):
        def __call__(self, parser, namespace, values, option_string=None):
            bad = [value for value in values if "=" not in value]
            if bad:
                parser.error(f"{option_string} takes KEY=VALUE items (e.g. train_cfg.max_epochs=12), got {bad[0]!r}")
            super().__call__(parser, namespace, values, option_string)

    return KeyValueAction


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file")
    parser.add_argument(
        "--cfg-options", nargs="+", action=cfg_options_action(), default={},
        help="override config entries, e.g. model.backbone.init_cfg=None train_dataloader.batch_size=1",
    )
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<task>/...)")


def train_parser(task: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=f"Train a {task} model with mmengine's Runner.")
    config_arguments(parser)
    parser.add_argument(
        "--resume", metavar="CHECKPOINT",
        help="resume from this checkpoint (default: resume from the work dir's latest checkpoint, if any)",
    )
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None,
        help="fp16 mixed precision (AmpOptimWrapper), as the official launchers train (default: on with CUDA, "
             "off on CPU; --no-amp trains in float32)",
    )
    parser.add_argument(
        "--auto-scale-lr", action="store_true",
        help="scale the learning rate by (total batch size / auto_scale_lr.base_batch_size)",
    )
    return parser


def evaluation_parser(task: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=f"Evaluate a {task} checkpoint on the config's test set.")
    config_arguments(parser)
    parser.add_argument("checkpoint", help="checkpoint file or URL, or 'pretrained' (the config's released file)")
    parser.add_argument("--show-dir", help="write PNG visualisations of every prediction into this folder")
    return parser


def read_config(path: str, cfg_options: Optional[dict] = None, import_custom_modules: bool = True):
    """The config with ``--cfg-options`` merged in, each checked against the kind of value it replaces.
    ``import_custom_modules=False`` leaves the plug-in package (and so torch) unimported."""
    from mmengine.config import Config

    if not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = Config.fromfile(path, import_custom_modules=import_custom_modules)
    if cfg_options:
        check_option_types(cfg, cfg_options)
        cfg.merge_from_dict(cfg_options)
    return cfg


def check_option_types(cfg, options: dict) -> None:
    """Refuse a ``--cfg-options`` value that cannot stand where the config has a number or a flag
    (``train_cfg.max_epochs=abc`` would fail deep in the Runner, after the processes started)."""
    plain = cfg.to_dict()
    for key, value in options.items():
        current = plain
        for part in key.split("."):
            if isinstance(current, dict) and part in current:
                current = current[part]
            elif isinstance(current, (list, tuple)) and part.isdigit() and int(part) < len(current):
                current = current[int(part)]
            else:
                current = None  # a new key: nothing to compare with
                break
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        fits = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number}
        if type(current) in fits and not fits[type(current)]:
            kind = {bool: "True or False", int: "an integer", float: "a number"}[type(current)]
            raise SystemExit(f"error: --cfg-options {key}={value!r}: the config's {key} is {current!r}, so the value "
                             f"must be {kind}")


def check_data_roots(cfg, loaders: Sequence[str]) -> None:
    """Fail early, with what to do, when a dataset folder named by the config is missing."""
    for loader in loaders:
        dataset = (cfg.get(loader) or {}).get("dataset", {})
        root = dataset.get("data_root")
        if root and not Path(root).is_dir():
            raise SystemExit(
                f"error: dataset folder {root} ({loader}) not found. Link your copy there (see "
                f"datasets/README.md), set PACAVIT_DATASETS to the folder that holds it, or override it with "
                f"--cfg-options {loader}.dataset.data_root=..."
            )


def check_auto_scale_lr(cfg, config: str) -> None:
    if "base_batch_size" not in (cfg.get("auto_scale_lr") or {}):
        raise SystemExit(f"error: --auto-scale-lr needs auto_scale_lr.base_batch_size in {config}")


def check_command(kind: str, task: str, argv: Sequence[str]) -> None:
    """What ``train_main`` / ``test_main`` would refuse from ``argv`` before building anything: one
    ``error:`` line and a non-zero exit (SystemExit).  What needs torch (``--amp`` without CUDA, the
    checkpoint's contents) is still checked by the processes themselves."""
    parser = train_parser if kind == "train" else evaluation_parser
    args = parser(task, prog=f"{kind}_{TASKS[task]}.py").parse_args(argv)  # usage lines name the entry script
    try:
        with warnings.catch_warnings():
            # mmengine finds the packages of `_base_ = 'mmdet::...'` through pkg_resources, which warns of itself
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            cfg = read_config(args.config, args.cfg_options, import_custom_modules=False)
    except Exception as err:  # anything Config.fromfile raises: the config's own mistake, named
        raise SystemExit(f"error: {args.config}: the config does not load ({type(err).__name__}: {err})") from err
    if kind == "train":
        if args.auto_scale_lr:
            check_auto_scale_lr(cfg, args.config)
        check_data_roots(cfg, ("train_dataloader", "val_dataloader"))
    else:
        check_data_roots(cfg, ("test_dataloader",))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("train", "test") or argv[1] not in TASKS:
        print(f"usage: python -m runtime.openmmlab_args train|test {'|'.join(TASKS)} ARGS...", file=sys.stderr)
        return 2
    check_command(argv[0], argv[1], argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
