"""FlowPolicy and the backbones: weight sets, snapshots, EMA, CFG, loading from a local directory."""

import pytest
import torch

from guardrl.policy import FlowPolicy, LoraSpec, SD3Backbone, TinyFluxBackbone, TinySD3Backbone


def _inputs(backbone, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = backbone.initial_noise(batch, generator, torch.device("cpu"))
    cond = backbone.encode_prompts(["a red circle", "a blue square"][:batch], with_negative=True)
    return latents, cond


def _velocity(policy, which, latents, cond, guidance=1.0):
    with torch.no_grad(), policy.use_weights(which) as transformer:
        return policy.backbone.velocity(latents, 0.6, cond, guidance, transformer)


def _perturb_policy(policy, value=0.05):
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(value)


@pytest.fixture
def lora_policy():
    policy = FlowPolicy(TinySD3Backbone(seed=0), LoraSpec(rank=4, alpha=8), ema_decay=0.9)
    policy.build()
    return policy


def test_lora_policy_starts_equal_to_base_and_trains_only_the_default_adapter(lora_policy):
    latents, cond = _inputs(lora_policy.backbone)
    # gaussian init keeps lora_B = 0, so every weight set is the base model at the start
    base = _velocity(lora_policy, "reference", latents, cond)
    for which in ("policy", "old", "ema"):
        assert torch.equal(_velocity(lora_policy, which, latents, cond), base)
    trainable = {n for n, p in lora_policy.transformer.named_parameters() if p.requires_grad}
    # 4 target modules x 2 blocks x (lora_A, lora_B), default adapter only
    assert len(trainable) == 16
    assert all(".default." in n and "lora_" in n for n in trainable)
    assert len(lora_policy.trainable_parameters()) == 16


def test_switching_weights_restores_trainable_flags(lora_policy):
    before = {n: p.requires_grad for n, p in lora_policy.transformer.named_parameters()}
    for which in ("old", "reference", "ema", "policy"):
        with lora_policy.use_weights(which):
            pass
        after = {n: p.requires_grad for n, p in lora_policy.transformer.named_parameters()}
        assert after == before, which


def test_old_snapshot_lags_until_synced(lora_policy):
    latents, cond = _inputs(lora_policy.backbone)
    _perturb_policy(lora_policy)
    v_policy = _velocity(lora_policy, "policy", latents, cond)
    v_old = _velocity(lora_policy, "old", latents, cond)
    assert not torch.equal(v_policy, v_old)
    assert torch.equal(v_old, _velocity(lora_policy, "reference", latents, cond))
    lora_policy.sync_old()
    assert torch.equal(_velocity(lora_policy, "old", latents, cond), v_policy)
    for name, p in lora_policy.named_weight_set("old").items():
        assert torch.equal(p, lora_policy.named_weight_set("policy")[name])


def test_old_equals_policy_only_while_the_snapshot_is_in_sync(lora_policy):
    assert lora_policy.old_equals_policy()  # built: both adapters are the same initial LoRA
    _perturb_policy(lora_policy)
    assert not lora_policy.old_equals_policy()
    lora_policy.sync_old()
    assert lora_policy.old_equals_policy()
    next(iter(lora_policy.named_weight_set("policy").values())).data.view(-1)[0] += 1e-7
    assert not lora_policy.old_equals_policy()


def test_ema_update_is_the_exponential_average(lora_policy):
    ema = {n: p.clone() for n, p in lora_policy.named_weight_set("ema").items()}
    _perturb_policy(lora_policy, 1.0)
    policy = lora_policy.named_weight_set("policy")
    lora_policy.update_ema()
    for name, p in lora_policy.named_weight_set("ema").items():
        # ema <- 0.9 ema + 0.1 policy
        torch.testing.assert_close(p, 0.9 * ema[name] + 0.1 * policy[name], rtol=0, atol=1e-7)


def test_full_finetune_keeps_copies_for_old_and_reference():
    policy = FlowPolicy(TinySD3Backbone(seed=0), lora=None, keep_reference=True)
    policy.build()
    n_transformer = sum(1 for _ in policy.transformer.parameters())
    assert len(policy.trainable_parameters()) == n_transformer
    assert not any(p.requires_grad for p in policy.old_transformer.parameters())
    latents, cond = _inputs(policy.backbone)
    _perturb_policy(policy, 1e-3)
    assert not torch.equal(
        _velocity(policy, "policy", latents, cond), _velocity(policy, "old", latents, cond)
    )
    assert torch.equal(_velocity(policy, "old", latents, cond), _velocity(policy, "reference", latents, cond))
    policy.sync_old()
    assert torch.equal(_velocity(policy, "old", latents, cond), _velocity(policy, "policy", latents, cond))
    assert not torch.equal(
        _velocity(policy, "old", latents, cond), _velocity(policy, "reference", latents, cond)
    )


def test_missing_weight_sets_are_refused_by_name():
    policy = FlowPolicy(TinySD3Backbone(seed=0), LoraSpec(rank=2, alpha=2), ema_decay=None)
    policy.build()
    with pytest.raises(ValueError, match="ema_decay"):
        with policy.use_weights("ema"):
            pass
    with pytest.raises(ValueError, match="weight set"):
        with policy.use_weights("bogus"):
            pass


def test_checkpoint_keys_are_adapters_only(lora_policy):
    keys = [k for k in lora_policy.state_dict() if lora_policy.is_trainable_state_key(k)]
    # 16 tensors per adapter, three adapters (default, old, ema)
    assert len(keys) == 48
    assert not any("lora_" not in k for k in keys)


@pytest.mark.parametrize("backbone_cls", [TinySD3Backbone, TinyFluxBackbone])
def test_velocity_with_cfg_is_uncond_plus_scaled_difference(backbone_cls):
    backbone = backbone_cls(seed=0)
    backbone.load()
    latents, cond = _inputs(backbone)
    with torch.no_grad():
        guided = backbone.velocity(latents, 0.5, cond, guidance_scale=4.5)
        plain = backbone.velocity(latents, 0.5, cond, guidance_scale=1.0)
    assert guided.shape == latents.shape and guided.dtype == torch.float32
    if backbone.uses_true_cfg:
        from guardrl.policy.backbones import Conditioning

        uncond = Conditioning(cond.negative)
        with torch.no_grad():
            v_uncond = backbone.velocity(latents, 0.5, uncond, guidance_scale=1.0)
        torch.testing.assert_close(guided, v_uncond + 4.5 * (plain - v_uncond), rtol=1e-5, atol=1e-5)
    else:  # tiny Flux without a guidance embedding: guidance changes nothing
        assert torch.equal(guided, plain)


def test_decode_gives_images_in_unit_range(tiny_sd3):
    latents, _ = _inputs(tiny_sd3)
    images = tiny_sd3.decode(latents)
    assert images.shape == (2, 3, 128, 128)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_prompt_cache_returns_the_same_embeddings_and_is_bounded():
    backbone = TinySD3Backbone(seed=0, prompt_cache_size=2)
    backbone.load()
    first = backbone.encode_prompts(["a cat", "a dog"], with_negative=False)
    again = backbone.encode_prompts(["a dog", "a cat"], with_negative=False)
    assert torch.equal(first.tensors["prompt_embeds"][0], again.tensors["prompt_embeds"][1])
    backbone.encode_prompts(["a car", "a tree", "a house"], with_negative=False)
    assert len(backbone._prompt_cache) == 2


def test_sd3_backbone_loads_a_saved_diffusers_directory(tmp_path):
    from guardrl.policy.tiny import make_tiny_sd3_pipeline

    make_tiny_sd3_pipeline(seed=3).save_pretrained(tmp_path / "pipe")
    loaded = SD3Backbone(
        str(tmp_path / "pipe"), torch_dtype="float32", resolution=128, max_sequence_length=32
    )
    loaded.load()
    built = TinySD3Backbone(seed=3)
    built.load()
    latents, cond = _inputs(built)
    with torch.no_grad():
        expected = built.velocity(latents, 0.4, cond)
        got = loaded.velocity(latents, 0.4, loaded.encode_prompts(["a red circle", "a blue square"], False))
    # Same weights, but a module read from disk may pick another matmul kernel than the one built in memory:
    # the pooled text embedding differs by ~5e-7 (float32 rounding), so equality is to float32 precision.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_backbone_refuses_a_directory_that_is_not_a_pipeline(tmp_path):
    backbone = SD3Backbone(str(tmp_path), resolution=128)
    with pytest.raises(ValueError, match="model_index.json"):
        backbone.load()


def test_backbone_refuses_a_resolution_the_vae_cannot_take():
    # VAE x8 times patch 2: multiples of 16
    backbone = TinySD3Backbone(seed=0, resolution=120)
    with pytest.raises(ValueError, match="resolution=120.*multiple of 16"):
        backbone.load()


def test_bad_dtype_names_the_option():
    with pytest.raises(ValueError, match="torch_dtype must be one of"):
        SD3Backbone("x", torch_dtype="float64")


def test_lora_adapters_are_float32_on_a_bfloat16_base_and_train(tmp_path):
    from guardrl.policy import FlowPolicy, LoraSpec
    from guardrl.policy.tiny import make_tiny_sd3_pipeline

    make_tiny_sd3_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    backbone = SD3Backbone(
        str(tmp_path / "pipe"), torch_dtype="bfloat16", resolution=128, max_sequence_length=32
    )
    policy = FlowPolicy(backbone, LoraSpec(rank=2, alpha=4))
    policy.build()
    lora = {n: p for n, p in policy.transformer.named_parameters() if "lora_" in n}
    base = [p for n, p in policy.transformer.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for p in base)
    latents, cond = _inputs(backbone)
    velocity = backbone.velocity(latents, 0.5, cond, 1.0, policy.transformer)
    velocity.float().square().mean().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


COMPUTE = torch.device("cpu", 0)  # a device that is not the offload target "cpu" (str), yet runs on any CPU


class _OnCompute(torch.Tensor):
    """Latents that report COMPUTE as their device (decode onloads the VAE to the latents' device)."""

    @property
    def device(self):
        return COMPUTE


def _record_moves_and_uses(backbone, names):
    """Every `.to(target)` of the named modules and every forward of them, in order: ("to", name, str(target))
    and ("use", name)."""
    events = []
    for name in names:
        module = getattr(backbone, name)
        original = module.to

        def recording(*args, _name=name, _original=original, **kwargs):
            events.append(("to", _name, str(args[0] if args else kwargs.get("device"))))
            return _original(*args, **kwargs)

        module.to = recording
        used = module.decoder if name == "vae" else module  # decode() runs the VAE's decoder, not forward()
        used.register_forward_pre_hook(lambda *_, _name=name: events.append(("use", _name)))
    return events


def _per_module(events, name):
    return [e[0] if e[0] == "use" else e[2] for e in events if e[1] == name]


def test_offloaded_text_encoders_and_vae_move_to_the_device_only_while_used(monkeypatch):
    # On a CPU-only machine the compute device is the CPU, so the test makes it distinguishable: the
    # transformer reports COMPUTE = cpu:0 (text encoders go to the transformer's device) and the latents
    # report cpu:0 (the VAE goes to the latents' device), while offloading moves modules to "cpu". Every move
    # and every forward is recorded: each offloaded module must go to cpu:0 before its forwards and back to
    # "cpu" after them, and the outputs must equal a backbone without offloading.
    from diffusers import SD3Transformer2DModel

    from guardrl.policy import TinySD3Backbone

    plain = TinySD3Backbone(seed=0)
    plain.load()
    backbone = TinySD3Backbone(seed=0, offload_text_encoders=True, offload_vae=True)
    backbone.load()
    encoders = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert backbone.offloaded_modules() == [*encoders, "vae"]
    assert type(backbone.transformer) is SD3Transformer2DModel
    monkeypatch.setattr(SD3Transformer2DModel, "device", property(lambda self: COMPUTE))
    events = _record_moves_and_uses(backbone, [*encoders, "vae"])

    backbone.offload()  # what GRPOModule.on_fit_start does after Lightning moved everything to the device
    assert events == [("to", n, "cpu") for n in [*encoders, "vae"]]
    events.clear()

    cond = backbone.encode_prompts(["a cat", "a dog"], with_negative=True)
    for name in encoders:
        # onloaded, then used once per uncached prompt ("a cat", "a dog", ""), then back in CPU memory
        assert _per_module(events, name) == ["cpu:0", "use", "use", "use", "cpu"], name
    assert _per_module(events, "vae") == []
    # all three encoders are onloaded before the first forward and offloaded after the last one
    first_use = next(i for i, e in enumerate(events) if e[0] == "use")
    last_use = max(i for i, e in enumerate(events) if e[0] == "use")
    assert events[:first_use] == [("to", n, "cpu:0") for n in encoders]
    assert events[last_use + 1 :] == [("to", n, "cpu") for n in encoders]
    events.clear()
    backbone.encode_prompts(["a cat", "a dog"], with_negative=True)
    assert events == []  # every prompt is cached: the encoders are neither moved nor run
    expected = plain.encode_prompts(["a cat", "a dog"], with_negative=True)
    for got, want in zip(
        (cond.tensors["prompt_embeds"], cond.tensors["pooled_prompt_embeds"], cond.negative["prompt_embeds"]),
        (
            expected.tensors["prompt_embeds"],
            expected.tensors["pooled_prompt_embeds"],
            expected.negative["prompt_embeds"],
        ),
    ):
        assert torch.equal(got, want)

    latents = backbone.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    images = backbone.decode(latents.as_subclass(_OnCompute))
    assert _per_module(events, "vae") == ["cpu:0", "use", "cpu"]
    assert events[0] == ("to", "vae", "cpu:0") and events[-1] == ("to", "vae", "cpu")
    assert all(e[1] == "vae" for e in events)  # decoding touches no text encoder
    assert torch.equal(images.as_subclass(torch.Tensor), plain.decode(latents))

    # the same backbone without offloading moves nothing, ever
    events = _record_moves_and_uses(plain, [*encoders, "vae"])
    plain.offload()
    plain.encode_prompts(["a red circle"], with_negative=False)
    plain.decode(latents.as_subclass(_OnCompute))
    assert [e for e in events if e[0] == "to"] == []
    assert ("use", "text_encoder") in events and ("use", "vae") in events


def test_offload_options_must_be_booleans():
    from guardrl.policy import SD3Backbone

    with pytest.raises(
        ValueError, match=r"model\.backbone\.init_args\.offload_vae must be true or false, got 'yes'"
    ):
        SD3Backbone("some/model", offload_vae="yes")
