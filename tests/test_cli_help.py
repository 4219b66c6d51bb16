"""The help of ``ssi-dask run/train/psf/...`` states the defaults the code really uses."""

from __future__ import annotations

import argparse
import inspect
import re

import numpy as np
import pytest

from ssi_dask import cli
from ssi_dask.blockwise import DEFAULT_TARGET_VOXELS
from ssi_dask.config import ClusterSettings, PSFSettings, TrainSettings
from ssi_dask.example import make_example
from ssi_dask.lr import WB_SUPPORT_FRACTION, wiener_butterworth_defaults
from ssi_dask.lr_auto import DEFAULT_MAX_ITER, choose_iterations
from ssi_dask.ssi import train_ssi
from ssi_dask.ssi.train import DEFAULTS
from ssi_dask.training import REGION_PATCHES


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _help(command: str) -> dict[str, str]:
    """Flag -> its help text as printed (``%(default)s`` expanded)."""
    parser = _subparsers()[command]
    texts = {}
    for action in parser._actions:
        if action.option_strings and action.help:
            text = action.help % {"default": action.default} if "%(" in action.help else action.help
            texts[action.option_strings[0]] = text.replace("%%", "%")
    return texts


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("command", ["run", "train", "psf", "demo", "make-example", "verify"])
def test_every_argparse_default_is_the_one_stated(command):
    """A flag with a default value states exactly that value in its help."""
    parser = _subparsers()[command]
    for action in parser._actions:
        default = action.default
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        if default is None or isinstance(default, bool) or default == argparse.SUPPRESS:
            continue
        text = _help(command)[action.option_strings[0]]
        assert "default" in text, (command, action.option_strings, text)
        stated = [
            value.rstrip(",")
            for value in re.findall(r"default:? ([^\s;)]+)", text)
            + re.findall(r"(\S+) \(default\)", text)
        ]
        assert _number(default) in stated or str(default) in stated, (action.option_strings, text)


def test_defaults_without_argparse_value_match_the_code():
    run, train = _help("run"), _help("train")
    for ndim in (2, 3):
        for key, flag in (
            ("steps", "--steps"),
            ("patch_size", "--patch-size"),
            ("batch_size", "--batch-size"),
            ("depth", "--net-depth"),
            ("base_channels", "--base-channels"),
        ):
            label = f"{DEFAULTS[ndim][key]} {ndim}D"
            shared = all(DEFAULTS[n][key] == DEFAULTS[ndim][key] for n in (2, 3))
            expected = f"default: {DEFAULTS[ndim][key]})" if shared else label
            assert expected in run[flag] and expected in train[flag], (flag, run[flag])
    signature = inspect.signature(train_ssi).parameters
    assert f"(default: {signature['restarts'].default})" in train["--restarts"]
    assert f"(default: {signature['ensemble'].default})" in train["--ensemble"]
    defaults = wiener_butterworth_defaults(np.ones((3, 3), np.float32))
    assert f"default: {defaults['wiener_alpha']:g}," in run["--wiener-alpha"]
    assert f"default: {defaults['butterworth_order']:g})" in run["--butterworth-order"]
    assert f"{100 * WB_SUPPORT_FRACTION:g}% of its peak" in run["--cutoff"]
    most = (
        f"default: {DEFAULT_MAX_ITER['classic']} classic, "
        f"{DEFAULT_MAX_ITER['wiener-butterworth']} wiener-butterworth"
    )
    assert most in run["--auto-max-iterations"]
    samples = inspect.signature(choose_iterations).parameters["n_samples"].default
    assert f"(default: {samples};" in run["--auto-samples"]
    voxels = {n: f"{DEFAULT_TARGET_VOXELS[n] / 1e6:.1f}M" for n in (2, 3)}
    assert f"~{voxels[3]} voxels in 3D, {voxels[2]} in 2D" in run["--chunks"]
    assert REGION_PATCHES == 2 and "two training patches" in run["--region-size"]
    assert f"default: {TrainSettings().regions})" in run["--regions"]
    shape = inspect.signature(make_example).parameters["shape"].default
    assert f"default: {','.join(map(str, shape))})" in _help("make-example")["--shape"]
    assert f"default: {PSFSettings().refractive_index}" in run["--refractive-index"]
    cluster = ClusterSettings()
    assert f"default: {cluster.worker_timeout:g})" in run["--worker-timeout"]
    assert f"default: {cluster.threads_per_worker})" in run["--threads-per-worker"]
