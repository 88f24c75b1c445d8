import numpy as np
import pytest
import torch

from pipeline.config import IGNORE_INDEX
from pipeline.data.dataset import SegmentationDataset
from pipeline.engine.pseudo import TO_PSEUDO, online_label_fn, pseudo_labels, self_training_lut
from pipeline.engine.train import Schedule, train
from tests.tiny import class_embeddings, tiny_model
from tests.train_fixtures import make_data, setup, train_cfg, trainable_vector

SEEN, UNSEEN = [0, 1, 3], [2, 4]


def scores_and_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 5, 6, 6, generator=g)
    labels = torch.randint(0, 5, (2, 6, 6), generator=g)
    labels[:, 0, :] = IGNORE_INDEX  # background / padding rows
    return scores, labels


def test_seen_pixels_keep_truth_and_only_unseen_classes_are_assigned():
    scores, labels = scores_and_labels()
    out, confidence = pseudo_labels(scores, labels, seen_ids=SEEN, unseen_ids=UNSEEN)
    seen = torch.isin(labels, torch.tensor(SEEN))
    assert torch.equal(out[seen], labels[seen])
    filled = ~seen & (labels != IGNORE_INDEX)
    assert set(out[filled].unique().tolist()) <= set(UNSEEN)
    # the assigned class is the arg-max over unseen scores, and its score is the confidence
    best = scores[:, UNSEEN].argmax(1)
    assert torch.equal(out[filled], torch.tensor(UNSEEN)[best][filled])
    assert torch.allclose(confidence[filled], scores[:, UNSEEN].amax(1)[filled])
    assert torch.all(confidence[~filled] == 0)


def test_ignored_and_padding_pixels_stay_ignored():
    scores, labels = scores_and_labels()
    out, _ = pseudo_labels(scores, labels, seen_ids=SEEN, unseen_ids=UNSEEN)
    assert torch.all(out[labels == IGNORE_INDEX] == IGNORE_INDEX)


def test_threshold_leaves_unsure_pixels_ignored():
    scores, labels = scores_and_labels()
    out, confidence = pseudo_labels(scores, labels, seen_ids=SEEN, unseen_ids=UNSEEN, threshold=0.6)
    filled = ~torch.isin(labels, torch.tensor(SEEN)) & (labels != IGNORE_INDEX)
    unsure = filled & (scores[:, UNSEEN].amax(1) < 0.6)
    assert unsure.any() and torch.all(out[unsure] == IGNORE_INDEX)
    assert torch.all(out[filled & ~unsure] != IGNORE_INDEX)
    keep_all, _ = pseudo_labels(scores, labels, seen_ids=SEEN, unseen_ids=UNSEEN, threshold=0.0)
    assert torch.all(keep_all[filled] != IGNORE_INDEX)


def test_online_and_offline_give_the_same_labels_for_the_same_model_and_batch():
    model = tiny_model(prompt_dropout=0.0, decoder_dropout=0.0).eval()
    embeddings = class_embeddings(num_classes=5)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    truth = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(4))
    truth[:, :4] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(images, embeddings).logits
    offline, _ = pseudo_labels(logits.sigmoid(), truth, seen_ids=SEEN, unseen_ids=UNSEEN)
    marked = torch.from_numpy(self_training_lut(SEEN, 5)[truth.numpy()].astype(np.int64))
    assert set(marked.unique().tolist()) == set(SEEN) | {TO_PSEUDO, IGNORE_INDEX}
    online = online_label_fn(SEEN, UNSEEN)(logits, marked)
    assert torch.equal(online, offline)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_data(root)
    return root


def test_short_self_training_starts_from_the_checkpoint_and_changes_the_weights(data, tmp_path):
    model, _, _, cfg, loss_cfg = setup(data, cfg=train_cfg(iterations=3))
    start = trainable_vector(model).clone()
    classes = make_data(data)
    dataset = SegmentationDataset(data, "train", transform=setup(data)[2].transform, seed=0,
                                  lut=self_training_lut(classes.seen_ids, classes.num_classes))
    seen_labels = []
    label_fn = online_label_fn(classes.seen_ids, classes.unseen_ids)

    def spy(logits, labels):
        out = label_fn(logits, labels)
        seen_labels.append(out)
        return out

    train(model, class_embeddings(num_classes=classes.num_classes), dataset, cfg=cfg, loss_cfg=loss_cfg,
          schedule=Schedule(3, 1), seed=0, checkpoint=tmp_path / "st.pt", resume_key={"run": "st"}, label_fn=spy, progress=False)
    assert not torch.equal(start, trainable_vector(model))
    values = set(torch.cat([x.flatten() for x in seen_labels]).unique().tolist())
    assert TO_PSEUDO not in values and values <= set(range(classes.num_classes)) | {IGNORE_INDEX}
