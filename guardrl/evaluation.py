"""Held-out evaluation: images of prompts a run never trains on, sampled the way the model will be used,
scored by metrics that are not (only) the training reward.

What an evaluation fixes, so that two evaluations of a run differ only by the weights:
- its prompts (a .txt or .jsonl file, optionally grouped by a .jsonl field such as GenEval's `tag`),
- its sampler: step count, guidance and image size of its own (None: the run's), ODE by default,
- its noise: image j of prompt i starts from seed (seed, i, j), whatever the number of ranks or the batch,
- its weights: the EMA when the run keeps one ("auto"), else the policy.

Metrics are guardrl `Reward`s (PickScore, CLIPScore, HPSv2.1, ImageReward, aesthetic, OCR, GenEval, a remote
or VLM-judge reward: scored per image with the run's retries, reported as the mean per metric and per prompt
group) or torchmetrics `Metric`s with `update(images, prompts)` (guardrl.gold.ImageDetail, the toy world's
verifier; their `compute()` aggregates over ranks; per group only for metrics without weights, which are
cloned per group). The run's own rewards are always scored too, as the proxy.

`evaluate()` is the one implementation; the `Evaluation` callback runs it during fit and in
`guardrl validate`, and `OverOptimizationWatch` adds its divergence alarm on top.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torchmetrics import Metric

from guardrl.data.prompts import PromptRecord, check_prompt_file, iter_prompt_records, load_condition_image
from guardrl.options import require_int, require_number
from guardrl.rewards import Reward
from guardrl.rollouts import score_images

if TYPE_CHECKING:
    from guardrl.module import GRPOModule

WEIGHTS = ("auto", "ema", "policy")
SAMPLERS = ("ode", "sde")
ALL = "all"  # the group of every prompt when the file has no groups


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    text: str
    group: str
    record: Optional[PromptRecord] = None  # editing models: the line naming its conditioning image
    source: str = ""  # the prompt file


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How an evaluation samples (None: as the run does)."""

    samples_per_prompt: int = 2
    sampler: str = "ode"
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    weights: str = "auto"
    seed: int = 1234
    batch_size: int = 16  # images per batch, rounded to whole prompts (at least one prompt's)

    def check(self, option: str) -> None:
        require_int(f"{option}.samples_per_prompt", self.samples_per_prompt, minimum=1)
        require_int(f"{option}.batch_size", self.batch_size, minimum=1)
        require_int(f"{option}.num_inference_steps", self.num_inference_steps, minimum=2, allow_none=True)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"{option}.sampler must be 'ode' or 'sde', got {self.sampler!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(
                f"{option}.weights must be one of {', '.join(map(repr, WEIGHTS))} (auto: the EMA when the "
                f"run keeps one); got {self.weights!r}"
            )
        require_number(f"{option}.guidance_scale", self.guidance_scale, minimum=0, allow_none=True)
        require_int(f"{option}.height", self.height, minimum=16, allow_none=True)
        require_int(f"{option}.width", self.width, minimum=16, allow_none=True)
        require_int(f"{option}.seed", self.seed, minimum=0)


@dataclasses.dataclass
class EvaluationResult:
    """One evaluation: the mean proxy and every metric, overall and per prompt group; the grid's images."""

    iteration: int
    proxy: float
    metrics: dict[str, float]
    proxy_per_group: dict[str, float]
    metrics_per_group: dict[str, dict[str, float]]  # metric -> group -> value
    num_images: int
    grid: Optional[torch.Tensor] = None  # (P * samples_per_prompt, 3, H, W), rank zero only
    grid_prompts: list[str] = dataclasses.field(default_factory=list)
    grid_proxy: Optional[torch.Tensor] = None

    def scalars(self, prefix: str, proxy_tag: Optional[str] = None) -> dict[str, float]:
        """The tags an evaluation logs: <proxy_tag> (default <prefix>/proxy), <prefix>/<metric>, and per group
        (when the prompts have groups) <proxy_tag>/<group>, <prefix>/<metric>/<group>."""
        proxy_tag = f"{prefix}/proxy" if proxy_tag is None else proxy_tag
        out = {proxy_tag: self.proxy}
        out.update({f"{prefix}/{name}": value for name, value in self.metrics.items()})
        if list(self.proxy_per_group) != [ALL]:
            out.update({f"{proxy_tag}/{g}": value for g, value in self.proxy_per_group.items()})
            for name, groups in self.metrics_per_group.items():
                out.update({f"{prefix}/{name}/{g}": value for g, value in groups.items()})
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "num_images": self.num_images,
            "proxy": self.proxy,
            "metrics": self.metrics,
            "proxy_per_group": self.proxy_per_group,
            "metrics_per_group": self.metrics_per_group,
        }


# ------------------------------------------------------------------------------------------------ prompts
def load_eval_prompts(
    path: str,
    owner: str,
    prompt_field: str = "prompt",
    group_field: Optional[str] = None,
    image_field: Optional[str] = None,
    max_prompts: Optional[int] = None,
    prompts_option: str = "prompts",
) -> list[EvalPrompt]:
    """The evaluation prompts of a file, read whole, in order; a .jsonl line's `group_field` names its
    group. `owner` is the options' prefix in messages (e.g. "evaluation": evaluation.prompts)."""
    option = f"{owner}.{prompts_option}"
    check_prompt_file(path, option)
    if group_field is not None and not path.endswith(".jsonl"):
        raise ValueError(
            f"{owner}.group_field={group_field!r} needs a .jsonl prompt file (the group is a field of "
            f"each line), but {option}={path!r} is not one"
        )
    if max_prompts is not None and (not isinstance(max_prompts, int) or max_prompts < 1):
        raise ValueError(
            f"{owner}.max_prompts must be an integer >= 1 or null (all), got {max_prompts!r}"
        )
    prompts = []
    for record in iter_prompt_records(path, prompt_field, image_field, option):
        group = ALL
        if group_field is not None:
            value = (record.fields or {}).get(group_field)
            if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value).strip() == "":
                raise ValueError(
                    f"{owner}.group_field={group_field!r}: line {record.line_number} of {path!r} has no "
                    f"group (found {value!r}): every line needs a non-empty string or integer under "
                    f"{group_field!r}"
                )
            group = _tag_safe(str(value))
        prompts.append(EvalPrompt(record.prompt, group, record if image_field else None, path))
        if max_prompts is not None and len(prompts) == max_prompts:
            break
    if not prompts:
        raise ValueError(f"{option}={path!r} contains no prompt")
    return prompts


def _tag_safe(group: str) -> str:
    """A group name as a log tag component: no slashes or spaces."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in group.strip())


# ------------------------------------------------------------------------------------------------ metrics
def metric_name(metric: Union[Metric, Reward]) -> str:
    """A Reward's own name (`reward.name`); a Metric's class name in snake_case (ImageDetail ->
    image_detail)."""
    if isinstance(metric, Reward):
        return metric.name
    name = type(metric).__name__
    return "".join(("_" + c.lower()) if c.isupper() and i else c.lower() for i, c in enumerate(name))


def check_metrics(metrics: Sequence, option: str, require_direction: bool = False) -> list[str]:
    """Every entry is a guardrl Reward or a torchmetrics Metric (with higher_is_better set when the caller
    compares values over time); names are unique. Returns the names."""
    names = []
    for i, metric in enumerate(metrics):
        if isinstance(metric, Reward):
            pass
        elif isinstance(metric, Metric):
            if require_direction and getattr(metric, "higher_is_better", None) is None:
                raise ValueError(
                    f"{option}[{i}]: {type(metric).__name__} must set higher_is_better (True or False): the "
                    "watch compares each metric with its first value"
                )
        else:
            raise ValueError(
                f"{option}[{i}] must be a guardrl Reward (e.g. guardrl.rewards.PickScore) or a torchmetrics "
                f"Metric with update(images, prompts), got {type(metric).__name__}"
            )
        names.append(metric_name(metric))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"{option}: two metrics are named {duplicates[0]!r}; give a Reward its own init_args.name (a "
            "Metric is named after its class: list it once)"
        )
    if "proxy" in names:
        raise ValueError(f"{option}: 'proxy' is the run's own reward's tag; name the metric otherwise")
    return names


def higher_is_better(metric: Union[Metric, Reward]) -> bool:
    if isinstance(metric, Reward):
        return bool(getattr(metric, "higher_is_better", True))
    return bool(metric.higher_is_better)


class _RewardTotals:
    """Per-group sums and counts of per-image scores (float64), all-reduced at the end."""

    def __init__(self, groups: list[str]) -> None:
        self.groups = groups
        self.index = {g: i for i, g in enumerate(groups)}
        self.sums = torch.zeros(len(groups), dtype=torch.float64)
        self.counts = torch.zeros(len(groups), dtype=torch.float64)

    def add(self, scores: torch.Tensor, groups: list[str]) -> None:
        for score, group in zip(scores.detach().double().cpu(), groups):
            self.sums[self.index[group]] += score
            self.counts[self.index[group]] += 1

    def reduce(self, module: GRPOModule) -> tuple[float, dict[str, float]]:
        local = torch.stack([self.sums, self.counts]).to(module.device)
        total = module.all_gather(local).reshape(-1, 2, len(self.groups)).sum(0).cpu()
        sums, counts = total[0], total[1]
        overall = float(sums.sum() / counts.sum().clamp(min=1))
        per_group = {g: float(sums[i] / counts[i].clamp(min=1)) for i, g in enumerate(self.groups)}
        return overall, per_group


def _has_weights(metric: Metric) -> bool:
    return any(True for _ in metric.parameters()) or any(b.numel() > 1000 for b in metric.buffers())


# ------------------------------------------------------------------------------------------------ sampling
def resolve_weights(module: GRPOModule, weights: str, option: str) -> str:
    has_ema = module.policy.ema_decay is not None
    if weights == "auto":
        return "ema" if has_ema else "policy"
    if weights == "ema" and not has_ema:
        raise ValueError(
            f"{option}.weights='ema' but the run keeps no EMA (model.grpo.ema_decay is null); set "
            "model.grpo.ema_decay or use weights 'auto' or 'policy'"
        )
    return weights


def image_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The noise seed of image `sample_index` of prompt `prompt_index`: independent of ranks and batches."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0])


def _noise(module: GRPOModule, keys: list[tuple[int, int]], seed: int) -> torch.Tensor:
    backbone = module.backbone
    draws = []
    for prompt_index, sample_index in keys:
        seeded = image_seed(seed, prompt_index, sample_index)
        generator = torch.Generator(device=module.device).manual_seed(seeded)
        draws.append(backbone.initial_noise(1, generator, module.device))
    return torch.cat(draws)


@torch.no_grad()
def evaluate(
    module: GRPOModule,
    prompts: list[EvalPrompt],
    metrics: Sequence[Union[Metric, Reward]],
    settings: SamplerSettings,
    option: str,
    grid_prompts: int = 0,
) -> EvaluationResult:
    """Sample every evaluation image (this rank's share: prompt i on rank i % world), score it with the run's
    rewards (the proxy) and with `metrics`, and reduce over ranks. Collectives in the same order on every
    rank. Images are scored batch by batch and dropped, except the first `grid_prompts` prompts' (gathered
    to rank zero for the image grid)."""
    backbone = module.backbone
    has_images = any(p.record is not None for p in prompts)
    if backbone.takes_condition_image and not has_images:
        raise ValueError(
            f"{option}: {type(backbone).__name__} edits images and its evaluation prompts name no "
            f"conditioning image: set {option}.image_field (a .jsonl file with an image path on every line)"
        )
    if has_images and not backbone.takes_condition_image:
        raise ValueError(
            f"{option}.image_field is set but {type(backbone).__name__} takes no conditioning image: set "
            f"{option}.image_field to null"
        )
    weights = resolve_weights(module, settings.weights, option)
    rank, world = module.global_rank, module.trainer.world_size if module._trainer is not None else 1
    groups = sorted({p.group for p in prompts})
    per_prompt = settings.samples_per_prompt
    # batches of whole prompts: a groupwise reward (guardrl.rewards.GroupReward) sees all of a prompt's images
    mine = [i for i in range(len(prompts)) if i % world == rank]
    prompts_per_batch = max(1, settings.batch_size // per_prompt)
    proxy = _RewardTotals(groups)
    reward_totals = {metric_name(m): _RewardTotals(groups) for m in metrics if isinstance(m, Reward)}
    plain = [m for m in metrics if isinstance(m, Metric)]
    per_group_clones: dict[str, dict[str, Metric]] = {}
    for metric in plain:
        metric.to(module.device)
        metric.reset()
        if groups != [ALL] and not _has_weights(metric):
            per_group_clones[metric_name(metric)] = {g: metric.clone() for g in groups}
    grid_count = min(grid_prompts, len(prompts)) * settings.samples_per_prompt
    height = backbone.height if settings.height is None else settings.height
    width = backbone.width if settings.width is None else settings.width
    grid = grid_proxy = None
    with backbone.at_image_size(height, width, f"{option}.height", f"{option}.width"):
        if grid_count:
            shape = (grid_count, 3, height, width)
            grid = torch.zeros(shape, device=module.device)
            grid_proxy = torch.zeros(grid_count, device=module.device, dtype=torch.float64)
        for start in range(0, len(mine), prompts_per_batch):
            keys = [(i, j) for i in mine[start : start + prompts_per_batch] for j in range(per_prompt)]
            batch = [prompts[i] for i, _ in keys]
            texts = [p.text for p in batch]
            condition = None
            if has_images:
                condition = [load_condition_image(p.record, p.source) for p in batch if p.record]
            noise = _noise(module, keys, settings.seed)
            generator = torch.Generator(device=module.device).manual_seed(
                image_seed(settings.seed, *keys[0]) ^ 0x5DE
            )
            images = module.sample(
                texts,
                noise,
                settings.sampler,
                generator,
                weights,
                condition,
                settings.num_inference_steps,
                settings.guidance_scale,
            )
            labels = [p.group for p in batch]
            total, _ = module.score(images, texts, per_prompt)
            proxy.add(total, labels)
            for metric in metrics:
                name = metric_name(metric)
                if isinstance(metric, Reward):
                    scores, _ = score_images([metric], images, texts, module.faults, per_prompt)
                    reward_totals[name].add(scores, labels)
                else:
                    metric.update(images, texts)
                    for group, clone in per_group_clones.get(name, {}).items():
                        chosen = [k for k, label in enumerate(labels) if label == group]
                        if chosen:
                            clone.update(images[chosen], [texts[k] for k in chosen])
            if grid is not None and grid_proxy is not None:
                for k, (i, j) in enumerate(keys):
                    slot = i * settings.samples_per_prompt + j
                    if slot < grid_count:
                        grid[slot] = images[k]
                        grid_proxy[slot] = total[k].double()
    proxy_mean, proxy_groups = proxy.reduce(module)
    values, per_group = {}, {}
    for metric in metrics:
        name = metric_name(metric)
        if isinstance(metric, Reward):
            values[name], per_group[name] = reward_totals[name].reduce(module)
            continue
        with warnings.catch_warnings():
            # a rank may hold no image of a group (or of the whole set): its zero states still join the sum
            warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric .* called before")
            values[name] = float(metric.compute())  # torchmetrics syncs across ranks here
            if name in per_group_clones:
                per_group[name] = {g: float(c.compute()) for g, c in per_group_clones[name].items()}
    result = EvaluationResult(
        iteration=module.num_iterations,
        proxy=proxy_mean,
        metrics=values,
        proxy_per_group=proxy_groups,
        metrics_per_group=per_group,
        num_images=len(prompts) * settings.samples_per_prompt,
    )
    if grid is not None and grid_proxy is not None:
        # each slot was filled on exactly one rank (zeros elsewhere): the sum over ranks is the grid
        grid = module.all_gather(grid).reshape(-1, *grid.shape).sum(0)
        grid_proxy = module.all_gather(grid_proxy).reshape(-1, grid_count).sum(0)
        if module.global_rank == 0:
            result.grid, result.grid_proxy = grid.cpu(), grid_proxy.cpu()
            shown = min(grid_prompts, len(prompts))
            result.grid_prompts = [p.text for p in prompts[:shown] for _ in range(per_prompt)]
    return result
