"""Each HQ-CLIP loss term against an independent float64 computation; gradients reach towers and head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import ContrastiveLoss, HardNegativeLoss, HQCLIPLoss, TagLoss
from training.tag_head import TagHead

SCALE = 7.5


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


@pytest.fixture
def features():
    return _unit(5, 8, 1), _unit(5, 8, 2), _unit(5, 8, 3)


def _dot(a, b) -> float:
    return float(sum(float(x) * float(y) for x, y in zip(a, b)))


def _log_softmax_at(scores: list[float], index: int) -> float:
    top = max(scores)
    return scores[index] - (top + math.log(sum(math.exp(s - top) for s in scores)))


def test_contrastive_is_symmetric_infonce(features):
    image, text, _ = features
    n = len(image)
    i2t = -sum(_log_softmax_at([SCALE * _dot(image[i], text[j]) for j in range(n)], i) for i in range(n)) / n
    t2i = -sum(_log_softmax_at([SCALE * _dot(text[i], image[j]) for j in range(n)], i) for i in range(n)) / n
    got = ContrastiveLoss()(image, text, torch.tensor(SCALE))["contrastive"]
    assert float(got) == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_hni_columns_plus_contrastive_is_negclip(features):
    image, text, negative = features
    n = len(image)
    # NegCLIP: image->text softmax over all positives and all hard negatives; text->image as usual.
    i2t = -sum(
        _log_softmax_at([SCALE * _dot(image[i], t) for t in list(text) + list(negative)], i) for i in range(n)
    ) / n
    t2i = -sum(_log_softmax_at([SCALE * _dot(text[i], image[j]) for j in range(n)], i) for i in range(n)) / n
    negclip = (i2t + t2i) / 2
    terms = HQCLIPLoss(lambda_hni=1.0, lambda_stc=0.0)(image, text, torch.tensor(SCALE), negative)
    assert float(terms["loss"]) == pytest.approx(negclip, rel=1e-5)
    # and the term alone is half the log of (1 + negative mass / positive mass), averaged over images
    expected = np.mean([
        0.5 * math.log(1 + sum(math.exp(SCALE * _dot(image[i], m)) for m in negative)
                       / sum(math.exp(SCALE * _dot(image[i], t)) for t in text))
        for i in range(n)
    ])
    assert float(terms["hni"]) == pytest.approx(expected, rel=1e-5)
    assert float(terms["hni"]) > 0


def test_hni_pairwise_is_two_way_softmax(features):
    image, text, negative = features
    expected = np.mean([
        -math.log(math.exp(SCALE * _dot(image[i], text[i]))
                  / (math.exp(SCALE * _dot(image[i], text[i])) + math.exp(SCALE * _dot(image[i], negative[i]))))
        for i in range(len(image))
    ])
    got = HardNegativeLoss("pairwise")(image, text, negative, torch.tensor(SCALE))["hni"]
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_hni_rewards_the_right_ordering(features):
    image, _text, _ = features
    loss = HardNegativeLoss("pairwise")
    scale = torch.tensor(SCALE)
    assert float(loss(image, image, -image, scale)["hni"]) < float(loss(image, -image, image, scale)["hni"])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_stc_is_multilabel_bce(reduction):
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    targets = (torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.6).to(torch.uint8)
    per_entry = [
        [-(float(y) * math.log(1 / (1 + math.exp(-float(x))))
           + (1 - float(y)) * math.log(1 - 1 / (1 + math.exp(-float(x)))))
         for x, y in zip(row_x, row_y)]
        for row_x, row_y in zip(logits, targets)
    ]
    expected = np.mean([sum(r) for r in per_entry]) if reduction == "sum" else np.mean(per_entry)
    got = TagLoss(reduction)(logits, targets)["stc"]
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_total_weights_the_terms_and_skips_zero_weights(features):
    image, text, negative = features
    logits, targets = torch.randn(5, 3), torch.ones(5, 3)
    terms = HQCLIPLoss(lambda_hni=0.7, lambda_stc=0.3)(image, text, torch.tensor(SCALE), negative, logits, targets)
    assert float(terms["loss"]) == pytest.approx(
        float(terms["contrastive"]) + 0.7 * float(terms["hni"]) + 0.3 * float(terms["stc"]), rel=1e-6)
    plain = HQCLIPLoss(lambda_hni=0.0, lambda_stc=0.0)(image, text, torch.tensor(SCALE))
    assert set(plain) == {"contrastive", "loss"}
    with pytest.raises(ValueError, match="negative"):
        HQCLIPLoss(lambda_hni=1.0, lambda_stc=0.0)(image, text, torch.tensor(SCALE))


def test_tag_head_bias_starts_at_tag_log_odds():
    head = TagHead(8, 3, [0.5, 0.1, 0.01])
    probabilities = torch.sigmoid(head(torch.zeros(1, 8)))[0]
    assert probabilities.tolist() == pytest.approx([0.5, 0.1, 0.01], rel=1e-5)


def test_gradients_reach_both_towers_the_head_and_the_scale(tiny_checkpoint):
    from training.hqclip_model import HQCLIPModel, freeze_towers, load_bundle

    bundle = load_bundle(str(tiny_checkpoint))
    head = TagHead(64, 4)
    model = HQCLIPModel(bundle.model, head)
    images = torch.randn(3, 3, 64, 64)
    positive = bundle.tokenizer(["a cat", "a cup of coffee", "a rocket"])
    negative = bundle.tokenizer(["a dog", "a cup of tea", "a plane"])
    out = model(images, positive, negative)
    loss = HQCLIPLoss(1.0, 1.0)(out["image"], out["text"], out["logit_scale"], out["negative"], out["tag_logits"],
                                torch.eye(3, 4))["loss"]
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("clip.visual.conv1.weight", "clip.visual.proj", "clip.token_embedding.weight",
                 "clip.transformer.resblocks.0.attn.in_proj_weight", "clip.text_projection",
                 "clip.logit_scale", "tag_head.linear.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name

    # LiT-style: frozen towers get no gradients, their projections still do
    model.zero_grad(set_to_none=True)
    frozen = freeze_towers(bundle.model, image=True, text=True)
    out = model(images, positive, negative)
    HQCLIPLoss(1.0, 1.0)(out["image"], out["text"], out["logit_scale"], out["negative"], out["tag_logits"],
                         torch.eye(3, 4))["loss"].backward()
    assert bundle.model.visual.conv1.weight.grad is None
    assert bundle.model.token_embedding.weight.grad is None
    assert bundle.model.visual.proj.grad.abs().sum() > 0
    assert bundle.model.text_projection.grad.abs().sum() > 0
    assert frozen == [bundle.model.visual, bundle.model.transformer, bundle.model.token_embedding,
                      bundle.model.ln_final]
