"""GenEval's rules, as pure functions: which detections count, where objects are relative to each other,
and whether an image satisfies its prompt's metadata.

Sources (read, not copied): GenEval (Ghosh et al. 2023, arXiv 2310.11513), `evaluation/evaluate_images.py`
of github.com/djghosh13/geneval (`evaluate`, `relative_position`, the per-class selection in
`evaluate_image`, and its defaults threshold 0.3, counting threshold 0.9, 16 objects per class, no NMS,
position threshold 0.1); and FlowGRPO's reward server, `reward_server/gen_eval.py` of
github.com/yifan123/reward-server (`evaluate_reward`), whose partial score FlowGRPO trains on.

Three scores of one image, all computed from the same selected detections:

* `correct` (GenEval's metric): every `include` clause has at least `count` objects of its class, the
  first `count` of them (by confidence) have the colour asked for, and each of them is at the asked position
  of every object of the clause it refers to; no `exclude` clause is met (`count` or more objects). GenEval's
  counting prompts pair "include n" with "exclude n + 1", i.e. exactly n.
* `strict` (the reward server's `strict_correct`): like `correct` but counts must be exact (`==`) and
  `exclude` clauses are not read.
* `partial` (the reward server's `score`, FlowGRPO's GenEval training reward): the mean of one term per
  check, reproduced with its quirks, which change the reward's values and so a published recipe's dynamics:
  - count term `1 - |count - found| / count`, which is NEGATIVE when more than twice `count` objects are
    found (one "cat" asked, three found: -1);
  - when the count is wrong, a single 0 stands for the colour and position checks (even when both are asked);
  - colour term `1 - |count - n_with_colour| / count`;
  - position: a failed pair adds 0 AND the loop's closing 1 (a failed position check adds two terms, 0 and
    1), a passed one adds 1; a missing target adds 0;
  - no terms at all (no include clause) gives 0.

Detections are per GenEval class name: lists of `Detection(box, score, mask)`, box in pixels (x1, y1, x2, y2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

# GenEval's prompts/object_names.txt: the 80 COCO classes in detector order, three of them renamed.
GENEVAL_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
# COCO label names (as in detector configs) that GenEval renames.
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    """One detected object: box (x1, y1, x2, y2) in pixels, confidence, and its (H, W) bool mask or None."""

    box: tuple[float, float, float, float]
    score: float
    mask: Optional[np.ndarray] = field(default=None, compare=False)


@dataclass(frozen=True)
class Thresholds:
    """GenEval's selection settings (its `--options`): defaults are GenEval's and the reward server's."""

    threshold: float = 0.3  # confidence above which a detection counts
    counting_threshold: float = 0.9  # the same, for prompts tagged "counting"
    max_objects: int = 16  # per class, the most confident ones
    max_overlap: float = 1.0  # per-class NMS IoU; 1.0 = no NMS (GenEval's default)
    position_threshold: float = 0.1  # fraction of the two boxes' sizes ignored in the centre offset


@dataclass(frozen=True)
class Verdict:
    """An image against its metadata: GenEval's `correct`, the server's `strict` and `partial`, and why."""

    correct: bool
    strict: bool
    partial: float
    reasons: tuple[str, ...]


# A colour classifier for one image: (class name, objects) -> one colour name per object.
ColorFn = Callable[[str, list[Detection]], list[str]]


# ------------------------------------------------------------------------------------------- metadata


def check_metadata(metadata: dict, where: str) -> dict:
    """Validate one GenEval metadata record (a line of evaluation_metadata.jsonl / FlowGRPO's
    train_metadata.jsonl); `where` names it in errors. Returns it with positions as (str, int) tuples."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: a metadata record must be a JSON object, got {type(metadata).__name__}")
    for key in ("prompt", "tag"):
        if not isinstance(metadata.get(key), str) or not metadata[key]:
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {metadata.get(key)!r}")
    include = metadata.get("include", [])
    exclude = metadata.get("exclude", [])
    if not isinstance(include, list) or not isinstance(exclude, list):
        raise ValueError(f"{where}: 'include' and 'exclude' must be lists of clauses")
    checked_include = []
    for i, clause in enumerate(include):
        clause = _check_clause(clause, f"{where}: include[{i}]")
        if "color" in clause and clause["color"] not in COLORS:
            raise ValueError(
                f"{where}: include[{i}].color={clause['color']!r} is not one of GenEval's colours "
                f"{list(COLORS)}"
            )
        if "position" in clause:
            position = clause["position"]
            if not (isinstance(position, (list, tuple)) and len(position) == 2):
                raise ValueError(f"{where}: include[{i}].position={position!r} must be [relation, index]")
            relation, target = position
            if relation not in POSITIONS:
                raise ValueError(
                    f"{where}: include[{i}].position[0]={relation!r} must be one of {list(POSITIONS)}"
                )
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < i:
                raise ValueError(
                    f"{where}: include[{i}].position[1]={target!r} must index an earlier include "
                    f"clause (an int in 0..{i - 1})"
                    if i
                    else f"{where}: include[0] cannot have a position (it needs an earlier clause)"
                )
            clause["position"] = (relation, target)
        checked_include.append(clause)
    checked_exclude = [_check_clause(c, f"{where}: exclude[{i}]") for i, c in enumerate(exclude)]
    return {**metadata, "include": checked_include, "exclude": checked_exclude}


def _check_clause(clause, where: str) -> dict:
    if not isinstance(clause, dict):
        raise ValueError(f"{where} must be an object with 'class' and 'count', got {clause!r}")
    if clause.get("class") not in GENEVAL_CLASSES:
        raise ValueError(
            f"{where}.class={clause.get('class')!r} is not one of GenEval's 80 classes "
            f"(prompts/object_names.txt of GenEval, e.g. 'cat', 'tv remote')"
        )
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}.count={count!r} must be an int >= 1")
    return dict(clause)


def load_metadata(path: str) -> dict[str, dict]:
    """prompt -> metadata from a .jsonl file (one record per line). The same prompt twice with different
    metadata is refused: the reward could not know which one a sample was drawn with."""
    by_prompt: dict[str, dict] = {}
    try:
        handle = open(path, encoding="utf-8")
    except OSError as error:
        raise ValueError(
            f"GenEval metadata={path!r}: cannot read it ({error.strerror}); it must be a .jsonl "
            "file of GenEval metadata records (e.g. FlowGRPO's dataset/geneval/train_metadata.jsonl)"
        )
    with handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"GenEval metadata {path!r} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            record = check_metadata(record, where)
            previous = by_prompt.get(record["prompt"])
            if previous is not None and _comparable(previous) != _comparable(record):
                raise ValueError(
                    f"{where}: prompt {record['prompt']!r} appears earlier with different metadata"
                )
            by_prompt[record["prompt"]] = record
    if not by_prompt:
        raise ValueError(f"GenEval metadata={path!r} holds no records")
    return by_prompt


def _comparable(record: dict) -> str:
    return json.dumps({k: record.get(k) for k in ("tag", "include", "exclude")}, sort_keys=True)


# ------------------------------------------------------------------------------------------- detections


def box_iou(a, b) -> float:
    """GenEval's IoU, with its +1 pixel convention on widths and heights."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(
    detections: dict[str, list[Detection]], tag: str, thresholds: Thresholds = Thresholds()
) -> dict[str, list[Detection]]:
    """GenEval's per-class selection: above the confidence threshold (a stricter one for counting prompts),
    most confident first, at most `max_objects`, then greedy NMS unless max_overlap is 1. Classes with no
    object left are absent."""
    threshold = thresholds.counting_threshold if tag == "counting" else thresholds.threshold
    selected = {}
    for classname, found in detections.items():
        # stable sort on -score: ties keep the detector's order
        ordered = sorted((d for d in found if d.score > threshold), key=lambda d: -d.score)[
            : thresholds.max_objects
        ]
        kept: list[Detection] = []
        while ordered:
            best = ordered.pop(0)
            kept.append(best)
            if thresholds.max_overlap != 1:
                ordered = [d for d in ordered if box_iou(best.box, d.box) < thresholds.max_overlap]
        if kept:
            selected[classname] = kept
    return selected


def relative_position(box_a, box_b, position_threshold: float = 0.1) -> set[str]:
    """Where A is relative to B: the centre offset, shrunk per axis by `position_threshold` x the two boxes'
    sizes along it (clamped at 0), divided by the unshrunk offset's length; a component beyond +-0.5 names a
    relation ("left of", "right of", "above", "below"; y grows downwards). Nearly concentric boxes: none."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    sizes = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - position_threshold * sizes, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


# ------------------------------------------------------------------------------------------- verdicts


def judge(
    objects: dict[str, list[Detection]], metadata: dict, colors: ColorFn, position_threshold: float = 0.1
) -> Verdict:
    """All three scores of one image (module docstring). `objects` come from `select_objects`."""
    correct, reasons = _geneval_correct(objects, metadata, colors, position_threshold)
    strict, partial = _server_partial(objects, metadata, colors, position_threshold)
    return Verdict(correct=correct, strict=strict, partial=partial, reasons=tuple(reasons))


def _position_failure(found, targets, relation, position_threshold) -> Optional[str]:
    for obj in found:
        for target in targets:
            actual = relative_position(obj.box, target.box, position_threshold)
            if relation not in actual:
                return f"expected {relation} target, found {' and '.join(sorted(actual)) or 'no relation'}"
    return None


def _geneval_correct(objects, metadata, colors: ColorFn, position_threshold) -> tuple[bool, list[str]]:
    """GenEval's `evaluate`: at least `count`, colour and position on the `count` most confident objects."""
    correct, reasons, groups = True, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                n_color = colors(name, found).count(clause["color"])
                if n_color < count:
                    matched = False
                    reasons.append(f"expected {clause['color']} {name}>={count}, found {n_color}")
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    failure = _position_failure(found, groups[target], relation, position_threshold)
                    if failure:
                        matched = False
                        reasons.append(f"{name}: {failure}")
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        n = len(objects.get(clause["class"], []))
        if n >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n}")
    return correct, reasons


def _server_partial(objects, metadata, colors: ColorFn, position_threshold) -> tuple[bool, float]:
    """The reward server's `evaluate_reward`: exact counts, and the mean of its per-check terms (quirks in
    the module docstring)."""
    strict, terms, groups = True, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])  # all selected objects, not only the first `count`
        terms.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                n_color = colors(name, found).count(clause["color"])
                terms.append(1 - abs(count - n_color) / count)
                matched = n_color == count
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    matched = False
                    terms.append(0.0)
                else:
                    if _position_failure(found, groups[target], relation, position_threshold):
                        matched = False
                        terms.append(0.0)
                    terms.append(1.0)  # the server appends 1 after its loop, failed or not
        strict = strict and matched
        groups.append(found if matched else None)
    partial = sum(terms) / len(terms) if terms else 0.0
    return strict, float(partial)
