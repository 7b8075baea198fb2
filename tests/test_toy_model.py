"""The toy text-to-image model: shipped weights, the FlowBackbone interface, GRPO fit, seeded pretraining."""

import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from guardrl.cli import main
from guardrl.toy.backbone import ToyBackbone
from guardrl.toy.evaluate import evaluate_set, evaluation_set
from guardrl.toy.grammar import split_prompts
from guardrl.toy.model import (
    CONFIG_FILE,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
    ToyTextEncoder,
    count_parameters,
    load_toy_model,
    save_toy_model,
)
from guardrl.toy.pretrain import pretrain
from tests.conftest import tiny_fit_args

# Measured on the shipped weights (docs/toy_model.md): ODE, 10 steps, the shipped CFG scale (2), 8 held-out
# images per kind (32 in all, `evaluation_set("heldout", 8)`): colours right 96.9%, counts right 75.0%,
# shapes right 3.1%, kind-balanced pass rate 3.1% (1 image). The full pass rate is far below the 50%
# target (2.0% on 512 held-out images): shape is the bottleneck, so the guard pins what the model does
# learn, with a margin for float differences between machines.
COLOR_FLOOR, COUNT_FLOOR = 0.85, 0.6


@pytest.fixture(scope="module")
def shipped():
    backbone = ToyBackbone()
    backbone.load()
    return backbone


def test_shipped_weights_are_package_data_and_small():
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        path = os.path.join(WEIGHTS_DIR, name)
        assert os.path.isfile(path)
        assert os.path.getsize(path) < 8 * 2**20


def test_backbone_produces_images_through_the_flow_backbone_interface(shipped):
    assert shipped.transformer.config.in_channels == 3 and shipped.transformer.config.sample_size == 32
    assert not any(p.requires_grad for p in shipped.parameters())
    assert shipped.latent_numel() == 3 * 32 * 32
    sigmas = shipped.sigmas(10)
    assert len(sigmas) == 11 and float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    cond = shipped.encode_prompts(["a red circle", "two blue squares"], with_negative=True)
    assert cond.tensors["prompt_embeds"].shape == (2, 10, 64) and cond.tensors[
        "pooled_prompt_embeds"
    ].shape == (2, 64)
    assert cond.negative["prompt_embeds"].shape == (2, 10, 64)
    noise = shipped.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert noise.shape == (2, 3, 32, 32)
    v = shipped.velocity(noise, 0.5, cond, guidance_scale=3.0)
    assert v.shape == noise.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    images = shipped.decode(noise - 0.5 * v)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_backbone_rejects_other_resolutions_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="trained on 32 x 32"):
        ToyBackbone(resolution=64).load()
    with pytest.raises(FileNotFoundError, match="toy_model"):
        ToyBackbone(weights_path=str(tmp_path)).load()


def test_tokenizer_is_closed_vocabulary():
    encoder = ToyTextEncoder()
    ids = encoder.tokenize(["A red circle.", "", "a purple cat"])
    vocab = encoder.config.vocab
    assert [vocab[i] for i in ids[0, :3]] == ["a", "red", "circle"] and (ids[0, 3:] == 0).all()
    assert (ids[1] == 0).all()  # the null prompt is all padding
    assert vocab[int(ids[2, 1])] == "<unk>" and vocab[int(ids[2, 2])] == "<unk>"
    every_word = {w for p in split_prompts("train") + split_prompts("heldout") for w in p.split()}
    assert every_word <= set(vocab)


def test_save_load_round_trip(tmp_path):
    transformer, text_encoder, _ = load_toy_model()
    save_toy_model(str(tmp_path), transformer, text_encoder, note="copy")
    t2, e2, config = load_toy_model(str(tmp_path))
    assert config["note"] == "copy"
    for a, b in ((transformer, t2), (text_encoder, e2)):
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(pa, pb)  # the shipped weights are float16-exact


def test_pretraining_is_deterministic_from_a_seed(tmp_path):
    small = dict(num_layers=1, num_attention_heads=2, caption_projection_dim=64)
    runs = [
        pretrain(
            str(tmp_path / name),
            steps=10,
            seed=seed,
            stop_step=3,
            threads=1,
            transformer_config=small,
            verbose=False,
            batch_size=8,
            warmup_steps=2,
        )
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert [r["steps_done"] for r in runs] == [3, 3, 3]
    states = [
        {**r["modules"][0].state_dict(), **{f"text.{k}": v for k, v in r["modules"][1].state_dict().items()}}
        for r in runs
    ]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])
    # What was saved is what was trained (float16), with the progress in the config.
    t, _, config = load_toy_model(str(tmp_path / "a"))
    assert config["pretraining"]["steps_done"] == 3 and config["pretraining"]["finished"]
    assert torch.equal(t.state_dict()["proj_out.weight"], states[0]["proj_out.weight"].half().float())
    assert count_parameters(t) == count_parameters(runs[0]["modules"][0])


class SnapshotAfterEachOptimizerStep(Callback):
    """The policy's weights when training starts and after every optimizer step (a torch step post-hook)."""

    def on_train_start(self, trainer, pl_module):
        named = dict(pl_module.policy.transformer.named_parameters())
        self.trainable = [n for n, p in named.items() if p.requires_grad]
        self.start = {n: p.detach().clone() for n, p in named.items()}
        self.after_step = []

        def snapshot(optimizer, args, kwargs):
            self.after_step.append({n: named[n].detach().clone() for n in self.trainable})

        trainer.optimizers[0].register_step_post_hook(snapshot)


def test_two_grpo_iterations_on_the_toy_backbone_update_the_lora_adapter(tmp_path):
    prompts = tmp_path / "toy.txt"
    prompts.write_text("\n".join(split_prompts("train")[::97]) + "\n")
    args = tiny_fit_args(
        str(prompts),
        str(tmp_path / "runs"),
        **{"--model.backbone": "guardrl.toy.ToyBackbone", "--model.sampling.guidance_scale": "2.0"},
    )
    cli = main(args, run=False)
    record = SnapshotAfterEachOptimizerStep()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.model.num_iterations == 2
    assert isinstance(cli.model.backbone, ToyBackbone)
    assert cli.model.num_latent_elements == 3072
    # 2 iterations x 2 inner epochs x 1 minibatch = 4 optimizer steps, each one recorded
    assert cli.trainer.global_step == 4 and len(record.after_step) == 4
    start, (first, *_, last) = record.start, record.after_step
    lora_a = [n for n in record.trainable if "lora_A" in n]
    lora_b = [n for n in record.trainable if "lora_B" in n]
    assert lora_a and lora_b and len(lora_a) + len(lora_b) == len(record.trainable)
    # The first AdamW step (lr 0.01, weight decay 0.01, eps 1e-8) from B = 0, where A's gradient is 0:
    #   B: m_hat / (sqrt(v_hat) + eps) = g / (|g| + 1e-8), so each element moves by 0.01 * |g| / (|g| + 1e-8),
    #      at most 0.01 and 0.01 to within 1% wherever |g| >= 1e-6 (measured: mean 0.009997, 99.96% > 0.009)
    #   A: only the decoupled decay, A <- A (1 - 0.01 * 0.01) = A - 1e-4 A
    # A no-op update leaves every difference at 0.
    moved_b = torch.cat([(first[n] - start[n]).abs().flatten() for n in lora_b])
    assert float(moved_b.max()) <= 0.01 + 1e-7
    assert 0.0095 <= float(moved_b.mean()) <= 0.01
    for name in lora_a:
        torch.testing.assert_close(first[name], start[name] * (1 - 1e-4), atol=1e-7, rtol=0)
    # every later step moves the weights again: by more than 1e-3 somewhere (measured max 0.0067-0.0082),
    # and by at most ~1.01 lr per element (Adam's bias-corrected step for t <= 4) plus the 1e-4 A decay, so
    # the four add up to between one lr and 4 x 0.0101 + 4e-4 = 0.0408 (measured 0.032)
    for before, after in zip(record.after_step, record.after_step[1:]):
        assert max(float((after[n] - before[n]).abs().max()) for n in record.trainable) > 1e-3
    total = max(float((last[n] - start[n]).abs().max()) for n in record.trainable)
    assert 0.01 < total < 0.0408
    # control: the frozen weights (the base model) are bitwise untouched
    frozen = [n for n in start if n not in record.trainable and "lora_" not in n]
    assert frozen
    after_fit = dict(cli.model.policy.transformer.named_parameters())
    assert all(torch.equal(start[n], after_fit[n]) for n in frozen)


def test_shipped_model_pass_rate_regression_guard(shipped):
    guidance = shipped.model_config["evaluation"]["guidance_scale"]
    result = evaluate_set(shipped, "heldout", per_kind=8, guidance_scale=guidance, sde=False, gold=False)
    assert result["images"] == len(evaluation_set("heldout", 8)) == 32
    assert result["check_colors"] >= COLOR_FLOOR and result["check_counts"] >= COUNT_FLOOR, result
