"""Noise schedules: beta_t builders (float64 NumPy) and the `Schedule` pytree of derived tables.

Index convention: `t` in [0, num_timesteps - 1]; index t is the paper's step t + 1 (the
improved-diffusion / diffusers convention), so `betas[0]` is Ho et al.'s beta_1.

All builders compute in float64 NumPy, as improved-diffusion does, and `Schedule.from_betas`
casts the finished tables to the requested dtype only at the end.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "cosine_betas",
    "linear_betas",
    "rescale_zero_terminal_snr",
    "scaled_linear_betas",
]


def _check_num_timesteps(num_timesteps) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer):
        raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps}")
    return int(num_timesteps)


def _is_number(value) -> bool:
    """A real number: a Python or NumPy int or float, not a bool (nor an array or a string)."""
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def _check_beta_range(name: str, value: float) -> float:
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1); got {value!r}")
    return float(value)


def check_betas(betas) -> np.ndarray:
    """Validates a beta schedule: 1-D, finite, every beta_t in (0, 1]. Returns float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array; got shape {betas.shape}")
    bad = ~np.isfinite(betas) | (betas <= 0.0) | (betas > 1.0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"betas must lie in (0, 1]; got betas[{i}] = {float(betas[i])!r}")
    return betas


def linear_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Linear beta schedule of Ho et al. 2020, section 4.

    Args:
      num_timesteps: T, the number of diffusion steps.
      beta_start: beta_1, in (0, 1).
      beta_end: beta_T, in (0, 1).

    Returns:
      [T] float64 betas, `linspace(beta_start, beta_end, T)`. No rescaling by 1000 / T is
      applied (improved-diffusion does that); pass scaled endpoints for other T.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    beta_start = _check_beta_range("beta_start", beta_start)
    beta_end = _check_beta_range("beta_end", beta_end)
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """Scaled-linear schedule (latent diffusion / Stable Diffusion): linear in sqrt(beta).

    The defaults are Stable Diffusion's (0.00085, 0.012 over T = 1000), not those of diffusers'
    scheduler classes (beta_schedule="scaled_linear" with their default 1e-4, 0.02): pass
    beta_start and beta_end to match a diffusers config.

    Args:
      num_timesteps: T >= 1.
      beta_start, beta_end: beta at t = 0 and t = T - 1, in (0, 1).

    Returns:
      [T] float64 betas, `linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    beta_start = _check_beta_range("beta_start", beta_start)
    beta_end = _check_beta_range("beta_end", beta_end)
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17.

    alpha_bar(u) = cos((u + s) / (1 + s) * pi / 2) ** 2 for u = t / T, and
    beta_t = min(1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), max_beta).

    Args:
      num_timesteps: T.
      s: small offset that keeps beta_1 from being too small near t = 0.
      max_beta: clip on beta_t, in (0, 1], preventing the singularity at t = T.

    Returns:
      [T] float64 betas.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if not _is_number(s) or not s >= 0.0:
        raise ValueError(f"s must be >= 0; got {s!r}")
    if not _is_number(max_beta) or not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must lie in (0, 1]; got {max_beta!r}")

    def alpha_bar(u):
        return np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = alpha_bar(u)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Rescales a schedule so that the last alphas_cumprod is exactly 0 (Lin et al. 2024, Alg. 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is kept;
    the last beta becomes exactly 1 (SNR = 0 at t = T - 1). Use `prediction="v"` with such a
    schedule: eps-prediction cannot recover x0 where alphas_cumprod = 0.

    Args:
      betas: [T] betas in (0, 1], T >= 2.

    Returns:
      [T] float64 betas in (0, 1] with `betas[-1] == 1`.
    """
    betas = check_betas(betas)
    if betas.shape[0] < 2:
        raise ValueError(f"betas must have at least 2 entries to rescale; got {betas.shape[0]}")
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    if not first > last:
        raise ValueError("betas must decrease alphas_cumprod over time to rescale them")
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    out = 1.0 - alphas
    out[-1] = 1.0  # exact, whatever the rounding above
    return out


def _check_timesteps(t, num_timesteps: int) -> jax.Array:
    """`t` as an integer array, in [0, num_timesteps - 1] where it is concrete (a traced t is
    checked at trace time for its dtype only); else ValueError. JAX indexing would clamp or
    wrap an out-of-range t without a word."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"t must be an integer array; got dtype {t.dtype}")
    if not isinstance(t, jax.core.Tracer):
        tc = np.asarray(t)
        if tc.size and (tc.min() < 0 or tc.max() >= num_timesteps):
            raise ValueError(
                f"t must lie in [0, {num_timesteps - 1}]; got values in [{tc.min()}, {tc.max()}]"
            )
    return t


def _check_timestep_subset(timesteps, num_timesteps: int) -> np.ndarray:
    """`timesteps` (concrete) as distinct ints in [0, num_timesteps - 1], sorted ascending;
    else ValueError. A respaced schedule's or a sampler's own subsequence of steps."""
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.shape[0] < 1 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty 1-D int array; got {timesteps!r}")
    ts = np.sort(ts)
    if ts[0] < 0 or ts[-1] >= num_timesteps or np.any(np.diff(ts) == 0):
        raise ValueError(
            f"timesteps must be distinct ints in [0, {num_timesteps - 1}]; got {ts.tolist()}"
        )
    return ts


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-timestep tables of a discrete Gaussian diffusion (Ho et al. 2020, eqs. 4, 6, 7).

    A registered pytree: the tables are leaves (so a `Schedule` passes through `jax.jit` and
    `jax.pmap` as an argument; use `in_axes=None` for pmap), `num_timesteps` is static.

    Fields, each [T] in `dtype`, index t = paper step t + 1:
      betas: beta_t.
      alphas_cumprod: alpha_bar_t = prod_{s <= t} (1 - beta_s).
      alphas_cumprod_prev: alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: alpha_t and sigma_t of
        x_t = alpha_t x0 + sigma_t eps.
      posterior_variance: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t (eq. 7);
        0 at t = 0.
      posterior_log_variance_clipped: log beta_tilde_t with the t = 0 entry replaced by
        beta_tilde at t = 1 (improved-diffusion), so it is finite everywhere.
      posterior_mean_coef1, posterior_mean_coef2: the x0 and x_t coefficients of mu_tilde_t (eq. 7).
      logsnr_table: log(alpha_bar_t / (1 - alpha_bar_t)); -inf where alpha_bar_t = 0.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    logsnr_table: jax.Array
    num_timesteps: int = dataclasses.field(metadata={"static": True})

    @classmethod
    def from_betas(cls, betas, dtype=jnp.float32) -> Schedule:
        """Builds every table in float64 NumPy from [T] betas in (0, 1], then casts to `dtype`.

        Raises:
          ValueError: bad betas, a dtype that is not floating, or float64 with x64 disabled
            (JAX would silently make it float32).
        """
        betas = check_betas(betas)
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"dtype must be a floating dtype; got {dtype}")
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:  # would silently become float32
            raise ValueError(
                f"dtype {dtype} needs 64-bit JAX (jax.config.update('jax_enable_x64', True), or "
                "inside `with jax.enable_x64(True):`); got it with x64 disabled"
            )
        num_timesteps = betas.shape[0]
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        one_minus_abar = 1.0 - abar
        post_var = betas * (1.0 - abar_prev) / one_minus_abar
        # beta_tilde_0 = 0; as in improved-diffusion its log is replaced by that of beta_tilde_1.
        first = post_var[1] if num_timesteps > 1 else betas[0]
        post_logvar = np.log(np.concatenate([[first], post_var[1:]]))
        coef1 = betas * np.sqrt(abar_prev) / one_minus_abar
        coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / one_minus_abar
        with np.errstate(divide="ignore"):
            logsnr = np.log(abar) - np.log(one_minus_abar)
        tables = dict(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_abar),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_logvar,
            posterior_mean_coef1=coef1,
            posterior_mean_coef2=coef2,
            logsnr_table=logsnr,
        )
        return cls(
            **{k: jnp.asarray(v, dtype=dtype) for k, v in tables.items()},
            num_timesteps=num_timesteps,
        )

    def logsnr(self, t: jax.Array) -> jax.Array:
        """log SNR(t) = log(alpha_bar_t / (1 - alpha_bar_t)) at integer `t` [B] (or any shape)."""
        return self.logsnr_table[_check_timesteps(t, self.num_timesteps)]

    def snr(self, t: jax.Array) -> jax.Array:
        """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021) at integer `t`.

        Taken from the float64-built log-SNR table, so it keeps full relative precision near
        t = 0 where 1 - alpha_bar_t cancels in float32; 0 where alpha_bar_t = 0. Exponentiated
        in at least float32: a float16 table's SNR near t = 0 (1e5 for a cosine T = 4000)
        overflows float16.
        """
        logsnr = self.logsnr(t)
        return jnp.exp(logsnr.astype(jnp.promote_types(logsnr.dtype, jnp.float32)))

    def respace(self, timesteps) -> Schedule:
        """The schedule restricted to a subsequence of steps (Nichol & Dhariwal 2021, section 4).

        Keeps alphas_cumprod at the kept steps and sets beta'_i = 1 - abar[k_i] / abar[k_{i-1}],
        so ancestral (DDPM) sampling on the subsequence is a valid Markov chain. The new
        schedule's index i corresponds to the original step `sorted(timesteps)[i]`: call the
        model with the original step, not with i.

        The new tables are built in NumPy, so this schedule must be concrete: call `respace`
        outside `jax.jit` (or on a schedule closed over, not passed as a traced argument).

        Args:
          timesteps: concrete ints in [0, T - 1], any order, no duplicates.

        Returns:
          A `Schedule` with `len(timesteps)` steps, in this schedule's dtype.

        Raises:
          ValueError: bad timesteps, or a traced schedule.
        """
        if isinstance(self.betas, jax.core.Tracer):
            raise ValueError(
                "respace needs a concrete schedule (its tables are rebuilt in NumPy); got a "
                "traced one: respace outside jax.jit or close over the schedule"
            )
        ts = _check_timestep_subset(timesteps, self.num_timesteps)
        abar = np.exp(self._log_alphas_cumprod())[ts]
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        betas = np.minimum(1.0 - abar / abar_prev, 1.0)
        return Schedule.from_betas(betas, dtype=self.betas.dtype)

    def _log_alphas_cumprod(self) -> np.ndarray:
        """log alpha_bar_t in float64, from whichever of this schedule's tables holds it best.

        The cast alphas_cumprod table loses the precision of 1 - alpha_bar near t = 0 (~1e-4
        relative in float32); the betas lose that of 1 - beta_t where beta_t nears 1 (a cosine
        schedule's 0.999, a respaced schedule's last steps: a respace of a respace read
        alpha_bar 100% off); the log-SNR table holds log alpha_bar = -log(1 + exp(-logsnr)) to
        (1 - alpha_bar) |logsnr| rounding units. The cumulative sum of log(1 - beta_s) holds it
        to the root sum of squares of beta_s / (1 - beta_s) units (independent roundings). Each
        step takes the table of the smaller bound.
        """
        betas = np.asarray(self.betas, dtype=np.float64)
        logsnr = np.asarray(self.logsnr_table, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            from_betas = np.cumsum(np.log1p(-betas))  # -inf from a beta of exactly 1
            err_betas = np.sqrt(np.cumsum((betas / (1.0 - betas)) ** 2))
            from_logsnr = -np.logaddexp(0.0, -logsnr)  # -inf where logsnr is -inf (SNR 0)
            err_logsnr = np.where(np.isneginf(logsnr), 0.0, np.abs(logsnr) / (1 + np.exp(logsnr)))
        return np.where(err_logsnr < err_betas, from_logsnr, from_betas)


jax.tree_util.register_dataclass(
    Schedule,
    data_fields=[f.name for f in dataclasses.fields(Schedule) if f.name != "num_timesteps"],
    meta_fields=["num_timesteps"],
)
