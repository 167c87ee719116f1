"""layer_times.py: each module's own time by kind of layer, with its FLOPs, a process per model."""
import csv
import itertools

import pytest
import timm
import torch
from torch import nn

import models
from classification import layer_times
from classification.layer_times import ACTIVATION, CONV, DEPTHWISE, GEMM, NORM, OTHER, ModuleTimer, layer_kind
from models.flops import count_flops
from models.layers import fused
from runtime.cli import UsageError

TINY = "pacavit_tiny_p2cconv_100_0"


def test_every_layer_of_a_fused_paca_model_and_of_a_timm_model_has_its_kind(monkeypatch):
    monkeypatch.setattr(fused, "cpu_fusion_support", lambda: frozenset({torch.float32}))  # any host fuses
    paca = models.fuse_for_cpu(timm.create_model(TINY))
    block = paca.stage1[0]
    assert type(block.mlp.fc1) is fused.FusedLinear and layer_kind(block.mlp.fc1) == GEMM
    assert layer_kind(block.mlp.dwconv.dwconv) == DEPTHWISE  # FusedConv2d, groups = channels
    clustering = block.attn.clustering.clustering
    assert [layer_kind(m) for m in (clustering[0], clustering[2], clustering[4])] == [DEPTHWISE, GEMM, GEMM]
    assert layer_kind(block.norm1_before) == NORM
    # the fused transform's classes count as the model's own
    assert layer_kind(block.attn) == "PaCaAttention's own ops" and layer_kind(paca.stage1) == "PaCaStage's own ops"
    convnext = timm.create_model("convnext_tiny")
    assert layer_kind(convnext.stem[0]) == CONV and layer_kind(convnext.stem[1]) == NORM
    convnext_block = convnext.stages[0].blocks[0]
    assert layer_kind(convnext_block.conv_dw) == DEPTHWISE and layer_kind(convnext_block.mlp.fc1) == GEMM
    assert layer_kind(convnext_block.mlp.act) == ACTIVATION  # timm's GELU, not torch's
    assert layer_kind(nn.Conv2d(8, 4, 1)) == GEMM and layer_kind(convnext_block) == "ConvNeXtBlock's own ops"


class Ticks:
    """A clock that only moves when a module says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Work(nn.Module):
    def __init__(self, clock, seconds, *children):
        super().__init__()
        self.clock, self.seconds, self.parts = clock, seconds, nn.ModuleList(children)

    def forward(self, x):
        self.clock.now += self.seconds
        for part in self.parts:
            x = part(x)
        return x


def test_a_modules_own_time_is_its_time_less_its_childrens_and_a_reused_module_counts_each_call():
    clock = Ticks()
    shared = nn.Linear(2, 2)
    norm = nn.LayerNorm(2)

    class Timed(nn.Module):  # a linear layer that takes 3 ticks, called twice by the model
        def __init__(self):
            super().__init__()
            self.linear = shared

        def forward(self, x):
            clock.now += 3
            return self.linear(x)

    timed = Timed()
    model = Work(clock, 1, timed, Work(clock, 5, norm), timed)
    timer = ModuleTimer(model, clock=clock)
    with timer:
        model(torch.zeros(1, 2))
    assert timer.by_kind() == {"Work's own ops": 6.0, "Timed's own ops": 6.0, GEMM: 0.0, NORM: 0.0}
    assert sum(timer.by_kind().values()) == clock.now  # the kinds add up to the forward
    timer.reset()
    assert timer.by_kind() == {}
    model(torch.zeros(1, 2))  # outside ``with``: no hooks left
    assert timer.seconds == {}


def test_the_flops_by_kind_add_up_to_the_models_count():
    model = timm.create_model(TINY).eval()
    kinds = layer_times.gflops_by_kind(model, 64)
    assert sum(kinds.values()) == pytest.approx(count_flops(model, (1, 3, 64, 64)) / 1e9)
    assert kinds[GEMM] > kinds["PaCaAttention's own ops"] > 0  # the attention's matmuls are its own ops
    assert kinds[CONV] > 0 and kinds[DEPTHWISE] > 0 and kinds["PaCaBlock's own ops"] == 0


def test_rounds_give_medians_and_small_own_ops_go_to_one_other_row():
    rounds = [{"kinds": {GEMM: ms, "Block's own ops": 1.0, "Tiny's own ops": 0.1}, "hooked_ms": ms + 1.1,
               "plain_ms": ms, "fused": True} for ms in (10.0, 30.0, 20.0)]
    summary = layer_times.summarize(rounds, {GEMM: 2.0, "Tiny's own ops": 0.5})
    assert summary["kinds"] == {GEMM: {"ms": 20.0, "gflops": 2.0}, "Block's own ops": {"ms": 1.0, "gflops": 0.0},
                                OTHER: {"ms": 0.1, "gflops": 0.5}}
    assert summary["hooked_ms"] == 21.1 and summary["plain_ms"] == 20.0 and summary["fused"]
    assert layer_times.rate(summary["kinds"][GEMM], 8) == pytest.approx(2.0 * 8 / 0.020)


def test_bfloat16_on_a_cpu_without_its_kernels_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(layer_times, "cpu_bfloat16_supported", lambda: False)
    with pytest.raises(UsageError, match="no bfloat16 kernels.*--precision fp32"):
        layer_times.main(["--models", TINY, "--precision", "bf16"])


@pytest.mark.slow  # a process per model
def test_a_run_prints_each_models_kinds_and_writes_the_rows_and_the_picture(tmp_path, capsys):
    csv_path = tmp_path / "layer_times.csv"
    layer_times.main(["--models", f"{TINY},resnet10t", "--img-size", 64, "-b", 2, "--rounds", 2, "--iters", 1,
                      "--threads", 1, "--csv", csv_path])
    out = capsys.readouterr().out
    assert f"{TINY} (fp32, fused)" in out or f"{TINY} (fp32)" in out
    assert "PaCaAttention's own ops" in out and "resnet10t (fp32)" in out
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_model = {name: list(group) for name, group in itertools.groupby(rows, key=lambda r: r["model"])}
    assert list(by_model) == [TINY, "resnet10t"]
    for name, group in by_model.items():
        assert sum(float(r["share_pct"]) for r in group) == pytest.approx(100, abs=0.5)
        total = sum(float(r["ms_per_batch"]) for r in group)
        assert total == pytest.approx(float(group[0]["hooked_ms"]), rel=0.05)  # the kinds make up the forward
        assert float(group[0]["plain_ms"]) > 0 and group[0]["rounds"] == "2" and group[0]["threads"] == "1"
    gemm = next(r for r in by_model["resnet10t"] if r["kind"] == CONV)
    assert float(gemm["gflops_per_image"]) > 0 and float(gemm["gflops_per_s"]) > 0
    assert (tmp_path / "layer_times.png").stat().st_size > 10_000
