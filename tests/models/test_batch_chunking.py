"""fuse_for_cpu_inference runs each stage's blocks on groups of images: the same outputs, and the
whole batch wherever a gradient, a tracer or a hook needs it."""
import pytest
import timm
import torch

import models
from models.layers import PaCaStage
from models.layers.fused import BatchChunkedStage

SMALL = dict(depths=(2, 1, 1, 1))


@pytest.fixture
def stage1_batches(monkeypatch):
    """The batch size of each run of stage 1's blocks (the whole batch, or one group)."""
    sizes = []
    run_blocks = PaCaStage.forward

    def recording(self, x, *args):
        if x.shape[-1] == 96:  # stage 1 of the tiny models
            sizes.append(int(x.shape[0]))
        return run_blocks(self, x, *args)

    monkeypatch.setattr(PaCaStage, "forward", recording)
    return sizes


def fused_pair(name: str, **kwargs):
    torch.manual_seed(0)
    plain = timm.create_model(name, **SMALL, **kwargs).eval()
    fused = timm.create_model(name, **SMALL, **kwargs).eval()
    fused.load_state_dict(plain.state_dict())
    return plain, models.fuse_for_cpu_inference(fused)


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


def test_groups_of_at_least_one_image_by_tokens_per_thread():
    stage = BatchChunkedStage(PaCaStage([]))
    threads = torch.get_num_threads()
    assert stage.group_size(56 * 56) == max(1, 1024 * threads // (56 * 56))
    assert stage.group_size(7 * 7) == 1024 * threads // 49
    stage.tokens_per_group = 1000
    assert stage.group_size(56 * 56) == 1 and stage.group_size(100) == 10


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
