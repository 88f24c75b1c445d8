import torch

from pipeline.config import LossConfig
from pipeline.model import segmentation_loss
from tests.tiny import class_embeddings, images, tiny_model


def _backward(model):
    out = model(images(2, 32), class_embeddings(4))
    labels = torch.randint(0, 4, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    segmentation_loss(out, labels, LossConfig()).total.backward()


def test_gradients_reach_prompts_and_head_and_no_frozen_clip_weight():
    model = tiny_model().train()
    _backward(model)
    prompts = model.encoder.prompts
    for p in [prompts.embeddings, prompts.proj.weight, prompts.norm.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the shallowest prompt set reaches the loss through every block
    assert prompts.embeddings.grad[0].abs().sum() > 0
    for name, p in model.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for p in model.encoder.clip_parameters() + model.encoder.tap_parameters() + list(model.text_encoder.parameters()):
        assert not p.requires_grad and p.grad is None


def test_trainable_parameter_count_is_prompts_plus_head():
    model = tiny_model()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for p in [*model.encoder.prompts.parameters(), *model.head.parameters()]}
    assert trainable == expected


def test_tap_trainable_option_unfreezes_taps_only():
    model = tiny_model(tap_trainable=True)
    assert all(p.requires_grad for p in model.encoder.tap_parameters())
    assert not any(p.requires_grad for p in model.encoder.clip_parameters())


def test_param_groups_decay_every_trainable_parameter_by_default_as_the_release():
    """METHOD.md "Optimisation": mmcv takes the longest matching custom key, so 'backbone'/'head'
    (lr x10, decay 0.01) win over 'norm'/'ln' for every trainable name: norms, prompt embeddings and
    NGA weights are decayed too."""
    model = tiny_model()
    groups = model.param_groups(lr=2e-5, weight_decay=0.01, lr_mult=10.0)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(abs(g["lr"] - 2e-4) < 1e-12 and g["lr_mult"] == 10.0 for g in groups)
    assert {g["weight_decay"] for g in groups} == {0.01}
    assert [g["name"] for g in groups] == ["prompts", "head"]
    torch.optim.AdamW(groups)  # accepted as is


def test_param_groups_no_decay_norms_option_exempts_norms_prompt_embeddings_and_nga_weights():
    model = tiny_model()
    groups = model.param_groups(lr=2e-5, weight_decay=0.01, lr_mult=10.0, no_decay_norms=True)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(abs(g["lr"] - 2e-4) < 1e-12 for g in groups)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.encoder.prompts.embeddings) in no_decay
    assert id(model.encoder.prompts.norm.weight) in no_decay
    assert id(model.head.aggregators[0].weights) in no_decay
    assert id(model.head.decoders[0].layers[0].attn_norm.weight) in no_decay
    assert id(model.head.decoders[0].layers[0].q.weight) not in no_decay
    assert id(model.encoder.prompts.proj.weight) not in no_decay
    torch.optim.AdamW(groups)  # accepted as is


def test_frozen_variant_trains_only_the_head():
    model = tiny_model(variant="frozen")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head.parameters()}
