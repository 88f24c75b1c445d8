import torch
import torch.nn.functional as F

from pipeline.model import average_class_embeddings, make_tokenizer
from tests.tiny import tiny_arch, tiny_model


def test_average_class_embeddings_normalises_before_and_after_averaging():
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # two templates of one class, different norms
    out = average_class_embeddings(a.unsqueeze(0))
    assert torch.allclose(out, torch.tensor([[2**-0.5, 2**-0.5]]))
    emb = torch.randn(4, 3, 8)
    out = average_class_embeddings(emb)
    assert out.shape == (4, 8)
    assert torch.allclose(out.norm(dim=-1), torch.ones(4))
    assert torch.allclose(out, F.normalize(F.normalize(emb, dim=-1).sum(1), dim=-1), atol=1e-6)


def test_encode_text_embeds_every_class_and_template():
    model = tiny_model().eval()
    tokenizer = make_tokenizer(tiny_arch())
    names, templates = ["cat", "dog", "traffic light"], ["a photo of a {}.", "a {} in the scene."]
    emb = model.encode_text(names, templates, tokenizer, batch_size=4)
    assert emb.shape == (3, 32)
    with torch.no_grad():
        direct = model.text_encoder(tokenizer([t.format("dog") for t in templates]))
    assert torch.allclose(emb[1], average_class_embeddings(direct.unsqueeze(0))[0], atol=1e-6)


def test_text_tower_parameters_count_in_the_model_total():
    model = tiny_model()
    assert model.text_encoder.token_embedding.weight.shape == (49408, 32)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
