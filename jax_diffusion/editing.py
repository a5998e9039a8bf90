"""Editing with an unconditional denoiser: RePaint inpainting and SDEdit image-to-image.

Neither method trains anything: both steer the reverse process of a pretrained model.

- `repaint_sample` (Lugmayr et al. 2022, "RePaint", Algorithm 1): inpainting. At every reverse
  step the known pixels (mask = 1) are replaced by a fresh draw of q(x_{t-1} | x0_known) and the
  unknown ones (mask = 0) come from the model's ancestral step p(x_{t-1} | x_t). The two halves
  are drawn independently, so the result can be incoherent at the seam; RePaint "resamples":
  after every `jump_length` reverse steps the chain is noised forward again by as many steps of
  q(x_t | x_{t-1}) and re-denoised, `jump_n_sample - 1` extra times per jump point
  (`repaint_timesteps`), which lets the unknown region harmonise with the known one.
  `jump_n_sample = 1` is the plain replacement method (Song et al. 2021, score SDE,
  appendix I.2). For Gaussian data the exact conditional is known in closed form:
  tests/test_editing.py measures the gap to it shrink with more resampling.
- `sdedit` (Meng et al. 2022, "SDEdit"): image-to-image. The guide x_guide (a stroke painting,
  a corrupted or out-of-domain image) is noised to an intermediate step t0 by q(x_t0 | x_guide)
  and denoised from there with DDIM (eta = 0, the probability-flow ODE) or its stochastic
  variant (eta = 1, the reverse SDE of the paper). `strength` picks t0 the way diffusers'
  img2img pipelines do: the last int(strength * num_steps) of the sampler's steps are run.
  Strength trades faithfulness to the guide (low) for realism (high).

Both are pure, one `jax.lax.scan` each (sdedit is `ddim_sample` on a tail of its steps), take
any denoiser `model_fn(x, t)` (see `jax_diffusion.samplers`), and work under `jax.jit` and
`jax.vmap`. Masks and guides are broadcast against the batch; arguments are validated eagerly
with a `ValueError` naming the argument.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int as _check_int
from jax_diffusion._checks import check_real
from jax_diffusion._sampling import (
    DenoisedFn,
    ModelFn,
    _alpha_sigma,
    _check_common,
    _check_x,
    _compute_dtype,
    _result,
    _scan,
)
from jax_diffusion.diffusion import _check_rng, _check_zero_snr, _is_concrete, q_sample
from jax_diffusion.samplers import _check_eta, _ddim_timesteps, _respaced, ddim_sample, ddpm_step
from jax_diffusion.schedules import Schedule

__all__ = ["repaint_sample", "repaint_timesteps", "sdedit", "sdedit_timesteps"]


def repaint_timesteps(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> np.ndarray:
    """RePaint's walk over the chain's states (Lugmayr et al. 2022, section 4.2, Figure 3).

    The states are step indices: num_steps - 1 is x_T, s >= 0 the sample at step s, and -1 the
    clean end. The walk goes down one state at a time; at every state j = 0, jump_length,
    2 jump_length, ... below num_steps - jump_length it turns back up jump_length states and comes
    down again, jump_n_sample - 1 times (the schedule of the authors' code, `get_schedule_jump`).

    Args:
      num_steps: the chain's number of steps, >= 1.
      jump_length: states per jump, >= 1 (the paper's j; 10 in its experiments).
      jump_n_sample: passes over each jumped stretch, >= 1 (the paper's r; 10); 1 never jumps.

    Returns:
      int32 [L]: num_steps - 1 first, -1 last, consecutive entries differing by exactly one.
      L = num_steps + 1 + 2 jump_length (jump_n_sample - 1) ceil((num_steps - jump_length) /
      jump_length) for num_steps > jump_length, else num_steps + 1.
    """
    num_steps = _check_int("num_steps", num_steps, 1)
    jump_length = _check_int("jump_length", jump_length, 1)
    jump_n_sample = _check_int("jump_n_sample", jump_n_sample, 1)
    jumps_left = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    s = num_steps - 1
    walk = [s]
    while s >= 0:
        s -= 1
        walk.append(s)
        if jumps_left.get(s, 0) > 0:
            jumps_left[s] -= 1
            walk.extend(range(s + 1, s + jump_length + 1))
            s += jump_length
    return np.asarray(walk, np.int32)


def _check_broadcast(name: str, value, x_T: jax.Array) -> jax.Array:
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    is_mask = name == "mask"
    if not (
        jnp.issubdtype(dtype, jnp.floating)
        or is_mask
        and (jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_)
    ):
        allowed = "a float, int or bool" if is_mask else "a float"
        raise ValueError(f"{name} must be {allowed} array; got dtype {dtype}")
    value = jnp.asarray(value)
    try:
        fits = jnp.broadcast_shapes(value.shape, x_T.shape) == x_T.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} must broadcast to x_T's shape {x_T.shape}; got shape {value.shape}"
        )
    return value


def _check_mask(mask, x_T: jax.Array) -> jax.Array:
    mask = _check_broadcast("mask", mask, x_T)
    if _is_concrete(mask) and mask.size:
        values = np.asarray(mask, np.float64)  # NumPy: jnp.min would be traced under jit
        lo, hi = float(values.min()), float(values.max())
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(
                f"mask must lie in [0, 1] (1 = known pixel); got values in [{lo}, {hi}]"
            )
    return mask


def repaint_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x0_known: jax.Array,
    mask: jax.Array,
    x_T: jax.Array,
    rng,
    *,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
    timesteps=None,
    return_trajectory: bool | int = False,
):
    """Inpaints x0_known where mask = 0 (Lugmayr et al. 2022, RePaint, Algorithm 1).

    Along `repaint_timesteps(num_steps, jump_length, jump_n_sample)`, a step down from state s
    to s - 1 is

      x_known   = alpha_{s-1} x0_known + sigma_{s-1} z1           (q(x_{s-1} | x0), eq. 8)
      x_unknown = mu_theta(x_s, s) + sigma_s z2                   (`ddpm_step`)
      x_{s-1}   = mask * x_known + (1 - mask) * x_unknown,

    (x_known = x0_known at the clean end s - 1 = -1), and a step up from s to s + 1 is
    x_{s+1} = sqrt(1 - beta_{s+1}) x_s + sqrt(beta_{s+1}) z (q(x_{s+1} | x_s), eq. 2). With
    `timesteps` the chain runs on that subsequence with respaced betas (`Schedule.respace`), the
    model called with the original steps, as in `ddpm_sample` (the paper: 250 of 1000 steps).

    Randomness: `rng` is split into one key per move of the walk; a step down gives its key to
    `ddpm_step` as is and draws z1 from `jax.random.fold_in(key, 1)`, a step up draws z from
    the key. So with mask = 0 and jump_n_sample = 1 the result is `ddpm_sample`'s, bit for bit.

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the noise schedule.
      x0_known: the image to complete, float, broadcastable to x_T's shape [B, ...]; its values
        where mask = 0 are never read.
      mask: 1 where x0_known is known (kept), 0 where it is to be generated; float or int in
        [0, 1], or bool, broadcastable to x_T's shape (e.g. [H, W, 1] for all images and channels).
        Fractional values blend the two draws.
      x_T: [B, ...] float, the start of the chain, typically N(0, I).
      rng: PRNG key.
      jump_length, jump_n_sample: RePaint's resampling (see `repaint_timesteps`); the model is
        called len(walk) - 1 - (moves up) times, about jump_n_sample times num_steps.
      prediction: 'eps' | 'x0' | 'v'.
      variance: 'fixed_small' | 'fixed_large' | 'learned_range' (as `ddpm_sample`).
      clip_denoised, denoised_fn: x0_hat clipping / thresholding at every step down.
      timesteps: None (all T steps) or concrete distinct ints in [0, T - 1] (respaced chain).
      return_trajectory: False, True or a stride k, over the moves of the walk (see
        `jax_diffusion.samplers`).

    Returns:
      x0 [B, ...] in x_T's dtype, equal to x0_known where mask = 1, or (x0, trajectory).

    Raises:
      ValueError: bad prediction / variance / jump arguments / timesteps / return_trajectory, a
        mask outside [0, 1] or x0_known / mask not broadcastable to x_T, a missing rng.
    """
    x_T, stride = _check_common(
        model_fn, schedule, x_T, prediction, variance, clip_denoised, denoised_fn, return_trajectory
    )
    x0_known = _check_broadcast("x0_known", x0_known, x_T)
    mask = _check_mask(mask, x_T)
    _check_rng(rng, why=" for repaint_sample")
    sched, model_ts = _respaced(schedule, timesteps)
    model_ts = model_ts[::-1]  # ascending: model_ts[s] is the model's step at index s
    _check_zero_snr(schedule, prediction, int(model_ts[-1]))
    walk = repaint_timesteps(sched.num_timesteps, jump_length, jump_n_sample)
    s_from, s_to = walk[:-1], walk[1:]
    num_moves = s_from.shape[0]
    xs = (
        jnp.asarray(s_from),
        jnp.asarray(s_to),
        jnp.asarray(model_ts[np.maximum(s_from, 0)]),
        jax.random.split(rng, num_moves),
    )
    dtype = _compute_dtype(x_T)
    known = x0_known.astype(dtype)
    keep = mask.astype(dtype)
    kw = dict(prediction=prediction, variance=variance, denoised_fn=denoised_fn)
    kw.update(clip_denoised=clip_denoised)
    step_down = functools.partial(ddpm_step, model_fn, sched, **kw)
    sqrt_betas = jnp.sqrt(sched.betas.astype(dtype))
    sqrt_alphas = jnp.sqrt(1.0 - sched.betas.astype(dtype))

    def down(x, s, model_t, key):
        x_unknown = step_down(x, s, key, model_t=model_t).x_prev.astype(dtype)
        alpha, sigma = _alpha_sigma(sched, s - 1, dtype)
        z = jax.random.normal(jax.random.fold_in(key, 1), x.shape, dtype)
        x_known = alpha * known + sigma * z
        return (keep * x_known + (1.0 - keep) * x_unknown).astype(x.dtype)

    def up(x, s_next, key):
        z = jax.random.normal(key, x.shape, dtype)
        x_next = sqrt_alphas[s_next] * x.astype(dtype) + sqrt_betas[s_next] * z
        return x_next.astype(x.dtype)

    def step(x, a):
        s, s_next, model_t, key = a
        return jax.lax.cond(
            s_next < s, lambda x: down(x, s, model_t, key), lambda x: up(x, s_next, key), x
        )

    x0, trajectory = _scan(step, x_T, xs, num_moves, stride, lambda x: x)
    return _result(x0, trajectory, stride)


def _check_strength(strength) -> float:
    if check_real("strength", strength, positive=True) > 1.0:
        raise ValueError(f"strength must be a number in (0, 1]; got {strength!r}")
    return float(strength)


def sdedit_timesteps(
    schedule: Schedule, strength: float, num_steps=None, spacing=None, timesteps=None
) -> np.ndarray:
    """The descending steps `sdedit` runs: the last int(strength * n) of the n steps that
    `ddim_sample` would visit with the same num_steps / spacing / timesteps (diffusers'
    img2img `strength`). Its first entry is t0, the step the guide is noised to.

    Raises:
      ValueError: strength outside (0, 1], or so small that no step is left.
    """
    strength = _check_strength(strength)
    ts = _ddim_timesteps(schedule, num_steps, spacing, timesteps)
    keep = int(strength * len(ts))  # diffusers: int(num_inference_steps * strength)
    if keep < 1:
        raise ValueError(
            f"strength={strength} keeps no step of {len(ts)}: pass a strength of at least "
            f"1 / {len(ts)} or more steps"
        )
    return ts[len(ts) - keep :]


def sdedit(
    model_fn: ModelFn,
    schedule: Schedule,
    x_guide: jax.Array,
    rng,
    *,
    strength: float = 0.5,
    num_steps: int | None = None,
    eta=0.0,
    spacing: str | None = None,
    timesteps=None,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
    return_trajectory: bool | int = False,
):
    """Image-to-image by noising a guide and denoising it (Meng et al. 2022, SDEdit, Algorithm 1).

    x_t0 = alpha_t0 x_guide + sigma_t0 z (q(x_t0 | x_guide)), then `ddim_sample` from x_t0 over
    `sdedit_timesteps(schedule, strength, num_steps, spacing, timesteps)`, whose first entry is
    t0. eta = 0 follows the probability-flow ODE (deterministic given z); eta = 1 is the
    ancestral (reverse-SDE) variant of the paper.

    For data N(m, s^2 I) and the exact ODE the result is a linear function of the guide:
    m + s (alpha_t0 (x_guide - m) + sigma_t0 z) / sqrt(alpha_t0^2 s^2 + sigma_t0^2); more
    strength means a smaller alpha_t0, so less of the guide survives.

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the noise schedule.
      x_guide: [B, ...] float, the guide images, in the data's range.
      rng: PRNG key: `jax.random.split(rng)` gives the key of z and, for eta != 0, the
        sampler's key.
      strength: in (0, 1], the fraction of the sampler's steps that is run; 1 starts at the
        first step (near pure noise for most schedules).
      num_steps, spacing, timesteps: the full step sequence as for `ddim_sample`.
      eta: >= 0; 0 deterministic, 1 ancestral.
      prediction, variance, clip_denoised, denoised_fn: as for `ddim_sample`.
      return_trajectory: False, True or a stride k; the trajectory starts at x_t0.

    Returns:
      [B, ...] in x_guide's dtype, or (x0, trajectory).

    Raises:
      ValueError: a bad strength (or one that keeps no step), or any of ddim_sample's errors.
    """
    x_guide = _check_x(x_guide, "x_guide")
    _check_common(
        model_fn, schedule, x_guide, prediction, variance, clip_denoised, denoised_fn, False
    )
    _check_rng(rng, why=" for sdedit's noise")
    deterministic = _check_eta(eta)
    ts = sdedit_timesteps(schedule, strength, num_steps, spacing, timesteps)
    _check_zero_snr(schedule, prediction, int(ts[0]), doing="run sdedit from")
    noise_rng, sample_rng = jax.random.split(rng)
    dtype = _compute_dtype(x_guide)
    t0 = jnp.full(x_guide.shape[:1], ts[0], jnp.int32)
    z = jax.random.normal(noise_rng, x_guide.shape, dtype)
    x_t0 = q_sample(schedule, x0=x_guide.astype(dtype), t=t0, noise=z).astype(x_guide.dtype)
    return ddim_sample(
        model_fn,
        schedule,
        x_t0,
        None if deterministic else sample_rng,
        eta=eta,
        prediction=prediction,
        variance=variance,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        timesteps=ts,
        return_trajectory=return_trajectory,
    )
