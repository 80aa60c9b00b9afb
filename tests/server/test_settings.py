"""settings.py: options, --with, flags and the environment, with the documented precedence."""
from __future__ import annotations

import argparse

import pytest

from sam_backend.errors import ConfigError, SamBackendError
from sam_backend.settings import (Settings, add_listen_arguments, add_option_arguments,
                                  parse_with, settings_from_args)


def test_an_explicit_option_beats_the_environment_which_beats_the_default():
    assert Settings.load({}, environ={}).out_poly is False
    assert Settings.load({}, environ={"OUT_POLY": "yes"}).out_poly is True
    assert Settings.load({"out_poly": "false"}, environ={"OUT_POLY": "true"}).out_poly is False
    assert Settings.load({"max_points": " 7 "}, environ={"MAX_POINTS": "9"}).max_points == 7


def test_offline_false_beats_sam_backend_offline():
    assert Settings.load({}, environ={"SAM_BACKEND_OFFLINE": "1"}).offline is True
    assert Settings.load({"offline": "false"}, environ={"SAM_BACKEND_OFFLINE": "1"}).offline is False
    assert Settings.load({}, environ={"SAM_BACKEND_OFFLINE": "1", "OFFLINE": "0"}).offline is False


@pytest.mark.parametrize("options, message", [
    ({"modle_name": "sam"}, "unknown option(s) modle_name"),
    ({"out_mask": "maybe"}, "out_mask='maybe' is not a boolean"),
    ({"max_tasks": "many"}, "max_tasks='many' is not a valid int"),
    ({"max_tasks": "0"}, "max_tasks=0 must be a positive number"),
])
def test_bad_options_are_a_config_error_naming_them(options, message):
    with pytest.raises(ConfigError) as err:
        Settings.load(options, environ={})
    assert message in str(err.value)


def parser():
    p = argparse.ArgumentParser()
    add_listen_arguments(p)
    add_option_arguments(p)
    return p


def test_a_flag_beats_the_same_option_in_with():
    args = parser().parse_args(["--with", "device=cpu", "max_points=3", "--max_points", "5"])
    settings = settings_from_args(args)
    assert (settings.device, settings.max_points) == ("cpu", 5)
    assert parse_with(["a=b=c", "k= v"]) == {"a": "b=c", "k": " v"}
    with pytest.raises(SamBackendError, match="--with expects key=value, got 'device'"):
        parse_with(["device"])


def test_port_and_host_default_to_label_studio_mls_variables(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("HOST", raising=False)
    args = parser().parse_args([])
    assert (args.port, args.host) == (9090, "0.0.0.0")
    monkeypatch.setenv("PORT", "9123")
    monkeypatch.setenv("HOST", "127.0.0.1")
    args = parser().parse_args([])
    assert (args.port, args.host) == (9123, "127.0.0.1")
    assert parser().parse_args(["-p", "9200"]).port == 9200
