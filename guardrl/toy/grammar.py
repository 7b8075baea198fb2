"""Prompt text <-> PromptSpec, the enumerated vocabulary and the train / held-out split.

The grammar (GenEval's four compositional kinds, one sentence form each):
    single_object  "a red circle"
    counting       "two red circles", "three red circles"
    two_object     "a red circle and a blue square"            (different colors; both orders enumerated)
    position       "a red circle left of a blue square"        (also "right of", "above", "below")

Held-out prompts (never in the training file) are of two sorts, decided per object, not per sentence, so that
a held-out scene never leaks into training through a reworded prompt:
  pairing      the prompt contains one of HELDOUT_PAIRINGS, color-shape pairings that no training prompt has
               (each color and each shape still appears in training, with other partners);
  combination  the unordered pair of its two objects is one of the held-out combinations: a fixed
               HELDOUT_COMBINATION_FRACTION of the remaining object pairs, chosen by a hash of their text,
               never seen together in any training prompt (in either order, with any relation).

Run `python -m guardrl.toy.grammar --write DIR` to write DIR/train.txt and DIR/heldout.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

from guardrl.toy.world import COLORS, KINDS, MAX_COUNT, RELATIONS, SHAPES, ObjectSpec, PromptSpec

COUNT_WORDS = {2: "two", 3: "three"}
HELDOUT_PAIRINGS: tuple[ObjectSpec, ...] = (
    ObjectSpec("blue", "circle"),
    ObjectSpec("magenta", "square"),
    ObjectSpec("yellow", "triangle"),
)
HELDOUT_COMBINATION_FRACTION = 0.15
SPLITS = ("train", "heldout")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: ObjectSpec) -> str:
    return f"{_article(obj.color)} {obj.color} {obj.shape}"


def prompt_text(spec: PromptSpec) -> str:
    """The one sentence of the grammar that states `spec`."""
    if spec.kind == "single_object":
        return _noun_phrase(spec.objects[0])
    if spec.kind == "counting":
        obj = spec.objects[0]
        return f"{COUNT_WORDS[spec.count]} {obj.color} {obj.shape}s"
    first, second = (_noun_phrase(obj) for obj in spec.objects)
    return f"{first} and {second}" if spec.relation is None else f"{first} {spec.relation} {second}"


_COLOR = "(" + "|".join(COLORS) + ")"
_SHAPE = "(" + "|".join(SHAPES) + ")"
_OBJECT = rf"an? {_COLOR} {_SHAPE}"
_SINGLE = re.compile(rf"{_OBJECT}")
_COUNTING = re.compile(rf"({'|'.join(COUNT_WORDS.values())}) {_COLOR} {_SHAPE}s")
_PAIR = re.compile(rf"{_OBJECT} (and|{'|'.join(RELATIONS)}) {_OBJECT}")
_FORMS = (
    '"a red circle"',
    '"two|three red circles"',
    '"a red circle and a blue square"',
    f'"a red circle <{"|".join(RELATIONS)}> a blue square"',
)


def parse_prompt(text: str) -> PromptSpec:
    """The PromptSpec a sentence of the grammar states (case, repeated spaces and a final period ignored)."""
    normalized = " ".join(text.lower().split()).removesuffix(".")
    if match := _SINGLE.fullmatch(normalized):
        return PromptSpec((ObjectSpec(*match.groups()),))
    if match := _COUNTING.fullmatch(normalized):
        word, color, shape = match.groups()
        count = next(n for n, w in COUNT_WORDS.items() if w == word)
        return PromptSpec((ObjectSpec(color, shape),), count=count)
    if match := _PAIR.fullmatch(normalized):
        color_a, shape_a, link, color_b, shape_b = match.groups()
        if color_a == color_b:
            raise ValueError(f"toy prompt {text!r}: the two objects must have different colors")
        return PromptSpec(
            (ObjectSpec(color_a, shape_a), ObjectSpec(color_b, shape_b)),
            relation=None if link == "and" else link,
        )
    raise ValueError(
        f"toy prompt {text!r} is not in the grammar: expected one of {', '.join(_FORMS)} "
        f"with colors {COLORS} and shapes {SHAPES}"
    )


def as_spec(prompt: str | PromptSpec) -> PromptSpec:
    return prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)


def _objects() -> list[ObjectSpec]:
    return [ObjectSpec(color, shape) for color in COLORS for shape in SHAPES]


def enumerate_specs(kind: str | None = None) -> list[PromptSpec]:
    """Every prompt of one kind (or of all kinds, in KINDS order), in a fixed order."""
    if kind is None:
        return [spec for k in KINDS for spec in enumerate_specs(k)]
    if kind == "single_object":
        return [PromptSpec((obj,)) for obj in _objects()]
    if kind == "counting":
        return [PromptSpec((obj,), count=n) for n in COUNT_WORDS for obj in _objects()]
    ordered_pairs = [(a, b) for a, b in itertools.permutations(_objects(), 2) if a.color != b.color]
    if kind == "two_object":
        return [PromptSpec(pair) for pair in ordered_pairs]
    if kind == "position":
        return [PromptSpec(pair, relation=rel) for rel in RELATIONS for pair in ordered_pairs]
    raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")


def enumerate_prompts(kind: str | None = None) -> list[str]:
    return [prompt_text(spec) for spec in enumerate_specs(kind)]


def sample_specs(num_specs: int, seed: int, kinds: Sequence[str] = KINDS) -> list[PromptSpec]:
    """`num_specs` specs drawn with replacement, kinds in turn (the same number of each, as GenEval weighs its
    kinds equally), uniformly within a kind; seeded, so evaluation sets are fixed."""
    rng = np.random.default_rng(seed)
    per_kind = [enumerate_specs(kind) for kind in kinds]
    return [
        per_kind[i % len(kinds)][int(rng.integers(len(per_kind[i % len(kinds)])))] for i in range(num_specs)
    ]


def _pair_key(a: ObjectSpec, b: ObjectSpec) -> str:
    """Order-free text key of two objects, e.g. 'blue square|red circle'."""
    return "|".join(sorted((f"{a.color} {a.shape}", f"{b.color} {b.shape}")))


@lru_cache(maxsize=1)
def heldout_combinations() -> frozenset[str]:
    """Pair keys (see `_pair_key`) of the held-out object combinations.

    Ranked by SHA-256 of the key rather than by a seeded shuffle, so the choice does not depend on the
    enumeration order and survives adding a color (existing pairs keep their hash).
    """
    eligible = sorted(
        {
            _pair_key(a, b)
            for a, b in itertools.combinations(_objects(), 2)
            if a.color != b.color and a not in HELDOUT_PAIRINGS and b not in HELDOUT_PAIRINGS
        }
    )
    ranked = sorted(eligible, key=lambda key: hashlib.sha256(key.encode()).hexdigest())
    return frozenset(ranked[: round(HELDOUT_COMBINATION_FRACTION * len(ranked))])


def heldout_reason(spec: PromptSpec) -> str | None:
    """'pairing', 'combination', or None for a training prompt."""
    if any(obj in HELDOUT_PAIRINGS for obj in spec.objects):
        return "pairing"
    if len(spec.objects) == 2 and _pair_key(*spec.objects) in heldout_combinations():
        return "combination"
    return None


def split_of(prompt: str | PromptSpec) -> str:
    return "train" if heldout_reason(as_spec(prompt)) is None else "heldout"


def split_prompts(split: str, kinds: Iterable[str] | None = None) -> list[str]:
    """The prompts of one split, kinds in KINDS order (or the order given), each kind in enumeration order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kinds = KINDS if kinds is None else tuple(kinds)
    return [prompt_text(spec) for kind in kinds for spec in enumerate_specs(kind) if split_of(spec) == split]


def write_prompt_file(path: str, prompts: Sequence[str]) -> str:
    """One prompt per line (the `.txt` format guardrl's prompt streams read). Returns the path."""
    if not path.endswith(".txt"):
        raise ValueError(f"prompt files are .txt, got {path!r}")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{prompt}\n" for prompt in prompts)
    return path


def write_split_files(directory: str, kinds: Iterable[str] | None = None) -> dict[str, str]:
    """Write `train.txt` and `heldout.txt` under `directory`; returns {split: path}."""
    kinds = None if kinds is None else tuple(kinds)
    return {
        split: write_prompt_file(os.path.join(directory, f"{split}.txt"), split_prompts(split, kinds))
        for split in SPLITS
    }


def split_counts() -> dict[str, dict[str, int]]:
    """{kind: {'train': n, 'pairing': n, 'combination': n}} for the docs and the tests."""
    counts: dict[str, dict[str, int]] = {}
    for kind in KINDS:
        row = {"train": 0, "pairing": 0, "combination": 0}
        for spec in enumerate_specs(kind):
            row[heldout_reason(spec) or "train"] += 1
        counts[kind] = row
    return counts


def near_misses(spec: PromptSpec) -> list[PromptSpec]:
    """Prompts one edit away from `spec` that no render of `spec` satisfies (for testing the verifier).

    Edits: one object's color (to a color the prompt does not use) or shape; the count; for two objects, the
    relation (any other one), the objects' order under the same relation, or dropping the second object.
    Edits that keep the scene true are left out: reordering "and", or the converse relation with swapped
    objects ("B right of A" is "A left of B").
    """
    objects = list(spec.objects)
    edits: list[PromptSpec] = []

    def with_object(i: int, obj: ObjectSpec) -> PromptSpec:
        return PromptSpec(
            tuple(obj if j == i else o for j, o in enumerate(objects)), spec.count, spec.relation
        )

    used_colors = {obj.color for obj in objects}
    for i, obj in enumerate(objects):
        edits += [with_object(i, ObjectSpec(c, obj.shape)) for c in COLORS if c not in used_colors]
        edits += [with_object(i, ObjectSpec(obj.color, s)) for s in SHAPES if s != obj.shape]
    if len(objects) == 1:
        edits += [PromptSpec(spec.objects, n) for n in range(1, MAX_COUNT + 1) if n != spec.count]
    else:
        edits.append(PromptSpec(spec.objects[:1]))
    if spec.relation is not None:
        edits += [PromptSpec(spec.objects, relation=r) for r in RELATIONS if r != spec.relation]
        edits.append(PromptSpec(spec.objects[::-1], relation=spec.relation))
    return edits


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", metavar="DIR", help="write DIR/train.txt and DIR/heldout.txt")
    args = parser.parse_args(argv)
    for kind, row in split_counts().items():
        print(
            f"{kind:14s} train {row['train']:5d}  held out: pairing {row['pairing']:4d}, "
            f"combination {row['combination']:4d}"
        )
    if args.write:
        for path in write_split_files(args.write).values():
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
