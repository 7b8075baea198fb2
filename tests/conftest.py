import os

# No model hub on the test machines: everything is built in code or read from tmp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_sd3():
    from guardrl.policy import TinySD3Backbone

    backbone = TinySD3Backbone(seed=0)
    backbone.load()
    return backbone


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n\na green triangle\ntwo yellow circles\na cat\na dog\n")
    return str(path)


def tiny_fit_args(prompt_path: str, log_dir: str, **overrides) -> list[str]:
    """Arguments for a seconds-long in-process `guardrl fit` on the tiny SD3 model."""
    settings = {
        "--model.backbone": "guardrl.policy.TinySD3Backbone",
        "--model.rewards": '[{"class_path": "guardrl.rewards.JpegCompressibility"}]',
        "--model.sampling.num_inference_steps": "4",
        "--model.grpo.ratio_variant": "grpo_guard",
        "--model.grpo.clip_range": "1e-4",
        "--model.grpo.num_inner_epochs": "2",
        "--model.lora": '{"rank": 4, "alpha": 8}',
        "--model.optimizer": '{"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}',
        "--model.max_iterations": "2",
        "--data.train_prompts": prompt_path,
        "--data.group_size": "2",
        "--data.prompts_per_batch": "2",
        "--trainer.accelerator": "cpu",
        "--trainer.logger.init_args.save_dir": log_dir,
        # Checkpoints and the saved config land here too when a test turns the logger off.
        "--trainer.default_root_dir": log_dir,
        "--trainer.enable_progress_bar": "false",
        "--trainer.enable_model_summary": "false",
    }
    settings.update(overrides)
    args = []
    for key, value in settings.items():
        args += [key, value]
    return args


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tiny models run faster on one thread, and CPU results do not depend on thread scheduling.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
