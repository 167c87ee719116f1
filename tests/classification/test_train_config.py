"""Configs, learning-rate rule, class mapping and the digits export (no training)."""
import statistics

import pytest

import models
from classification import cls_common
from classification import train_timm
from .cls_helpers import CLS_DIR, write_colour_dataset
from classification.make_digits_dataset import export

REQUIRED = ["--data-dir", "d", "--model", "m", "--output", "o"]

# The official recipes, key by key (shared/seed/classification-recipes.md).
VIT_RECIPE = dict(
    batch_size=128, train_interpolation="bicubic", epochs=300, opt="adamw", opt_eps=1e-8, opt_betas=[0.9, 0.999],
    momentum=0.9, weight_decay=0.05, lr_base=5e-4, lr_base_size=512, lr_base_scale="linear",
    auto_scale_warmup_min_lr=True, min_lr=5e-6, sched="cosine", warmup_epochs=5, warmup_lr=5e-7, cooldown_epochs=0,
    amp=True, color_jitter=0.4, smoothing=0.1, reprob=0.25, remode="pixel", recount=1, aa="rand-m9-mstd0.5-inc1",
    mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", dist_bn="",
)
CONV_RECIPE = dict(
    VIT_RECIPE, batch_size=256, lr_base=4e-3, lr_base_size=4096, auto_scale_warmup_min_lr=False,
    grad_accumulation_steps=1, min_lr=1e-6, warmup_epochs=20, warmup_lr=1e-6, dist_bn="reduce",
)


@pytest.mark.parametrize("name, recipe", [("imagenet_vit_adamw.yml", VIT_RECIPE), ("imagenet_conv_adamw.yml", CONV_RECIPE)])
def test_configs_hold_the_official_recipes(name, recipe):
    args = vars(train_timm.parse_args(["-c", str(CLS_DIR / "configs" / name), *REQUIRED]))
    assert {key: args[key] for key in recipe} == recipe
    assert args["clip_grad"] is None and args["model_ema"] is False  # commented out in the official files


def test_command_line_overrides_the_config():
    config = str(CLS_DIR / "configs" / "imagenet_vit_adamw.yml")
    args = train_timm.parse_args(["-c", config, *REQUIRED, "--epochs", "3", "-b", "16", "--no-amp", "--lr", "0.01"])
    assert (args.epochs, args.batch_size, args.amp, args.lr, args.weight_decay) == (3, 16, False, 0.01, 0.05)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--log-interval", "0"], "--log-interval must be at least 1, got 0"),
    (["--grad-accumulation-steps", "0"], "--grad-accumulation-steps must be at least 1, got 0"),
    (["-b", "0"], "--batch-size must be at least 1, got 0"),
    (["--img-size", "0"], "--img-size must be at least 1, got 0"),
    (["-j", "-1"], "--workers must be at least 0, got -1"),
    (["-c", str(CLS_DIR / "configs" / "imagenet_vit_adamw.yml"), "-b", "9"], "--batch-size must be even, got 9"),
])
def test_out_of_range_counts_are_one_line_naming_the_option(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train_timm.parse_args([*REQUIRED, *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    config = tmp_path / "bad.yml"
    config.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        train_timm.parse_args(["-c", str(config), *REQUIRED])
    assert "unknown keys ['learning_rate']" in capsys.readouterr().err


def _lr_args(config, world_size, *flags):
    args = train_timm.parse_args(["-c", str(CLS_DIR / "configs" / config), *REQUIRED, *flags])
    args.world_size = world_size
    train_timm.scale_learning_rate(args)
    return args


def test_lr_base_rule_scales_lr_and_optionally_warmup_and_min_lr():
    vit = _lr_args("imagenet_vit_adamw.yml", 8)  # 8 x 128 = 1024 = 2 x lr_base_size
    assert (vit.lr, vit.warmup_lr, vit.min_lr) == pytest.approx((1e-3, 1e-6, 1e-5))
    conv = _lr_args("imagenet_conv_adamw.yml", 8, "--grad-accumulation-steps", "2")  # 4096 images per update
    assert (conv.lr, conv.warmup_lr, conv.min_lr) == pytest.approx((4e-3, 1e-6, 1e-6))
    sqrt = _lr_args("imagenet_vit_adamw.yml", 2, "--lr-base-scale", "sqrt")  # ratio 256 / 512
    assert sqrt.lr == pytest.approx(5e-4 * 0.5**0.5)
    explicit = _lr_args("imagenet_vit_adamw.yml", 8, "--lr", "0.002")
    assert (explicit.lr, explicit.warmup_lr) == (0.002, 5e-7)


def test_validation_labels_follow_the_training_classes(tmp_path):
    root = write_colour_dataset(tmp_path / "data", {"train": 1, "val": 1})
    for image in (root / "val" / "class0").iterdir():
        image.unlink()
    (root / "val" / "class0").rmdir()
    assert cls_common.class_map_for(str(root), "val") == {"class0": 0, "class1": 1, "class2": 2}
    (root / "val" / "class9").mkdir()
    with pytest.raises(cls_common.UsageError, match="class9"):
        cls_common.class_map_for(str(root), "val")
    with pytest.raises(cls_common.UsageError, match="make_digits_dataset"):
        cls_common.require_split(str(root), "test")


def test_digits_export_is_a_deterministic_stratified_image_folder(tmp_path):
    counts = export(str(tmp_path / "a"), size=16)
    export(str(tmp_path / "b"), size=16)
    assert counts == {"train": 1437, "val": 360}
    files = {split: sorted(p.relative_to(tmp_path / "a" / split).as_posix() for p in (tmp_path / "a" / split).rglob("*.png"))
             for split in ("train", "val")}
    assert len(files["train"]) == 1437 and len(files["val"]) == 360
    assert files["val"] == sorted(p.relative_to(tmp_path / "b" / "val").as_posix() for p in (tmp_path / "b" / "val").rglob("*.png"))
    per_class = [sum(f.startswith(f"{d}/") for f in files["val"]) for d in range(10)]
    assert min(per_class) >= 35 and max(per_class) <= 37  # stratified: ~20% of each digit
    assert not (tmp_path / "a.tmp").exists()


def test_unknown_model_suggests_close_names():
    with pytest.raises(models.UnknownModelError, match="Did you mean pacavit_tiny_p2cconv_100_0"):
        models.check_model_name("pacavit_tiny_p2cconv_100")



def test_efficiency_compares_compiled_with_compiled_and_eager_with_eager():
    from classification.benchmark import add_efficiency

    rows = [dict(model=name, compile=compiled, gflops=gflops, infer_img_per_s=ips)
            for name, compiled, gflops, ips in [("paca", False, 2.0, 10.0), ("ref", False, 4.0, 10.0),
                                                 ("paca", True, 2.0, 30.0), ("ref", True, 4.0, 20.0)]]
    add_efficiency(rows, "ref")
    assert [row["infer_efficiency"] for row in rows] == [0.5, 1.0, 0.75, 1.0]
    assert all("train_efficiency" not in row for row in rows)


def test_efficiency_is_the_median_of_ratios_taken_in_the_same_round():
    from classification.benchmark import add_efficiency

    # seconds per batch in 3 rounds; the reference's third round caught a slow spell of the host.
    # Round by round the model does 2, 1 and 4 times the reference's work: median 2, where the
    # ratio of the two medians (3 s / 2 s) would say 1.5
    rounds = [{"infer": [1.0, 3.0, 2.0], "train": []}, {"infer": [2.0, 3.0, 8.0], "train": []}]
    rows = [dict(model=name, compile=False, precision="fp32", gflops=1.0, infer_img_per_s=8 / statistics.median(r["infer"]))
            for name, r in zip(("paca", "ref"), rounds)]
    add_efficiency(rows, "ref", rounds)
    assert [row["infer_efficiency"] for row in rows] == [2.0, 1.0]
    # without the rounds, or with round counts that differ, it is the ratio of the medians
    add_efficiency(rows, "ref")
    assert rows[0]["infer_efficiency"] == pytest.approx(1.5, abs=0.005)  # from img/s rounded to 0.01
    rounds[0]["infer"] = [1.0, 3.0]
    add_efficiency(rows, "ref", rounds)
    assert rows[0]["infer_efficiency"] == pytest.approx(1.5, abs=0.005)


def test_benchmark_csv_with_other_columns_is_kept_aside(tmp_path):
    from classification.benchmark import FIELDS, append_rows

    path = tmp_path / "results.csv"
    path.write_text("date,model,old_column\n2025-01-01,m,1\n")
    append_rows(str(path), [{"model": "pacavit_tiny_p2cconv_100_0"}])
    assert path.read_text().splitlines()[0] == ",".join(FIELDS)
    (kept,) = tmp_path.glob("results.columns-until-*.csv")
    assert kept.read_text() == "date,model,old_column\n2025-01-01,m,1\n"
    append_rows(str(path), [{"model": "convnext_tiny"}])
    assert len(path.read_text().splitlines()) == 3 and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("flags", [[], ["--no-cpu-kernels"]], ids=["default", "no-cpu-kernels"])
def test_on_the_cpu_training_takes_the_fused_layers_unless_told_not_to(flags):
    """With the same state_dict keys, so that checkpoints stay the plain model's."""
    from models.layers.fused import FusedDWConv, cpu_fusion_support

    args = train_timm.parse_args([*REQUIRED, *flags])
    plain = cls_common.create_classifier("pacavit_tiny_p2cconv_100_0", 3, depths=(1, 1, 1, 1))
    keys = list(plain.state_dict())
    model = train_timm.place_model(plain, train_timm.torch.device("cpu"), False, args.cpu_kernels)
    assert any(isinstance(m, FusedDWConv) for m in model.modules()) == (not flags and bool(cpu_fusion_support()))
    assert list(model.state_dict()) == keys
