"""The samplers over the whole range the command line accepts (1 <= --num-sampling-steps <= --timesteps), driven by
the exact noise model of Gaussian data; the linear schedule ends in noise at any T. (That the samplers and the schedule
are one text in the three scripts is tests/test_shared_blocks.py's check.)

Gaussian data x0 ~ N(mu, s^2) per dimension makes everything closed form:
- x_t = sqrt(a) x0 + sqrt(1-a) eps ~ N(sqrt(a) mu, a s^2 + 1 - a), a = abar_t, and the optimal noise model is
  E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
- The probability-flow ODE acts on each dimension alone and its flow keeps the order of points, so it carries the
  marginal at t = T-1 to the data by the one increasing map between two 1-D Gaussians, standardise and rescale:
  x0 = mu + s (x_T - sqrt(a_T) mu) / sqrt(a_T s^2 + 1 - a_T). Deterministic samplers approach it as S grows.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import load_module

ddpm = load_module("ddpm_cifar10.py")
dit = load_module("dit_cifar10.py")

MU = torch.tensor([0.3, -0.5, 0.0, 0.6], dtype=torch.float64)
STD = torch.tensor([0.2, 0.5, 0.1, 0.3], dtype=torch.float64)


def linear_alphas_cumprod(T: int) -> torch.Tensor:
    return ddpm.make_alphas_cumprod(ddpm.make_beta_schedule("linear", T))


def exact_model_fn(alphas_cumprod: torch.Tensor, seen: list = None):
    """The optimal eps(x_t, t) for the Gaussian data; appends each evaluated timestep to `seen`."""
    def model_fn(x, t):
        if seen is not None:
            seen.append(int(t[0]))
        a = alphas_cumprod[t].to(x.dtype)[:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD ** 2 + 1 - a)  # E[eps | x_t]
    return model_fn


def pf_ode_solution(x_T: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = float(alphas_cumprod[-1])
    return MU + STD * (x_T - math.sqrt(a) * MU) / torch.sqrt(a * STD ** 2 + 1 - a)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, len(MU), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


SAMPLERS = {  # name -> (abar, model_fn, x_T, S) -> x_0; DDPM unclipped, so that the Gaussian case stays exact
    **{f"ddpm-{sp}": (lambda sp: lambda abar, fn, x, S: ddpm.ddpm_sample(
        fn, x, abar, S, clip_denoised=False, generator=torch.Generator().manual_seed(1), spacing=sp))(sp)
       for sp in ("uniform", "linspace", "quadratic")},
    **{f"ddim-{sp}": (lambda sp: lambda abar, fn, x, S: ddpm.ddim_sample(fn, x, abar, S, eta=0.0, spacing=sp))(sp)
       for sp in ("uniform", "linspace", "quadratic")},
    "dpm++": lambda abar, fn, x, S: ddpm.dpm_solver_sample(fn, x, abar, S),
}
# S = 1, 2, one that divides neither T, one between T/2 and T (leading's T // S stride stopped at S-1 there), T-1, T;
# at T = 1000 fewer, to stay fast (S = T there: in the convergence test)
STEP_COUNTS = {100: (1, 2, 7, 60, 99, 100), 1000: (1, 7, 600)}


def test_linear_schedule_ends_in_noise_at_any_T_and_is_the_papers_at_1000():
    # T = 1000: exactly Ho et al.'s betas (scale 1000/T = 1), in float64
    assert torch.equal(ddpm.make_beta_schedule("linear", 1000),
                       torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    # T = 100: the scaled schedule leaves sqrt(abar_T) = 0.0045 of the signal (unscaled 1e-4..0.02 left 0.60)
    assert math.sqrt(float(linear_alphas_cumprod(100)[-1])) < 0.01
    assert math.sqrt(float(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100, dtype=torch.float64), 0)[-1])) > 0.5
    for T in (20, 50, 250, 500):
        assert math.sqrt(float(linear_alphas_cumprod(T)[-1])) < 0.01, T
    # the scale applies to whatever --beta-start / --beta-end give
    assert (ddpm.make_beta_schedule("linear", 500, 2e-4, 0.01)
            - torch.linspace(4e-4, 0.02, 500, dtype=torch.float64)).abs().max() < 1e-15
    for T in (1, 5, 10, 20):  # beta would reach 1 and beyond below T = 20: capped at 0.999, abar stays positive
        betas = ddpm.make_beta_schedule("linear", T)
        assert betas.max() <= 0.999 and (ddpm.make_alphas_cumprod(betas) > 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# Timesteps over the whole range


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("T", [100, 1000])
def test_every_sampler_starts_within_T_over_S_of_the_top(sampler, T):
    abar = linear_alphas_cumprod(T)
    for S in STEP_COUNTS[T]:
        seen = []
        x = SAMPLERS[sampler](abar, exact_model_fn(abar, seen), noise(2), S)
        assert torch.isfinite(x).all(), (S, x)
        assert len(seen) == S and all(0 <= t < T for t in seen), (S, seen)
        if sampler.endswith("quadratic") and S > 1:  # the DDIM paper's CIFAR-10 protocol starts at 0.8 T by design
            assert seen[0] == int(0.8 * T), (S, seen[:3])
            continue
        assert T - 1 - seen[0] <= T / S, f"S = {S}: first timestep {seen[0]}, more than T/S below T-1 = {T - 1}"
        assert all(a > b for a, b in zip(seen, seen[1:])), (S, seen)  # strictly descending: no repeated timestep
        if S == 1:
            assert seen == [T - 1]


def test_spacings_keep_diffusers_timesteps_where_they_reach_the_top():
    """"uniform" is diffusers' "leading" arange(S) * (T // S) wherever S divides T (the DDIM paper's protocol, kept);
    "linspace" is diffusers' round(linspace(0, T-1, S)) for S >= 2; DPM-Solver++ takes DPMSolverMultistepScheduler's
    round(linspace(0, T-1, S+1))[::-1][:-1] for S < T. (diffusers' set_timesteps formulas, written out here: importing
    diffusers would take most of this file's time budget; test_ddpm_cifar10.py runs the schedulers themselves.)"""
    T = 1000
    for S in (2, 4, 5, 10, 50, 250, 1000):
        assert ddpm.ddim_timesteps(T, S, "uniform") == (np.arange(S) * (T // S))[::-1].tolist(), S
    for S in (2, 5, 7, 60, 250, 600, 999, 1000):
        assert ddpm.ddim_timesteps(T, S, "linspace") == np.linspace(0, T - 1, S).round()[::-1].astype(int).tolist(), S
    abar = linear_alphas_cumprod(T)
    for S in (1, 10, 600, 999):
        seen = []
        ddpm.dpm_solver_sample(exact_model_fn(abar, seen), noise(1), abar, S)
        assert seen == np.linspace(0, T - 1, S + 1).round()[::-1][:-1].astype(int).tolist(), S
    with pytest.raises(ValueError):
        ddpm.ddim_timesteps(100, 0, "uniform")
    with pytest.raises(ValueError):
        ddpm.dpm_solver_sample(exact_model_fn(abar), noise(1), abar, T + 1)


def test_dit_ddpm_visits_dits_own_respaced_timesteps():
    """DiT's protocol (DDPM, 250 of 1000 steps) respaces with space_timesteps
    (facebookresearch/DiT diffusion/respace.py): one section of S steps at round(i (T-1) / (S-1)), ending at 999 (not
    leading's 996)."""
    abar = linear_alphas_cumprod(1000)
    seen = []
    dit.sample_images(exact_model_fn(abar, seen), torch.zeros(1, 4, dtype=torch.float64), abar, "ddpm", 250,
                      generator=torch.Generator().manual_seed(0))
    expected = [round(Fraction(i * 999, 249)) for i in range(250)][::-1]  # exact rational, ties to even as round()
    assert seen == expected and seen[:2] == [999, 995] and seen[-2:] == [4, 0]


# ----------------------------------------------------------------------------------------------------------------------
# Against the exact answers of Gaussian data


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_one_step_lands_on_the_denoised_prediction_at_the_top(sampler):
    """S = 1 is one jump from T-1 to the clean image: x0_hat = E[x0 | x_{T-1}], not the starting noise."""
    T = 100
    abar = linear_alphas_cumprod(T)
    x_T = noise(64)
    a = float(abar[-1])
    posterior_mean = MU + math.sqrt(a) * STD ** 2 * (x_T - math.sqrt(a) * MU) / (a * STD ** 2 + 1 - a)
    x = SAMPLERS[sampler](abar, exact_model_fn(abar), x_T, 1)
    assert (x - posterior_mean).abs().max() < 1e-9, (x - posterior_mean).abs().max()


@pytest.mark.parametrize("sampler,T,final_error", [  # measured: 0.0437, 0.0437, 0.0500, 0.0092, 0.0051, 0.00099
    ("ddim-uniform", 100, 0.05), ("ddim-linspace", 100, 0.05), ("ddim-quadratic", 100, 0.06), ("dpm++", 100, 0.011),
    ("ddim-uniform", 1000, 0.006), ("dpm++", 1000, 0.0012)])  # DPM-Solver++ with 0.45 for its 0.5 D1: 0.0122, 0.0014
def test_deterministic_samplers_approach_the_probability_flow_solution_as_steps_grow(sampler, T, final_error):
    """The largest error over 256 x 4 values does not grow (by more than 0.1%) from one S to the next larger, and ends
    below final_error at S = T; what remains there is mostly the last step's first-order jump from t = 0 to the
    clean image (sigma_0 = 0.03 at T = 100), the same for S = T-1 and T."""
    abar = linear_alphas_cumprod(T)
    x_T = noise(256)
    exact = pf_ode_solution(x_T, abar)
    errors = [float((SAMPLERS[sampler](abar, exact_model_fn(abar), x_T, S) - exact).abs().max())
              for S in STEP_COUNTS[T] + ((T,) if T not in STEP_COUNTS[T] else ())]
    assert all(later <= earlier * 1.001 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < final_error, errors


@pytest.mark.parametrize("sampler", ["ddpm-uniform", "ddpm-linspace"])
@pytest.mark.parametrize("S", [100, 99])
def test_ancestral_ddpm_samples_have_the_datas_mean_and_variance(sampler, S):
    """4000 samples at T = 100: each dimension's mean within 4 standard errors (4 s / sqrt(4000)) of mu, its standard
    deviation within 10% of s (the fixed-large variance beta_t gives +1% to +7% at T = 100; beta~_t would give -21%)."""
    abar = linear_alphas_cumprod(100)
    n = 4000
    x = SAMPLERS[sampler](abar, exact_model_fn(abar), noise(n), S)
    assert ((x.mean(0) - MU).abs() < 4 * STD / math.sqrt(n)).all(), (x.mean(0), MU)
    assert ((x.std(0) / STD - 1).abs() < 0.1).all(), x.std(0) / STD
