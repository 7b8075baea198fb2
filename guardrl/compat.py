"""The private parts of Lightning and jsonargparse that guardrl relies on, in one place, with the versions
they were checked against (tests/test_compat.py fails when an upgrade removes one).

Why each is needed:

- `LightningCLI._parse_ckpt_path`: overridden to do nothing (guardrl/cli.py). Lightning's version
  overwrites the model's options with the hyper-parameters saved in the checkpoint, silently undoing what the
  command line says on resume. If a Lightning release renamed it, the override would become dead code and
  that silent behaviour would come back: hence `check_lightning_cli_hooks`, called when the CLI is built.
- `LightningCLI._instantiate_trainer`: overridden to drop forced callbacks that the config replaces and to add
  the atomic checkpoint IO plugin.
- `ArgumentParser._actions` (argparse, through jsonargparse): the known option names, for "did you mean".
- `LightningModule._trainer`: whether a trainer is attached, without the exception `.trainer` raises.
"""

from __future__ import annotations

# Checked against (the versions installed when this list was last reviewed).
CHECKED_VERSIONS = {"lightning": "2.6.6", "jsonargparse": "4.53.0"}
LIGHTNING_CLI_HOOKS = ("_parse_ckpt_path", "_instantiate_trainer")


def missing_lightning_cli_hooks() -> list[str]:
    from lightning.pytorch.cli import LightningCLI

    return [name for name in LIGHTNING_CLI_HOOKS if not callable(getattr(LightningCLI, name, None))]


def check_lightning_cli_hooks() -> None:
    """Refuse to run on a Lightning whose LightningCLI lacks a hook guardrl overrides (see the module
    docstring): a clear error instead of a silently different resume."""
    missing = missing_lightning_cli_hooks()
    if missing:
        import lightning

        raise RuntimeError(
            f"lightning {lightning.__version__}: LightningCLI has no {', '.join(missing)}, which guardrl "
            f"overrides (guardrl/compat.py; checked with lightning {CHECKED_VERSIONS['lightning']}). "
            "Install a lightning version in guardrl's range (setup.cfg) or update guardrl/cli.py"
        )
