import pytest
import torch
import torch.nn.functional as F

from pipeline.model.build import build_model
from pipeline.model.clip import create_clip
from pipeline.model.image_encoder import resize_position_embedding
from tests.tiny import class_embeddings, images, tiny_arch, tiny_cfg, tiny_model


def test_position_embedding_is_resized_to_the_configured_grid_at_build():
    model = tiny_model(image_size=48)  # CLIP grid 4x4 -> 6x6
    assert model.encoder.grid == (6, 6)
    assert model.encoder.positional_embedding.shape == (1 + 36, 32)
    assert tiny_model().encoder.positional_embedding.shape == (1 + 16, 32)


def test_run_time_resize_equals_build_time_resize():
    # a model resized at build to 6x6 and one resized at run time from 4x4 give the same outputs
    at_build = tiny_model(seed=0, image_size=48).eval()
    at_run = tiny_model(seed=0).eval()
    x, t = images(1, 48), class_embeddings(3)
    with torch.no_grad():
        assert torch.allclose(at_build(x, t).logits, at_run(x, t).logits, atol=1e-5)


def test_other_grid_at_run_time():
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(images(1, 56), class_embeddings(3))
    assert out.logits.shape == (1, 3, 56, 56)
    assert out.layer_logits[-1][-1].shape == (1, 3, 7, 7)


def test_resize_keeps_the_class_position_and_is_identity_on_the_same_grid():
    pos = torch.randn(1 + 16, 8)
    assert resize_position_embedding(pos, (4, 4), (4, 4)) is pos
    big = resize_position_embedding(pos, (4, 4), (8, 6))
    assert big.shape == (1 + 48, 8)
    assert torch.equal(big[0], pos[0])
    # a constant patch embedding stays constant under bilinear resizing
    const = torch.cat([pos[:1], torch.ones(16, 8)])
    assert torch.allclose(resize_position_embedding(const, (4, 4), (7, 3))[1:], torch.ones(21, 8))


@pytest.mark.parametrize("src,dst", [((8, 8), (12, 12)), ((8, 8), (6, 6)), ((14, 14), (32, 32)), ((14, 14), (32, 45)),
                                     ((16, 16), (36, 36)), ((2, 8), (4, 4))])
def test_resize_equals_plain_bilinear_interpolation_bit_for_bit(src, dst):
    # the timm resampler must give exactly what F.interpolate(bilinear, align_corners=False) gives, so that
    # switching to it changed no metric: the demo grid (8x8 -> 12x12) and ViT-B/16, L/14 grids at 512 px; and a
    # grid of the same token count, which timm before 1.0.29 returned unresized
    pos = 0.02 * torch.randn(1 + src[0] * src[1], 64, generator=torch.Generator().manual_seed(0))
    patches = pos[1:].reshape(1, *src, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(patches, size=dst, mode="bilinear", align_corners=False)
    expected = torch.cat([pos[:1], expected.reshape(64, -1).transpose(0, 1)])
    assert torch.equal(resize_position_embedding(pos, src, dst), expected)


def test_release_double_cls_changes_only_the_cls_path():
    single = tiny_model(seed=0).eval()
    double = tiny_model(seed=0, release_double_cls=True).eval()
    x = images(1, 32)
    with torch.no_grad():
        f1, f2 = single.encoder(x), double.encoder(x)
    assert not torch.allclose(f1.global_embedding, f2.global_embedding)


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_global_embedding_is_clips_own_image_embedding(pool):
    # without prompts the encoder's g is CLIP's encode_image, for class-token and average pooling
    arch = tiny_arch()
    arch["vision_cfg"]["pool_type"] = pool
    torch.manual_seed(0)
    clip = create_clip(arch).eval()
    model = build_model(tiny_cfg(variant="frozen"), arch, clip.state_dict()).eval()
    x = images(2, 32)
    with torch.no_grad():
        expected = F.normalize(clip.encode_image(x), dim=-1)
        assert torch.allclose(model.encoder(x).global_embedding, expected, atol=1e-5)


def test_pooling_open_clip_applies_differently_is_refused():
    arch = tiny_arch()
    arch["vision_cfg"] |= {"pool_type": "avg", "final_ln_after_pool": True}
    with pytest.raises(ValueError, match="final_ln_after_pool=True"):
        tiny_model(arch=arch)
