"""GenEval: its rules on hand-made detections with hand-computed scores (incl. the FlowGRPO reward server's
partial-score quirks), the Mask2Former post-processing on synthetic logits, the colour classifier's
templates and crops, and the whole reward on tiny random-weight Mask2Former and CLIP models saved here."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guardrl.rewards import GenEval, RewardError
from guardrl.rewards.geneval import (
    COLOR_TEMPLATES,
    ClipColorClassifier,
    Mask2FormerDetector,
    geneval_label_names,
    instance_detections,
    mask_to_box,
    object_crop,
)
from guardrl.rewards.geneval_rules import (
    COLORS,
    GENEVAL_CLASSES,
    Detection,
    Thresholds,
    box_iou,
    check_metadata,
    judge,
    load_metadata,
    relative_position,
    select_objects,
)
from tests.test_model_rewards import tiny_clip_tokenizer


def det(x1, y1, x2, y2, score=0.95):
    return Detection(box=(x1, y1, x2, y2), score=score)


def fixed_colors(*names):
    """A colour classifier answering `names` in order, whatever the crop; records what it was asked."""
    asked = []

    def classify(classname, objects):
        asked.append((classname, len(objects)))
        return list(names[: len(objects)])

    classify.asked = asked
    return classify


COUNT3 = check_metadata(
    {
        "prompt": "a photo of three cups",
        "tag": "counting",
        "include": [{"class": "cup", "count": 3}],
        "exclude": [{"class": "cup", "count": 4}],
    },
    "t",
)
RED_CAR = check_metadata(
    {
        "prompt": "a photo of a red car",
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red"}],
    },
    "t",
)
DOG_LEFT_OF_CAT = check_metadata(
    {
        "prompt": "a photo of a dog left of a cat",
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
    },
    "t",
)


# ---------------------------------------------------------------- geometry


def test_relative_position_on_hand_worked_boxes():
    # centres (5, 5) and (25, 5), sizes 10: offset (-20, 0), shrunk by 0.1 * 20 -> (-18, 0) / 20 = (-0.9, 0)
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    # diagonal: (-10, -10) shrunk to (-8, -8), / 14.142 = -0.566 on both axes: left of and above
    assert relative_position((0, 0, 10, 10), (10, 10, 20, 20)) == {"left of", "above"}
    assert relative_position((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}
    # offset (-1.5, 0) is within 0.1 x (10 + 10) = 2 of the sizes: no relation at all
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    # (-12, -5): shrunk (-10, -3) / 13 = (-0.77, -0.23): left only; with threshold 0, (-0.92, -0.38):
    # still left
    assert relative_position((0, 0, 10, 10), (12, 5, 22, 15)) == {"left of"}
    assert relative_position((0, 0, 10, 10), (12, 5, 22, 15), position_threshold=0.0) == {"left of"}
    # (-6, -8): shrunk (-4, -6) / 10 = (-0.4, -0.6): above only; threshold 0 gives (-0.6, -0.8): both
    assert relative_position((0, 0, 10, 10), (6, 8, 16, 18)) == {"above"}
    assert relative_position((0, 0, 10, 10), (6, 8, 16, 18), position_threshold=0.0) == {"left of", "above"}


def test_box_iou_uses_genevals_plus_one_pixel_areas():
    # 10 x 10 boxes (0..9) overlapping on 5 x 5: 25 / (100 + 100 - 25)
    assert box_iou((0, 0, 9, 9), (5, 5, 14, 14)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


def test_select_objects_thresholds_sorts_caps_and_optionally_suppresses():
    found = {
        "cup": [
            det(0, 0, 9, 9, 0.5),
            det(0, 0, 9, 9, 0.95),
            det(1, 1, 10, 10, 0.92),
            det(50, 50, 59, 59, 0.2),
        ],
        "cat": [det(0, 0, 5, 5, 0.31)],
    }
    picked = select_objects(found, "two_object")
    assert [d.score for d in picked["cup"]] == [0.95, 0.92, 0.5]  # > 0.3, most confident first
    assert list(picked) == ["cup", "cat"]
    counting = select_objects(found, "counting")  # counting prompts keep only > 0.9
    assert [d.score for d in counting["cup"]] == [0.95, 0.92] and "cat" not in counting
    capped = select_objects(found, "two_object", Thresholds(max_objects=1))
    assert [d.score for d in capped["cup"]] == [0.95]
    # NMS at IoU 0.5: (1, 1, 10, 10) overlaps (0, 0, 9, 9) with IoU 81/119 = 0.68 and goes; so does the 0.5
    # twin
    nms = select_objects(found, "two_object", Thresholds(max_overlap=0.5))
    assert [d.score for d in nms["cup"]] == [0.95]


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    "n_cups,correct,strict,partial",
    [
        (3, True, True, 1.0),
        (2, False, False, 1 - 1 / 3),  # too few
        (
            4,
            False,
            False,
            1 - 1 / 3,
        ),  # enough for "include 3", but "exclude 4" fires; the server: count term only
        (7, False, False, 1 - 4 / 3),  # the server's count term goes negative beyond twice the count
    ],
)
def test_counting(n_cups, correct, strict, partial):
    objects = {"cup": [det(20 * i, 0, 20 * i + 10, 10) for i in range(n_cups)]}
    verdict = judge(objects, COUNT3, fixed_colors())
    assert (verdict.correct, verdict.strict) == (correct, strict)
    assert verdict.partial == pytest.approx(partial, abs=1e-12)


def test_colors():
    car = {"car": [det(0, 0, 10, 10)]}
    good = judge(car, RED_CAR, fixed_colors("red"))
    assert (good.correct, good.strict, good.partial) == (True, True, 1.0)
    bad = judge(car, RED_CAR, fixed_colors("blue"))
    assert (bad.correct, bad.strict, bad.partial) == (False, False, 0.5)  # count 1, colour 0
    assert any("expected red car" in r for r in bad.reasons)
    # no car: the server's one 0 stands for the colour check too: (0 + 0) / 2; the classifier is never asked
    colors = fixed_colors("red")
    none = judge({}, RED_CAR, colors)
    assert (none.correct, none.strict, none.partial, colors.asked) == (False, False, 0.0, [])
    # two cars, the first red: GenEval checks the most confident `count` (1) and passes; the server wants
    # exactly one: count term 1 - 1/1 = 0 and a single 0 for colour
    two = judge({"car": [det(0, 0, 10, 10), det(30, 0, 40, 10, 0.9)]}, RED_CAR, fixed_colors("red", "blue"))
    assert (two.correct, two.strict, two.partial) == (True, False, 0.0)


def test_position_and_the_servers_extra_one():
    cat, dog_left, dog_right = det(30, 0, 40, 10), det(0, 0, 10, 10), det(60, 0, 70, 10)
    good = judge({"cat": [cat], "dog": [dog_left]}, DOG_LEFT_OF_CAT, fixed_colors())
    assert (good.correct, good.strict, good.partial) == (True, True, 1.0)  # terms [1, 1, 1]
    bad = judge({"cat": [cat], "dog": [dog_right]}, DOG_LEFT_OF_CAT, fixed_colors())
    # terms: cat count 1; dog count 1, failed position 0 and the loop's closing 1: 3 / 4
    assert (bad.correct, bad.strict, bad.partial) == (False, False, 0.75)
    assert any("expected left of target, found right of" in r for r in bad.reasons)
    # no cat: the target group is None; terms [0 (cat count), 1 (dog count), 0 (no target)]
    orphan = judge({"dog": [dog_left]}, DOG_LEFT_OF_CAT, fixed_colors())
    assert (orphan.correct, orphan.strict, orphan.partial) == (False, False, pytest.approx(1 / 3))
    assert any("no target for dog" in r for r in orphan.reasons)


def test_metadata_checks_name_the_field_and_what_is_allowed(tmp_path):
    cases = [
        (
            {"prompt": "p", "tag": "x", "include": [{"class": "unicorn", "count": 1}]},
            "include\\[0\\].class='unicorn'",
        ),
        (
            {"prompt": "p", "tag": "x", "include": [{"class": "cat", "count": 0}]},
            "include\\[0\\].count=0 must be an int >= 1",
        ),
        (
            {"prompt": "p", "tag": "x", "include": [{"class": "cat", "count": 1, "color": "teal"}]},
            "color='teal'",
        ),
        (
            {
                "prompt": "p",
                "tag": "x",
                "include": [
                    {"class": "cat", "count": 1},
                    {"class": "dog", "count": 1, "position": ["near", 0]},
                ],
            },
            "position\\[0\\]='near' must be one of",
        ),
        (
            {
                "prompt": "p",
                "tag": "x",
                "include": [
                    {"class": "cat", "count": 1},
                    {"class": "dog", "count": 1, "position": ["above", 1]},
                ],
            },
            "position\\[1\\]=1 must index an earlier include clause \\(an int in 0..0\\)",
        ),
        ({"prompt": "p", "include": []}, "'tag' must be a non-empty string"),
    ]
    for record, message in cases:
        with pytest.raises(ValueError, match=message):
            check_metadata(record, "line 1")
    clash = tmp_path / "clash.jsonl"
    clash.write_text(
        json.dumps(RED_CAR) + "\n" + json.dumps({**RED_CAR, "include": [{"class": "car", "count": 2}]})
    )
    with pytest.raises(
        ValueError, match="line 2: prompt 'a photo of a red car' appears earlier with different"
    ):
        load_metadata(str(clash))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_metadata(str(broken))
    with pytest.raises(ValueError, match="cannot read it"):
        load_metadata(str(tmp_path / "missing.jsonl"))


def test_genevals_classes_are_coco_in_detector_order_with_three_renamed():
    assert len(GENEVAL_CLASSES) == 80 and len(set(GENEVAL_CLASSES)) == 80
    assert GENEVAL_CLASSES.index("computer mouse") == 64 and GENEVAL_CLASSES.index("toothbrush") == 79
    coco = {i: n for i, n in enumerate(GENEVAL_CLASSES)} | {64: "mouse", 65: "remote", 66: "keyboard"}
    assert geneval_label_names(coco) == list(GENEVAL_CLASSES)
    with pytest.raises(ValueError, match="label 0 'wall' is not one of GenEval's 80 COCO classes"):
        geneval_label_names({0: "wall"})


# ---------------------------------------------------------------- detector post-processing


def test_instance_detections_on_synthetic_logits():
    # 2 queries, 2 classes + "no object"; masks already at the image size (every resize is the identity)
    class_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    masks = torch.full((2, 6, 8), -3.0)
    masks[0, 1:3, 2:5] = 3.0  # query 0: rows 1-2, cols 2-4
    masks[1, 4:6, 0:2] = 1.0  # query 1: rows 4-5, cols 0-1
    out = instance_detections(class_logits, masks, (6, 8), (6, 8), (6, 8), max_per_image=3)
    p0 = torch.tensor([2.0, 0.0, 0.0]).softmax(0)
    p1 = torch.tensor([0.0, 1.0, 3.0]).softmax(0)
    expected = sorted(
        [(0, float(p0[0])), (1, float(p0[1])), (0, float(p1[0])), (1, float(p1[1]))], key=lambda t: -t[1]
    )[:3]
    assert [label for label, _, _ in out] == [label for label, _ in expected]
    sig3, sig1 = 1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-1))
    # (query 0, class 0), then (query 1, class 1), then (query 0, class 1): score = class prob x mask mean
    assert out[0][1] == pytest.approx(float(p0[0]) * sig3, rel=1e-5)
    assert out[1][1] == pytest.approx(float(p1[1]) * sig1, rel=1e-5)
    assert mask_to_box(out[0][2]) == (2.0, 1.0, 5.0, 3.0)
    assert mask_to_box(out[1][2]) == (0.0, 4.0, 2.0, 6.0)
    assert mask_to_box(torch.zeros(4, 4, dtype=torch.bool)) == (0.0, 0.0, 0.0, 0.0)


def test_instance_detections_crop_the_padding_and_resize_to_the_original():
    # model output 4x4 for a padded 8x8 input whose image is the top-left 8x4 (resized), original 16x8
    masks = torch.full((1, 4, 4), -5.0)
    masks[0, :, :2] = 5.0  # the left half of the padded input = all of the resized image
    out = instance_detections(torch.tensor([[4.0, 0.0]]), masks, (8, 8), (8, 4), (16, 8), max_per_image=1)
    label, score, mask = out[0]
    assert mask.shape == (16, 8) and bool(mask.all())
    assert mask_to_box(mask) == (0.0, 0.0, 8.0, 16.0)


def test_object_crop_pastes_on_grey_through_the_mask_and_crops_to_the_box():
    image = np.full((6, 8, 3), 200, dtype=np.uint8)
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 2:4] = True
    crop = np.asarray(object_crop(image, Detection((2, 1, 5, 3), 0.9, mask)))
    assert crop.shape == (2, 3, 3)
    assert (crop[:, :2] == 200).all() and (crop[:, 2] == 153).all()  # column 4 is outside the mask: #999
    whole = np.asarray(object_crop(image, Detection((0, 0, 8, 6), 0.9, None)))
    assert (whole == 200).all() and whole.shape == (6, 8, 3)


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_geneval(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    root = tmp_path_factory.mktemp("tiny_geneval")
    coco = [
        {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(n, n)
        for n in GENEVAL_CLASSES
    ]
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=80,
        id2label=dict(enumerate(coco)),
        label2id={n: i for i, n in enumerate(coco)},
        hidden_dim=32,
        feature_size=32,
        mask_feature_size=32,
        num_queries=6,
        encoder_layers=1,
        decoder_layers=2,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        num_attention_heads=2,
    )
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(root / "m2f")
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(root / "m2f")
    tok = tiny_clip_tokenizer()
    clip = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(1)
    CLIPModel(clip).save_pretrained(root / "clip")
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    ).save_pretrained(root / "clip")
    metadata = root / "metadata.jsonl"
    metadata.write_text("\n".join(json.dumps(r) for r in (COUNT3, RED_CAR, DOG_LEFT_OF_CAT)) + "\n")
    return {"m2f": str(root / "m2f"), "clip": str(root / "clip"), "metadata": str(metadata)}


def test_mask2former_detector_loads_a_saved_model_and_returns_detections_at_image_size(tiny_geneval):
    detector = Mask2FormerDetector(tiny_geneval["m2f"], max_per_image=7)
    assert not any(p.requires_grad for p in detector.parameters()) and not detector.model.training
    assert detector.label_names[64:67] == ["computer mouse", "tv remote", "computer keyboard"]
    images = torch.randint(
        0, 256, (2, 40, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    found = detector(images)
    assert len(found) == 2
    for per_image in found:
        flat = [d for dets in per_image.values() for d in dets]
        assert len(flat) == 7 and set(per_image) <= set(GENEVAL_CLASSES)
        for d in flat:
            assert d.mask.shape == (40, 56) and 0 <= d.score <= 1
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= 56 and 0 <= y1 <= y2 <= 40
            assert d.box == mask_to_box(torch.from_numpy(d.mask))
    with pytest.raises(ValueError, match="max_per_image=0 must be an int >= 1"):
        Mask2FormerDetector(tiny_geneval["m2f"], max_per_image=0)


def test_the_detector_without_scipy_says_how_to_install_it(tiny_geneval, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy", None)  # as if scipy were not installed
    with pytest.raises(ImportError, match=r"needs scipy.*pip install 'guardrl\[geneval\]'"):
        Mask2FormerDetector(tiny_geneval["m2f"])


def test_color_classifier_uses_genevals_three_templates_averaged(tiny_geneval):
    from transformers import CLIPModel, CLIPProcessor

    classifier = ClipColorClassifier(tiny_geneval["clip"])
    model, processor = (
        CLIPModel.from_pretrained(tiny_geneval["clip"]).eval(),
        CLIPProcessor.from_pretrained(tiny_geneval["clip"]),
    )
    with torch.no_grad():
        columns = []
        for color in COLORS:
            texts = [
                f"a photo of a {color} cup",
                f"a photo of a {color}-colored cup",
                f"a photo of a {color} object",
            ]
            assert texts == [t.format(color=color, object="cup") for t in COLOR_TEMPLATES]
            tokens = processor(text=texts, padding=True, return_tensors="pt")
            out = model.get_text_features(**tokens)
            emb = F.normalize(getattr(out, "pooler_output", out), dim=-1).mean(0)
            columns.append(emb / emb.norm())
        expected = torch.stack(columns, dim=1)
        torch.testing.assert_close(classifier.color_weights("cup"), expected, rtol=1e-5, atol=1e-6)
        image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        objects = [Detection((4, 2, 30, 36), 0.9, None), Detection((10, 10, 48, 40), 0.8, None)]
        crops = [object_crop(image, d) for d in objects]
        pixels = processor(images=crops, return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=pixels)
        hand = (F.normalize(getattr(out, "pooler_output", out), dim=-1) @ expected).argmax(1).tolist()
    assert classifier(image, "cup", objects) == [COLORS[i] for i in hand]
    assert classifier(image, "cup", []) == []


def test_geneval_reward_end_to_end_on_tiny_models(tiny_geneval):
    reward = GenEval(
        tiny_geneval["metadata"],
        detector=tiny_geneval["m2f"],
        color_classifier=tiny_geneval["clip"],
        threshold=0.0,
        counting_threshold=0.0,
    )
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    prompts = [COUNT3["prompt"], RED_CAR["prompt"], DOG_LEFT_OF_CAT["prompt"]]
    scores = reward(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # the same verdicts recomputed from the same detector and classifier, through the pure rules
    uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    found = reward.detector(uint8)
    for i, record in enumerate((COUNT3, RED_CAR, DOG_LEFT_OF_CAT)):
        objects = select_objects(found[i], record["tag"], reward.thresholds)
        verdict = judge(objects, record, lambda c, o, i=i: reward.color_classifier(uint8[i].numpy(), c, o))
        assert float(scores[i]) == pytest.approx(verdict.partial)
    with pytest.raises(ValueError, match="prompt 'a photo of a unicorn' is not in metadata=.*3 prompts"):
        reward(images[:1], ["a photo of a unicorn"])


def test_geneval_reward_with_a_scripted_detector_gives_the_hand_scores(tiny_geneval):
    scripted = [
        {"cup": [det(0, 0, 10, 10), det(20, 0, 30, 10)]},  # two of three cups
        {"car": [det(0, 0, 10, 10)]},  # a car, coloured by the classifier
        {"cat": [det(30, 0, 40, 10)], "dog": [det(60, 0, 70, 10)]},  # dog right of the cat
    ]
    prompts = [COUNT3["prompt"], RED_CAR["prompt"], DOG_LEFT_OF_CAT["prompt"]]
    images = torch.zeros(3, 3, 8, 8)
    expected = {"partial": [2 / 3, 0.5, 0.75], "correct": [0.0, 0.0, 0.0], "strict": [0.0, 0.0, 0.0]}
    for kind, values in expected.items():
        reward = GenEval(
            tiny_geneval["metadata"],
            detector=lambda images: scripted,
            color_classifier=lambda image, classname, objects: ["blue"] * len(objects),
            score=kind,
        )
        torch.testing.assert_close(reward(images, prompts), torch.tensor(values), rtol=0, atol=1e-6)
    green = GenEval(
        tiny_geneval["metadata"],
        detector=lambda images: scripted[1:2],
        color_classifier=lambda image, classname, objects: ["red"] * len(objects),
        score="correct",
    )
    assert green(images[:1], prompts[1:2]).tolist() == [1.0]
    with pytest.raises(ValueError, match="score='best' must be one of \\['partial', 'correct', 'strict'\\]"):
        GenEval(
            tiny_geneval["metadata"],
            detector=lambda images: scripted,
            color_classifier=lambda *a: [],
            score="best",
        )
    with pytest.raises(ValueError, match="threshold=1.5 must be a number in \\[0, 1\\]"):
        GenEval(
            tiny_geneval["metadata"],
            detector=lambda images: scripted,
            color_classifier=lambda *a: [],
            threshold=1.5,
        )


def test_geneval_loads_through_the_reward_server_loader(tiny_geneval):
    from guardrl.rewards.server import load_reward

    reward = load_reward(
        "guardrl.rewards.GenEval",
        {
            "metadata": tiny_geneval["metadata"],
            "score": "strict",
            "detector": {
                "class_path": "guardrl.rewards.geneval.Mask2FormerDetector",
                "init_args": {"pretrained": tiny_geneval["m2f"], "max_per_image": 3},
            },
            "color_classifier": tiny_geneval["clip"],
        },
    )
    assert isinstance(reward.detector, Mask2FormerDetector) and reward.detector.max_per_image == 3
    assert isinstance(reward.color_classifier, ClipColorClassifier)
    assert set(reward(torch.rand(1, 3, 32, 32), [RED_CAR["prompt"]]).tolist()) <= {0.0, 1.0}


def test_geneval_served_by_the_reward_server_scores_as_it_does_in_process(tiny_geneval):
    # what the GenEval recipes do: the reward server hosts GenEval, RemoteReward sends prompts and uint8
    # images
    from guardrl.rewards.remote import RemoteReward, images_to_uint8
    from tests.test_reward_server import _free_port, _kill, _start_server

    init_args = {
        "metadata": tiny_geneval["metadata"],
        "detector": tiny_geneval["m2f"],
        "color_classifier": tiny_geneval["clip"],
        "threshold": 0.0,
        "counting_threshold": 0.0,
    }
    port = _free_port()
    process = _start_server("guardrl.rewards.GenEval", init_args, port)
    try:
        images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
        prompts = [COUNT3["prompt"], RED_CAR["prompt"], DOG_LEFT_OF_CAT["prompt"]]
        served = RemoteReward(f"http://127.0.0.1:{port}", name="geneval", max_attempts=1)(images, prompts)
        quantised = torch.from_numpy(images_to_uint8(images)).permute(0, 3, 1, 2).float() / 255
        local = GenEval(**init_args)(quantised, prompts)
        torch.testing.assert_close(served, local, rtol=0, atol=1e-6)
        # the server's error reaches the trainer, at once (a wrong request is not retried)
        with pytest.raises(RewardError, match=r"refused the request \(422\).*'a unicorn' is not in metadata"):
            RemoteReward(f"http://127.0.0.1:{port}", name="geneval", max_attempts=3)(
                images[:1], ["a unicorn"]
            )
    finally:
        _kill(process)
