"""PEFT LoRA on the attention projections: the adapters take effect, train alone, and merge back
into a model with the official parameter names."""
import copy

import peft
import pytest
import timm
import torch
from torch import nn

import models  # noqa: F401  (registers the models)

NAME = "pacavit_tiny_p2cconv_100_0"


def q_and_v_layers(model: nn.Module) -> list:
    return [name for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in ("q", "v")]


@pytest.fixture(scope="module")
def lora_run():
    """LoRA (r=4) on every q and v projection of PaCa-Tiny (5 classes), trained for a few steps on
    random data.  Returns the base model's state before training, the PEFT model
    and a fixed batch."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=5)
    targets = q_and_v_layers(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    # the head stays frozen too, so that any change of the output comes from the adapters
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    lora = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    images, labels = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
    with torch.no_grad():
        untrained = lora.eval()(images)
    lora.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(lora(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dict(targets=targets, base_state=base_state, lora=lora.eval(), images=images, untrained=untrained)


def test_every_q_and_v_projection_gets_an_adapter(lora_run):
    lora = lora_run["lora"]
    wrapped = [
        name for name, module in lora.base_model.model.named_modules() if isinstance(module, peft.tuners.lora.Linear)
    ]
    assert sorted(wrapped) == sorted(lora_run["targets"]) and len(wrapped) == 2 * 10  # 10 blocks in PaCa-Tiny
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_training_changes_only_the_adapters(lora_run):
    lora = lora_run["lora"]
    frozen_now = {
        k.replace("base_layer.", ""): v
        for k, v in lora.base_model.model.state_dict().items()
        if "lora_" not in k
    }
    base = lora_run["base_state"]
    assert frozen_now.keys() == base.keys()
    assert [k for k in base if not torch.equal(frozen_now[k], base[k])] == []
    lora_b = [p for name, p in lora.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero and must have been trained"


def test_adapters_change_the_output(lora_run):
    lora, images = lora_run["lora"], lora_run["images"]
    with torch.no_grad():
        adapted = lora(images)
        with lora.disable_adapter():
            plain = lora(images)
    # with the adapters off the model computes the base model's q and v: the outputs must differ
    assert (adapted - plain).abs().max() > 1e-3
    torch.testing.assert_close(plain, lora_run["untrained"])


def test_merged_model_has_the_official_names_and_the_adapted_output(lora_run):
    lora, images = lora_run["lora"], lora_run["images"]
    with torch.no_grad():
        adapted = lora(images)
    # merge a copy: the fixture's PEFT model is shared by the other tests
    merged = copy.deepcopy(lora).merge_and_unload()
    base = lora_run["base_state"]
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(base[k], v)}
    assert changed and all(k.endswith((".attn.q.weight", ".attn.v.weight")) for k in changed)
    assert all(type(merged.get_submodule(name)) is nn.Linear for name in lora_run["targets"])
    plain = timm.create_model(NAME, num_classes=5).eval()
    plain.load_state_dict(merged.state_dict())  # strict: exactly the model's own parameter names
    with torch.no_grad():
        torch.testing.assert_close(plain(images), adapted, rtol=1e-4, atol=1e-4)
