"""guardrl/compat.py: the private Lightning/jsonargparse internals guardrl overrides or reads still exist."""

from __future__ import annotations

import argparse

import pytest

from guardrl import compat


def test_the_installed_lightning_cli_has_every_overridden_hook():
    assert compat.missing_lightning_cli_hooks() == []
    compat.check_lightning_cli_hooks()


def test_a_missing_hook_is_a_clear_error(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.delattr(LightningCLI, "_parse_ckpt_path")
    assert compat.missing_lightning_cli_hooks() == ["_parse_ckpt_path"]
    with pytest.raises(RuntimeError, match=r"LightningCLI has no _parse_ckpt_path, which guardrl overrides"):
        compat.check_lightning_cli_hooks()


def test_parsers_still_list_their_actions():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--alpha", type=int)
    assert "alpha" in {action.dest for action in parser._actions}
    assert isinstance(parser, argparse.ArgumentParser)


def test_the_resume_override_is_the_one_lightning_calls():
    """GuardRLCLI._parse_ckpt_path replaces Lightning's: the subclass defines it, so a renamed hook in
    Lightning would leave it uncalled (what check_lightning_cli_hooks catches)."""
    from lightning.pytorch.cli import LightningCLI

    from guardrl.cli import GuardRLCLI

    assert GuardRLCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path
    assert "_parse_ckpt_path" in GuardRLCLI.__dict__
