"""Heads on tiny inputs, and metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from insitu.backbones import create_backbone
from insitu.config import BackboneConfig
from insitu.errors import ConfigError
from insitu.heads import create_head, few_shot_accuracy, head_options, prototype_logits
from insitu.heads.metrics import classification_metrics, multilabel_metrics, segmentation_metrics
from tests.conftest import TINY_BACKBONE


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(BackboneConfig.model_validate(TINY_BACKBONE))


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_classification_heads_shapes_and_gradients(name):
    head = create_head("classification", name, 96, 5, **head_options("classification", name, {"hidden_dim": 16}))
    x = torch.randn(4, 96, requires_grad=True)
    out = head(x)
    assert out.shape == (4, 5)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    head.eval()  # no dropout: rows are independent and the linear head is fc(layer_norm(x)) by hand
    with torch.no_grad():
        out = head(x)
        assert torch.allclose(torch.cat([head(x[i : i + 1]) for i in range(4)]), out, atol=1e-6)
        y = x.clone()
        y[2] += 1.0
        changed = (head(y) - out).abs().sum(1) > 0
        assert changed.tolist() == [False, False, True, False]
        if name == "linear":
            z = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
            want = (z * head.norm.weight + head.norm.bias) @ head.fc.weight.T + head.fc.bias
            assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize(("name", "levels"), [("linear", 1), ("fpn", 2), ("fpn", 4)])
def test_segmentation_heads_on_backbone_intermediates(backbone, name, levels):
    x = torch.randn(2, 3, 32, 32)
    maps = backbone.forward_intermediates(x, [0, 1, 1, 1][:levels] if levels > 2 else levels)
    assert maps[0].shape == (2, 48, 4, 4)
    head = create_head("segmentation", name, 48, 3, **head_options("segmentation", name, {"levels": len(maps), "decoder_dim": 8}))
    logits = head(maps, (32, 32))
    assert logits.shape == (2, 3, 32, 32)
    assert torch.isfinite(logits).all()
    head.eval()
    with torch.no_grad():
        out = head(maps, (32, 32))
        # samples do not mix: the second image alone gives its own logits
        assert torch.allclose(head([m[1:] for m in maps], (32, 32)), out[1:], atol=1e-5)
        # every level reaches the output: changing only the finest map changes the logits
        assert not torch.allclose(head([maps[0] + 1.0, *maps[1:]], (32, 32)), out, atol=1e-4)
        if name == "linear":
            # bilinear upsampling ×8 (align_corners=False) copies token (0, 0) to the 4×4 corner pixels
            norm = head.norm
            z = (maps[-1][:, :, 0, 0] - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
            want = z @ head.conv.weight[:, :, 0, 0].T + head.conv.bias
            assert torch.allclose(out[:, :, :4, :4], want[:, :, None, None].expand(-1, -1, 4, 4), atol=1e-5)
            # a 1×1 head commutes with a horizontal flip of the token maps
            assert torch.allclose(head([m.flip(-1) for m in maps], (32, 32)), out.flip(-1), atol=1e-5)


def test_unknown_head_is_a_config_error():
    with pytest.raises(ConfigError, match="Unknown segmentation head 'fnp'.*'fpn'"):
        create_head("segmentation", "fnp", 8, 2)


def test_classification_metrics_by_hand():
    # targets 0,0,1,2 ; predictions 0,1,1,2 -> accuracy 3/4; recalls 1/2, 1, 1 -> balanced 5/6
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    m = classification_metrics(logits, torch.tensor([0, 0, 1, 2]), 3)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(5 / 6)
    # binary AUROC by hand: positives score 0.9, 0.4; negatives 0.6, 0.1 -> 3 of 4 pairs ordered = 0.75
    p = torch.tensor([0.9, 0.4, 0.6, 0.1])
    two = torch.stack([torch.log(1 - p), torch.log(p)], 1)
    assert classification_metrics(two, torch.tensor([1, 1, 0, 0]), 2)["auroc"] == pytest.approx(0.75)


def test_segmentation_metrics_by_hand_with_ignore():
    target = torch.tensor([[[0, 0, 1], [1, 255, 1]]])
    pred = torch.tensor([[[0, 1, 1], [1, 0, 0]]])
    # kept pixels: t=0,0,1,1,1 p=0,1,1,1,0 -> class0 IoU 1/3, class1 IoU 2/4
    m = segmentation_metrics(pred, target, 2)
    assert m["mIoU"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["dice"] == pytest.approx((2 * 1 / 4 + 2 * 2 / 6) / 2)  # 2|A∩B|/(|A|+|B|) per class
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    # a class absent from prediction and target does not drag the mean down
    assert segmentation_metrics(pred, target, 3)["mIoU"] == pytest.approx(m["mIoU"])


def test_multilabel_map_by_hand():
    target = torch.tensor([[1, 0], [0, 1], [1, 1]])
    # label 0: scores 0.9(+) 0.8(-) 0.7(+) -> AP = (1/1 + 2/3)/2; label 1: 0.1(-) 0.6(+) 0.2(+) -> AP = 1
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.6], [0.7, 0.2]])
    ap0 = (1 + 2 / 3) / 2
    assert multilabel_metrics(torch.logit(probs), target)["mAP"] == pytest.approx((ap0 + 1) / 2)


def test_prototypes_by_hand_and_few_shot():
    support = torch.tensor([[1.0, 0], [3.0, 0], [0, 2.0]])
    logits = prototype_logits(support, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 1.0]]), 2)
    assert logits[0].tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)])
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (20, 4)) + [5, 0, 0, 0], rng.normal(0, 0.1, (20, 4)) + [0, 5, 0, 0]]).astype(np.float32)
    y = np.repeat([0, 1], 20)
    mean, std = few_shot_accuracy(x, y, x, y, shots=1, episodes=5)
    assert mean == 1.0 and std == 0.0
