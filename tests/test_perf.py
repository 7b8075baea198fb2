"""guardrl/perf.py and the performance options: exact FLOP counts per phase, throughput and MFU from a known
clock, gradient checkpointing that recomputes (and changes nothing else), torch.compile, bf16 autocast with
the log-probability math in float32, offloading. (Bad performance options: tests/test_bad_inputs.py.)"""

import torch
from lightning.pytorch.callbacks import Callback

import guardrl.perf as perf
from guardrl.cli import main
from guardrl.perf import FlopCounter, PhaseMeter, compute_dtype
from tests.conftest import tiny_fit_args


class CaptureOutputs(Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


class CaptureScalars(Callback):
    """Every scalar the module writes, by iteration (wraps guardrl.logs.write_scalars as the module uses
    it)."""

    def __init__(self, monkeypatch):
        import guardrl.module

        self.by_iteration = {}
        original = guardrl.module.write_scalars

        def write(trainer, metrics, iteration):
            self.by_iteration.setdefault(iteration, {}).update({k: float(v) for k, v in metrics.items()})
            return original(trainer, metrics, iteration)

        monkeypatch.setattr(guardrl.module, "write_scalars", write)


def _fit(prompt_file, log_dir, callbacks=(), **overrides):
    cli = main(
        tiny_fit_args(prompt_file, str(log_dir), **{"--trainer.logger": "false", **overrides}), run=False
    )
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli.model


def test_flop_counter_gives_the_closed_form_of_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(8, 16, requires_grad=True)
    with FlopCounter() as forward:
        y = layer(x)
    assert forward.total == 2 * 8 * 16 * 32
    with FlopCounter() as backward:
        y.square().sum().backward()
    # grad wrt the input and wrt the weight: two matmuls of the forward's size
    assert backward.total == 2 * (2 * 8 * 16 * 32)


def test_phase_meter_throughput_and_mfu_from_a_known_clock(monkeypatch):
    clock = {"now": 100.0}

    def perf_counter():
        clock["now"] += 0.25  # every reading advances the clock: a phase measures 0.25 s
        return clock["now"]

    monkeypatch.setattr(perf.time, "perf_counter", perf_counter)
    layer = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(8, 16)
    meter = PhaseMeter(torch.device("cpu"), peak_flops=32768.0, window=2)
    history = []
    for _ in range(3):
        with meter.phase("rollout"), torch.no_grad():
            layer(x)
        with meter.phase("reward"):
            pass
        history.append(meter.end_iteration(samples=8))
    first, second, third = history
    # the counted first iteration: times and FLOPs, never a throughput
    assert first["time/rollout_s"] == 0.25 and first["time/iteration_s"] == 0.5
    assert first["flops/rollout"] == 8192 and first["flops/reward"] == 0 and first["flops/model"] == 8192
    assert not any(key.startswith("throughput/") for key in first)
    # the window (2 iterations) fills with the third: 8192 FLOPs over 0.25 s of rollout
    assert not any(key.startswith("throughput/") for key in second)
    assert third["throughput/rollout/flops_per_sec"] == 8192 / 0.25
    assert third["throughput/rollout/mfu"] == 8192 / 0.25 / 32768.0
    assert third["throughput/rollout/samples_per_sec"] == 8 / 0.25
    assert third["throughput/iteration/flops_per_sec"] == 8192 / 0.5
    assert third["throughput/reward/samples_per_sec"] == 8 / 0.25
    assert "throughput/reward/flops_per_sec" not in third  # the reward's model is not the policy's


def test_every_phase_is_timed_and_its_flops_are_the_models_exact_count(prompt_file, tmp_path, monkeypatch):
    scalars = CaptureScalars(monkeypatch)
    model = _fit(
        prompt_file,
        tmp_path,
        [scalars],
        **{"--model.max_iterations": "3", "--model.performance.throughput_window": "2"},
    )
    logged = scalars.by_iteration
    for iteration in (0, 1, 2):
        for phase in ("encode", "rollout", "decode", "reward", "update"):
            assert logged[iteration][f"time/{phase}_s"] > 0
    assert logged[2]["throughput/rollout/flops_per_sec"] > 0
    assert "throughput/rollout/mfu" not in logged[2]  # no peak FLOP/s known for a CPU
    # Recount by hand with the same shapes: 2 prompts x 2 samples, 4 sampler steps (no CFG), trained steps
    # 0-2 (the last step is deterministic) x 2 inner epochs, each a policy forward + backward and a reference
    # forward (train/kl is tracked).
    backbone, policy = model.backbone, model.policy
    cond = backbone.encode_prompts(["a red circle", "a cat", "a blue square", "a dog"], with_negative=False)
    latents = backbone.initial_noise(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    with FlopCounter() as policy_forward, torch.no_grad(), policy.use_weights("old") as old:
        backbone.velocity(latents, 0.5, cond, 1.0, old)
    with FlopCounter() as forward_backward:
        backbone.velocity(latents, 0.5, cond, 1.0).square().sum().backward()
    with FlopCounter() as reference_forward, torch.no_grad(), policy.use_weights("reference") as reference:
        backbone.velocity(latents, 0.5, cond, 1.0, reference)
    with FlopCounter() as decode, torch.no_grad():
        backbone.decode(latents)
    flops = {k: v for k, v in logged[0].items() if k.startswith("flops/")}
    assert flops["flops/rollout"] == 4 * policy_forward.total
    assert flops["flops/update"] == 3 * 2 * (forward_backward.total + reference_forward.total)
    assert flops["flops/decode"] == decode.total
    assert flops["flops/model"] == flops["flops/rollout"] + flops["flops/update"] + flops["flops/decode"]
    assert reference_forward.total < policy_forward.total  # the adapters' own matmuls are off


def test_gradient_checkpointing_recomputes_the_blocks_and_changes_nothing_else(prompt_file, tmp_path):
    calls, trained = {}, {}
    for flag in ("false", "true"):
        counter = {"n": 0}

        class CountBlockCalls(Callback):
            # Wraps forward itself: torch's non-reentrant checkpoint recomputes without running module hooks.
            def on_train_start(self, trainer, pl_module):
                block = pl_module.policy.transformer.transformer_blocks[0]
                forward = block.forward

                def counted(*args, **kwargs):
                    counter["n"] += 1
                    return forward(*args, **kwargs)

                block.forward = counted

        model = _fit(
            prompt_file,
            tmp_path / flag,
            [CountBlockCalls()],
            **{
                "--model.max_iterations": "1",
                "--model.performance.gradient_checkpointing": flag,
            },
        )
        assert model.policy.transformer.gradient_checkpointing is (flag == "true")
        calls[flag] = counter["n"]
        trained[flag] = [p.detach().clone() for p in model.policy.trainable_parameters()]
    # 4 rollout forwards + 3 trained steps x 2 epochs x (policy + reference) = 16; checkpointing reruns each
    # of the 6 policy forwards in its backward
    assert calls == {"false": 16, "true": 22}
    assert all(torch.equal(a, b) for a, b in zip(trained["false"], trained["true"]))


def test_compile_after_the_counted_first_iteration_gives_the_same_training(prompt_file, tmp_path):
    results = {}
    for flag in ("false", "true"):
        model = _fit(
            prompt_file,
            tmp_path / flag,
            **{"--model.performance.compile": flag, "--model.performance.compile_backend": "eager"},
        )
        assert model._compiled is (flag == "true")
        assert (getattr(model.policy.transformer, "_compiled_call_impl", None) is not None) is (
            flag == "true"
        )
        results[flag] = [p.detach().clone() for p in model.policy.trainable_parameters()]
    # the "eager" backend runs the traced graph with the same kernels: bitwise the same weights
    assert all(torch.equal(a, b) for a, b in zip(results["false"], results["true"]))


def test_bf16_autocast_keeps_the_log_probability_math_in_float32(prompt_file, tmp_path):
    capture = CaptureOutputs()
    _fit(
        prompt_file,
        tmp_path,
        [capture],
        **{"--trainer.precision": "bf16-mixed", "--model.max_iterations": "1"},
    )
    (outputs,) = capture.outputs
    for stats in outputs["step_stats"]:
        first_update = stats.log_ratio[0]
        assert first_update.dtype == torch.float32 and stats.raw_log_ratio[0].dtype == torch.float32
        # the update recomputes the rollout's forward under the same autocast: the ratio is exactly 1
        assert torch.equal(first_update, torch.zeros_like(first_update))
    assert compute_dtype("bf16-mixed", torch.float32) is torch.bfloat16
    assert compute_dtype("16-mixed", torch.float32) is torch.float16
    assert compute_dtype("32-true", torch.bfloat16) is torch.bfloat16


def test_a_bfloat16_trajectory_keeps_the_first_updates_ratio_exactly_one(prompt_file, tmp_path):
    capture = CaptureOutputs()
    _fit(
        prompt_file,
        tmp_path,
        [capture],
        **{"--model.performance.trajectory_dtype": "bfloat16", "--model.max_iterations": "1"},
    )
    (outputs,) = capture.outputs
    assert len(outputs["step_stats"]) == 3  # steps 0-2 of 4 are SDE steps here
    for stats in outputs["step_stats"]:
        first_update = stats.log_ratio[0]
        assert first_update.dtype == torch.float32
        assert torch.equal(first_update, torch.zeros_like(first_update))
        assert torch.equal(stats.raw_log_ratio[0], torch.zeros_like(first_update))


COMPUTE = torch.device(
    "cpu", 0
)  # stands for the accelerator: not the offload target "cpu", yet runs on a CPU
OFFLOADABLE = ["text_encoder", "text_encoder_2", "text_encoder_3", "vae"]


class _OnCompute(torch.Tensor):
    """Latents that report COMPUTE as their device (decode onloads the VAE to the latents' device)."""

    @property
    def device(self):
        return COMPUTE


class RecordOffloading(Callback):
    """From on_fit_start (after Lightning moved the model to its device, before GRPOModule.on_fit_start
    offloads): every `.to(target)` of the offloadable modules and every forward of them, in order, as
    (name, str(target)) and (name, "use"). The text encoders go to the transformer's device, which reports
    COMPUTE; the VAE goes to the latents' device, which the decode entry point makes report COMPUTE."""

    def __init__(self):
        self.events = []

    def on_fit_start(self, trainer, pl_module):
        backbone = pl_module.backbone
        for name in OFFLOADABLE:
            module = getattr(backbone, name)
            original = module.to

            def recording(*args, _name=name, _original=original, **kwargs):
                self.events.append((_name, str(args[0] if args else kwargs.get("device"))))
                return _original(*args, **kwargs)

            module.to = recording
            used = module.decoder if name == "vae" else module  # decode() runs the decoder, not forward()
            used.register_forward_pre_hook(lambda *_, _name=name: self.events.append((_name, "use")))
        decode = backbone.decode
        backbone.decode = lambda latents: decode(latents.as_subclass(_OnCompute)).as_subclass(torch.Tensor)

    def of(self, name):
        return [event for module, event in self.events if module == name]


def test_a_run_with_offloaded_text_encoders_and_vae_trains_the_same_weights(
    prompt_file, tmp_path, monkeypatch
):
    # On CPU the compute device is the CPU, so the moves are made visible: the transformer reports cpu:0 as
    # its device, and so do the latents given to decode, while offloading targets "cpu".
    from diffusers import SD3Transformer2DModel

    monkeypatch.setattr(SD3Transformer2DModel, "device", property(lambda self: COMPUTE))
    results, records = {}, {}
    for flag in ("false", "true"):
        records[flag] = RecordOffloading()
        model = _fit(
            prompt_file,
            tmp_path / flag,
            [records[flag]],
            **{
                "--model.max_iterations": "1",
                "--model.backbone.init_args.offload_text_encoders": flag,
                "--model.backbone.init_args.offload_vae": flag,
            },
        )
        assert type(model.backbone.transformer) is SD3Transformer2DModel  # the patched device is the one used
        assert model.backbone.offloaded_modules() == (OFFLOADABLE if flag == "true" else [])
        results[flag] = [p.detach().clone() for p in model.policy.trainable_parameters()]
    # One iteration: 2 prompts (no CFG, so no empty negative prompt) encoded once each, one decode of the
    # batch. Offloaded: to CPU memory when the fit starts, onto the compute device just before the forwards,
    # back to CPU memory right after them.
    offloaded = records["true"]
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert offloaded.of(name) == ["cpu", "cpu:0", "use", "use", "cpu"], name
    assert offloaded.of("vae") == ["cpu", "cpu:0", "use", "cpu"]
    # the encoders are all onloaded before the first encoder forward, and all offloaded before decoding
    events = offloaded.events
    first_use = next(i for i, (_, event) in enumerate(events) if event == "use")
    assert [e for e in events[:first_use] if e[1] == "cpu:0"] == [
        (n, "cpu:0") for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
    ]
    vae_onload = events.index(("vae", "cpu:0"))
    assert all(event != "cpu:0" for _, event in events[vae_onload + 1 :])
    assert {n for n, event in events[:vae_onload] if event == "cpu"} == set(OFFLOADABLE)
    # not offloaded: the same forwards, and no module is ever moved
    plain = records["false"]
    assert [e for e in plain.events if e[1] != "use"] == []
    assert plain.of("text_encoder") == ["use", "use"] and plain.of("vae") == ["use"]
    # and the training is bitwise the same
    assert all(torch.equal(a, b) for a, b in zip(results["false"], results["true"]))
