"""Flow-ODE samplers as a registry: name -> update rule. The pipeline, the CLI and the server all read `SAMPLERS`.

Each sampler moves the latent x from grid time t to t_next (t = 0 is noise, t = 1 the image) given the velocity
v = v(x, t) already evaluated there; `cheers.sampling.integrate` walks the grid and adds the reference's final step.
This module imports no torch, so `cheers --help` can list the names without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# (velocity, x, v, t, t_next, step index, fresh-noise drawer) -> next x; `velocity(x, t)` evaluates the model.
Update = Callable[[Callable[[Any, float], Any], Any, Any, float, float, int, Callable[[int], Any]], Any]


@dataclass(frozen=True)
class Sampler:
    name: str
    update: Update
    evaluations_per_interval: int  # model evaluations per grid interval (the final step adds one)
    needs_seeds: bool  # draws fresh noise per image and step, from the image's seed
    summary: str


def _euler(velocity, x, v, t, t_next, i, draw):
    return x + v * (t_next - t)


def _heun(velocity, x, v, t, t_next, i, draw):
    dt = t_next - t
    v2 = velocity(x + v * dt, t_next)
    return x + 0.5 * dt * (v + v2)


def _midpoint(velocity, x, v, t, t_next, i, draw):
    dt = t_next - t
    return x + velocity(x + v * (dt / 2), t + dt / 2) * dt


def _renoise(velocity, x, v, t, t_next, i, draw):
    # Predict the clean latent and re-noise it to t_next with fresh noise: forgets the noise estimate x - t v that
    # euler carries along, so a weak model's errors do not accumulate into smeared shapes.
    x1 = x + (1.0 - t) * v
    return t_next * x1 + (1.0 - t_next) * draw(i)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("euler", _euler, 1, False, "the reference's first-order update"),
    Sampler("heun", _heun, 2, False, "second-order (trapezoidal) ODE update"),
    Sampler("midpoint", _midpoint, 2, False, "second-order (midpoint) ODE update"),
    Sampler("renoise", _renoise, 1, True, "stochastic: re-noises the predicted clean latent at every step"),
)}


def get_sampler(name: str) -> Sampler:
    """The registered sampler `name`, or a ValueError listing the choices."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def evaluations(sampler: str, grid_points: int) -> int:
    """Velocity evaluations `integrate` makes with `sampler` on a grid of `grid_points` times (incl. the last)."""
    return get_sampler(sampler).evaluations_per_interval * (grid_points - 1) + 1
