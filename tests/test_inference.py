import torch

from pipeline.engine.inference import scores_from_logits, segment_logits, slide_logits, window_starts


def conv_segmenter(num_classes=3):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, num_classes, 3, padding=1)
    return lambda x: conv(x)


def test_window_grid_covers_the_axis_with_last_window_flush():
    assert window_starts(512, 512, 426) == [0]
    assert window_starts(683, 512, 426) == [0, 171]
    assert window_starts(100, 512, 426) == [0]
    starts = window_starts(1000, 300, 200)
    assert starts[0] == 0 and starts[-1] == 700 and all(b - a <= 200 for a, b in zip(starts, starts[1:]))


def test_slide_equals_whole_when_one_window_covers_the_image():
    fn = conv_segmenter()
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        whole = segment_logits(fn, images, num_classes=3, mode="whole")
        slide = segment_logits(fn, images, num_classes=3, mode="slide", crop=40, stride=30)
    assert torch.allclose(whole, slide, atol=1e-6)


def test_slide_averages_overlaps_and_handles_small_images():
    fn = conv_segmenter()
    images = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        slide = slide_logits(fn, images, num_classes=3, crop=32, stride=20)
        small = slide_logits(fn, torch.randn(1, 3, 20, 25), num_classes=3, crop=32, stride=20)
    assert slide.shape == (1, 3, 50, 70)
    assert small.shape == (1, 3, 20, 25)
    # a pointwise segmenter gives the same logits however the image is windowed
    point = torch.nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        assert torch.allclose(slide_logits(point, images, num_classes=3, crop=32, stride=20), point(images), atol=1e-5)


def test_batched_equals_one_by_one():
    fn = conv_segmenter()
    images = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        batched = segment_logits(fn, images, num_classes=3, crop=32, stride=24)
        single = torch.cat([segment_logits(fn, im[None], num_classes=3, crop=32, stride=24) for im in images])
    assert torch.allclose(batched, single, atol=1e-6)


def test_calibration_lowers_only_seen_scores():
    logits = torch.zeros(1, 3, 2, 2)
    scores = scores_from_logits(logits, seen_mask=torch.tensor([True, False, True]), calibration=0.1)
    assert torch.allclose(scores[0, :, 0, 0], torch.tensor([0.4, 0.5, 0.4]))
