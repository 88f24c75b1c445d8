import pytest
import torch

from pipeline.model.aggregation import SingleBlock, WeightedSum, build_aggregator, nga_initial_weights
from tests.tiny import tiny_model


@pytest.mark.parametrize(
    "sigma, table16",
    [(0.8, [0.04, 0.46, 1.00]), (1.0, [0.14, 0.61, 1.00]), (1.2, [0.25, 0.71, 1.00])],
)
def test_nga_initial_weights_match_table_16(sigma, table16):
    weights = nga_initial_weights(3, sigma)
    assert torch.allclose(weights, torch.tensor(table16), atol=0.006)
    assert weights[-1] == 1.0


def test_nga_weights_are_trainable_and_start_gaussian_in_the_model():
    model = tiny_model(nga_sigma=0.8)
    first, second, last = model.head.aggregators
    assert isinstance(first, WeightedSum) and isinstance(second, WeightedSum)
    assert torch.allclose(first.weights, nga_initial_weights(3, 0.8))
    assert first.weights.requires_grad
    # a single-block stage has no weights (the release has weights_s1 and weights_s2 only)
    assert isinstance(last, SingleBlock) and not list(last.parameters())


def test_nga_sums_blocks_with_their_weights():
    agg = build_aggregator("nga", num_blocks=3, dim=4, sigma=1.0)
    feats = [torch.full((1, 2, 4), float(i + 1)) for i in range(3)]
    w = nga_initial_weights(3, 1.0)
    assert torch.allclose(agg(feats), torch.full((1, 2, 4), float(w[0] * 1 + w[1] * 2 + w[2] * 3)))


def test_plain_and_trainable_sum():
    feats = [torch.randn(2, 5, 4) for _ in range(2)]
    assert torch.allclose(build_aggregator("sum", num_blocks=2, dim=4)(feats), feats[0] + feats[1])
    trainable = build_aggregator("trainable_sum", num_blocks=2, dim=4)
    assert torch.equal(trainable.weights, torch.ones(2)) and trainable.weights.requires_grad
    assert not list(build_aggregator("sum", num_blocks=2, dim=4).parameters())


def test_fixed_nga_keeps_its_gaussian_weights_out_of_training():
    from pipeline.model.aggregation import build_aggregator

    fixed = build_aggregator("nga_fixed", num_blocks=3, dim=8, sigma=1.0)
    assert list(fixed.parameters()) == [] and fixed.no_decay_parameters() == []
    assert torch.allclose(fixed.weights, torch.tensor([0.1353, 0.6065, 1.0]), atol=1e-4)
    trainable = build_aggregator("nga", num_blocks=3, dim=8, sigma=1.0)
    assert [p.shape for p in trainable.parameters()] == [torch.Size([3])]
