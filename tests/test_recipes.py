"""What the launchers run equals the official effective recipes (tests/fixtures/golden/recipes/
official_recipes.json, facts from the official code), apart from the deviations the README lists:
the seed's ImageNet command as train_timm.py resolves it and builds the model, and every detection
and segmentation zoo config as train_main hands it to mmengine's Runner on a CUDA machine.  The task
READMEs' recipe tables are what tools/recipes.py reads from the same code."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from timm.layers import DropPath, calculate_drop_path_rates

import models
from tests.conftest import GOLDEN, REPO
from tests.tools.test_launch_common import gpu_env  # noqa: F401  (fixture: a simulated 8-GPU node)
from tools import recipes

OFFICIAL = json.loads((GOLDEN / "recipes" / "official_recipes.json").read_text())
SCOPE = {"detection": "mmdet", "segmentation": "mmseg"}


def official_name(path) -> str:
    """The official config name of a zoo config: the official names the teachers *_100 (here
    *_100_0) and the PaCa-head ablation files pacahead_* (released as upernet_*)."""
    name = path.stem.replace("_100_0_", "_100_") if "convmixer" in path.stem else path.stem
    if path.parent.name == "paca_head":
        name = name.replace("upernet_", "pacahead_", 1)
    return name


def official_yaml_value(text: str):
    """A value of the official YAML as the json quotes it (with its comment); empty: unset.  YAML
    reads 5e-4 as a string, which argparse then converts with the option's type (float)."""
    value = yaml.safe_load(text.split("#")[0])
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


# -- ImageNet: the seed's command ---------------------------------------------------------------
@pytest.mark.parametrize("model", sorted(OFFICIAL["imagenet"]))
def test_imagenet_command_resolves_to_the_official_recipe(model):
    args = vars(recipes.imagenet_args(model))
    official = {key: official_yaml_value(text) for key, text in OFFICIAL["imagenet_common"]["yaml"].items()}
    official["opt_betas"] = official["opt_betas"] or [0.9, 0.999]  # unset: AdamW's default betas
    official["dist_bn"] = official["dist_bn"] or ""
    assert {key: args[key] for key in official} == official
    assert args["drop_path"] == OFFICIAL["imagenet"][model]["drop_path"]
    assert args["clip_grad"] is None  # the official launcher passes none (see clip_grad_note)


def test_drop_path_option_still_overrides():
    from classification import train_timm

    args = train_timm.parse_args(["-c", str(recipes.IMAGENET_CONFIG), "--model", "pacavit_base_p2cconv_100_0",
                                  "--data-dir", "d", "--output", "o", "--drop-path", "0.2"])
    assert args.drop_path == 0.2
    other = train_timm.parse_args(["--model", "resnet18", "--data-dir", "d", "--output", "o"])
    assert other.drop_path is None  # not a PaCa-ViT variant: the model's own default


@pytest.mark.parametrize("model", sorted(OFFICIAL["imagenet"]))
def test_imagenet_model_is_built_with_the_official_drop_path(model):
    """DropPath rates of the model built the way train_timm.py builds it: linear over the blocks up
    to the variant's official rate (the official table's stochastic depth rule)."""
    from classification import train_timm

    args = recipes.imagenet_args(model)
    with torch.device("meta"):
        built = train_timm.build_model(args, num_classes=1000)
    rates = [m.drop_prob for m in built.modules() if isinstance(m, DropPath)]
    depths = list(models.VARIANTS[model]["depths"])
    expected = [rate for rate in calculate_drop_path_rates(OFFICIAL["imagenet"][model]["drop_path"], depths,
                                                           stagewise=False) if rate > 0]
    assert rates == pytest.approx(expected) and max(rates) == pytest.approx(OFFICIAL["imagenet"][model]["drop_path"])


@pytest.fixture
def cuda_backend_flags():
    """The process-wide cuDNN / cuBLAS flags, all off for the test and restored afterwards."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.benchmark = cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield lambda: (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_cuda_backends_allow_tf32_as_the_official_training(cuda_backend_flags):
    from classification import train_timm

    train_timm.configure_cuda_backends(torch.device("cpu"))
    assert cuda_backend_flags() == (False, False, False)
    train_timm.configure_cuda_backends(torch.device("cuda", 0))
    assert cuda_backend_flags() == (True, True, True)


def test_random_erasing_comes_after_mixup():
    """Erased patches are pure noise in the mixed batch (official order), not blended into a partner.

    Every image is the constant 100, so Mixup leaves it at 100 whatever lambda it draws (alpha 1000
    keeps lambda near 0.5); pixel-mode erasing writes N(0, 1) noise.  Erased before mixing, the noise
    would be blended with 100 (values near 50)."""
    from classification import train_timm

    args = recipes.imagenet_args("pacavit_tiny_p2cconv_100_0")
    args.mixup, args.cutmix, args.reprob = 1000.0, 0.0, 1.0
    torch.manual_seed(0)
    images, target = torch.full((4, 3, 32, 32), 100.0), torch.tensor([0, 1, 2, 3])
    mixed, soft = train_timm.augment_batch(images, target, train_timm.build_mixup(args, 4),
                                           train_timm.build_random_erasing(args, torch.device("cpu")))
    erased = mixed != 100.0
    assert all(erased[i].any() for i in range(4))
    assert mixed[erased].abs().max() < 10
    assert soft.shape == (4, 4) and (soft.max(dim=1).values < 0.9).all()  # the targets were mixed


# -- detection and segmentation: the merged config the Runner gets --------------------------------
def runner_config(monkeypatch, tmp_path, path, task, *options, cuda=True):
    """The config train_main hands to mmengine's Runner (stopped right there), on a CUDA machine
    unless ``cuda=False``."""
    import mmengine.runner

    from runtime import openmmlab

    class Handed(Exception):
        pass

    def capture(cls, cfg):
        raise Handed(cfg)

    with monkeypatch.context() as patch, pytest.raises(Handed) as handed:
        patch.setattr(torch.cuda, "is_available", lambda: cuda)
        patch.setattr(openmmlab, "check_data_roots", lambda cfg, loaders: None)
        patch.setattr(openmmlab, "claim_run_folder", lambda *a, **k: None)
        patch.setattr(mmengine.runner.Runner, "from_cfg", classmethod(capture))
        openmmlab.train_main(SCOPE[task], task, [str(path), "--work-dir", str(tmp_path), *options])
    return handed.value.args[0]


def per_parameter_settings(model, optim_wrapper) -> dict:
    """{parameter name: (lr, weight decay)} as mmengine's optimizer constructor sets them."""
    from mmengine.optim import build_optim_wrapper

    names = {id(p): name for name, p in model.named_parameters()}
    settings = {}
    for group in build_optim_wrapper(model, optim_wrapper).optimizer.param_groups:
        for p in group["params"]:
            settings[names[id(p)]] = (pytest.approx(group["lr"]), pytest.approx(group["weight_decay"]))
    return settings


def official_optim_wrapper(official: dict) -> dict:
    custom_keys = {key: dict(yaml.safe_load("{" + text.replace("=", ": ") + "}"))
                   for key, text in official.get("custom_keys", {}).items()}
    return dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=official["lr"], weight_decay=official["weight_decay"]),
                paramwise_cfg=dict(custom_keys=custom_keys))


ZOO = [(task, path) for task, paths in recipes.ZOO_CONFIGS.items() for path in paths]


def test_every_official_config_has_a_zoo_config():
    for task in ("detection", "segmentation"):
        assert {official_name(p) for p in recipes.ZOO_CONFIGS[task]} == set(OFFICIAL[task])


@pytest.mark.parametrize("task, path", ZOO, ids=[path.stem for _, path in ZOO])
def test_zoo_config_runs_the_official_recipe(task, path, monkeypatch, tmp_path):
    """drop path, AMP, lr, weight decay (per parameter, the official paramwise keys applied to the same
    model), cluster numbers and lr scaling of what the Runner would train."""
    from mmengine.registry import MODELS

    official = OFFICIAL[task][official_name(path)]
    cfg = runner_config(monkeypatch, tmp_path, path, task)
    backbone = cfg.model.backbone
    assert path.parent.name == official["folder"]
    assert backbone.drop_path_rate == official["drop_path_rate"]
    assert (cfg.optim_wrapper.type == "AmpOptimWrapper") == official["amp"]
    assert cfg.get("auto_scale_lr", {}).get("enable", False) == official.get("auto_scale_lr", False)
    if "downstream_cluster_num" in official:
        assert list(backbone.downstream_cluster_num) == official["downstream_cluster_num"]
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    # the parameter groups are the constructor's; the wrapper type (AMP) is checked above
    fp32_wrapper = {key: value for key, value in cfg.optim_wrapper.items() if key != "loss_scale"}
    ours = per_parameter_settings(model, {**fp32_wrapper, "type": "OptimWrapper"})
    assert ours == per_parameter_settings(model, official_optim_wrapper(official))


@pytest.mark.parametrize("options, cuda", [((), False), (("--no-amp",), True)])
def test_fp32_on_cpu_and_with_no_amp(options, cuda, monkeypatch, tmp_path):
    path = recipes.ZOO_CONFIGS["segmentation"][0]
    assert runner_config(monkeypatch, tmp_path, path, "segmentation", *options, cuda=cuda).optim_wrapper.type == "OptimWrapper"


def test_amp_on_cpu_is_refused(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--amp needs a CUDA device"):
        runner_config(monkeypatch, tmp_path, recipes.ZOO_CONFIGS["detection"][0], "detection", "--amp", cuda=False)


# -- the READMEs' recipe tables -----------------------------------------------------------------
@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_readme_recipe_tables_are_up_to_date(task):
    text = {"classification": recipes.classification_table, "detection": lambda: recipes.openmmlab_table("detection"),
            "segmentation": lambda: recipes.openmmlab_table("segmentation")}[task]()
    assert recipes.block(text) in recipes.README[task].read_text(), "run: python tools/recipes.py --write"


def test_seed_command_through_the_launcher_on_a_gpu_node(gpu_env, tmp_path):
    """``train_timm.sh configs/imagenet_vit_adamw.yml MODEL IMNET 224 ...`` on a simulated 8-GPU node:
    the train_timm.py command it starts (recorded in place of torchrun) resolves to the official
    recipe and launcher flags (--channels-last, --pin-mem; AMP from the YAML)."""
    from classification import train_timm

    record = tmp_path / "torchrun_argv.json"
    python = tmp_path / "python-recording-torchrun"
    python.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "-m torch.distributed.run" ]; then\n'
        f'  exec "{sys.executable}" -c "import json, sys; json.dump(sys.argv[1:], open(\'{record}\', \'w\'))" "$@"\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    for split in ("train", "val"):
        (tmp_path / "datasets" / "IMNET" / split).mkdir(parents=True)
    env = dict(gpu_env, PYTHON=str(python), PACAVIT_DATASETS=str(tmp_path / "datasets"),
               PACAVIT_WORK_DIRS=str(tmp_path / "work_dirs"))
    env.pop("MASTER_PORT", None)
    model = "pacavit_base_p2cconv_100_0"
    result = subprocess.run(
        ["bash", str(REPO / "classification" / "train_timm.sh"), "configs/imagenet_vit_adamw.yml", model, "IMNET",
         "224", "0", "0", "cvpr23", "try1", "0,1,2,3,4,5,6,7", "8", "8", "23900"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    argv = json.loads(record.read_text())
    script = next(i for i, arg in enumerate(argv) if arg.endswith("train_timm.py"))
    assert "--nproc_per_node=8" in argv[:script] and "--master_port=23900" in argv[:script]
    args = vars(train_timm.parse_args(argv[script + 1:]))
    assert (args["device"], args["channels_last"], args["pin_mem"], args["amp"]) == ("cuda", True, True, True)
    assert args["drop_path"] == OFFICIAL["imagenet"][model]["drop_path"]
    official = {key: official_yaml_value(text) for key, text in OFFICIAL["imagenet_common"]["yaml"].items()}
    assert {key: args[key] for key in ("batch_size", "epochs", "lr_base", "mixup", "reprob")} == {
        key: official[key] for key in ("batch_size", "epochs", "lr_base", "mixup", "reprob")}
