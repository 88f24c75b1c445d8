import torch

from pipeline.model import SegOutput, calibrated_scores
from tests.tiny import class_embeddings, images, tiny_model


def test_calibration_subtracts_from_seen_classes_only():
    logits = torch.zeros(1, 3, 1, 1)  # sigmoid = 0.5 everywhere
    seen = torch.tensor([True, False, True])
    scores = SegOutput(logits=logits, layer_logits=[]).scores(calibration=0.1, seen_mask=seen)
    assert torch.allclose(scores.flatten(), torch.tensor([0.4, 0.5, 0.4]))
    assert torch.allclose(calibrated_scores(logits), torch.full((1, 3, 1, 1), 0.5))
    assert torch.allclose(calibrated_scores(logits, seen, 0.0), torch.full((1, 3, 1, 1), 0.5))


def test_calibration_can_flip_the_prediction_to_an_unseen_class():
    logits = torch.tensor([0.2, 0.0]).reshape(1, 2, 1, 1)  # seen class 0 wins by a little
    out = SegOutput(logits=logits, layer_logits=[])
    seen = torch.tensor([True, False])
    assert out.scores().argmax(1).item() == 0
    assert out.scores(0.1, seen).argmax(1).item() == 1


def test_predict_is_the_arg_max_of_calibrated_scores():
    model = tiny_model().eval()
    x, t = images(2, 32), class_embeddings(4)
    seen = torch.tensor([True, True, False, False])
    pred = model.predict(x, t, seen_mask=seen, calibration=0.1)
    assert pred.shape == (2, 32, 32) and pred.dtype == torch.int64
    with torch.no_grad():
        expected = model(x, t).scores(0.1, seen).argmax(1)
    assert torch.equal(pred, expected)
