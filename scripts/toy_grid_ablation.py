"""Ablation of the toy world's layout: does aligning object boxes to the transformer's 4-pixel patch grid make
shapes learnable sooner? (docs/toy_model.md, "What was tried")

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/toy_grid_ablation.py base 1500 runs/ablation_base
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/toy_grid_ablation.py grid 1500 runs/ablation_grid

`base` pretrains on the shipped world (boxes of 9-12 px anywhere); `grid` replaces the renderer's layout with
boxes of 8 or 12 px at multiples of 4 (each box covers whole 4 x 4 patches), all else equal (seed, schedule,
settings of guardrl.toy.pretrain). Each then prints the verifier's check rates on 32 prompts per kind, held
out and train, ODE at CFG 2 and 4. About 20 minutes each for 1,500 steps on one thread (two at once on 2
cores).
"""

import json
import sys

import numpy as np

import guardrl.toy.render as render
from guardrl.toy import evaluate
from guardrl.toy.backbone import ToyBackbone
from guardrl.toy.pretrain import pretrain
from guardrl.toy.world import relation_offsets

GRID, SIZES, GAP, CANDIDATES = 4, (8, 12), 2, 256


def grid_layout(spec, rng, image_size=32):
    """render.sample_layout with box sizes in SIZES and corners on multiples of GRID (no border)."""
    for _ in range(render.MAX_RESTARTS):
        placed = []
        for obj in spec.instances():
            sizes = rng.choice(np.array(SIZES), size=CANDIDATES)
            xs = GRID * rng.integers(0, (image_size - sizes) // GRID + 1)
            ys = GRID * rng.integers(0, (image_size - sizes) // GRID + 1)
            fits = np.ones(CANDIDATES, dtype=bool)
            for other in placed:
                fits &= (
                    (xs + sizes + GAP <= other.x)
                    | (other.x + other.size + GAP <= xs)
                    | (ys + sizes + GAP <= other.y)
                    | (other.y + other.size + GAP <= ys)
                )
            if spec.relation is not None and placed:
                along, across = relation_offsets(
                    spec.relation, placed[0].center2, (2 * xs + sizes, 2 * ys + sizes)
                )
                fits &= (along > 0) & (along >= render.RELATION_DOMINANCE * across)
            if not fits.any():
                break
            i = int(np.argmax(fits))
            placed.append(render.PlacedObject(obj, int(xs[i]), int(ys[i]), int(sizes[i])))
        else:
            return placed
    raise RuntimeError(f"no grid layout for {spec}")


def main() -> None:
    variant, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if variant not in ("base", "grid"):
        raise SystemExit(f"variant must be 'base' or 'grid', got {variant!r}")
    if variant == "grid":
        render.sample_layout = grid_layout
    pretrain(out, steps, seed=0, threads=1, save_every=1e9, log_every=100)
    backbone = ToyBackbone(weights_path=out)
    for split in ("heldout", "train"):
        rows = {
            cfg: {
                k: round(v, 4)
                for k, v in evaluate.evaluate_set(backbone, split, 32, cfg, sde=False, gold=False).items()
            }
            for cfg in (2.0, 4.0)
        }
        print(split, json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
