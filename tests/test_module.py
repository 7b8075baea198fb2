"""GRPOModule end to end on the tiny SD3 model: where learning happens, ratio = 1 on-policy, logged names,
checkpoints, and the errors for impossible settings."""

import glob
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from guardrl.algorithm import RATIO_VARIANTS
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


@pytest.mark.parametrize("variant", list(RATIO_VARIANTS))  # every registered variant, no hand list
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
        # the loss's own clip flags travel with the statistics (what the callbacks count)
        assert len(stats.clipped_upper) == len(stats.clipped_lower) == 2
        assert not stats.clipped_upper[0].any() and not stats.clipped_lower[0].any()
        c = outputs["clip_range"]
        assert torch.equal(stats.clipped_upper[1], second_update.exp() > 1 + c)
        assert torch.equal(stats.clipped_lower[1], second_update.exp() < 1 - c)


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
    # Same seed, same first rollout and rewards: the null run's advantages are the real ones permuted per
    # group.
    assert torch.equal(first_real["rewards"], first_null["rewards"])
    real_groups = first_real["advantages"].reshape(-1, group)
    null_groups = first_null["advantages"].reshape(-1, group)
    assert torch.equal(real_groups.sort(dim=1).values, null_groups.sort(dim=1).values)
    assert not torch.equal(real_groups, null_groups)


def test_full_finetune_with_a_kl_penalty_trains_every_weight_and_the_kl_leaves_zero(prompt_file, tmp_path):
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
    cli.model.configure_model()
    before = [p.detach().clone() for p in cli.model.policy.transformer.parameters()]
    model = _fit(cli, [capture])
    assert model.policy.lora is None
    trainable = model.policy.trainable_parameters()
    assert len(trainable) == len(before)  # full fine-tuning: every transformer weight is trained
    assert (
        sum(not torch.equal(b, p) for b, p in zip(before, model.policy.transformer.parameters()))
        > len(before) // 2
    )
    kl_first_update, kl_second_update = capture.outputs[0]["step_stats"][0].kl
    # the policy starts as the reference (KL exactly 0), and has moved away by the second update
    assert torch.equal(kl_first_update, torch.zeros_like(kl_first_update))
    assert float(kl_second_update.mean()) > 0


def test_kl_penalty_adds_beta_times_the_hand_worked_kl_to_the_loss_and_its_gradient():
    """The KL term of `_step_loss` on a case built by hand: one trained step, two samples of D = 4 elements,
    a policy velocity a (a scalar with a gradient) and a reference velocity b, everywhere.

    t = 0.5, t_next = 0.25 (dt = -0.25), sigma_k = 0.7: s = 0.7 sqrt(0.25) = 0.35. The step's mean is
    mu = x + (v + sigma_k^2 / (2t) (x + (1 - t) v)) dt, so d mu / dv = dt (1 + 0.49 * 0.5 / 1) = -0.25 * 1.245
    = -0.31125 whatever x, and mu_theta - mu_ref = -0.31125 (a - b). With a - b = 0.7 - 0.5 = 0.2:
        dmu = -0.06225,  KL = dmu^2 / (2 s^2) = 0.0038750625 / 0.245 = 0.0158165816 per element
    ("mean" reduction: per element, the same for every element and sample, so the batch KL too).
    With kl_beta = 0.1 the loss gains 0.1 * KL = 0.00158165816, and d(loss)/da gains
        0.1 * dmu * (-0.31125) / s^2 = 0.1 * 0.0193753125 / 0.1225 = 0.0158165816,
    everything else (the clipped policy term: ratio 1, on-policy) being the same as with kl_beta = 0.
    """
    from guardrl.module import GRPOModule
    from guardrl.options import GRPOOptions
    from guardrl.policy import TinySD3Backbone
    from guardrl.policy.backbones import Conditioning
    from guardrl.rewards import JpegCompressibility
    from guardrl.types import StepStats, Trajectory
    from guardrl.update import step_loss

    # The old mean is the policy's own mean at a = 0.7 (on-policy), by hand:
    #   x = 1:   1 + (0.7 + 0.49 * (1 + 0.5 * 0.7)) * -0.25 = 1 - 0.340375 = 0.659625
    #   x = 0.5: 0.5 + (0.7 + 0.49 * (0.5 + 0.5 * 0.7)) * -0.25 = 0.5 - 0.279125 = 0.220875
    x = torch.tensor([1.0, 0.5]).view(2, 1, 1, 1, 1).expand(2, 1, 1, 2, 2).contiguous()
    mean_old = torch.tensor([0.659625, 0.220875]).view(2, 1, 1, 1, 1).expand(2, 1, 1, 2, 2).contiguous()
    eps = torch.tensor([1.0, -1.0, 0.5, -0.5]).view(1, 1, 1, 2, 2).expand(2, 1, 1, 2, 2)
    trajectory = Trajectory(
        step_indices=[0],
        latents_BTCHW=x,
        next_latents_BTCHW=mean_old + 0.35 * eps,
        mean_old_BTCHW=mean_old,
        log_prob_old_BT=torch.zeros(2, 1),
        sigma_T=torch.tensor([0.5]),
        sigma_next_T=torch.tensor([0.25]),
        noise_scale_T=torch.tensor([0.7]),
        final_latents=torch.zeros(2, 1, 2, 2),
    )
    cond = Conditioning({"prompt_embeds": torch.zeros(2, 3, 8), "pooled_prompt_embeds": torch.zeros(2, 8)})
    results = {}
    for beta in (0.0, 0.1):
        module = GRPOModule(
            TinySD3Backbone(seed=0),
            [JpegCompressibility()],
            grpo=GRPOOptions(ratio_variant="flow_grpo", kl_beta=beta, track_kl=True),
            group_size=2,
        )
        module.configure_model()
        a = torch.tensor(0.7, requires_grad=True)
        calls = []

        def velocity(latents, t, step_cond, guidance_scale=1.0, transformer=None, _a=a):
            calls.append("policy" if transformer is None else "reference")
            return (_a if transformer is None else torch.tensor(0.5)).expand_as(latents)

        module.backbone.velocity = velocity
        stats = StepStats(step_index=0)
        loss, kl = step_loss(module, trajectory, 0, torch.arange(2), cond, torch.tensor([1.0, -1.0]), stats)
        loss.backward()
        assert calls == ["policy", "reference"]
        assert torch.equal(stats.log_ratio[0], torch.zeros(2))  # on-policy: the ratio is exactly 1
        results[beta] = (float(loss), float(kl), float(a.grad), stats.kl[0])
    (loss_0, kl_0, grad_0, kl_b0), (loss_1, kl_1, grad_1, kl_b1) = results[0.0], results[0.1]
    # the KL is tracked either way, and equals the hand value for both samples
    for value in (kl_0, kl_1, *kl_b0.tolist(), *kl_b1.tolist()):
        assert value == pytest.approx(0.0158165816, rel=1e-5)
    # and only kl_beta > 0 puts it into the loss and the gradient, scaled by beta
    assert loss_1 - loss_0 == pytest.approx(0.00158165816, rel=1e-4)
    assert grad_1 - grad_0 == pytest.approx(0.0158165816, rel=1e-4)


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
