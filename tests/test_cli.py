"""`sam-backend`: a command whose module cannot be imported is not dropped silently. Using it
exits 2 with an error that names the command and what is missing; the other commands work."""
from __future__ import annotations

import importlib
import logging

import pytest

from sam_backend import cli


def failing_import(module_name: str, missing: str):
    real = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == module_name:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, *args, **kwargs)

    return import_module


@pytest.mark.parametrize("missing", ["rq", "sam_backend.commands.precompute"])
def test_a_command_whose_module_fails_to_import_says_why(monkeypatch, caplog, tmp_path, capsys,
                                                         missing):
    """``missing``: a dependency of the module, or the module itself (dropped silently before)."""
    monkeypatch.setattr(cli.importlib, "import_module",
                        failing_import("sam_backend.commands.precompute", missing))
    with caplog.at_level(logging.ERROR, logger="sam_backend"):
        assert cli.main(["worker", "--burst", "--with", "model_name=mobile_sam"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "sam-backend worker is unavailable" in errors[0]
    assert "sam_backend.commands.precompute" in errors[0] and repr(missing) in errors[0]

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="sam_backend"):
        assert cli.main(["precompute", "--project", "1"]) == 2
    assert "sam-backend precompute is unavailable" in caplog.records[-1].getMessage()

    # the other commands are there and work; the help lists the broken ones as unavailable
    assert cli.main(["weights", "list", "--dir", str(tmp_path)]) == 0
    help_text = cli.build_parser().format_help()
    assert "annotate" in help_text and "worker" in help_text
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_the_command_table_names_what_each_module_registers():
    import argparse

    for module_name, commands in cli.COMMAND_MODULES.items():
        parser = argparse.ArgumentParser()
        subparsers = parser.add_subparsers()
        importlib.import_module(module_name).register_cli(subparsers)
        assert tuple(subparsers.choices) == commands, module_name
