"""The toy world's hackable proxy reward (guardrl/toy/proxy*.py, docs/toy_proxy.md): shipped weights,
agreement with the exact verifier, seeded training, the pixel hack, bad inputs."""

import json
import math
import os

import pytest
import torch

from guardrl.rewards.base import Reward
from guardrl.toy.grammar import as_spec, split_of, split_prompts
from guardrl.toy.model import count_parameters
from guardrl.toy.proxy_attack import HACK_SEED, _hack_row, hack
from guardrl.toy.proxy_data import labelled_renders, training_batch
from guardrl.toy.proxy_evaluation import evaluation_set
from guardrl.toy.proxy_net import CONFIG_FILE, WEIGHTS_DIR, WEIGHTS_FILE
from guardrl.toy.proxy_reward import ToyProxyReward, prompt_targets, relation_log_prob
from guardrl.toy.proxy_training import build_net, train
from guardrl.toy.render import render_batch
from guardrl.toy.world import KINDS
from tests.published_recipes import TOY_PROXY

# On the 32 held-out renders of `heldout` below, the shipped weights rank the own prompt above the mismatched
# one and above the near miss on 32 / 32 images (mean gaps 23.0 and 19.4 nats; own prompt -0.004 on average);
# on 1,024 renders, 100% (docs/toy_proxy.md). The floors leave room for float differences between machines.
WIN_RATE_FLOOR = 0.9


@pytest.fixture(scope="module")
def reward():
    return ToyProxyReward()


@pytest.fixture(scope="module")
def heldout():
    """32 clean renders of held-out prompts (8 per kind) with a near miss and a mismatched prompt each."""
    data = evaluation_set("heldout", 32, seed=7)
    images, _ = labelled_renders(data["prompts"], data["seeds"])
    return data, images


def test_shipped_weights_are_package_data_small_and_as_documented(reward):
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        assert os.path.isfile(os.path.join(WEIGHTS_DIR, name))
    assert os.path.getsize(os.path.join(WEIGHTS_DIR, WEIGHTS_FILE)) < 2 * 2**20
    with open(os.path.join(WEIGHTS_DIR, CONFIG_FILE)) as f:
        record = json.load(f)
    # The shipped record against what docs/toy_proxy.md publishes (tests/published_recipes.py, with quotes)
    for key, row in TOY_PROXY.items():
        value = record
        for part in key.split("."):
            value = value[part]
        assert value == row.value, f"{key}={value!r}; {row.source}"
    # and the loaded network itself: its parameter count, counted here, is the documented one
    assert count_parameters(reward) == TOY_PROXY["parameters"].value


def test_shipped_reward_scores_finite_log_probabilities_and_is_frozen(reward, heldout):
    data, images = heldout
    scores = reward(images, data["prompts"])
    assert scores.shape == (32,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert (scores <= 1e-5).all()  # a sum of log-probabilities
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()  # Lightning does this to the whole module tree; the scorer stays in eval mode
    assert not reward.net.training
    assert torch.equal(reward(images, data["prompts"]), scores)


def test_own_prompt_scores_above_wrong_prompts_on_held_out_renders(reward, heldout):
    data, images = heldout
    own = reward(images, data["prompts"])
    assert own.mean() > -1.0  # about 0: the proxy is confident of what clean renders show
    for wrong in ("mismatched", "near_miss"):
        other = reward(images, data[wrong])
        assert (own > other).double().mean() >= WIN_RATE_FLOOR, wrong
        assert (own - other).mean() > 5.0  # nats


def test_every_kind_is_judged_including_position(reward):
    prompts = ["a red circle left of a green square"] * 2
    images = render_batch(prompts, [0, 1])
    right = reward(images, prompts)
    swapped = reward(images, ["a red circle right of a green square"] * 2)
    extra = reward(images, ["three red circles"] * 2)
    assert (right > swapped + 3).all() and (right > extra + 3).all()
    by_kind = {kind: split_prompts("heldout", [kind])[0] for kind in KINDS}
    images = render_batch(list(by_kind.values()), [3] * 4)
    assert (reward(images, list(by_kind.values())) > -1.0).all()


def test_relation_probability_follows_the_world_convention():
    def point(i: int) -> torch.Tensor:  # a certain bin, as a log-distribution over 16 bins
        return torch.full((1, 16), -1e9).index_fill_(1, torch.tensor([i]), 0.0)

    a_x, a_y, b_x, b_y = point(2), point(8), point(10), point(9)  # B right of A, about level
    for name, relation, expected in (("left of", 0, 1.0), ("right of", 1, 0.0), ("above", 2, 0.0)):
        p = relation_log_prob(a_x, a_y, b_x, b_y, torch.tensor([relation])).exp().item()
        assert p == pytest.approx(expected, abs=1e-6), name


def test_training_data_are_training_prompts_and_exact_renders():
    train_prompts = {kind: split_prompts("train", [kind]) for kind in KINDS}
    prompts, images, labels = training_batch(0, 3, 16, train_prompts, ToyProxyReward().net.config)
    assert all(split_of(p) == "train" for p in prompts)
    assert images.shape == (16, 3, 32, 32)
    assert labels["total"].tolist() == [len(as_spec(p).instances()) for p in prompts]
    again, images_again, _ = training_batch(0, 3, 16, train_prompts, ToyProxyReward().net.config)
    assert again == prompts and torch.equal(images, images_again)


def test_labelled_renders_are_render_batch():
    prompts, seeds = ["two red circles", "a blue circle above a green triangle"], [5, 6]
    images, labels = labelled_renders(prompts, seeds)
    assert torch.equal(images, render_batch(prompts, seeds))
    assert labels["count"].sum(1).tolist() == [2, 2] and labels["x"][0].max() == -100  # no single centre


def _weights(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, WEIGHTS_FILE))


def test_training_is_deterministic_from_the_seed_and_writes_both_files(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = str(tmp_path / name)
        train(out, steps=3, seed=seed, eval_size=0, verbose=False, batch_size=4)
        assert sorted(os.listdir(out)) == [CONFIG_FILE, WEIGHTS_FILE]  # no .tmp left behind
        runs[name] = _weights(out)
    assert runs["a"].keys() == runs["c"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])
    with open(tmp_path / "a" / CONFIG_FILE) as f:
        record = json.load(f)
    assert record["training"]["steps_done"] == 3 and record["training"]["seed"] == 0
    assert "--seed 0 --steps 3" in record["training"]["command"]
    assert len(record["training"]["log"]) == 1 and math.isfinite(record["training"]["log"][0]["loss"])
    ToyProxyReward(str(tmp_path / "a"))  # a training directory loads as a reward


def test_initialisation_comes_from_the_seed_alone():
    state = torch.random.get_rng_state()
    first, again, other = (build_net(seed).state_dict() for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first if k.endswith("weight"))


@pytest.fixture(scope="module")
def hack_set():
    data = evaluation_set("heldout", 8, HACK_SEED)
    images, _ = labelled_renders(data["prompts"], data["seeds"])
    return data, images


def _hacked(reward, start, texts, **settings):
    hacked = hack(reward, start, texts, **settings)
    return hacked, _hack_row(reward, start, texts), _hack_row(reward, hacked, texts)


# Measured on these 8 images (docs/toy_proxy.md has the 256-image figures): from black, mean proxy -55.8 ->
# -20.0 (every image gains >= 10.6 nats), off-palette 0 -> 0.36; own prompt -0.022 -> -0.004, off-palette
# 0 -> 0.35, verifier 100% -> 100%; near misses -24.8 -> -16.1.


def test_hack_from_the_empty_scene_raises_the_proxy_a_lot_but_not_the_verifier(reward, hack_set):
    data, images = hack_set
    start = torch.zeros_like(images)
    hacked, before, after = _hacked(reward, start, data["prompts"], epsilon=1.0, steps=15, step_size=0.05)
    assert after["proxy"].mean() > before["proxy"].mean() + 20.0  # nats
    assert (after["proxy"] > before["proxy"] + 3.0).all()
    assert before["verifier"].sum() == 0 and after["verifier"].sum() == 0
    assert before["off_palette"].max() == 0 and after["off_palette"].mean() > 0.2


def test_hack_within_epsilon_leaves_the_verifier_flat_and_leaves_the_palette(reward, hack_set):
    data, images = hack_set
    hacked, before, after = _hacked(reward, images, data["prompts"], epsilon=0.15, steps=5, step_size=0.05)
    assert (hacked - images).abs().max() <= 0.15 + 1e-6 and hacked.min() >= 0 and hacked.max() <= 1
    assert after["proxy"].mean() > before["proxy"].mean()
    assert before["verifier"].all() and after["verifier"].all()  # 0.26 RGB distance at most: inside 0.35
    assert before["off_palette"].max() == 0 and after["off_palette"].mean() > 0.2
    texts = data["near_miss"]  # one edit away: no render shows them
    _, before, after = _hacked(reward, images, texts, epsilon=0.15, steps=10, step_size=0.03)
    assert after["proxy"].mean() > before["proxy"].mean() + 2.0
    assert after["verifier"].sum() == 0


def test_missing_weights_directory_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.rewards\[\.\.\.\]\.init_args\.weights_path=.*proxy"):
        ToyProxyReward(str(tmp_path / "nowhere"))


def test_prompt_outside_the_grammar_names_the_option(reward):
    images = render_batch(["a red circle"], [0])
    with pytest.raises(ValueError, match=r"data\.train_prompts.*'a cat' is not in the grammar"):
        reward(images, ["a cat"])


def test_forward_checks_shapes_as_a_reward(reward):
    assert isinstance(reward, Reward) and reward.name == "toy_proxy" and reward.weight == 1.0
    images = render_batch(["a red circle", "two blue squares"], [0, 1])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(images, ["a red circle"])
    with pytest.raises(ValueError, match=r"resolution=32"):
        reward(torch.zeros(1, 3, 64, 64), ["a red circle"])
    named = ToyProxyReward(weight=0.5, name="proxy")
    assert named.name == "proxy" and named.weight == 0.5
    assert prompt_targets([as_spec("two blue squares")]).total.tolist() == [2]
