"""Self-supervised choice of the Lucy-Richardson iteration count (and Wiener-Butterworth alpha).

Too few iterations leave the image blurred, too many amplify noise, and the best count depends
on the noise. Without ground truth it is chosen here by a J-invariant hold-out criterion
(the idea of Noise2Self and of SSI's masked loss):

1. a few chunks are sampled from the volume (seeded positions);
2. in each, a random pixel subset ``J`` (density ``density``) is held out: those pixels get
   zero weight in the data term (ratio set to zero, edge weights ``b * (1 - 1_J)``), so the
   estimate never sees them;
3. after every iteration the held-out pixels are predicted through the forward model
   (``h * x``) and the squared prediction errors are summed;
4. among all candidates (iteration counts, and for Wiener-Butterworth the alphas of a small
   grid) the one with the smallest mean error over all samples and masks is found; its alpha
   is kept, and the *fewest* iterations whose mean error lies within one standard error of
   that minimum are chosen (the one-standard-error rule of cross-validation).

The noise at ``J`` is independent of everything the estimate saw, so the error does not
reward fitting the noise: it falls while the estimate gains real structure and rises when
noise amplification sets in. Because it is measured after blurring with the PSF, it barely
penalises the high-frequency noise that late classic iterations add (the curve is flat
there while the PSNR against the truth already falls): the one-standard-error rule stops
where the remaining gain is no longer significant, which on the protocol images lands near
the PSNR-best count where the plain minimum overshoots by 1-2 dB.

``rule="paired"`` (opt-in; SSI's ``lr_prior_rule``) measures the standard error on the
per-pixel *difference* between each count's error and the best count's instead: the noise of
the held-out pixels, common to every count, cancels, so it stops closer to the minimum (on
the 3D benchmark's beads at 71 iterations where the one-standard-error rule stops at 25 and
the minimum lies at 93). With ``acceleration="nesterov"`` the counts scored are those of the
accelerated iterations (:meth:`ssi_dask.lr.RLPlan.deconvolve`).

It is computed once per volume, before the chunked run, as Dask tasks (on the cluster when a
``distributed`` client is active).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np

from .config import DEFAULT_AUTO_MAX_ITER, DEFAULT_AUTO_SAMPLES, PRIOR_RULES, one_of
from .errors import ParameterError
from .lr import (
    _check_acceleration,
    _check_edge_threshold,
    _check_positive,
    _prepare_psf,
    get_plan,
    resolve_back_projector,
)

__all__ = [
    "AutoChoice",
    "CHOICE_RULES",
    "DEFAULT_ALPHAS",
    "DEFAULT_MAX_ITER",
    "choose_iterations",
    "holdout_errors",
    "holdout_products",
    "sample_slices",
]

#: Largest iteration count scored, per back projector.
DEFAULT_MAX_ITER = DEFAULT_AUTO_MAX_ITER  # defined in ssi_dask.config
#: Wiener alphas tried by default (Wiener-Butterworth).
DEFAULT_ALPHAS = (0.003, 0.01, 0.03, 0.1, 0.3)
#: Rules for the count below the hold-out error's minimum (see :func:`choose_iterations`).
CHOICE_RULES = PRIOR_RULES  # defined in ssi_dask.config
#: Size of a sampled chunk per dimensionality (capped at the volume's shape).
SAMPLE_SHAPE = {2: (256, 256), 3: (64, 128, 128)}


@dataclass
class AutoChoice:
    """The outcome of :func:`choose_iterations`.

    Attributes
    ----------
    num_iter : int
        Chosen iteration count.
    wiener_alpha : float or None
        Chosen Wiener alpha (Wiener-Butterworth), else ``None``.
    back_projector : str
        ``"classic"`` or ``"wiener-butterworth"``.
    errors : dict
        Mean squared prediction error of the held-out pixels per candidate: key ``"classic"``
        or the alpha as a string, value a list indexed by the iteration count (0 .. max).
    samples : list of list of int
        Start index of each sampled chunk.
    sample_shape, density, n_masks, seed, max_iter, rule, acceleration
        The settings used.
    """

    num_iter: int
    wiener_alpha: float | None
    back_projector: str
    errors: dict[str, list[float]]
    samples: list[list[int]]
    sample_shape: tuple[int, ...]
    density: float
    n_masks: int
    seed: int
    max_iter: int
    held_out_pixels: int = field(default=0)
    rule: str = field(default="one-se")
    acceleration: str = field(default="none")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly record for the output's provenance."""
        record = {
            "criterion": "J-invariant hold-out: held-out pixels predicted through the PSF",
            "num_iter": self.num_iter,
            "wiener_alpha": self.wiener_alpha,
            "back_projector": self.back_projector,
            "max_iter": self.max_iter,
            "samples": self.samples,
            "sample_shape": list(self.sample_shape),
            "density": self.density,
            "n_masks": self.n_masks,
            "seed": self.seed,
            "held_out_pixels": self.held_out_pixels,
            "errors": {k: [float(f"{v:.6g}") for v in vals] for k, vals in self.errors.items()},
        }
        # recorded only when not the default (records written before stay as they were)
        if self.rule != "one-se":
            record["rule"] = self.rule
        if self.acceleration != "none":
            record["acceleration"] = self.acceleration
        return record

    def summary(self) -> str:
        """One line for the console."""
        alpha = f", wiener alpha {self.wiener_alpha:g}" if self.wiener_alpha is not None else ""
        return (
            f"auto iterations: {self.num_iter}{alpha} ({self.back_projector} back projector; "
            f"hold-out criterion on {len(self.samples)} sampled "
            f"chunk{'s' if len(self.samples) != 1 else ''} of "
            f"{'x'.join(map(str, self.sample_shape))}, {self.held_out_pixels} held-out pixels)"
        )


def sample_slices(
    shape: Sequence[int],
    sample_shape: Sequence[int],
    n_samples: int,
    seed: int = 0,
) -> list[tuple[slice, ...]]:
    """Seeded, distinct positions of ``n_samples`` boxes of ``sample_shape`` inside ``shape``.

    When the volume holds fewer distinct boxes than asked for (e.g. it is no larger than one
    box), fewer are returned.
    """
    shape = tuple(int(s) for s in shape)
    box = tuple(min(int(b), s) for b, s in zip(sample_shape, shape, strict=True))
    rng = np.random.default_rng(seed)
    room = [s - b + 1 for s, b in zip(shape, box)]
    n_samples = min(max(1, int(n_samples)), math.prod(room))
    picks: list[tuple[int, ...]] = []
    while len(picks) < n_samples:
        start = tuple(int(rng.integers(0, r)) for r in room)
        if start not in picks:
            picks.append(start)
    return [tuple(slice(s, s + b) for s, b in zip(start, box)) for start in picks]


def holdout_errors(
    block: np.ndarray,
    psf: np.ndarray,
    *,
    max_iter: int,
    density: float = 0.05,
    n_masks: int = 2,
    seed: int = 0,
    back_projector: str = "classic",
    edge_threshold: float = 1e-3,
    eps: float = 1e-6,
    workers: int = 1,
    acceleration: str = "none",
    paired: bool = False,
    **back_projector_options: Any,
) -> tuple[np.ndarray, int]:
    """Summed squared prediction errors of held-out pixels of one block, per iteration count.

    Returns the sums of ``e^2`` and ``e^4`` per iteration count (shape ``(max_iter + 1, 2)``,
    over ``n_masks`` independent masks; see :meth:`ssi_dask.lr.RLPlan.holdout_errors`) and the
    number of held-out pixels they cover; with ``paired``, :func:`holdout_products`'s matrix
    instead. A pure per-block function: no I/O.
    """
    block = np.ascontiguousarray(block, dtype=np.float32)
    spec = resolve_back_projector(psf, back_projector, **back_projector_options)
    plan = get_plan(psf, tuple(block.shape), edge_threshold=edge_threshold, back_projector=spec)
    rng = np.random.default_rng(seed)
    total = np.zeros((max_iter + 1, max_iter + 2 if paired else 2), dtype=np.float64)
    count = 0
    for _ in range(n_masks):
        held = rng.random(block.shape) < density
        errors = plan.holdout_errors(
            block,
            held,
            max_iter,
            eps=eps,
            workers=workers,
            per_pixel=paired,
            acceleration=acceleration,
        )
        if paired:  # errors: every held-out pixel's e^2 per count
            squared = errors.astype(np.float64)
            total[:, 0] += squared.sum(axis=1)
            total[:, 1:] += squared @ squared.T
        else:
            total += errors
        count += int(held.sum())
    return total, count


def holdout_products(block: np.ndarray, psf: np.ndarray, **options: Any) -> tuple[np.ndarray, int]:
    """Sums and products of held-out pixels' squared errors of one block, for paired comparisons.

    :func:`holdout_errors` with ``paired=True`` (same options; the same masks for the same
    ``seed``): the matrix ``G[n, m] = sum_j e_n(j)^2 e_m(j)^2`` over the held-out pixels ``j``
    with one extra first column holding ``sum_j e_n(j)^2`` (shape ``(max_iter + 1, max_iter +
    2)``) and the number of held-out pixels: from them the standard error of the *difference*
    between two counts' mean errors follows (the noise common to both cancels).
    """
    return holdout_errors(block, psf, paired=True, **options)


def _paired_choice(
    sums: dict[str, np.ndarray], candidates: list[float | None], held_out: int
) -> tuple[str, int, float | None]:
    """The alpha of the smallest mean error, then the fewest iterations whose mean error is
    not above the best count's by more than one standard error of the paired difference."""
    count = max(held_out, 1)
    table = []
    for alpha in candidates:
        key = "classic" if alpha is None else f"{alpha:g}"
        mean = sums[key][:, 0] / count
        table += [(float(mean[n]), n, alpha, key) for n in range(1, mean.size)]
    best_mean, best_n, best_alpha, best_key = min(table, key=lambda row: row[0])
    mean = sums[best_key][:, 0] / count
    gram = sums[best_key][:, 1:] / count
    diagonal = np.diag(gram)
    difference = mean - best_mean
    variance = diagonal - 2 * gram[:, best_n] + gram[best_n, best_n] - difference**2
    standard_error = np.sqrt(np.maximum(variance, 0.0) / count)
    n = next(n for n in range(1, mean.size) if difference[n] <= standard_error[n])
    return best_key, n, best_alpha


def _one_standard_error_choice(
    sums: dict[str, np.ndarray], candidates: list[float | None], held_out: int
) -> tuple[str, int, float | None]:
    """The alpha of the smallest mean error, then the fewest iterations within one SE of it."""
    count = max(held_out, 1)
    table = []
    for alpha in candidates:
        key = "classic" if alpha is None else f"{alpha:g}"
        mean = sums[key][:, 0] / count
        variance = np.maximum(sums[key][:, 1] / count - mean**2, 0.0)
        for n in range(1, mean.size):  # at least one iteration
            table.append((float(mean[n]), float(np.sqrt(variance[n] / count)), n, alpha, key))
    best_mean, best_se, _, best_alpha, best_key = min(table, key=lambda row: row[0])
    n = min(row[2] for row in table if row[4] == best_key and row[0] <= best_mean + best_se)
    return best_key, n, best_alpha


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def choose_iterations(
    image: Any,
    psf: np.ndarray,
    *,
    back_projector: str = "classic",
    max_iter: int | None = None,
    alphas: Sequence[float] | None = None,
    wiener_alpha: float | None = None,
    n_samples: int = DEFAULT_AUTO_SAMPLES,
    sample_shape: Sequence[int] | None = None,
    density: float = 0.05,
    n_masks: int = 2,
    seed: int = 0,
    edge_threshold: float = 1e-3,
    eps: float = 1e-6,
    rule: str = "one-se",
    acceleration: str = "none",
    **back_projector_options: Any,
) -> AutoChoice:
    """Choose the iteration count (and Wiener alpha) for a volume without ground truth.

    Parameters
    ----------
    image : numpy.ndarray, dask.array.Array, zarr.Array or str
        2D or 3D image or a path to a Zarr array; only the sampled chunks are read.
    psf : numpy.ndarray
        PSF with the image's dimensionality (normalised here).
    back_projector : {"classic", "wiener-butterworth"}
        Back projector of the run the choice is for.
    max_iter : int, optional
        Largest count scored (default 50 classic, 10 Wiener-Butterworth).
    alphas : sequence of float, optional
        Wiener alphas tried (Wiener-Butterworth; default ``DEFAULT_ALPHAS``).
    wiener_alpha : float, optional
        Fix alpha instead of choosing it (Wiener-Butterworth).
    n_samples : int
        Number of chunks sampled (default 4).
    sample_shape : sequence of int, optional
        Size of a sampled chunk (default 256x256 in 2D, 64x128x128 in 3D, capped at the
        image's shape).
    density : float
        Fraction of pixels held out per mask (default 0.05).
    n_masks : int
        Independent masks per sampled chunk (default 2).
    seed : int
        Seed of the chunk positions and the masks.
    edge_threshold, eps
        As in :func:`ssi_dask.lr.richardson_lucy`.
    rule : {"one-se", "paired"}
        How far below the minimum the count may go: ``"one-se"`` takes the fewest iterations
        whose mean error lies within one standard error (of the mean) of the minimum;
        ``"paired"`` the fewest whose mean error exceeds the minimum's by no more than one
        standard error of the per-pixel *difference* to the best count (the noise common to
        both cancels, so it stops closer to the minimum).
    acceleration : {"none", "nesterov"}
        The iterations scored (see :meth:`ssi_dask.lr.RLPlan.deconvolve`).
    **back_projector_options
        ``butterworth_order`` and ``cutoff`` (Wiener-Butterworth).

    Returns
    -------
    AutoChoice
        The chosen count (``>= 1``), alpha, and the error curves.

    Raises
    ------
    ParameterError
        For a bad setting (names the setting and the accepted values).
    """
    from .io import open_volume  # noqa: PLC0415
    from .psf import normalize_psf, validate_psf  # noqa: PLC0415

    volume = open_volume(image)
    validate_psf(psf, volume.ndim)
    psf = _prepare_psf(normalize_psf(psf), volume.ndim, normalize=True)
    spec = resolve_back_projector(
        psf, back_projector, wiener_alpha=wiener_alpha, **back_projector_options
    )
    wb = spec.kind == "wiener-butterworth"
    max_iter = _check_int(
        "max_iter", DEFAULT_MAX_ITER[spec.kind] if max_iter is None else max_iter, 1
    )
    n_samples = _check_int("n_samples", n_samples, 1)
    n_masks = _check_int("n_masks", n_masks, 1)
    seed = _check_int("seed", seed, 0)
    density = _check_positive("density", density)
    if density >= 0.5:
        raise ParameterError(f"density must be below 0.5 (a fraction held out), got {density}")
    _check_edge_threshold(edge_threshold)
    one_of("rule", rule, CHOICE_RULES)
    acceleration = _check_acceleration(acceleration)
    if alphas is not None and not wb:
        raise ParameterError("alphas only apply to the Wiener-Butterworth back projector")
    if wb:
        candidates = (
            [spec.wiener_alpha]
            if wiener_alpha is not None
            else [_check_positive("alphas", a) for a in (alphas or DEFAULT_ALPHAS)]
        )
        if not candidates:
            raise ParameterError("alphas must hold at least one value")
    else:
        candidates = [None]
    box = tuple(
        min(int(b), s)
        for b, s in zip(sample_shape or SAMPLE_SHAPE[volume.ndim], volume.shape, strict=True)
    )
    if any(b < k for b, k in zip(box, psf.shape)):
        raise ParameterError(
            f"the sampled chunk {box} is smaller than the PSF {psf.shape}; "
            "give a larger sample_shape"
        )
    slices = sample_slices(volume.shape, box, n_samples, seed)
    options = dict(back_projector_options)
    tasks = []
    psf_key = dask.delayed(psf, traverse=False)
    for i, where in enumerate(slices):
        block = volume.data[where]
        for alpha in candidates:
            extra = {"wiener_alpha": alpha, **options} if wb else {}
            tasks.append(
                dask.delayed(holdout_errors)(
                    block,
                    psf_key,
                    max_iter=max_iter,
                    density=density,
                    n_masks=n_masks,
                    seed=seed * 1000 + i,
                    back_projector=spec.kind,
                    edge_threshold=edge_threshold,
                    eps=eps,
                    acceleration=acceleration,
                    paired=rule == "paired",
                    **extra,
                )
            )
    results = dask.compute(*tasks)
    sums: dict[str, np.ndarray] = {}
    held_out = 0
    for index, (err, count) in enumerate(results):
        alpha = candidates[index % len(candidates)]
        key = "classic" if alpha is None else f"{alpha:g}"
        sums[key] = sums.get(key, 0) + err
        if index % len(candidates) == 0:
            held_out += count
    choice = _paired_choice if rule == "paired" else _one_standard_error_choice
    _, best_n, chosen_alpha = choice(sums, candidates, held_out)
    return AutoChoice(
        num_iter=best_n,
        wiener_alpha=chosen_alpha,
        back_projector=spec.kind,
        errors={k: list(v[:, 0] / max(held_out, 1)) for k, v in sums.items()},
        samples=[[s.start for s in where] for where in slices],
        sample_shape=box,
        density=density,
        n_masks=n_masks,
        seed=seed,
        max_iter=max_iter,
        held_out_pixels=held_out,
        rule=rule,
        acceleration=acceleration,
    )


def choose_iterations_within(
    image: Any,
    psf: np.ndarray,
    *,
    plan_for: Any = None,
    max_iter: int | None = None,
    offset: float = 0.0,
    echo: Any = None,
    **options: Any,
) -> AutoChoice:
    """:func:`choose_iterations` limited to the counts whose halo fits the chunks.

    The one implementation of ``num_iter="auto"`` for :func:`ssi_dask.deconvolve` and
    :func:`ssi_dask.run` (and so the command line). ``plan_for(n)`` plans the run for ``n``
    iterations and raises :class:`~ssi_dask.errors.ParameterError` when their halo does not
    fit (user-set chunks); the largest count that fits is found by bisection (the halo grows
    with the count). ``offset`` is subtracted from the image first, as the run does.
    """
    back_projector = options.get("back_projector", "classic")
    max_iter = max_iter or DEFAULT_MAX_ITER[back_projector]
    if plan_for is not None:

        def fits(num_iter: int) -> bool:
            try:
                plan_for(num_iter)
            except ParameterError:
                return False
            return True

        fitting = max_iter
        if not fits(max_iter):
            low, high = 1, max_iter  # the largest count that fits lies in [low, high)
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if fits(middle) else (low, middle)
            fitting = low
        if fitting < max_iter and echo is not None:
            echo(f"auto iterations: trying 1..{fitting} (the halo of more exceeds the chunks)")
        max_iter = fitting
    if offset:
        import dask.array as da  # noqa: PLC0415

        image = da.asarray(image).astype(np.float32) - np.float32(offset)
    return choose_iterations(image, psf, max_iter=max_iter, **options)
