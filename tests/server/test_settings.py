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


def test_label_studio_and_image_options_from_flags_options_and_both_environment_names():
    # the alternative names the image layer always took still work
    env = {"LABEL_STUDIO_HOST": "http://host-name:8080", "LABEL_STUDIO_ACCESS_TOKEN": "tok-alt",
           "SAM_BACKEND_IMAGE_CACHE_DIR": "/env/cache", "SAM_BACKEND_IMAGE_CACHE_BYTES": "0",
           "SAM_BACKEND_MAX_IMAGE_PIXELS": "1e6", "SAM_BACKEND_IMAGE_TIMEOUT": "7.5",
           "SAM_BACKEND_MAX_IMAGE_BYTES": "4096"}
    s = Settings.load({}, environ=env)
    assert (s.label_studio_url, s.label_studio_api_key) == ("http://host-name:8080", "tok-alt")
    assert (s.image_cache_dir, s.image_cache_bytes, s.max_image_pixels, s.image_timeout,
            s.max_image_bytes) == ("/env/cache", 0, 1_000_000, 7.5, 4096)
    # the field's own upper-case name comes first; an empty variable counts as unset
    env.update(LABEL_STUDIO_URL="http://url:8080", LABEL_STUDIO_API_KEY="tok-main",
               IMAGE_TIMEOUT="")
    s = Settings.load({}, environ=env)
    assert (s.label_studio_url, s.label_studio_api_key, s.image_timeout) == (
        "http://url:8080", "tok-main", 7.5)
    # an explicit option beats every environment name
    s = Settings.load({"label_studio_url": "http://opt:1", "label_studio_api_key": "tok-opt",
                       "max_image_pixels": "500", "image_timeout": "2"}, environ=env)
    assert (s.label_studio_url, s.label_studio_api_key, s.max_image_pixels, s.image_timeout) == (
        "http://opt:1", "tok-opt", 500, 2.0)
    # defaults: the image layer's
    s = Settings.load({}, environ={})
    assert (s.label_studio_url, s.label_studio_api_key, s.image_cache_dir) == (None, None, None)
    assert (s.image_cache_bytes, s.max_image_pixels, s.image_timeout, s.max_image_bytes) == (
        2 * 1024**3, 100_000_000, 30.0, 1024**3)


def test_the_label_studio_key_is_never_in_the_settings_repr():
    s = Settings.load({}, environ={"LABEL_STUDIO_API_KEY": "secret-key-123",
                                   "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "secret-pass-456"})
    assert s.label_studio_api_key == "secret-key-123"
    assert "secret-key-123" not in repr(s) and "secret-pass-456" not in repr(s)


def test_annotate_and_precompute_flags_are_the_label_studio_options():
    from sam_backend.cli import build_parser

    p = build_parser()
    args = p.parse_args(["annotate", "--project", "1", "--url", "http://a:1", "--token", "t"])
    s = settings_from_args(args)
    assert (s.label_studio_url, s.label_studio_api_key) == ("http://a:1", "t")
    args = p.parse_args(["precompute", "--project", "1", "--label-studio-url", "http://b:2"])
    assert settings_from_args(args).label_studio_url == "http://b:2"


@pytest.mark.parametrize("options, message", [
    ({"modle_name": "sam"}, "unknown option(s) modle_name"),
    ({"out_mask": "maybe"}, "out_mask='maybe' is not a boolean"),
    ({"max_tasks": "many"}, "max_tasks='many' is not a valid int"),
    ({"max_tasks": "0"}, "max_tasks=0 must be a positive number"),
    ({"video_feature_cache_mb": "0"}, "video_feature_cache_mb and video_sessions must be positive"),
    ({"video_sessions": "-1"}, "video_feature_cache_mb and video_sessions must be positive"),
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
