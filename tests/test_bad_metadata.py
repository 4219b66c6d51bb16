"""Bad OME-NGFF metadata, optics and limits: one line on stderr naming the problem and the fix,
exit status 2, the input unchanged and no output written (issue 13, item 7)."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import run_cli, smooth_volume, tree_digest

from ssi_dask.cli import main
from ssi_dask.psf import save_psf, widefield_psf

pytest.importorskip("ome_zarr")

VOXEL = (0.3, 0.15, 0.15)
SHAPE = (12, 32, 32)
OPTICS = ("--na", "1.0", "--wavelength", "0.52")


def write_ome(path: Path, version: str = "0.4", edit=None, **extra) -> Path:
    """A one-level zyx OME-Zarr image written by ome-zarr-py; ``edit`` changes a copy of
    its multiscales list (``edit(multiscales)`` may return a replacement); ``extra`` adds
    attributes next to it (e.g. ``omero``)."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscale

    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    write_multiscale(
        [smooth_volume(SHAPE)],
        group,
        fmt=FormatV04() if version == "0.4" else FormatV05(),
        axes=[{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        coordinate_transformations=[[{"type": "scale", "scale": list(VOXEL)}]],
        storage_options={"chunks": (12, 16, 16)},
    )
    if edit is not None or extra:
        attrs = json.loads(json.dumps(dict(group.attrs)))
        block = attrs["ome"] if version == "0.5" else attrs
        multiscales = copy.deepcopy(block["multiscales"])
        changed = edit(multiscales) if edit is not None else None
        block["multiscales"] = multiscales if changed is None else changed
        block.update(extra)
        group.attrs.put(attrs)
    return path


def _scale(multiscales) -> list:
    return multiscales[0]["datasets"][0]["coordinateTransformations"][0]["scale"]


def _set_scale(values):
    def edit(multiscales):
        _scale(multiscales)[:] = values

    return edit


def _two_axes(multiscales):  # a 3D array declared as yx
    multiscales[0]["axes"] = multiscales[0]["axes"][1:]
    multiscales[0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [0.15, 0.15]


INVALID = "has invalid OME-NGFF metadata: "
FIX = "; fix the multiscales metadata (see ngff.openmicroscopy.org) or re-export the image"

# name -> (edit of the multiscales list, NGFF version, expected message after the input path)
METADATA_CASES = {
    "multiscales a dict": (lambda m: m[0], "0.4", INVALID + "multiscales is dict {"),
    "multiscales a string": (lambda m: "zyx", "0.4", INVALID + "multiscales is str 'zyx', not a"),
    "multiscales [1]": (lambda m: [1], "0.4", INVALID + "multiscales[0] is int 1, not an object"),
    "multiscales empty": (lambda m: [], "0.4", INVALID + "multiscales is list [], not a non-empty"),
    "multiscales a dict (0.5)": (lambda m: m[0], "0.5", INVALID + "multiscales is dict {"),
    "no datasets": (
        lambda m: m[0].pop("datasets") and None,
        "0.4",
        INVALID + "datasets is NoneType None, not a non-empty list" + FIX,
    ),
    "dataset without path": (
        lambda m: m[0]["datasets"][0].pop("path") and None,
        "0.4",
        "not an object with a path" + FIX,
    ),
    "axes a string": (
        lambda m: m[0].update(axes="zyx"),
        "0.4",
        INVALID + "axes is str 'zyx', not a list of axis objects" + FIX,
    ),
    "axes as names": (
        lambda m: m[0].update(axes=["z", "y", "x"]),
        "0.4",
        INVALID + "axis 0 is 'z', not an object with a name" + FIX,
    ),
    "transformations a string": (
        lambda m: m[0]["datasets"][0].update(coordinateTransformations="scale"),
        "0.4",
        INVALID + "dataset 0 has coordinateTransformations 'scale', not a non-empty list" + FIX,
    ),
    "no transformations": (
        lambda m: m[0]["datasets"][0].pop("coordinateTransformations") and None,
        "0.4",
        INVALID + "dataset 0 has coordinateTransformations None, not a non-empty list" + FIX,
    ),
    "translation before scale": (
        lambda m: m[0]["datasets"][0]["coordinateTransformations"].insert(
            0, {"type": "translation", "translation": [0, 0, 0]}
        ),
        "0.4",
        "has coordinateTransformations of types ['translation', 'scale']; NGFF needs a scale, "
        "optionally followed by a translation" + FIX,
    ),
    "scale of 2 values for 3 axes": (
        _set_scale([0.15, 0.15]),
        "0.4",
        INVALID + "dataset 0 has a scale of [0.15, 0.15]; NGFF needs 3 numbers, one per axis",
    ),
    "zero scale": (
        _set_scale([0.0, 0.15, 0.15]),
        "0.4",
        INVALID + "dataset 0 has a scale [0.0, 0.15, 0.15]; every scale (voxel size) must be "
        "above 0" + FIX,
    ),
    "negative scale (0.5)": (
        _set_scale([-0.3, 0.15, 0.15]),
        "0.5",
        INVALID + "dataset 0 has a scale [-0.3, 0.15, 0.15]; every scale (voxel size) must be "
        "above 0",
    ),
    "NaN scale": (
        _set_scale([float("nan"), 0.15, 0.15]),
        "0.4",
        INVALID + "dataset 0 has a scale [nan, 0.15, 0.15] with NaN or Inf" + FIX,
    ),
    "2 axes on a 3D array": (
        _two_axes,
        "0.4",
        "has axes ['y', 'x'] but its level 's0' has 3 dimensions (12, 32, 32); fix the axes in "
        "the multiscales metadata (one per array dimension)",
    ),
    "level that is not there": (
        lambda m: m[0]["datasets"][0].update(path="s9"),
        "0.5",
        "lists the level 's9', which is not a Zarr array in the group; fix the multiscales "
        "datasets or restore the level",
    ),
}


@pytest.fixture
def psf_path(tmp_path) -> Path:
    path = tmp_path / "psf.tif"
    save_psf(path, widefield_psf((7, 9, 9), VOXEL, na=1.0, wavelength=0.52), VOXEL)
    return path


def _check(status: int, stderr: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert status == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("ssi-dask: error: "), lines[0]
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("with_psf", [False, True], ids=["optics", "psf-file"])
def test_bad_ome_metadata_is_one_line(tmp_path, psf_path, capsys, with_psf):
    psf_options = ("--psf", psf_path) if with_psf else OPTICS
    for number, (name, (edit, version, message)) in enumerate(METADATA_CASES.items()):
        source = write_ome(tmp_path / f"case{number}.ome.zarr", version, edit)
        before = tree_digest(source)
        out = tmp_path / f"out{number}.ome.zarr"
        status = main(["run", str(source), str(out), *map(str, psf_options)])
        try:
            stderr = capsys.readouterr().err
            _check(status, stderr, message)
            assert f"ssi-dask: error: input '{source}' " in stderr, stderr
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None
        assert tree_digest(source) == before, name
        assert not out.exists(), name


OMERO_CASES = {
    "omero a string": ("x", "omero is str 'x', not an object"),
    "channels a dict": ({"channels": {"a": 1}}, "channels is dict {'a': 1}, not a list"),
    "channel an int": ({"channels": [1]}, "channel 0 is 1, not an object"),
    "label a list": ({"channels": [{"label": ["x"]}]}, "channel 0 has a label of ['x'], not text"),
}


def test_bad_omero_metadata_is_one_line(tmp_path, capsys):
    """Display metadata used for channel names and the output's colours (a traceback after
    the whole output was written, before)."""
    for number, (name, (omero, problem)) in enumerate(OMERO_CASES.items()):
        source = write_ome(tmp_path / f"omero{number}.ome.zarr", "0.5", omero=omero)
        before = tree_digest(source)
        out = tmp_path / "out.ome.zarr"
        status = main(["run", str(source), str(out), *OPTICS])
        message = (
            f"input '{source}' has invalid omero metadata: {problem}; fix it or remove the "
            "omero block (display settings only)"
        )
        try:
            _check(status, capsys.readouterr().err, message)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None
        assert tree_digest(source) == before and not out.exists(), name


def test_zero_scale_no_longer_divides_by_zero(tmp_path, capsys):
    # the case of the issue: a zero z scale with --na (a ZeroDivisionError traceback before)
    source = write_ome(tmp_path / "img.ome.zarr", "0.4", _set_scale([0.0, 0.15, 0.15]))
    before = tree_digest(source)
    status = main(["run", str(source), str(tmp_path / "out.ome.zarr"), *OPTICS, "--dry-run"])
    _check(status, capsys.readouterr().err, f"input '{source}' {INVALID}dataset 0 has a scale")
    assert tree_digest(source) == before


def test_valid_ome_input_still_plans(tmp_path, capsys):
    """The checks pass the metadata ome-zarr-py writes, 0.4 and 0.5."""
    for version in ("0.4", "0.5"):
        source = write_ome(tmp_path / f"good{version}.ome.zarr", version)
        status = main(["run", str(source), str(tmp_path / "o.ome.zarr"), *OPTICS, "--dry-run"])
        printed = capsys.readouterr()
        assert status == 0, printed.err
        assert f"OME-NGFF {version}, level 0, axes zyx, voxel size (0.3, 0.15, 0.15) um" in (
            printed.out
        )


OPTICS_CASES = {
    "NaN voxel size": (
        ("--voxel-size", "nan,0.15,0.15", *OPTICS),
        "--voxel-size needs positive values in micrometres, got 'nan,0.15,0.15'",
    ),
    "zero NA": (
        ("--voxel-size", "0.3,0.15,0.15", "--na", "0", "--wavelength", "0.52"),
        "--na must be above 0 and below the refractive index 1.33, got 0.0",
    ),
    "NaN NA": (
        ("--voxel-size", "0.3,0.15,0.15", "--na", "nan", "--wavelength", "0.52"),
        "--na must be above 0 and below the refractive index 1.33, got nan",
    ),
    "infinite wavelength": (
        ("--voxel-size", "0.3,0.15,0.15", "--na", "1", "--wavelength", "inf"),
        "--wavelength must be positive micrometres (e.g. 0.52), got inf",
    ),
    "zero refractive index": (
        ("--voxel-size", "0.3,0.15,0.15", *OPTICS, "--refractive-index", "0"),
        "--refractive-index must be a finite number > 0, got 0.0",
    ),
}


def test_bad_optics_are_one_line(tmp_path, capsys):
    source = tmp_path / "plain.zarr"
    zarr.create_array(store=str(source), shape=SHAPE, chunks=(12, 16, 16), dtype="f4")[...] = (
        smooth_volume(SHAPE)
    )
    before = tree_digest(source)
    for name, (options, message) in OPTICS_CASES.items():
        out = tmp_path / "out.zarr"
        status = main(["run", str(source), str(out), *options])
        try:
            _check(status, capsys.readouterr().err, message)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None
        assert tree_digest(source) == before and not out.exists(), name


@pytest.fixture
def plain(tmp_path) -> Path:
    source = tmp_path / "plain.zarr"
    zarr.create_array(store=str(source), shape=SHAPE, chunks=(12, 16, 16), dtype="f4")[...] = (
        smooth_volume(SHAPE)
    )
    return source


MEMORY_CASES = {
    "banana": "--memory-limit 'banana' is not a memory size; give e.g. 4GiB or 500MB, a "
    "fraction of the machine's memory such as 0.5, or leave it out",
    "-1GB": "--memory-limit '-1GB' is not a memory size",
    # a silent hang before (the worker paused for good)
    "150MB": "--memory-limit 150MB gives each worker 143.05 MiB, but one task needs ~",
    # "all workers gone" before (the nanny killed the worker again and again)
    "50MB": "--memory-limit 50MB gives each worker 47.68 MiB, but one task needs ~",
}


def test_memory_limit_too_small_is_refused_before_the_cluster(tmp_path, plain, psf_path):
    before = tree_digest(plain)
    for value, message in MEMORY_CASES.items():
        out = tmp_path / "out.zarr"
        result = run_cli(
            "run", plain, out, "--psf", psf_path, "--workers", "1", f"--memory-limit={value}",
            "--worker-timeout", "20", timeout=120,
        )  # fmt: skip
        try:
            _check(result.returncode, result.stderr, message)
        except AssertionError as exc:
            raise AssertionError(f"--memory-limit {value}: {exc}") from None
        assert "dask:" not in result.stdout  # refused before the cluster started
        assert tree_digest(plain) == before and not out.exists(), value
    assert "Dask's pause threshold (80% of the limit, where the run would stall); give " in (
        result.stderr
    )


def test_the_suggested_memory_limit_runs(tmp_path, plain, psf_path):
    """The size the refusal names is enough: the run with it finishes (no pause, no kill)."""
    from ssi_dask.verify import verify_output

    refused = run_cli("run", plain, tmp_path / "o.zarr", "--psf", psf_path, "--workers", "1",
                      "--memory-limit", "150MB", timeout=120)  # fmt: skip
    suggested = re.search(r"give --memory-limit (\d+)MiB or more", refused.stderr)
    assert refused.returncode == 2 and suggested, refused.stderr
    out = tmp_path / "out.zarr"
    result = run_cli(
        "run", plain, out, "--psf", psf_path, "--workers", "1", "--no-progress",
        "--memory-limit", f"{suggested.group(1)}MiB", "--worker-timeout", "30", timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert verify_output(out).ok


def test_memory_check_also_in_dry_run_and_before_ssi_training(plain, psf_path, tmp_path, capsys):
    before = tree_digest(plain)
    out = tmp_path / "out.zarr"
    status = main(["run", str(plain), str(out), "--psf", str(psf_path), "--dry-run",
                   "--memory-limit", "100MB"])  # fmt: skip
    _check(status, capsys.readouterr().err, "--memory-limit 100MB gives each worker 95.37 MiB")
    # SSI: refused before training (a worker imports torch: its baseline alone is too much)
    status = main(["run", str(plain), str(out), "--psf", str(psf_path), "--method", "ssi",
                   "--memory-limit", "300MB"])  # fmt: skip
    printed = capsys.readouterr()
    _check(status, printed.err, "--memory-limit 300MB gives each worker 286.10 MiB, but a worker "
           "needs ~384.00 MiB with its modules imported")  # fmt: skip
    assert "training" not in printed.out
    assert tree_digest(plain) == before and not out.exists()


def test_memory_rule_follows_threads_chunks_and_dask_thresholds():
    import dask

    from ssi_dask.cluster import TASKS_IN_FLIGHT, WORKER_BASELINE_BYTES, check_worker_memory
    from ssi_dask.errors import ParameterError

    mib = 2**20
    task = 100 * mib
    fits = (WORKER_BASELINE_BYTES["lr"] + TASKS_IN_FLIGHT * task) / 0.8  # exactly at the pause
    assert check_worker_memory(f"{int(fits) + 1}B", 1, task) == int(fits) + 1
    with pytest.raises(ParameterError, match=r"or more, or smaller chunks=$"):
        check_worker_memory(f"{int(fits) - mib}B", 1, task)
    # two threads: twice the tasks in flight, and the hint names the threads too
    with pytest.raises(ParameterError, match="4 tasks in flight.*fewer threads_per_worker"):
        check_worker_memory(f"{int(fits) + 1}B", 2, task)
    # without pausing, the terminate threshold (95 %) is the limit
    with dask.config.set({"distributed.worker.memory.pause": False}):
        assert check_worker_memory(f"{int(fits * 0.8 / 0.95) + 1}B", 1, task)
    assert check_worker_memory("0", 1, task) is None  # 0: no limit, as in Dask
    # the default limit (the machine's memory shared by the cores): fewer workers help too
    with pytest.raises(ParameterError, match="^the default memory limit .* fewer workers=, or"):
        check_worker_memory(None, 1, 2**50)


def _truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_failing_runs_print_exactly_one_line(tmp_path, plain, psf_path, monkeypatch):
    """Library warnings and log records (here tifffile's, in this process and on the local
    cluster's workers) do not add lines to a failing run's one-line error."""
    import tifffile

    image = tmp_path / "image.tif"
    tifffile.imwrite(image, smooth_volume(SHAPE))
    ome = write_ome(tmp_path / "dict.ome.zarr", "0.4", lambda m: m[0])
    cases = [
        (
            ("run", plain, "--psf", _truncated_copy(psf_path, tmp_path / "cut_psf.tif")),
            "PSF file '",
        ),
        (
            (
                "run",
                _truncated_copy(image, tmp_path / "cut.tif"),
                "--psf",
                psf_path,
                "--workers",
                "1",
                "--no-progress",
            ),
            "computing the chunk [0:12, 0:32, 0:32] failed (TiffFileError: ",
        ),  # fmt: skip
        (("run", ome, *OPTICS), INVALID + "multiscales is dict"),
        (("run", plain, "--psf", psf_path, "--memory-limit", "64MiB"), "gives each worker"),
    ]
    for number, ((command, source, *options), message) in enumerate(cases):
        before = tree_digest(source)
        out = tmp_path / f"out{number}.zarr"
        result = run_cli(command, source, out, *options, timeout=180)
        try:
            _check(result.returncode, result.stderr, message)
        except AssertionError as exc:
            raise AssertionError(f"{source.name}: {exc}") from None
        assert tree_digest(source) == before
    # the libraries did speak: with SSI_DASK_DEBUG=1 their records are shown again
    monkeypatch.setenv("SSI_DASK_DEBUG", "1")
    debug = run_cli("run", plain, tmp_path / "o.zarr", "--psf", tmp_path / "cut_psf.tif")
    assert len(debug.stderr.strip().splitlines()) > 1, debug.stderr


def test_own_warnings_become_one_line_library_warnings_are_not_shown(capsys):
    import warnings

    import ssi_dask.lr
    from ssi_dask.quiet import SsiDaskWarning, quiet_libraries

    shown, handlers = warnings.showwarning, list(logging.getLogger().handlers)
    with warnings.catch_warnings(), quiet_libraries():
        warnings.simplefilter("always")
        warnings.warn_explicit(
            "clipped 12 negative voxels\nsecond line", UserWarning, ssi_dask.lr.__file__, 1
        )
        warnings.warn_explicit("noisy", RuntimeWarning, np.__file__, 1)
        # a by-product in ssi-dask's own line (numpy's invalid value) is not shown either
        warnings.warn_explicit("invalid value", RuntimeWarning, ssi_dask.lr.__file__, 2)
        warnings.warn_explicit("chosen", SsiDaskWarning, np.__file__, 3)
        logging.getLogger("tifffile").warning("<tifffile.TiffPages @8> invalid page offset")
        logging.getLogger("ssi_dask.lr").warning("own log record")
    assert capsys.readouterr().err.splitlines() == [
        "ssi-dask: warning: clipped 12 negative voxels",
        "ssi-dask: warning: chosen",
        "ssi-dask: warning: own log record",
    ]
    # restored afterwards (main() runs in-process in tests and in users' scripts)
    assert warnings.showwarning is shown and logging.getLogger().handlers == handlers
