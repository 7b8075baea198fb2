"""GRPOModule end to end on the tiny SD3 model: where learning happens, ratio = 1 on-policy, logged names,
checkpoints, and the errors for impossible settings."""

import glob
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from guardrl.cli import main
from tests.conftest import tiny_fit_args


class CaptureOutputs(Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


def _cli(prompt_file, tmp_path, **overrides):
    return main(tiny_fit_args(prompt_file, str(tmp_path / "runs"), **overrides), run=False)


def _fit(cli, callbacks=(), ckpt_path=None):
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli.model


def _event_accumulator(log_root):
    (version_dir,) = glob.glob(os.path.join(log_root, "guardrl", "version_*"))
    accumulator = EventAccumulator(version_dir, size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_learning_happens_in_the_lora_adapter_only(prompt_file, tmp_path):
    cli = _cli(prompt_file, tmp_path)
    cli.model.configure_model()
    named = dict(cli.model.policy.transformer.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    model = _fit(cli)
    after = dict(model.policy.transformer.named_parameters())
    base = [n for n in before if "lora_" not in n]
    default = [n for n in before if ".default." in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base)
    assert all(not torch.equal(before[n], after[n]) for n in default if "lora_B" in n)
    # the old-policy snapshot is synced after every iteration (old_policy_sync_every = 1)
    for name in default:
        assert torch.equal(after[name], after[name.replace(".default.", ".old.")])
    assert model.num_iterations == 2
    # 2 iterations x 2 inner epochs x 1 minibatch = 4 optimizer steps
    assert cli.trainer.global_step == 4


@pytest.mark.parametrize(
    "variant", ["flow_grpo", "temp_reweight", "mean_revised", "ratio_norm", "grpo_guard"]
)
def test_ratio_is_exactly_one_on_the_first_update_and_moves_after(prompt_file, tmp_path, variant):
    capture = CaptureOutputs()
    cli = _cli(
        prompt_file,
        tmp_path,
        **{"--model.grpo.ratio_variant": variant, "--model.max_iterations": "1", "--trainer.logger": "false"},
    )
    _fit(cli, [capture])
    (outputs,) = capture.outputs
    step_stats = outputs["step_stats"]
    assert [s.step_index for s in step_stats] == [0, 1, 2]  # 4 steps, the last one deterministic
    for stats in step_stats:
        first_update, second_update = stats.log_ratio
        # one minibatch = the rollout batch, weights unchanged: the forward is recomputed bit for bit
        assert torch.equal(first_update, torch.zeros_like(first_update))
        assert torch.equal(stats.raw_log_ratio[0], torch.zeros_like(first_update))
        assert not torch.equal(second_update, torch.zeros_like(second_update))


def test_every_documented_name_is_in_the_tensorboard_events(prompt_file, tmp_path):
    _fit(_cli(prompt_file, tmp_path))
    accumulator = _event_accumulator(str(tmp_path / "runs"))
    scalars, histograms = set(accumulator.Tags()["scalars"]), set(accumulator.Tags()["histograms"])
    for k in (0, 1, 2):
        for name in ("ratio/mean", "ratio/std", "clip/frac_pos_upper", "clip/frac_neg_lower", "grad/norm"):
            assert f"{name}_t{k}" in scalars
        assert {f"ratio/log_ratio_t{k}", f"ratio/raw_log_ratio_t{k}"} <= histograms
    assert {"reward/mean", "train/loss", "train/kl", "reward/jpeg_compressibility/mean"} <= scalars
    # one point per GRPO iteration, on the iteration axis, for scalars and histograms alike
    assert [e.step for e in accumulator.Scalars("ratio/mean_t0")] == [0, 1]
    assert [e.step for e in accumulator.Histograms("ratio/log_ratio_t0")] == [0, 1]
    # train/kl is a KL: non-negative, and positive once the policy has moved
    assert all(e.value >= 0 for e in accumulator.Scalars("train/kl"))
    assert accumulator.Scalars("train/kl")[-1].value > 0


def test_checkpoint_keeps_trainable_state_and_resume_continues(prompt_file, tmp_path):
    overrides = {
        "--checkpoint.dirpath": str(tmp_path / "ckpt"),
        "--checkpoint.every_n_iterations": "1",
        "--trainer.logger": "false",
    }
    model = _fit(_cli(prompt_file, tmp_path, **overrides))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iteration=2.ckpt", "last.ckpt"]
    # weights_only: only tensors and plain Python values (RNG states as tensors, options as dicts)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    keys = list(checkpoint["state_dict"])
    # default + old adapters, 16 tensors each; no frozen base weight
    assert len(keys) == 32 and all("lora_" in k for k in keys)
    state = checkpoint["guardrl"]
    assert {k: state[k] for k in state if k != "rng"} == {
        "num_iterations": 2,
        "stream_position": 4,
        "num_skipped_updates": 0,
        "consecutive_skipped_updates": 0,
        "num_optimizer_steps": 4,
    }
    assert len(state["rng"]) == 1 and state["rng"][0]["torch"].dtype == torch.uint8

    resumed_cli = _cli(prompt_file, tmp_path, **{**overrides, "--model.max_iterations": "3"})
    resumed = _fit(resumed_cli, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.num_iterations == 3
    assert resumed_cli.datamodule.start_position == 4
    loaded = dict(resumed.policy.transformer.named_parameters())
    trained = dict(model.policy.transformer.named_parameters())
    # the resumed run started from the trained adapter, then took 2 more optimizer steps
    assert resumed_cli.trainer.global_step == 6
    assert any(not torch.equal(loaded[n], trained[n]) for n in trained if ".default." in n)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iteration=3.ckpt", "last.ckpt"]


def test_null_control_trains_on_advantages_shuffled_within_groups(prompt_file, tmp_path):
    runs = {}
    for name, flag in (("real", "false"), ("null", "true")):
        capture = CaptureOutputs()
        cli = _cli(
            prompt_file, tmp_path / name, **{"--model.grpo.null_control": flag, "--data.group_size": "4"}
        )
        _fit(cli, [capture])
        runs[name] = capture.outputs
    group = 4
    first_real, first_null = runs["real"][0], runs["null"][0]
    # Same seed, same first rollout and rewards: the null run's advantages are the real ones permuted per group.
    assert torch.equal(first_real["rewards"], first_null["rewards"])
    real_groups = first_real["advantages"].reshape(-1, group)
    null_groups = first_null["advantages"].reshape(-1, group)
    assert torch.equal(real_groups.sort(dim=1).values, null_groups.sort(dim=1).values)
    assert not torch.equal(real_groups, null_groups)


def test_full_finetune_and_kl_penalty_run(prompt_file, tmp_path):
    capture = CaptureOutputs()
    cli = _cli(
        prompt_file,
        tmp_path,
        **{
            "--model.lora": "null",
            "--model.grpo.kl_beta": "0.1",
            "--model.max_iterations": "1",
            "--trainer.logger": "false",
            "--model.optimizer": '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.001}}',
        },
    )
    model = _fit(cli, [capture])
    assert model.policy.lora is None
    kl_second_update = capture.outputs[0]["step_stats"][0].kl[1]
    assert float(kl_second_update.mean()) > 0


def test_ratio_norm_without_noise_is_refused(prompt_file, tmp_path):
    with pytest.raises(ValueError, match=r"ratio_variant='ratio_norm' \(RatioNorm\) needs a Gaussian step"):
        _cli(
            prompt_file,
            tmp_path,
            **{"--model.grpo.ratio_variant": "ratio_norm", "--model.sampling.noise_level": "0"},
        )


def test_minibatch_that_does_not_divide_the_batch_is_refused(prompt_file, tmp_path):
    cli = _cli(prompt_file, tmp_path, **{"--model.grpo.minibatch_size": "3", "--trainer.logger": "false"})
    with pytest.raises(ValueError, match=r"grpo.minibatch_size=3 must divide the rank's batch of 4"):
        _fit(cli)
