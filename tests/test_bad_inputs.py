"""The bad-input catalogue: what a user gets wrong, and the message each mistake gets (docs/errors.md).

Every case is refused with an exception whose message names the option as the user writes it, the value,
and what is allowed; `option`, `value` and `allowed` are regexes the message must each match. A case's
`value` is None only when the input is missing, so there is no value to show. Command-line cases run
`guardrl.cli.main` in-process: a parser error exits (SystemExit 2) and its message is read from stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

from guardrl.algorithm import (
    RATIO_VARIANTS,
    clipped_policy_loss,
    compute_ratio_terms,
    effective_clip_range,
    group_advantages,
)
from guardrl.callbacks import Evaluation, OverOptimizationWatch, RatioStatsCallback
from guardrl.checkpointing import IterationCheckpoint
from guardrl.checks import (
    check_batch_sizes,
    check_group_size,
    check_optimizer_for_strategy,
    check_rewards,
)
from guardrl.data import PromptDataModule, PromptStream, iter_prompt_file
from guardrl.evaluation import resolve_weights
from guardrl.gold import ImageDetail
from guardrl.suggestions import did_you_mean
from guardrl.module import GRPOModule
from guardrl.options import FaultOptions, GRPOOptions, SamplingOptions, check_compatible
from guardrl.perf import PerformanceOptions
from guardrl.policy import (
    Flux2KleinBackbone,
    FluxBackbone,
    LoraSpec,
    RandomSD35MediumBackbone,
    SD3Backbone,
    TinyFluxKontextBackbone,
    TinySD3Backbone,
)
from guardrl.policy.flux2 import TinyFlux2KleinBackbone
from guardrl.policy.qwen_image21 import QwenImage21Backbone, TinyQwenImage21Backbone
from guardrl.policy.qwen_image_edit import TinyQwenImageEditBackbone
from guardrl.policy.qwen_image import QwenImageBackbone, RandomQwenImageBackbone, TinyQwenImageBackbone
from guardrl.policy.z_image import RandomZImageTurboBackbone, TinyZImageBackbone
from guardrl.rewards import (
    GroupRank,
    JpegCompressibility,
    PairwiseFromScores,
    PairwiseReward,
    RemoteReward,
    Reward,
    RewardError,
    VLMJudgeReward,
)
from guardrl.runs import resolve_checkpoint_to_evaluate
from guardrl.sampling import flow_match_sigmas, noise_scales, reduce_elements, sample_rollouts
from tests.conftest import REPO_ROOT, tiny_fit_args

DOCS = os.path.join(REPO_ROOT, "docs", "errors.md")


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    does: str  # what the user does, in the words of docs/errors.md
    trigger: Callable  # called with a tmp_path; must raise
    option: str
    value: str | None
    allowed: str
    error: type = ValueError


# ---------------------------------------------------------------------------------------------- triggers
def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(factory, *args, **kwargs):
    return lambda tmp_path: factory(*args, **kwargs)


def write(tmp_path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def data_setup(name: str | None, content: str | bytes | None = None, world_size: int = 1, **kwargs):
    """PromptDataModule(...).setup("fit") as a run of `world_size` ranks; the file is written when content is
    given, and left absent otherwise."""

    def trigger(tmp_path):
        path = "" if name is None else str(tmp_path / name)
        if content is not None:
            write(tmp_path, name, content)
        dm = PromptDataModule(path, **kwargs)
        dm.trainer = SimpleNamespace(world_size=world_size, global_rank=0)  # what setup reads of the trainer
        dm.setup("fit")

    return trigger


EDIT_LINE = '{"prompt": "a cat", "image": "%s"}\n'


def _png_named(tmp_path, name, content=None):
    """A directory called `name` (content None) or a file with `content`, next to the prompt file."""
    (tmp_path / name).mkdir() if content is None else write(tmp_path, name, content)


def data_setup_on_directory(tmp_path):
    (tmp_path / "d.txt").mkdir()
    data_setup("d.txt")(tmp_path)


def read_prompts(name: str, content: str | bytes, **kwargs):
    return lambda tmp_path: list(iter_prompt_file(write(tmp_path, name, content), **kwargs))


def _truncated_checkpoint() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"guardrl": {"num_iterations": 3}, "state_dict": {"w": torch.zeros(256)}}, buffer)
    return buffer.getvalue()[:300]


def _torch_file(tmp_path, name: str) -> str:
    path = str(tmp_path / name)
    torch.save({"state_dict": {"w": torch.zeros(4)}}, path)
    return path


def _new_run_into_taken_version(tmp_path):
    cli(**{"--model.max_iterations": "1"}, run=True)(tmp_path)
    cli(**{"--trainer.logger.init_args.version": "0"}, run=True)(tmp_path)


def cli(*extra: str, run: bool = False, **overrides: str):
    """`guardrl fit` in-process on the tiny model, with `overrides` replacing tiny_fit_args' values."""

    def trigger(tmp_path):
        prompts = write(tmp_path, "prompts.txt", "a red circle\na blue square\n")
        args = tiny_fit_args(prompts, str(tmp_path / "runs"), **overrides)
        args = [a.replace("TMP", str(tmp_path)) for a in [*args, *extra]]
        from guardrl.cli import main

        main(["fit", *args] if run else args, run=run)

    return trigger


def cli_config(yaml: str):
    def trigger(tmp_path):
        config = write(tmp_path, "config.yaml", yaml)
        cli("--config", config)(tmp_path)

    return trigger


def cli_without(key: str):
    def trigger(tmp_path):
        args = tiny_fit_args(write(tmp_path, "p.txt", "a cat\n"), str(tmp_path / "runs"))
        i = args.index(key)
        from guardrl.cli import main

        main(args[:i] + args[i + 2 :], run=False)

    return trigger


def pipeline_dir(model_index: str | None):
    def trigger(tmp_path):
        (tmp_path / "pipe").mkdir()
        if model_index is not None:
            write(tmp_path, "pipe/model_index.json", model_index)
        SD3Backbone(str(tmp_path / "pipe")).load()

    return trigger


def module(**kwargs):
    def trigger(tmp_path):
        GRPOModule(backbone=TinySD3Backbone(), rewards=[JpegCompressibility()], **kwargs)

    return trigger


class ReturnsPairs(Reward):
    def score(self, images, prompts):
        return torch.zeros(len(prompts), 2)


class ReturnsList(Reward):
    def score(self, images, prompts):
        return [0.0] * len(prompts)


class AdamW8bit(torch.optim.AdamW):
    """Stands in for bitsandbytes.optim.AdamW8bit (bitsandbytes need not be installed): the check reads only
    the class's module."""


AdamW8bit.__module__ = "bitsandbytes.optim.adamw"


def eight_bit_adam(strategy: type):
    def trigger(tmp_path):
        check_optimizer_for_strategy(AdamW8bit([torch.nn.Parameter(torch.zeros(2))]), strategy())

    return trigger


def geneval(tmp_path, record=None, **kwargs):
    """A GenEval reward over a one-record metadata file, with a scripted detector (no model needed)."""
    from guardrl.rewards import GenEval

    record = record or {
        "prompt": "a photo of a cat",
        "tag": "single_object",
        "include": [{"class": "cat", "count": 1}],
    }
    return GenEval(
        write(tmp_path, "m.jsonl", json.dumps(record) + "\n"),
        detector=lambda images: [{}] * len(images),
        color_classifier=lambda image, classname, objects: [],
        **kwargs,
    )


def ratio_terms(std):
    x = torch.zeros(2, 4, dtype=torch.float64)
    return lambda tmp_path: compute_ratio_terms(
        x, x, x, torch.tensor(std, dtype=torch.float64), torch.full((2,), -0.1, dtype=torch.float64), "sum"
    )


def dynamic_sigmas_without_seq_len(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    flow_match_sigmas(scheduler, 4, image_seq_len=None)


def held_out(callback=Evaluation, name: str = "held_out.txt", content: str | None = "a circle\n", **kwargs):
    """`callback(<prompt file>, **kwargs)`; the file is written when content is given, and left absent
    otherwise."""

    def trigger(tmp_path):
        path = str(tmp_path / name) if content is None else write(tmp_path, name, content)
        callback(path, **kwargs)

    return trigger


def tiny_backbone_image_size(height: int, width: int):
    def trigger(tmp_path):
        backbone = TinySD3Backbone()
        backbone.load()
        backbone.check_image_size(height, width, "evaluation.height", "evaluation.width")

    return trigger


def evaluate_last_without_checkpoint(tmp_path):
    logger = Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir=str(tmp_path / "runs"), name="guardrl"),
    )
    resolve_checkpoint_to_evaluate(Namespace(ckpt_path="last", trainer=Namespace(logger=logger)))


def validate_without_evaluation(tmp_path):
    from guardrl.cli import main

    prompts = write(tmp_path, "prompts.txt", "a red circle\na blue square\n")
    main(["validate", *tiny_fit_args(prompts, str(tmp_path / "runs"))])


JUDGE_URL = "http://127.0.0.1:8000/v1"


def judge(**kwargs):
    return build(VLMJudgeReward, kwargs.pop("base_url", JUDGE_URL), model="judge", **kwargs)


def judge_answers(top: list[tuple[str, float]], delay_s: float = 0.0, **kwargs):
    """One 8x8 image scored by a VLMJudgeReward whose server (ThreadingHTTPServer on loopback, in a daemon
    thread) waits `delay_s` and answers a chat completion with these (token, logprob) top log-probabilities
    (tests/test_vlm_judge.py has a fuller one; importing it would pull in its fixtures and the reward server's
    extra)."""
    import http.server
    import threading
    import time

    entries = [{"token": t, "logprob": lp} for t, lp in top]
    payload = json.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": top[0][0]},
                    "logprobs": {"content": [dict(entries[0], top_logprobs=entries)]},
                }
            ]
        }
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(delay_s)
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                pass

        def log_message(self, *args):
            pass

    def trigger(tmp_path):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        try:
            reward = VLMJudgeReward(
                f"http://127.0.0.1:{server.server_port}/v1", model="judge", retry_delay_s=0.0, **kwargs
            )
            reward(torch.rand(1, 3, 8, 8), ["a cat"])
        finally:
            server.shutdown()
            server.server_close()

    return trigger


class Overconfident(PairwiseReward):
    """A judge whose preferences are not probabilities."""

    def prefer(self, images_a, images_b, prompts):
        return torch.full((len(prompts),), 1.2)


def scalars_of(files: dict[str, str]):
    """guardrl.analysis.load_scalars on a folder holding `files` (name -> content)."""

    def trigger(tmp_path):
        from guardrl.analysis import load_scalars

        (tmp_path / "run").mkdir()
        for name, content in files.items():
            write(tmp_path, f"run/{name}", content)
        load_scalars(str(tmp_path / "run"))

    return trigger


SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=torch.float64)
NAN, INF = float("nan"), float("inf")
FINITE_GT0, FINITE_GE0 = r"finite number > 0", r"finite number >= 0"
# The choices as messages list them, from the registry (a new variant needs no edit here).
VARIANTS = re.escape(", ".join(map(repr, RATIO_VARIANTS)))
S, G, F = SamplingOptions, GRPOOptions, FaultOptions

# ---------------------------------------------------------------------------------------------- catalogue
# fmt: off
CATALOGUE = [
    # ----- the command line and config files
    Case("cli-misspelt-flag", "cli", "misspells a key on the command line (`--model.grpo.clip_rnge 1e-4`)",
         cli("--model.grpo.clip_rnge", "1e-4"), r"clip_rnge", r"1e-4", r"--help", SystemExit),
    Case("cli-misspelt-key-in-config", "cli", "misspells a key in a config file (`grpo: {clip_rnge: ...}`)",
         cli_config("model:\n  grpo:\n    clip_rnge: 1.0e-4\n"), r"'model'", r"grpo\.clip_rnge", r"--help",
         SystemExit),
    Case("cli-misspelt-init-arg", "cli", "misspells a field of a class option (`--model.lora '{rnk: 4}'`)",
         cli(**{"--model.lora": '{"rnk": 4}'}), r"model\.lora", r"'rnk'", r"LoraSpec.*NoneType", SystemExit),
    Case("cli-wrong-type", "cli", "gives a word where a number goes (`--model.grpo.num_inner_epochs two`)",
         cli(**{"--model.grpo.num_inner_epochs": "two"}), r"model\.grpo\.num_inner_epochs", r"\btwo\b",
         r"Expected a <class 'int'>", SystemExit),
    Case("cli-invalid-ratio-variant", "cli", "misspells a choice (`--model.grpo.ratio_variant flow_grp`)",
         cli(**{"--model.grpo.ratio_variant": "flow_grp"}), r"model\.grpo\.ratio_variant", r"flow_grp\b",
         VARIANTS, SystemExit),
    Case("cli-invalid-sde-type", "cli", "names an unknown SDE (`--model.sampling.sde_type ddim`)",
         cli(**{"--model.sampling.sde_type": "ddim"}), r"model\.sampling\.sde_type", r"\bddim\b",
         r"'flow_grpo', 'dance_grpo'", SystemExit),
    Case("cli-invalid-reward-aggregation", "cli",
         "names Flow-Factory's aggregation (`--model.grpo.reward_aggregation sum`)",
         cli(**{"--model.grpo.reward_aggregation": "sum"}), r"model\.grpo\.reward_aggregation", r"\bsum\b",
         r"'weighted_sum', 'gdpo'", SystemExit),
    Case("cli-missing-train-prompts", "cli", "leaves out `--data.train_prompts`",
         cli_without("--data.train_prompts"), r"data\.train_prompts", None, r"required", SystemExit),
    Case("cli-config-file-missing", "cli", "passes a config file that does not exist",
         cli("--config", "TMP/nope.yaml"), r"config", r"nope\.yaml", r"does not exist", SystemExit),
    Case("cli-ckpt-path-missing", "cli", "resumes from a `--ckpt_path` that does not exist",
         cli("--ckpt_path", "TMP/missing.ckpt", run=True), r"ckpt_path|[Cc]heckpoint", r"missing\.ckpt",
         r"no such file|not found"),
    Case("cli-misspelt-class-path", "cli",
         "misspells a class path (`--model.backbone guardrl.policy.TinySD3Backbon`)",
         cli(**{"--model.backbone": "guardrl.policy.TinySD3Backbon"}), r"model\.backbone",
         r"TinySD3Backbon\b", r"did you mean 'guardrl\.policy\.TinySD3Backbone'", SystemExit),
    Case("cli-ckpt-path-truncated", "cli", "resumes from a truncated checkpoint file",
         lambda tmp_path: cli(
             "--ckpt_path", write(tmp_path, "cut.ckpt", _truncated_checkpoint()), run=True
         )(tmp_path),
         r"ckpt_path", r"cut\.ckpt", r"not a readable guardrl checkpoint.*written by guardrl fit"),
    Case("cli-ckpt-path-random-bytes", "cli", "passes a file of random bytes as `--ckpt_path`",
         lambda tmp_path: cli("--ckpt_path", write(tmp_path, "noise.ckpt", bytes(range(256)) * 64),
                              run=True)(tmp_path),
         r"ckpt_path", r"noise\.ckpt", r"not a readable guardrl checkpoint.*written by guardrl fit"),
    Case("cli-ckpt-path-not-guardrl", "cli", "passes another program's PyTorch file as `--ckpt_path`",
         lambda tmp_path: cli("--ckpt_path", _torch_file(tmp_path, "weights.pt"), run=True)(tmp_path),
         r"ckpt_path", r"weights\.pt", r"not a guardrl checkpoint.*written by guardrl fit"),
    Case("cli-taken-version-folder", "cli",
         "starts a new run with `--trainer.logger.init_args.version` of an existing run",
         _new_run_into_taken_version, r"trainer\.logger\.init_args\.version", r"=0\b",
         r"Leave the version unset.*--ckpt_path last"),
    Case("cli-nan-clip-range", "cli", "writes `.nan` for a float (`--model.grpo.clip_range .nan`)",
         cli(**{"--model.grpo.clip_range": ".nan"}), r"grpo\.clip_range", r"\bnan\b", FINITE_GT0),
    Case("cli-inf-noise-level", "cli", "writes `.inf` for a float (`--model.sampling.noise_level .inf`)",
         cli(**{"--model.sampling.noise_level": ".inf"}), r"sampling\.noise_level", r"\binf\b", FINITE_GE0),
    Case("cli-group-size-1", "cli", "sets `--data.group_size 1` (linked to model.group_size)",
         cli(**{"--data.group_size": "1"}), r"(data|model)\.group_size", r"\b1\b", r">= 2"),
    Case("cli-prompts-per-batch-0", "cli", "sets `--data.prompts_per_batch 0`",
         cli(**{"--data.prompts_per_batch": "0"}), r"data\.prompts_per_batch", r"\b0\b", r"integer >= 1"),
    Case("cli-lora-rank-0", "cli", "sets `--model.lora '{rank: 0}'`", cli(**{"--model.lora": '{"rank": 0}'}),
         r"lora\.rank", r"\b0\b", r"integer >= 1"),
    Case("cli-prompt-file-missing", "cli", "starts a run whose prompt file does not exist",
         cli(run=True, **{"--data.train_prompts": "TMP/missing.txt"}), r"data\.train_prompts",
         r"missing\.txt", r"existing \.txt or \.jsonl file"),

    # ----- model.sampling
    Case("sampling-steps-1", "sampling", "asks for 1 sampler step", build(S, num_inference_steps=1),
         r"sampling\.num_inference_steps", r"\b1\b", r"integer >= 2"),
    Case("sampling-steps-float", "sampling", "passes 2.5 sampler steps from Python",
         build(S, num_inference_steps=2.5), r"sampling\.num_inference_steps", r"2\.5", r"integer >= 2"),
    Case("sampling-guidance-below-1", "sampling", "sets guidance_scale 0.5", build(S, guidance_scale=0.5),
         r"sampling\.guidance_scale", r"0\.5", r">= 1 \(1\.0 = no guidance\)"),
    Case("sampling-guidance-nan", "sampling", "sets guidance_scale NaN", build(S, guidance_scale=NAN),
         r"sampling\.guidance_scale", r"\bnan\b", r"finite number >= 1"),
    Case("sampling-noise-negative", "sampling", "sets a negative noise_level", build(S, noise_level=-0.1),
         r"sampling\.noise_level", r"-0\.1", FINITE_GE0),
    Case("sampling-noise-nan", "sampling", "sets noise_level NaN", build(S, noise_level=NAN),
         r"sampling\.noise_level", r"\bnan\b", FINITE_GE0),
    Case("sampling-noise-inf", "sampling", "sets noise_level infinite", build(S, noise_level=INF),
         r"sampling\.noise_level", r"\binf\b", FINITE_GE0),
    Case("sampling-sde-type", "sampling", "passes sde_type 'ddim' from Python", build(S, sde_type="ddim"),
         r"sampling\.sde_type", r"'ddim'", r"'flow_grpo', 'dance_grpo'"),
    Case("sampling-cps-noise-above-1", "sampling", "sets noise_level 1.5 with sde_type cps",
         build(S, sde_type="cps", noise_level=1.5), r"sampling\.noise_level", r"\b1\.5\b",
         r"number in \[0, 1\]"),
    Case("sampling-cps-window-last-step", "sampling", "puts CPS's last step in sde_window",
         build(S, sde_type="cps", sde_window=(5, 10)), r"sampling\.sde_window", r"\[5, 10\]",
         r"0 <= start < end <= 9"),
    Case("sampling-window-size-fixed", "sampling", "sets sde_window_size with the fixed window",
         build(S, sde_window_size=3), r"sampling\.sde_window_size", r"=3", r"'random' or 'sliding'"),
    Case("sampling-window-size-too-big", "sampling", "asks for a moving window larger than its range",
         build(S, sde_window=(0, 5), sde_window_strategy="random", sde_window_size=6),
         r"sampling\.sde_window_size", r"\b6\b", r"integer in \[1, 5\]"),
    Case("sampling-window-slide-every", "sampling", "slides the window every 0 iterations",
         build(S, sde_window_strategy="sliding", sde_window_size=2, sde_window_slide_every=0),
         r"sampling\.sde_window_slide_every", r"\b0\b", r"integer >= 1"),
    Case("sampling-reduction", "sampling", "passes log_prob_reduction 'avg' from Python",
         build(S, log_prob_reduction="avg"), r"sampling\.log_prob_reduction", r"'avg'", r"'mean', 'sum'"),
    Case("sampling-window-reversed", "sampling", "sets sde_window [3, 1]", build(S, sde_window=(3, 1)),
         r"sampling\.sde_window", r"\[3, 1\]", r"0 <= start < end <= sampling\.num_inference_steps \(10\)"),
    Case("sampling-window-too-long", "sampling", "sets sde_window past the last step",
         build(S, num_inference_steps=4, sde_window=(0, 5)), r"sampling\.sde_window", r"\[0, 5\]",
         r"end <= sampling\.num_inference_steps \(4\)"),
    Case("sampling-window-shape", "sampling", "passes a 3-element sde_window from Python",
         build(S, sde_window=(0, 1, 2)), r"sampling\.sde_window", r"\(0, 1, 2\)",
         r"two integers \[start, end\)"),

    # ----- model.grpo
    Case("grpo-ratio-variant", "grpo", "passes ratio_variant 'flow_grp' from Python",
         build(G, ratio_variant="flow_grp"), r"grpo\.ratio_variant", r"'flow_grp'", VARIANTS),
    Case("grpo-clip-zero", "grpo", "sets clip_range 0", build(G, clip_range=0.0), r"grpo\.clip_range",
         r"\b0\.0\b", FINITE_GT0),
    Case("grpo-clip-nan", "grpo", "sets clip_range NaN", build(G, clip_range=NAN), r"grpo\.clip_range",
         r"\bnan\b", FINITE_GT0),
    Case("grpo-clip-inf", "grpo", "sets clip_range infinite", build(G, clip_range=INF), r"grpo\.clip_range",
         r"\binf\b", FINITE_GT0),
    Case("grpo-clip-ge-1", "grpo", "sets clip_range 2 in the log_prob unit (a unit mistake)",
         build(G, clip_range=2.0), r"grpo\.clip_range\b", r"2\.0", r"must be < 1"),
    Case("grpo-clip-unit", "grpo", "passes clip_range_unit 'per_element' from Python",
         build(G, clip_range_unit="per_element"), r"grpo\.clip_range_unit", r"'per_element'",
         r"'log_prob', 'per_sqrt_element'"),
    Case("grpo-adv-clip-zero", "grpo", "sets adv_clip_max 0", build(G, adv_clip_max=0.0),
         r"grpo\.adv_clip_max", r"\b0\.0\b", r"finite number > 0 or null"),
    Case("grpo-adv-clip-inf", "grpo", "sets adv_clip_max infinite (meaning no clip)",
         build(G, adv_clip_max=INF), r"grpo\.adv_clip_max", r"\binf\b", r"or null \(null: no clip\)"),
    Case("grpo-std-scope", "grpo", "passes std_scope 'batch' from Python", build(G, std_scope="batch"),
         r"grpo\.std_scope", r"'batch'", r"'group', 'global'"),
    Case("grpo-reward-aggregation", "grpo", "passes reward_aggregation 'sum' from Python",
         build(G, reward_aggregation="sum"), r"grpo\.reward_aggregation", r"'sum'",
         r"'weighted_sum', 'gdpo'"),
    Case("grpo-kl-negative", "grpo", "sets a negative kl_beta", build(G, kl_beta=-0.1), r"grpo\.kl_beta",
         r"-0\.1", FINITE_GE0),
    Case("grpo-kl-nan", "grpo", "sets kl_beta NaN", build(G, kl_beta=NAN), r"grpo\.kl_beta", r"\bnan\b",
         FINITE_GE0),
    Case("grpo-kl-inf", "grpo", "sets kl_beta infinite", build(G, kl_beta=INF), r"grpo\.kl_beta", r"\binf\b",
         FINITE_GE0),
    Case("grpo-inner-epochs-0", "grpo", "sets num_inner_epochs 0", build(G, num_inner_epochs=0),
         r"grpo\.num_inner_epochs", r"\b0\b", r"integer >= 1"),
    Case("grpo-minibatch-0", "grpo", "sets minibatch_size 0", build(G, minibatch_size=0),
         r"grpo\.minibatch_size", r"\b0\b", r"integer >= 1 or null"),
    Case("grpo-accumulation-0", "grpo", "sets gradient_accumulation_steps 0",
         build(G, gradient_accumulation_steps=0), r"grpo\.gradient_accumulation_steps", r"\b0\b",
         r"integer >= 1"),
    Case("grpo-grad-norm-zero", "grpo", "sets max_grad_norm 0", build(G, max_grad_norm=0.0),
         r"grpo\.max_grad_norm", r"\b0\.0\b", r"finite number > 0 or null"),
    Case("grpo-grad-norm-nan", "grpo", "sets max_grad_norm NaN", build(G, max_grad_norm=NAN),
         r"grpo\.max_grad_norm", r"\bnan\b", r"finite number > 0 or null"),
    Case("grpo-grad-norm-inf", "grpo", "sets max_grad_norm infinite (meaning no clipping)",
         build(G, max_grad_norm=INF), r"grpo\.max_grad_norm", r"\binf\b", r"or null \(null: no clipping\)"),
    Case("grpo-train-timesteps-0", "grpo", "sets num_train_timesteps 0", build(G, num_train_timesteps=0),
         r"grpo\.num_train_timesteps", r"\b0\b", r"integer >= 1 or null"),
    Case("grpo-timestep-selection", "grpo", "passes timestep_selection 'last' from Python",
         build(G, timestep_selection="last"), r"grpo\.timestep_selection", r"'last'", r"'random', 'first'"),
    Case("grpo-sync-every-0", "grpo", "sets old_policy_sync_every 0", build(G, old_policy_sync_every=0),
         r"grpo\.old_policy_sync_every", r"\b0\b", r"integer >= 1"),
    Case("grpo-ema-decay-1", "grpo", "sets ema_decay 1.0", build(G, ema_decay=1.0), r"grpo\.ema_decay",
         r"1\.0", r"in \(0, 1\) or null"),

    # ----- impossible combinations
    Case("combo-ratio-norm-no-variance", "combinations", "uses RatioNorm (`grpo_guard`) with noise_level 0",
         build(check_compatible, S(noise_level=0.0), G(ratio_variant="grpo_guard")), r"sampling\.noise_level",
         r"ratio_variant='grpo_guard'.*noise_level=0", r"set sampling\.noise_level > 0"),
    Case("combo-no-noise", "combinations", "trains `flow_grpo` with noise_level 0 (no stochastic step)",
         build(check_compatible, S(noise_level=0.0), G(ratio_variant="flow_grpo")), r"sampling\.noise_level",
         r"noise_level=0", r"sampling\.noise_level > 0"),
    Case("combo-train-timesteps-vs-window", "combinations", "trains more timesteps than the SDE window has",
         build(check_compatible, S(num_inference_steps=4), G(num_train_timesteps=5)),
         r"grpo\.num_train_timesteps", r"=5", r"<= 3 \(the SDE steps of sampling\.sde_window=\[0, 3\]\)"),
    Case("combo-train-timesteps-vs-moving-window", "combinations",
         "trains more timesteps than a moving window has",
         build(check_compatible, S(sde_window_strategy="random", sde_window_size=3),
               G(num_train_timesteps=4)),
         r"grpo\.num_train_timesteps", r"=4", r"<= 3 .*sampling\.sde_window_size=3"),
    Case("combo-clip-range-units", "combinations",
         "sets a per_sqrt_element clip range that exceeds 1 with sum",
         build(effective_clip_range, 0.1, "per_sqrt_element", "sum", 65536), r"grpo\.clip_range",
         r"clip_range=0\.1 .*'per_sqrt_element'.*'sum'.*D=65536", r"must be < 1"),
    Case("combo-minibatch-vs-batch", "combinations", "sets a minibatch_size that does not divide the batch",
         build(check_batch_sizes, G(minibatch_size=3), 2, 2), r"grpo\.minibatch_size", r"=3",
         r"allowed \[1, 2, 4\] or null"),
    Case("combo-accumulation-vs-updates", "combinations",
         "sets gradient_accumulation_steps that do not divide the updates",
         build(check_batch_sizes, G(minibatch_size=2, gradient_accumulation_steps=3), 2, 2),
         r"grpo\.gradient_accumulation_steps", r"=3", r"allowed \[1, 2\]"),
    Case("combo-rollout-chunks-vs-prompts", "combinations", "splits 3 prompt groups into 2 rollout chunks",
         build(check_batch_sizes, G(), 3, 2, 2), r"performance\.rollout_chunks", r"=2\b.*prompts_per_batch=3",
         r"allowed \[1, 3\]"),
    Case("combo-fewer-prompts-than-ranks", "combinations", "runs 4 ranks on a file of 2 prompts",
         data_setup("two.txt", "a cat\na dog\n", world_size=4), r"data\.train_prompts", r"two\.txt.*2 prompt",
         r"at least as many prompts as there are ranks"),
    Case("combo-8bit-adam-fsdp2", "combinations", "uses 8-bit Adam (bitsandbytes) under FSDP2",
         eight_bit_adam(ModelParallelStrategy), r"model\.optimizer", r"bitsandbytes\.optim\.adamw\.AdamW8bit",
         r"trainer\.strategy=ModelParallelStrategy.*Allowed: a torch\.optim optimizer"),
    Case("combo-8bit-adam-fsdp", "combinations", "uses 8-bit Adam (bitsandbytes) under FSDP",
         eight_bit_adam(FSDPStrategy), r"model\.optimizer", r"bitsandbytes", r"trainer\.strategy=ddp"),

    # ----- model (GRPOModule) and model.faults
    Case("module-group-size-1", "module", "builds GRPOModule with group_size 1", module(group_size=1),
         r"model\.group_size", r"\b1\b", r">= 2"),
    Case("module-max-iterations-0", "module", "sets model.max_iterations 0", module(max_iterations=0),
         r"model\.max_iterations", r"\b0\b", r">= 1 or null"),
    Case("module-group-size-check", "module", "links a group size of 1 (the check GRPOModule calls)",
         build(check_group_size, 1), r"model\.group_size", r"\b1\b",
         r"integer >= 2: a group-relative advantage"),
    Case("rewards-empty", "module", "lists no reward (`model.rewards: []`)", build(check_rewards, []),
         r"model\.rewards", r"\[\]", r"at least one reward"),
    Case("rewards-duplicate-names", "module", "lists two rewards with the same name",
         build(check_rewards, [JpegCompressibility(), JpegCompressibility(quality=50)]),
         r"model\.rewards\[0\].*model\.rewards\[1\]", r"'jpeg_compressibility'", r"set init_args\.name"),
    Case("rewards-all-weights-zero", "module", "gives every reward weight 0",
         build(check_rewards, [JpegCompressibility(weight=0.0)]), r"model\.rewards",
         r"weight 0 \(jpeg_compressibility\)", r"at least one reward a non-zero weight"),
    Case("module-gdpo-one-reward", "module", "asks for GDPO with one reward",
         module(grpo=G(reward_aggregation="gdpo")), r"grpo\.reward_aggregation",
         r"'gdpo'.*got 1 \(jpeg_compressibility\)",
         r"at least two rewards with a non-zero weight.*'weighted_sum' \(the default\)"),
    Case("module-gdpo-one-weighted-reward", "module", "asks for GDPO with two rewards, one of weight 0",
         lambda t: GRPOModule(backbone=TinySD3Backbone(), grpo=G(reward_aggregation="gdpo"),
                              rewards=[JpegCompressibility(), JpegCompressibility(weight=0.0, name="j0")]),
         r"grpo\.reward_aggregation", r"'gdpo'.*got 1 \(jpeg_compressibility\)",
         r"at least two rewards with a non-zero weight"),
    Case("faults-nonfinite-0", "module", "sets faults.max_consecutive_nonfinite 0",
         build(F, max_consecutive_nonfinite=0), r"faults\.max_consecutive_nonfinite", r"\b0\b",
         r"integer >= 1"),
    Case("faults-attempts-0", "module", "sets faults.reward_max_attempts 0", build(F, reward_max_attempts=0),
         r"faults\.reward_max_attempts", r"\b0\b", r"integer >= 1"),
    Case("faults-delay-inf", "module", "sets faults.reward_retry_delay_s infinite",
         build(F, reward_retry_delay_s=INF), r"faults\.reward_retry_delay_s", r"\binf\b", FINITE_GE0),
    Case("faults-timeout-0", "module", "sets faults.reward_timeout_s 0", build(F, reward_timeout_s=0.0),
         r"faults\.reward_timeout_s", r"\b0\.0\b", r"finite number > 0 or null"),
    Case("performance-window-1", "module", "sets performance.throughput_window 1",
         build(PerformanceOptions, throughput_window=1), r"performance\.throughput_window", r"\b1\b",
         r"integer >= 2"),
    Case("performance-peak-flops-0", "module", "sets performance.peak_flops 0",
         build(PerformanceOptions, peak_flops=0.0), r"performance\.peak_flops", r"\b0\.0\b",
         r"finite number > 0 or null"),
    Case("performance-compile-mode", "module", "names an unknown compile mode (`fast`)",
         build(PerformanceOptions, compile_mode="fast"), r"performance\.compile_mode", r"'fast'",
         r"'reduce-overhead', 'max-autotune'"),
    Case("performance-compile-backend", "module", "misspells the compile backend (`indcutor`)",
         build(PerformanceOptions, compile=True, compile_backend="indcutor"), r"performance\.compile_backend",
         r"'indcutor'", r"available: .*inductor"),
    Case("performance-rollout-chunks-0", "module", "sets performance.rollout_chunks 0",
         build(PerformanceOptions, rollout_chunks=0), r"performance\.rollout_chunks", r"\b0\b",
         r"integer >= 1"),
    Case("performance-trajectory-dtype", "module", "stores trajectories in an unsupported dtype (`float8`)",
         build(PerformanceOptions, trajectory_dtype="float8"), r"performance\.trajectory_dtype", r"'float8'",
         r"'float32', 'bfloat16', 'float16'"),
    Case("performance-overlap-one-chunk", "module", "overlaps rewards with a single rollout chunk",
         build(PerformanceOptions, overlap_rewards=True), r"performance\.overlap_rewards",
         r"rollout_chunks=1", r"needs performance\.rollout_chunks >= 2"),

    # ----- data: the module's options and the prompt files
    Case("data-image-field-empty", "data", "sets data.image_field ''",
         build(PromptDataModule, "p.jsonl", image_field=""), r"data\.image_field", r"''",
         r"null \(text-to-image\) or a non-empty string"),
    Case("data-image-field-txt", "data", "sets data.image_field with a .txt prompt file",
         data_setup("p.txt", "a cat\n", image_field="image"), r"data\.image_field", r"'image'.*p\.txt",
         r"needs a \.jsonl prompt file"),
    Case("prompts-image-field-absent", "data", "has a .jsonl line without the image field",
         data_setup("p.jsonl", '{"prompt": "a cat", "img": "a.png"}\n', image_field="image"),
         r"data\.image_field='image'", r"line 1 .*keys \['img', 'prompt'\]",
         r"every line needs a non-empty string path"),
    Case("prompts-image-missing", "data", "names a conditioning image that does not exist",
         data_setup("p.jsonl", EDIT_LINE % "missing.png", image_field="image"), r"data\.image_field",
         r"line 1 of .*p\.jsonl.*missing\.png", r"no such file; it must be an existing image file"),
    Case("prompts-image-unreadable", "data", "names a conditioning image that is not an image",
         lambda tmp_path: (_png_named(tmp_path, "fake.png", "not an image"),
                           data_setup("p.jsonl", EDIT_LINE % "fake.png", image_field="image")(tmp_path)),
         r"data\.image_field", r"line 1 of .*fake\.png", r"not a readable image .*PIL can open"),
    Case("prompts-image-directory", "data", "names a directory as a conditioning image",
         lambda tmp_path: (_png_named(tmp_path, "d.png"),
                           data_setup("p.jsonl", EDIT_LINE % "d.png", image_field="image")(tmp_path)),
         r"data\.image_field", r"line 1 of .*d\.png", r"a directory; it must be an existing image file"),
    Case("data-group-size-1", "data", "sets data.group_size 1",
         build(PromptDataModule, "p.txt", group_size=1), r"data\.group_size", r"\b1\b",
         r"integer >= 2 \(a group-relative advantage"),
    Case("data-prompts-per-batch-0", "data", "sets data.prompts_per_batch 0",
         build(PromptDataModule, "p.txt", prompts_per_batch=0), r"data\.prompts_per_batch", r"\b0\b",
         r"integer >= 1"),
    Case("data-shuffle-negative", "data", "sets data.shuffle_buffer_size -1",
         build(PromptDataModule, "p.txt", shuffle_buffer_size=-1), r"data\.shuffle_buffer_size", r"-1",
         r"integer >= 0"),
    Case("data-prompt-field-empty", "data", "sets data.prompt_field ''",
         build(PromptDataModule, "p.jsonl", prompt_field=""), r"data\.prompt_field", r"''",
         r"non-empty string"),
    Case("prompts-missing", "data", "names a prompt file that does not exist", data_setup("missing.txt"),
         r"data\.train_prompts", r"missing\.txt", r"no such file.*existing \.txt or \.jsonl"),
    Case("prompts-empty-path", "data", "leaves data.train_prompts empty", data_setup(None),
         r"data\.train_prompts", r"''", r"\.txt or \.jsonl prompt file"),
    Case("prompts-directory", "data", "names a directory", data_setup_on_directory, r"data\.train_prompts",
         r"d\.txt", r"is a directory: it must be a \.txt or \.jsonl prompt file"),
    Case("prompts-wrong-suffix", "data", "names a .csv file", data_setup("prompts.csv", "a,b\n"),
         r"data\.train_prompts", r"prompts\.csv", r"\('\.txt', '\.jsonl'\)"),
    Case("prompts-empty-file", "data", "names an empty file", data_setup("empty.txt", ""),
         r"data\.train_prompts", r"empty\.txt", r"at least one non-blank line"),
    Case("prompts-blank-lines", "data", "names a file of blank lines", data_setup("blank.txt", "\n  \n\t\n"),
         r"data\.train_prompts", r"blank\.txt", r"at least one non-blank line"),
    Case("prompts-not-utf8", "data", "names a Latin-1 file",
         read_prompts("latin1.txt", "ok\ncaf\xe9\n".encode("latin-1")),
         r"data\.train_prompts", r"latin1\.txt.*line 2", r"must be UTF-8"),
    Case("prompts-bad-json-line", "data", "has a line that is not JSON in a .jsonl file",
         read_prompts("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"\n'), r"data\.train_prompts",
         r"p\.jsonl.*line 2", r"one JSON object per line"),
    Case("prompts-json-not-object", "data", "has a JSON list on a .jsonl line",
         read_prompts("p.jsonl", '["a cat"]\n'), r"data\.train_prompts", r"line 1.*a JSON list",
         r"JSON object with the prompt under data\.prompt_field"),
    Case("prompts-missing-field", "data", "has .jsonl lines without the prompt field",
         read_prompts("p.jsonl", '{"text": "a cat"}\n'), r"data\.prompt_field", r"'prompt'.*\['text'\]",
         r"JSON object with the prompt under data\.prompt_field"),
    Case("prompts-field-not-string", "data", "has a number as the prompt",
         read_prompts("p.jsonl", '{"prompt": 3}\n'),
         r"data\.train_prompts", r"line 1 .*found 3 under 'prompt'", r"JSON object with the prompt"),
    Case("prompts-empty-json-prompt", "data", "has an empty prompt in a .jsonl line",
         read_prompts("p.jsonl", '{"prompt": "a cat"}\n{"prompt": " "}\n'), r"data\.train_prompts",
         r"line 2 has an empty 'prompt'", r"non-empty prompt"),
    Case("prompts-fewer-than-ranks-stream", "data", "streams 1 prompt to rank 1 of 2",
         lambda t: next(iter(PromptStream(write(t, "one.txt", "only one\n"), 2, 1, rank=1, world_size=2))),
         r"data\.train_prompts", r"one\.txt.*rank 1 of 2", r"at least as many prompts as there are ranks"),

    # ----- model.lora
    Case("lora-rank-0", "lora", "sets lora.rank 0", build(LoraSpec, rank=0), r"lora\.rank", r"\b0\b",
         r"integer >= 1"),
    Case("lora-alpha-nan", "lora", "sets lora.alpha NaN", build(LoraSpec, alpha=NAN), r"lora\.alpha",
         r"\bnan\b",
         FINITE_GT0),
    Case("lora-targets-empty", "lora", "sets lora.target_modules []", build(LoraSpec, target_modules=[]),
         r"lora\.target_modules", r"\[\]", r"non-empty list of module names"),
    Case("lora-targets-string", "lora", "sets lora.target_modules to one string",
         build(LoraSpec, target_modules="to_q"), r"lora\.target_modules", r"'to_q'", r"non-empty list"),
    Case("lora-dropout", "lora", "sets lora.dropout 0.1", build(LoraSpec, dropout=0.1), r"lora\.dropout",
         r"0\.1", r"must be 0: the policy runs in eval mode"),
    Case("lora-init", "lora", "sets lora.init 'pissa'", build(LoraSpec, init="pissa"), r"lora\.init",
         r"'pissa'", r"'gaussian', 'default'"),

    # ----- model.backbone
    Case("backbone-path-missing", "backbone", "points the model path at a directory that does not exist",
         lambda t: SD3Backbone(str(t / "nope")).load(),
         r"model\.backbone\.init_args\.pretrained_model_name_or_path",
         r"nope", r"diffusers pipeline directory .* or a hub id"),
    Case("backbone-not-diffusers", "backbone",
         "points the model path at a directory without model_index.json",
         pipeline_dir(None), r"pretrained_model_name_or_path", r"pipe'", r"diffusers pipeline directory"),
    Case("backbone-wrong-pipeline", "backbone", "loads a Flux directory with SD3Backbone",
         pipeline_dir('{"_class_name": "FluxPipeline"}'), r"pretrained_model_name_or_path", r"FluxPipeline",
         r"use model\.backbone\.class_path: guardrl\.policy\.FluxBackbone"),
    Case("backbone-path-none", "backbone", "gives SD3Backbone no model path", lambda t: SD3Backbone().load(),
         r"pretrained_model_name_or_path", r"None", r"local diffusers pipeline directory or a hub id"),
    Case("backbone-hub-id-unavailable", "backbone", "names a hub id that is not cached (offline) or misspelt",
         lambda t: FluxBackbone("nobody/no-such-model").load(), r"pretrained_model_name_or_path",
         r"nobody/no-such-model", r"cached locally or reachable"),
    Case("backbone-resolution-vae", "backbone", "asks for a resolution the VAE and patching cannot take",
         lambda t: TinySD3Backbone(resolution=120).load(), r"model\.backbone\.init_args\.resolution", r"=120",
         r"multiple of 16 .* e\.g\. 112 or 128"),
    Case("backbone-height-vae", "backbone", "asks for a non-square height the VAE and patching cannot take",
         lambda t: TinySD3Backbone(height=120, width=96).load(), r"model\.backbone\.init_args\.height",
         r"=120", r"multiple of 16 .* e\.g\. 112 or 128"),
    Case("backbone-width-small", "backbone", "asks for 8-pixel-wide images", build(TinySD3Backbone, width=8),
         r"model\.backbone\.init_args\.width", r"\b8\b", r"integer >= 16"),
    Case("backbone-klein-out-layers", "backbone", "gives FLUX.2-klein text_encoder_out_layers a word",
         build(Flux2KleinBackbone, "x", text_encoder_out_layers="9"),
         r"model\.backbone\.init_args\.text_encoder_out_layers", r"'9'", r"non-empty list of integers >= 0"),
    Case("backbone-klein-out-layers-deep", "backbone", "asks FLUX.2-klein for a Qwen3 layer it does not have",
         lambda t: TinyFlux2KleinBackbone(text_encoder_out_layers=[1, 2, 4]).load(),
         r"model\.backbone\.init_args\.text_encoder_out_layers", r"\[1, 2, 4\]", r"must be in \[0, 3\]"),
    Case("backbone-klein-out-layers-width", "backbone",
         "stacks fewer Qwen3 layers than the FLUX.2-klein transformer takes",
         lambda t: TinyFlux2KleinBackbone(text_encoder_out_layers=[1, 2]).load(),
         r"model\.backbone\.init_args\.text_encoder_out_layers", r"\[1, 2\]",
         r"takes 48 \(joint_attention_dim\): give 3 layers"),
    Case("backbone-klein-tiny-distilled", "backbone", "gives the tiny FLUX.2-klein `is_distilled: \"yes\"`",
         build(TinyFlux2KleinBackbone, is_distilled="yes"), r"model\.backbone\.init_args\.is_distilled",
         r"'yes'", r"true or false"),
    Case("backbone-z-image-sequence-rope", "backbone",
         "sets a Z-Image max_sequence_length beyond the transformer's RoPE table",
         lambda t: RandomZImageTurboBackbone(small=True, resolution=64, max_sequence_length=1505).load(),
         r"model\.backbone\.init_args\.max_sequence_length", r"=1505", r"at most 1504"),
    Case("backbone-z-image-resolution-rope", "backbone", "asks Z-Image for images larger than its RoPE table",
         lambda t: TinyZImageBackbone(resolution=1024).load(), r"model\.backbone\.init_args\.resolution",
         r"=1024", r"at most 512 pixels"),
    Case("backbone-condition-image-size-small", "backbone", "sets condition_image_size 8",
         build(TinyFluxKontextBackbone, condition_image_size=8),
         r"model\.backbone\.init_args\.condition_image_size", r"\b8\b", r"null .* or an integer >= 16"),
    Case("backbone-condition-image-size-multiple", "backbone", "sets condition_image_size 40",
         lambda tmp_path: TinyFluxKontextBackbone(condition_image_size=40).load(),
         r"model\.backbone\.init_args\.condition_image_size", r"=40\b", r"multiple of 16.*32 or 48"),
    Case("backbone-condition-images-mixed-sizes", "backbone",
         "gives one batch images that resize to different sizes",
         lambda tmp_path: TinyFluxKontextBackbone().collate(
             [{"image_latents": torch.zeros(1, 4, 16)}, {"image_latents": torch.zeros(1, 8, 16)}]),
         r"model\.backbone\.init_args\.condition_image_size", r"\[\(4, 16\), \(8, 16\)\]",
         r"images of one aspect ratio"),
    Case("backbone-qwen-sequence-length", "backbone", "sets max_sequence_length 2048 for Qwen-Image",
         build(QwenImageBackbone, "x", max_sequence_length=2048),
         r"model\.backbone\.init_args\.max_sequence_length", r"\b2048\b", r"integer in \[1, 1024\]"),
    Case("backbone-qwen-resolution-vae", "backbone",
         "asks Qwen-Image for a resolution the VAE and patching cannot take",
         lambda t: TinyQwenImageBackbone(resolution=120).load(), r"model\.backbone\.init_args\.resolution",
         r"=120", r"multiple of 16 .* e\.g\. 112 or 128"),
    Case("backbone-qwen-edit-condition-size", "backbone", "sets Qwen-Image-Edit's condition_image_size 16",
         lambda t: TinyQwenImageEditBackbone(condition_image_size=16),
         r"model\.backbone\.init_args\.condition_image_size", r"got 16\b", r"null .* or an integer >= 32"),
    Case("backbone-qwen21-sample-sigmas", "backbone", "gives Qwen-Image 2.1 `use_sample_sigmas: \"yes\"`",
         lambda t: QwenImage21Backbone("unused", use_sample_sigmas="yes"),
         r"model\.backbone\.init_args\.use_sample_sigmas", r"'yes'", r"true or false"),
    Case("backbone-qwen21-resolution", "backbone",
         "asks Qwen-Image 2.1 for a resolution its 16x VAE and patching cannot take",
         lambda t: TinyQwenImage21Backbone(resolution=112).load(), r"model\.backbone\.init_args\.resolution",
         r"=112", r"multiple of 32 .* e\.g\. 96 or 128"),
    Case("backbone-qwen-tiny-layers", "backbone", "builds the tiny Qwen-Image with 0 layers",
         build(TinyQwenImageBackbone, num_layers=0), r"model\.backbone\.init_args\.num_layers", r"\b0\b",
         r"integer >= 1"),
    Case("backbone-qwen-random-small", "backbone", "gives RandomQwenImageBackbone `small: \"yes\"`",
         build(RandomQwenImageBackbone, small="yes"), r"model\.backbone\.init_args\.small", r"'yes'",
         r"true or false"),
    Case("backbone-wrong-pipeline-qwen", "backbone", "loads a Qwen-Image directory with SD3Backbone",
         pipeline_dir('{"_class_name": "QwenImagePipeline"}'), r"pretrained_model_name_or_path",
         r"QwenImagePipeline", r"use model\.backbone\.class_path: guardrl\.policy\.QwenImageBackbone"),
    Case("backbone-resolution-small", "backbone", "asks for 8-pixel images",
         build(TinySD3Backbone, resolution=8),
         r"resolution", r"\b8\b", r"integer >= 16"),
    Case("backbone-dtype", "backbone", "asks for torch_dtype float64",
         build(SD3Backbone, "x", torch_dtype="float64"),
         r"model\.backbone\.init_args\.torch_dtype", r"'float64'", r"'bfloat16', 'float16', 'float32'"),
    Case("backbone-sequence-length", "backbone", "sets max_sequence_length 0",
         build(SD3Backbone, "x", max_sequence_length=0), r"max_sequence_length", r"\b0\b", r"integer >= 1"),
    Case("backbone-cache-negative", "backbone", "sets prompt_cache_size -1",
         build(SD3Backbone, "x", prompt_cache_size=-1), r"prompt_cache_size", r"-1", r"integer >= 0"),
    Case("backbone-tiny-layers", "backbone", "builds the tiny model with 0 layers",
         build(TinySD3Backbone, num_layers=0), r"num_layers", r"\b0\b", r"integer >= 1"),
    Case("backbone-random-small", "backbone", "gives the random-weight backbone `small: \"yes\"`",
         build(RandomSD35MediumBackbone, small="yes"), r"model\.backbone\.init_args\.small", r"'yes'",
         r"true or false"),

    # ----- model.rewards
    Case("reward-weight-nan", "rewards", "gives a reward weight NaN", build(JpegCompressibility, weight=NAN),
         r"weight", r"\bnan\b", r"finite number"),
    Case("reward-weight-inf", "rewards", "gives a reward weight infinite",
         build(JpegCompressibility, weight=INF),
         r"weight", r"\binf\b", r"finite number"),
    Case("reward-jpeg-quality", "rewards", "sets JPEG quality 100", build(JpegCompressibility, quality=100),
         r"quality", r"\b100\b", r"integer in \[1, 95\]"),
    Case("reward-output-shape", "rewards", "writes a reward that returns (B, 2) scores",
         lambda t: ReturnsPairs()(torch.zeros(2, 3, 8, 8), ["a", "b"]), r"reward 'returns_pairs'",
         r"shape \(2, 2\)", r"expected \(2,\)"),
    Case("reward-output-type", "rewards", "writes a reward that returns a list",
         lambda t: ReturnsList()(torch.zeros(2, 3, 8, 8), ["a", "b"]), r"reward 'returns_list'", r"\blist\b",
         r"expected a tensor of shape \(2,\)"),
    Case("reward-image-shape", "rewards", "scores images without a channel dim",
         lambda t: JpegCompressibility()(torch.zeros(2, 8, 8), ["a", "b"]), r"reward 'jpeg_compressibility'",
         r"\(2, 8, 8\)", r"\(B, 3, H, W\)"),
    Case("reward-server-not-there", "rewards", "points RemoteReward at a port where no server listens",
         lambda t: RemoteReward(f"http://127.0.0.1:{_unused_port()}", max_attempts=2, retry_delay_s=0.0)(
             torch.zeros(1, 3, 8, 8), ["a"]),
         r"reward server http://127\.0\.0\.1:\d+", r"ConnectionError", r"RemoteReward\.max_attempts=2",
         error=RewardError),
    Case("reward-prompt-count", "rewards", "scores 2 images with 1 prompt",
         lambda t: JpegCompressibility()(torch.zeros(2, 3, 8, 8), ["a"]), r"reward 'jpeg_compressibility'",
         r"2 images but 1 prompts", r"one prompt per image"),

    Case("reward-geneval-score", "rewards", "asks GenEval for an unknown score (`score: best`)",
         lambda t: geneval(t, score="best"), r"reward 'geneval'", r"score='best'",
         r"one of \['partial', 'correct', 'strict'\]"),
    Case("reward-geneval-metadata-class", "rewards", "gives GenEval metadata with a class it cannot detect",
         lambda t: geneval(t, record={"prompt": "a unicorn", "tag": "single_object",
                                      "include": [{"class": "unicorn", "count": 1}]}),
         r"metadata '.*m\.jsonl' line 1: include\[0\]\.class", r"'unicorn'", r"one of GenEval's 80 classes"),
    Case("reward-geneval-position-target", "rewards", "points a GenEval position clause at a later clause",
         lambda t: geneval(t, record={"prompt": "p", "tag": "position", "include": [
             {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 1]}]}),
         r"include\[1\]\.position\[1\]", r"=1\b", r"an earlier include clause \(an int in 0\.\.0\)"),
    Case("reward-geneval-unknown-prompt", "rewards", "trains GenEval on a prompt its metadata file lacks",
         lambda t: geneval(t)(torch.zeros(1, 3, 8, 8), ["a photo of a unicorn"]), r"metadata='.*m\.jsonl'",
         r"'a photo of a unicorn'", r"train on the same file \(data\.train_prompts\)"),

    Case("reward-judge-url-scheme", "rewards", "gives the VLM judge a base_url without http://",
         judge(base_url="127.0.0.1:8000/v1"), r"base_url \(model\.rewards\[\.\.\.\]\.init_args\.base_url\)",
         r"'127\.0\.0\.1:8000/v1'", r"an http:// or https:// URL"),
    Case("reward-judge-question-no-prompt", "rewards", "writes a judge question without `{prompt}`",
         judge(question="Is this a good image?"), r"init_args\.question", r"'Is this a good image\?'",
         r"a string holding \{prompt\}"),
    Case("reward-judge-top-logprobs", "rewards", "asks the judge for 50 top log-probabilities",
         judge(top_logprobs=50), r"init_args\.top_logprobs", r"\b50\b", r"integer in \[1, 20\]"),
    Case("reward-judge-timeout-0", "rewards", "sets the judge's timeout_s 0", judge(timeout_s=0),
         r"init_args\.timeout_s", r"got 0\b", r"finite number of seconds > 0"),
    Case("reward-judge-concurrency-0", "rewards", "sets the judge's max_concurrency 0",
         judge(max_concurrency=0), r"init_args\.max_concurrency", r"got 0\b", r"integer >= 1"),
    Case("reward-judge-token-both-ways", "rewards", "lists one token among both yes_tokens and no_tokens",
         judge(yes_tokens=["yes"], no_tokens=["no", "Yes"]), r"init_args\.no_tokens", r"\['no', 'Yes'\]",
         r"tokens not among yes_tokens \['yes'\] \(compared stripped and lower-cased\)"),
    Case("reward-judge-on-missing", "rewards", "sets the judge's on_missing 'zero'", judge(on_missing="zero"),
         r"init_args\.on_missing", r"'zero'", r"'error' or 'nan'"),
    Case("reward-judge-timeout", "rewards", "points the judge at a server slower than timeout_s",
         judge_answers([("yes", -0.1)], delay_s=1.0, timeout_s=0.2, max_retries=0),
         r"VLM judge http://127\.0\.0\.1:\d+/v1/chat/completions", r"no answer within timeout_s=0\.2",
         r"max_retries=0, timeout_s=0\.2", error=RewardError),
    Case("reward-judge-no-yes-no", "rewards", "gets judge answers with neither yes nor no among the tokens",
         judge_answers([("Maybe", -0.5), ("perhaps", -1.5)]), r"VLM judge http://127\.0\.0\.1:\d+",
         r"\('Maybe', -0\.5\), \('perhaps', -1\.5\)",
         r"neither yes_tokens \['yes'\] nor no_tokens \['no'\]", error=RewardError),
    Case("reward-group-lone-image", "rewards", "scores a group reward on a batch with one image for a prompt",
         lambda t: GroupRank(base=JpegCompressibility())(torch.zeros(3, 3, 8, 8), ["a", "a", "b"]),
         r"reward 'jpeg_compressibility_rank' \(GroupRank\)", r"got 1 for prompt 'b'",
         r"at least 2 consecutive images per prompt"),
    Case("reward-pairwise-temperature-0", "rewards", "sets PairwiseFromScores temperature 0",
         build(PairwiseFromScores, base=JpegCompressibility(), temperature=0),
         r"temperature \(model\.rewards\[\.\.\.\]\.init_args\.temperature\)", r"got 0\b",
         r"finite number > 0"),
    Case("reward-pairwise-not-probability", "rewards", "writes a pairwise judge whose prefer() returns 1.2",
         lambda t: Overconfident()(torch.zeros(2, 3, 8, 8), ["a", "a"]), r"reward 'overconfident'",
         r"prefer\(\) returned 1\.2", r"finite probability in \[0, 1\]"),
    Case("reward-group-base-weight", "rewards", "gives the reward a group reward wraps a weight",
         build(GroupRank, base={"class_path": "guardrl.rewards.JpegCompressibility",
                                "init_args": {"weight": 2.0}}),
         r"model\.rewards\[\.\.\.\]\.init_args\.base\.init_args\.weight", r"=2\.0",
         r"set the weight on the wrapping reward .* leave this one at 1\.0"),

    # ----- callbacks
    Case("checkpoint-every-n-minutes-0", "callbacks", "sets checkpoint.every_n_minutes 0",
         build(IterationCheckpoint, every_n_minutes=0), r"checkpoint\.every_n_minutes", r"\b0\b",
         r"number > 0 or null"),
    Case("ratio-stats-every-0", "callbacks", "sets ratio_stats.histogram_every_n_iterations 0",
         build(RatioStatsCallback, histogram_every_n_iterations=0),
         r"ratio_stats\.histogram_every_n_iterations",
         r"\b0\b", r"integer >= 1"),

    # ----- evaluation and `guardrl validate`
    Case("eval-prompts-missing", "evaluation", "names evaluation prompts that do not exist",
         held_out(name="missing.txt", content=None), r"evaluation\.prompts", r"missing\.txt",
         r"no such file.*existing \.txt or \.jsonl file"),
    Case("eval-group-field-txt", "evaluation", "sets evaluation.group_field with a .txt prompt file",
         held_out(group_field="tag"), r"evaluation\.group_field", r"'tag'.*held_out\.txt",
         r"needs a \.jsonl prompt file"),
    Case("eval-group-field-absent", "evaluation", "has an evaluation .jsonl line without the group field",
         held_out(name="p.jsonl", content='{"prompt": "a cat", "tag": "animals"}\n{"prompt": "a dog"}\n',
                  group_field="tag"),
         r"evaluation\.group_field='tag'", r"line 2 of .*p\.jsonl.*found None",
         r"every line needs a non-empty string or integer under 'tag'"),
    Case("eval-weights", "evaluation", "misspells evaluation.weights (`emma`)", held_out(weights="emma"),
         r"evaluation\.weights", r"'emma'", r"one of 'auto', 'ema', 'policy'"),
    Case("eval-weights-ema-without-ema", "evaluation", "evaluates the EMA weights of a run that keeps none",
         build(resolve_weights, SimpleNamespace(policy=SimpleNamespace(ema_decay=None)), "ema", "evaluation"),
         r"evaluation\.weights", r"='ema'.*model\.grpo\.ema_decay is null",
         r"set model\.grpo\.ema_decay or use weights 'auto' or 'policy'"),
    Case("eval-height-vae", "evaluation", "asks for an evaluation height the model cannot sample",
         tiny_backbone_image_size(50, 48), r"evaluation\.height", r"=50\b",
         r"multiple of 16 .* e\.g\. 48 or 64"),
    Case("eval-metric-type", "evaluation", "lists a module that is neither Reward nor Metric as a metric",
         held_out(metrics=[torch.nn.Identity()]), r"evaluation\.metrics\[0\]", r"got Identity",
         r"a guardrl Reward .* or a torchmetrics Metric"),
    Case("watch-gold-duplicate-names", "evaluation", "lists the same gold metric twice",
         held_out(OverOptimizationWatch, gold=[ImageDetail(), ImageDetail()]), r"watch\.gold",
         r"two metrics are named 'image_detail'", r"its own init_args\.name"),
    Case("eval-steps-1", "evaluation", "sets evaluation.num_inference_steps 1",
         held_out(num_inference_steps=1), r"evaluation\.num_inference_steps", r"got 1\b",
         r"integer >= 2 or null"),
    Case("validate-ckpt-last-missing", "evaluation",
         "validates `--ckpt_path last` of a run with no checkpoint",
         evaluate_last_without_checkpoint, r"ckpt_path", r"'last'",
         r"pass a \.ckpt file, or leave ckpt_path unset to evaluate the base model"),
    Case("validate-no-evaluation", "evaluation",
         "runs `guardrl validate` with a config without an evaluation",
         validate_without_evaluation, r"trainer\.callbacks", r"the config has no evaluation",
         r"add guardrl\.callbacks\.Evaluation .* or guardrl\.callbacks\.OverOptimizationWatch"),

    # ----- library functions (sampling/ and algorithm/ called directly)
    Case("fn-sigmas-steps-0", "functions", "asks flow_match_sigmas for 0 steps",
         lambda t: flow_match_sigmas(SimpleNamespace(config={}), 0), r"sampling\.num_inference_steps",
         r"\b0\b", r">= 1"),
    Case("fn-sigmas-seq-len", "functions", "asks a Flux-style schedule for sigmas without image_seq_len",
         dynamic_sigmas_without_seq_len, r"image_seq_len", r"None", r"backbone's image_seq_len\(\)"),
    Case("fn-noise-scales-nan", "functions", "calls noise_scales with eta NaN",
         build(noise_scales, SIGMAS, NAN, "flow_grpo", [0]), r"sampling\.noise_level", r"\bnan\b",
         FINITE_GE0),
    Case("fn-noise-scales-sde-type", "functions", "calls noise_scales with sde_type 'ddim'",
         build(noise_scales, SIGMAS, 0.5, "ddim", [0]), r"sampling\.sde_type", r"'ddim'",
         r"flow_grpo.*dance_grpo"),
    Case("fn-noise-scales-cps-eta", "functions", "calls noise_scales with eta 1.5 and sde_type 'cps'",
         build(noise_scales, SIGMAS, 1.5, "cps", [0]), r"sampling\.noise_level", r"\b1\.5\b", r"\[0, 1\]"),
    Case("fn-noise-scales-step", "functions", "calls noise_scales with a step outside the sampler's",
         build(noise_scales, SIGMAS, 0.5, "flow_grpo", [3]), r"sampling\.sde_window", r"step index 3",
         r"\[0, 3\)"),
    Case("fn-reduce-elements", "functions", "reduces log-probs with 'avg'",
         build(reduce_elements, torch.zeros(2, 3), "avg"), r"sampling\.log_prob_reduction", r"'avg'",
         r"\('mean', 'sum'\)"),
    Case("fn-rollout-noise-scales", "functions", "gives sample_rollouts fewer noise scales than steps",
         build(sample_rollouts, lambda x, t, k: x, torch.zeros(1, 2), SIGMAS, torch.zeros(2)),
         r"noise_scales_S",
         r"2 entries", r"one per step"),
    Case("fn-advantages-shape", "functions", "passes (B, 2) rewards to group_advantages",
         build(group_advantages, torch.zeros(4, 2), 2), r"rewards", r"\(4, 2\)", r"shape \(B,\)"),
    Case("fn-advantages-group-size", "functions", "groups 6 rewards by 4",
         build(group_advantages, torch.zeros(6), 4), r"data\.group_size", r"group_size=4",
         r">= 2 and divide the number of samples \(6\)"),
    Case("fn-advantages-std-scope", "functions", "passes std_scope 'batch' to group_advantages",
         build(group_advantages, torch.zeros(6), 3, "batch"), r"grpo\.std_scope", r"'batch'",
         r"'group', 'global'"),
    Case("fn-advantages-clip", "functions", "clips advantages at 0",
         build(group_advantages, torch.zeros(6), 3, "group", 1e-4, 0.0), r"grpo\.adv_clip_max", r"0\.0",
         r"> 0 or None"),
    Case("fn-clip-range-unit", "functions", "calls effective_clip_range with unit 'per_element'",
         build(effective_clip_range, 1e-4, "per_element", "mean", 16), r"grpo\.clip_range_unit",
         r"'per_element'",
         r"'log_prob', 'per_sqrt_element'"),
    Case("fn-clip-range-nan", "functions", "calls effective_clip_range with NaN",
         build(effective_clip_range, NAN, "log_prob", "mean", 16), r"grpo\.clip_range", r"\bnan\b",
         FINITE_GT0),
    Case("fn-loss-clip", "functions", "calls clipped_policy_loss with clip range 0",
         build(clipped_policy_loss, torch.zeros(2), torch.zeros(2), torch.ones(2), 0.0), r"grpo\.clip_range",
         r"0\.0", FINITE_GT0),
    Case("fn-loss-shapes", "functions", "calls clipped_policy_loss with mismatched shapes",
         build(clipped_policy_loss, torch.zeros(3), torch.zeros(2), torch.ones(3), 0.2),
         r"log_ratio, advantages and weight",
         r"\(3,\), \(2,\) and \(3,\)", r"same shape \(B,\)"),
    Case("fn-ratio-no-variance", "functions", "computes an importance ratio on a step with s = 0",
         ratio_terms([0.5, 0.0]), r"sampling\.noise_level", r"s = \[0\.5, 0\.0\]",
         r"s > 0 on every trained step"),

    # ----- reading the logs (guardrl.analysis)
    Case("analysis-no-logs", "analysis", "reads the scalars of a folder without logs", scalars_of({}),
         r"run_dir=", r"run'",
         r"guardrl\.analysis reads TensorBoard event files .* a CSVLogger's metrics\.csv",
         FileNotFoundError),
    Case("analysis-csv-without-step", "analysis", "reads a metrics.csv without a `step` column",
         scalars_of({"metrics.csv": "epoch,reward/mean\n0,1.0\n"}), r"metrics\.csv: no `step` column",
         r"columns: \['epoch', 'reward/mean'\]", r"not the metrics\.csv of lightning's CSVLogger"),
]
# fmt: on


# ---------------------------------------------------------------------------------------------- tests
def refusal(case: Case, tmp_path) -> tuple[BaseException, str]:
    """Run the case; return the exception and its message (a parser's message is on stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            case.trigger(tmp_path)
        except BaseException as e:  # SystemExit too: that is how a parser refuses
            raised = e
        else:
            pytest.fail(f"{case.id}: nothing was refused")
    if isinstance(raised, SystemExit):
        # The parser's refusal: its "tip:" line and everything from "error:" on (not the usage, which lists
        # every option and so would match any option name).
        text = stderr.getvalue()
        tips = [line for line in text.splitlines() if line.startswith("tip:")]
        return raised, "\n".join([*tips, text[text.rfind("error:") :]])
    return raised, str(raised)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_is_refused_naming_the_option_the_value_and_what_is_allowed(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (runs/, prompt files) stay in the test's folder
    raised, message = refusal(case, tmp_path)
    assert isinstance(raised, case.error), f"{case.id}: {type(raised).__name__}: {message}"
    if isinstance(raised, SystemExit):
        assert raised.code == 2
    assert re.search(case.option, message), (
        f"{case.id}: the option {case.option!r} is not named in: {message}"
    )
    if case.value is None:
        assert "missing" in case.id, "only a missing input may have no value to show"
    else:
        assert re.search(case.value, message), (
            f"{case.id}: the value {case.value!r} is not shown in: {message}"
        )
    assert re.search(case.allowed, message), (
        f"{case.id}: what is allowed ({case.allowed!r}) is missing: {message}"
    )


def test_catalogue_ids_are_unique_and_cover_every_area():
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert {c.area for c in CATALOGUE} == {
        "cli",
        "sampling",
        "grpo",
        "combinations",
        "module",
        "data",
        "lora",
        "backbone",
        "rewards",
        "callbacks",
        "functions",
        "evaluation",
        "analysis",
    }


def test_docs_list_every_case_with_the_count():
    with open(DOCS, encoding="utf-8") as f:
        docs = f.read()
    counts = re.findall(r"\*\*(\d+) bad inputs\*\*", docs)
    assert counts == [str(len(CATALOGUE))], (
        f"docs/errors.md says {counts}; the catalogue has {len(CATALOGUE)}"
    )
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", docs, flags=re.MULTILINE)
    assert sorted(rows) == sorted(c.id for c in CATALOGUE)


def test_good_values_pass_the_same_checks():
    # The checks refuse only what is wrong: the defaults and ordinary values go through.
    SamplingOptions(noise_level=0.0)  # valid alone: only the combination with training is refused
    GRPOOptions(clip_range=0.2, adv_clip_max=None, max_grad_norm=None, ema_decay=0.99, kl_beta=0.04)
    check_compatible(SamplingOptions(num_inference_steps=4), GRPOOptions(num_train_timesteps=3))
    check_batch_sizes(GRPOOptions(minibatch_size=2, gradient_accumulation_steps=2), 2, 2)
    check_rewards([JpegCompressibility(), JpegCompressibility(quality=50, name="jpeg_q50")])
    check_group_size(2)
    assert effective_clip_range(5.12e-4, "per_sqrt_element", "sum", 65536) == pytest.approx(0.131072)
    LoraSpec(rank=4, alpha=8, init="default")
    JpegCompressibility(weight=-1.0)  # a negative weight is a penalty, not a mistake


def test_eight_bit_adam_is_fine_without_sharding_and_adamw_is_fine_with_it():
    eight_bit = AdamW8bit([torch.nn.Parameter(torch.zeros(2))])
    check_optimizer_for_strategy(eight_bit, DDPStrategy())
    check_optimizer_for_strategy(eight_bit, SingleDeviceStrategy(device=torch.device("cpu")))
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    check_optimizer_for_strategy(adamw, ModelParallelStrategy())


def test_did_you_mean_suggests_the_closest_known_keys():
    known = ["model.grpo.clip_range", "model.grpo.clip_range_unit", "data.train_prompts", "trainer.max_steps"]
    message = did_you_mean("unrecognized arguments: --model.grpo.clip_rnge 1e-4", known)
    assert message.startswith("unrecognized arguments: --model.grpo.clip_rnge 1e-4")
    assert "did you mean 'model.grpo.clip_range'" in message and "--help" in message
    in_config = did_you_mean("Group 'data' does not accept option 'train_promts'", known)
    assert "'data.train_promts': did you mean 'data.train_prompts'?" in in_config
    assert did_you_mean("unrecognized arguments: --zzz 1", known) == "unrecognized arguments: --zzz 1"
