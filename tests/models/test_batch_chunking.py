"""fuse_for_cpu runs each stage's blocks on groups of images (float32: about 1024 tokens per
thread; bfloat16: below glibc's mmap threshold): the same outputs, and the whole batch wherever a
gradient, a tracer or a hook needs it."""
import pytest
import timm
import torch

import models
from models.layers import PaCaStage, fused
from models.layers.fused import BatchChunkedStage

SMALL = dict(depths=(2, 1, 1, 1))


@pytest.fixture
def stage1_batches(monkeypatch):
    """The batch size of each run of stage 1's blocks (the whole batch, or one group)."""
    sizes = []
    run_blocks = PaCaStage.run_blocks

    def recording(self, x, *args):
        if x.shape[-1] == 96:  # stage 1 of the tiny models
            sizes.append(int(x.shape[0]))
        return run_blocks(self, x, *args)

    monkeypatch.setattr(PaCaStage, "run_blocks", recording)
    return sizes


def fused_pair(name: str, **kwargs):
    torch.manual_seed(0)
    plain = timm.create_model(name, **SMALL, **kwargs).eval()
    fused = timm.create_model(name, **SMALL, **kwargs).eval()
    fused.load_state_dict(plain.state_dict())
    return plain, models.fuse_for_cpu(fused)


@pytest.mark.parametrize("name", ["pacavit_tiny_p2cconv_100_0", "pacavit_convmixer_tiny_100"])
def test_grouped_stages_compute_the_whole_batch(stage1_batches, name):
    plain, fused = fused_pair(name)
    assert all(type(fused.get_submodule(f"stage{i}")) is BatchChunkedStage for i in range(1, 5))
    assert list(fused.state_dict()) == list(plain.state_dict())
    # 64x96 images: 16x24 = 384 stage-1 tokens; 768 tokens make groups of 2, 2 and 1 images
    fused.stage1.tokens_per_group = 768
    x = torch.randn(5, 3, 64, 96)
    with torch.inference_mode():
        expected = plain(x)
        stage1_batches.clear()
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
        assert stage1_batches == [2, 2, 1]
        out = fused.forward_intermediates(x, intermediates_only=True)  # the teacher's inputs are split alike
    torch.testing.assert_close(out, plain.forward_intermediates(x, intermediates_only=True), rtol=1e-4, atol=1e-4)


def test_float32_groups_hold_about_1024_tokens_per_thread_in_nearly_equal_groups(monkeypatch):
    stage = models.fuse_for_cpu(timm.create_model("pacavit_tiny_p2cconv_100_0")).stage2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert stage.group_size(8, 56 * 56) == 1  # at least one image
    assert stage.group_size(8, 28 * 28) == 2
    assert stage.group_size(7, 28 * 28) == 2  # 2 + 2 + 2 + 1
    assert stage.group_size(8, 14 * 14) == 8  # 2048 tokens take 10 images: the whole batch
    assert stage.group_size(13, 14 * 14) == 7  # 7 + 6, not 10 + 3
    stage.tokens_per_group = 1000  # an explicit size in tokens instead
    assert stage.group_size(8, 56 * 56) == 1 and stage.group_size(25, 100) == 9  # 9 + 8 + 8


def test_bfloat16_groups_keep_the_largest_activation_below_glibcs_mmap_threshold():
    model = models.fuse_for_cpu(timm.create_model("pacavit_tiny_p2cconv_100_0"))
    stage1, stage4 = model.stage1, model.stage4
    # stage 1 at 224: 56x56 tokens, the MLP's 384 hidden channels are the widest (2 heads x 100 clusters: 200)
    assert stage1.widest_activation(56 * 56) == 384
    image_bytes = 56 * 56 * 384 * 2  # 2.4 MB per bfloat16 image: at most 13 images stay below 32 MiB
    assert 13 * image_bytes < fused.MMAP_THRESHOLD_MAX < 14 * image_bytes
    assert stage1.group_size(8, 56 * 56, torch.bfloat16) == 8
    assert stage1.group_size(16, 56 * 56, torch.bfloat16) == 8  # 8 + 8, not 13 + 3
    # stage 4 has no clusters: its scores (16 heads x all patches) outgrow the MLP at high resolution
    assert stage4.widest_activation(7 * 7) == 1536 and stage4.widest_activation(28 * 28) == 16 * 28 * 28
    scores_bytes = 16 * (28 * 28) ** 2 * 2
    assert scores_bytes < fused.MMAP_THRESHOLD_MAX < 2 * scores_bytes
    assert stage4.group_size(8, 28 * 28, torch.bfloat16) == 1


def test_whole_batch_for_training_and_tracing(stage1_batches):
    plain, fused = fused_pair("pacavit_tiny_p2cconv_100_0", num_classes=3)
    fused.stage1.tokens_per_group = 1  # one image per group wherever groups are allowed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain(x)
    stage1_batches.clear()
    fused.train()
    fused(x).sum().backward()
    assert all(p.grad is not None for p in fused.parameters())
    fused.eval()
    with torch.no_grad():
        traced = torch.jit.trace(fused, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-4)
        assert stage1_batches == [2, 2]  # training, tracing
        fused(x)
    assert stage1_batches == [2, 2, 1, 1]


def test_whole_batch_while_a_hook_watches(stage1_batches):
    _, fused = fused_pair("pacavit_tiny_p2cconv_100_0")
    fused.stage1.tokens_per_group = 1
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        with models.capture_maps(fused) as maps:
            fused(x)
        handle = fused.stage1[0].mlp.fc2.register_forward_hook(lambda *args: None)
        fused(x)
        handle.remove()
        fused(x)
    assert [m["assignments"].shape[0] for m in maps if m["stage"] == 0] == [2, 2]  # one record per block
    assert stage1_batches == [2, 2, 1, 1]
