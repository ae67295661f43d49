"""ddpm_cifar10.py: the U-Net against the paper and diffusers, the samplers against diffusers' schedulers step by step,
a tiny model that must learn, the script as a user runs it, exact resume, torchrun, and every bad input."""
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from conftest import (PYTHON, ROOT, assert_checkpoints_bitwise_equal, assert_one_line_error, checkpoint_tensors, file_hash,
                      load_module, measured, only_run_dir, read_image_tags, read_scalars, run_script,
                      run_until_line_then_kill, script_env, SEED_SHIFT)

ddpm = load_module("ddpm_cifar10.py")
SCRIPT = "ddpm_cifar10.py"
TINY = ["--preset", "tiny"]


# ---------------------------------------------------------------------------------------------------------------------
# Model


def diffusers_ddpm_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                       norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                       attention_head_dim=None, dropout=0.1)


def diffusers_key_to_ours(key: str) -> str:
    """Maps a UNet2DModel state-dict key to ddpm_cifar10.UNet's (2 res blocks per level down, 3 up)."""
    parts = key.split(".")
    renames = {"time_emb_proj": "temb_proj", "conv_shortcut": "shortcut", "group_norm": "norm", "to_q": "q",
               "to_k": "k", "to_v": "v"}
    if parts[0] == "time_embedding":
        return {"linear_1": "temb_dense1", "linear_2": "temb_dense2"}[parts[1]] + "." + parts[2]
    if parts[0] == "conv_norm_out":
        return "norm_out." + parts[1]
    if parts[0] in ("down_blocks", "up_blocks"):
        level, kind, index = int(parts[1]), parts[2], int(parts[3])
        rest = parts[4:]
        per_level = 2 if parts[0] == "down_blocks" else 3
        side = parts[0].split("_")[0]
        if kind in ("downsamplers", "upsamplers"):
            return f"{kind[:-3]}es.{level}." + ".".join(rest)  # downsamplers.0.conv -> downsamples.{level}.conv
        if kind == "attentions":
            rest = ["proj_out", rest[-1]] if rest[0] == "to_out" else [renames.get(rest[0], rest[0]), rest[-1]]
            return f"{side}_attns.{level * per_level + index}." + ".".join(rest)
        return f"{side}_blocks.{level * per_level + index}." + ".".join(renames.get(p, p) for p in rest)
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            rest = ["proj_out", rest[-1]] if rest[0] == "to_out" else [renames.get(rest[0], rest[0]), rest[-1]]
            return "mid_attn." + ".".join(rest)
        return f"mid_block{index + 1}." + ".".join(renames.get(p, p) for p in rest)
    return key


def test_default_unet_has_the_papers_parameter_count():
    model = ddpm.build_model(ddpm.Args())
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


def test_unet_equals_diffusers_unet2dmodel_with_copied_weights():
    torch.manual_seed(0)
    theirs = diffusers_ddpm_unet().eval()
    ours = ddpm.build_model(ddpm.Args()).eval()
    mapped = {diffusers_key_to_ours(k): v for k, v in theirs.state_dict().items()}
    assert set(mapped) == set(ours.state_dict())
    ours.load_state_dict(mapped)  # strict: every tensor has the same shape
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([3, 777])
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    assert expected.abs().mean() > 0.05  # a meaningful comparison: diffusers' init is not zero
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unet_starts_as_zero_prediction_and_every_parameter_is_trained():
    args = ddpm.replace(ddpm.Args(), channels=32, channel_mult=(1, 2), img_size=8, attn_resolutions=(4,))
    model = ddpm.build_model(args)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x, torch.tensor([1, 500])), torch.zeros_like(x))
    # zero-init branches wake up one after another: after a few steps every parameter gets a gradient (no dead branch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        (model(x, torch.tensor([1, 500])) - x.flip(0)).square().mean().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Schedule and samplers against diffusers


def test_alphas_cumprod_matches_diffusers():
    from diffusers import DDPMScheduler

    ours = ddpm.make_alphas_cumprod(ddpm.make_beta_schedule("linear", 1000))
    assert ours.dtype == torch.float64
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    torch.testing.assert_close(ours.float(), theirs, atol=1e-6, rtol=0)
    ours_cos = ddpm.make_alphas_cumprod(ddpm.make_beta_schedule("cosine", 1000))
    theirs_cos = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    torch.testing.assert_close(ours_cos.float(), theirs_cos, atol=1e-6, rtol=0)


def alphas_cumprod():
    return ddpm.make_alphas_cumprod(ddpm.make_beta_schedule("linear", 1000, 1e-4, 0.02))


ABAR = alphas_cumprod().float()


def fixed_model_fn(x, t):
    """A deterministic, nonlinear stand-in for a trained noise model: it predicts x0 = 0.9 tanh(x_t + t/2000) and
    returns the matching eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), so samples stay in the data range."""
    abar = ABAR[t][:, None, None, None]
    x0 = 0.9 * torch.tanh(x + t[:, None, None, None] / 2000)
    return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def overshooting_model_fn(x, t):
    """As fixed_model_fn, with x0 = 1.6 tanh(x_t + t/2000): predictions outside [-1, 1] that clipping changes."""
    abar = ABAR[t][:, None, None, None]
    x0 = 1.6 * torch.tanh(x + t[:, None, None, None] / 2000)
    return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def run_diffusers_loop(scheduler, x_T, num_steps, generator=None, model_fn=fixed_model_fn, **step_kwargs):
    scheduler.set_timesteps(num_steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        eps = model_fn(x, torch.full((x.shape[0],), int(t)))
        kwargs = dict(step_kwargs, generator=generator) if generator is not None else step_kwargs
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


def x_T(seed=0):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("num_steps", [None, 50])
def test_ddpm_sample_matches_diffusers_ddpm_scheduler(variance, num_steps):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type=variance,
                              clip_sample=True)
    expected = run_diffusers_loop(scheduler, x_T(), num_steps or 1000, generator=torch.Generator().manual_seed(7))
    got = ddpm.ddpm_sample(fixed_model_fn, x_T(), alphas_cumprod(), num_steps, variance=variance,
                           clip_denoised=True, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_sample_matches_diffusers_ddim_scheduler(eta):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True,
                              clip_sample=False, timestep_spacing="leading", steps_offset=0)
    expected = run_diffusers_loop(scheduler, x_T(), 50, generator=torch.Generator().manual_seed(3), eta=eta)
    got = ddpm.ddim_sample(fixed_model_fn, x_T(), alphas_cumprod(), 50, eta=eta, spacing="uniform",
                           generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_steps", [10, 20])
def test_dpm_solver_sample_matches_diffusers_dpm_solver_multistep(num_steps):
    from diffusers import DPMSolverMultistepScheduler

    expected = run_diffusers_loop(DPMSolverMultistepScheduler(), x_T(), num_steps)
    got = ddpm.dpm_solver_sample(fixed_model_fn, x_T(), alphas_cumprod(), num_steps)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_clipped_ddim_and_dpm_solver_match_diffusers_clip_sample_and_thresholding():
    """The x0 clipping the script's DDIM and DPM-Solver++ use (sample_images), step for step as diffusers' DDIM with
    clip_sample=True and DPM-Solver++ with thresholding to sample_max_value 1, on a model whose x0 overshoots."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ddim_scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True,
                                   clip_sample=True, timestep_spacing="leading", steps_offset=0)
    expected = run_diffusers_loop(ddim_scheduler, x_T(), 50, model_fn=overshooting_model_fn)
    got = ddpm.ddim_sample(overshooting_model_fn, x_T(), alphas_cumprod(), 50, clip_denoised=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    dpm_scheduler = DPMSolverMultistepScheduler(thresholding=True, sample_max_value=1.0)
    expected = run_diffusers_loop(dpm_scheduler, x_T(), 20, model_fn=overshooting_model_fn)
    got = ddpm.dpm_solver_sample(overshooting_model_fn, x_T(), alphas_cumprod(), 20, clip_denoised=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    unclipped = ddpm.dpm_solver_sample(overshooting_model_fn, x_T(), alphas_cumprod(), 20)
    assert (unclipped - got).abs().max() > 0.05  # the stand-in overshoots: clipping changes the samples


@pytest.mark.parametrize("sampler,steps", [("ddim", 50), ("dpm++", 20)])
def test_the_scripts_few_step_samplers_clip_x0(sampler, steps):
    images = ddpm.sample_images(overshooting_model_fn, x_T(), alphas_cumprod(), sampler, steps)
    if sampler == "ddim":
        x = ddpm.ddim_sample(overshooting_model_fn, x_T(), alphas_cumprod(), steps, clip_denoised=True)
    else:
        x = ddpm.dpm_solver_sample(overshooting_model_fn, x_T(), alphas_cumprod(), steps, clip_denoised=True)
    assert torch.equal(images, ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


def test_ddim_timestep_spacings_by_hand():
    assert ddpm.ddim_timesteps(1000, 5, "uniform") == [800, 600, 400, 200, 0]
    # diffusers' "linspace": round(linspace(0, 999, 5)) half to even (the seed's .long() truncated to 499, 249)
    assert ddpm.ddim_timesteps(1000, 5, "linspace") == [999, 749, 500, 250, 0]
    # DDIM's CIFAR-10 choice: int(linspace(0, sqrt(800), S)^2) = 0, 50, 200, 450, 800
    assert ddpm.ddim_timesteps(1000, 5, "quadratic") == [800, 450, 200, 50, 0]


def test_first_dpm_solver_step_is_ddim():
    """With one step each, DPM-Solver++ and DDIM both land on the x0 prediction at t = 999; with two steps the first
    (first-order) DPM-Solver++ step must equal a DDIM step between the same timesteps."""
    abar = alphas_cumprod()
    torch.testing.assert_close(ddpm.dpm_solver_sample(fixed_model_fn, x_T(), abar, 1),
                               ddpm.ddim_sample(fixed_model_fn, x_T(), abar, 1, spacing="linspace"))


# ---------------------------------------------------------------------------------------------------------------------
# A tiny model learns


def four_distinct_images() -> torch.Tensor:
    """4 two-colour 8x8 patterns in [-1, 1], each pair 2.0 apart in mean squared distance."""
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    patterns = [xx < 4, yy < 4, (xx + yy) % 2 == 0, (xx - 3.5).abs() + (yy - 3.5).abs() < 3]
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
    return torch.stack([torch.where(p, c[:, None, None], -c[:, None, None]) for p, c in zip(patterns, colours)])


def nearest_distance(samples_uint8: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    samples = samples_uint8.float() / 127.5 - 1
    return ((samples[:, None] - data[None]) ** 2).mean(dim=(2, 3, 4)).min(dim=1).values


def optimal_x0(x, t, data):
    """E[x0 | x_t] for data made of a few points: the posterior mean over them, weighted by p(x0 = image i | x_t)."""
    a = ABAR[t][:, None, None, None]
    squared = ((x[:, None] - a[:, None].sqrt() * data[None]) ** 2).sum(dim=(2, 3, 4))
    weights = torch.softmax(-squared / (2 * (1 - ABAR[t][:, None])), dim=1)
    return (weights[:, :, None, None, None] * data[None]).sum(1)


TINY_STEPS, TINY_LR = 400, 3e-3
SAMPLERS = [("ddim", 20), ("dpm++", 20), ("ddpm", 100), ("ddpm", 1000)]


@pytest.mark.parametrize("sampler,steps", SAMPLERS)
def test_samplers_with_the_exact_denoiser_land_on_the_data(sampler, steps):
    """For data made of 4 points the optimal noise model is known in closed form (the posterior mean over the 4
    images); every sampler driven by it must end on one of them. A sign error or a wrong coefficient does not."""
    data = four_distinct_images()

    def optimal_model_fn(x, t):
        a = ABAR[t][:, None, None, None]  # eps = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar)
        return (x - a.sqrt() * optimal_x0(x, t, data)) / (1 - a).sqrt()

    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    samples = ddpm.sample_images(optimal_model_fn, x, alphas_cumprod(), sampler, steps,
                                 generator=torch.Generator().manual_seed(2))
    assert nearest_distance(samples, data).max() < 1e-3
    assert len({int(i) for i in ((samples.float()[:, None] / 127.5 - 1 - data[None]) ** 2).mean(dim=(2, 3, 4))
                .argmin(1)}) >= 2  # not collapsed onto one image


class OptimalVModel(torch.nn.Module):
    """The exact denoiser of `data` written as a v-predicting network: v = sqrt(abar) eps - sqrt(1 - abar) x0."""

    def __init__(self, data):
        super().__init__()
        self.data, self.unused = data, torch.nn.Parameter(torch.zeros(()))  # generate_samples reads the device

    def forward(self, x, t):
        a = ABAR[t][:, None, None, None]
        x0 = optimal_x0(x, t, self.data)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def test_v_prediction_is_turned_into_the_same_eps_and_the_samples_land_on_the_data():
    """--prediction v: the exact denoiser as a v-network, converted by eps_from_output, equals the exact eps; the
    script's generate_samples with it ends every sample on one of the 4 images (a wrong sign or coefficient in
    eps = sqrt(abar) v + sqrt(1 - abar) x_t does not)."""
    data = four_distinct_images()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 1, 100, 400, 700, 900, 990, 999])
    a = ABAR[t][:, None, None, None]
    expected_eps = (x - a.sqrt() * optimal_x0(x, t, data)) / (1 - a).sqrt()
    eps = ddpm.eps_from_output(OptimalVModel(data)(x, t), x, t, alphas_cumprod(), "v")
    torch.testing.assert_close(eps, expected_eps, atol=1e-4, rtol=1e-4)
    assert ddpm.eps_from_output(expected_eps, x, t, alphas_cumprod(), "eps") is expected_eps
    for sampler, steps in [("ddim", 20), ("dpm++", 20), ("ddpm", 100)]:
        args = ddpm.replace(ddpm.Args(), img_size=8, prediction="v", sampler=sampler, num_sampling_steps=steps,
                            sample_batch_size=16)
        samples = torch.from_numpy(ddpm.generate_samples(OptimalVModel(data), alphas_cumprod(), args, 16))
        assert nearest_distance(samples, data).max() < 1e-3, sampler


def test_v_prediction_loss_by_hand():
    """ddpm_loss with prediction v regresses v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0: a network that outputs 0
    has loss mean(v^2), and one that outputs the true v has loss 0."""
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 250, 600, 999])
    a = ABAR[t][:, None, None, None]
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    assert float(ddpm.ddpm_loss(zero, x0, t, noise, ABAR, prediction="v")) == pytest.approx(float(v.square().mean()))
    assert float(ddpm.ddpm_loss(zero, x0, t, noise, ABAR)) == pytest.approx(float(noise.square().mean()))
    true_v = lambda x_t, t: a.sqrt() * noise - (1 - a).sqrt() * x0  # noqa: E731
    assert float(ddpm.ddpm_loss(true_v, x0, t, noise, ABAR, prediction="v")) < 1e-10


def as_eps_fn(model, prediction):
    """The network as the samplers call it: model_fn(x_t, t) -> eps (a v-prediction converted)."""
    return lambda x, t: ddpm.eps_from_output(model(x, t), x, t, ABAR, prediction)


@pytest.fixture(scope="module")
def tiny_trained_models():
    """Two small U-Nets trained in-process on 4 fixed, distinct 8x8 images with ddpm_loss, the same draws of images,
    t and noise: one predicting eps, one v. Each is returned as the eps function the samplers take, with its losses."""
    data = four_distinct_images()
    models = {}
    for prediction in ("eps", "v"):
        torch.manual_seed(SEED_SHIFT)
        args = ddpm.replace(ddpm.Args(), channels=32, channel_mult=(1, 2), num_res_blocks=1, img_size=8,
                            attn_resolutions=(4,), dropout=0.0, prediction=prediction)
        model = ddpm.build_model(args)
        opt = torch.optim.Adam(model.parameters(), lr=TINY_LR)
        losses = []
        for step in range(TINY_STEPS):
            x0 = data[torch.randint(0, 4, (32,))]
            t = torch.randint(0, 1000, (32,))
            loss = ddpm.ddpm_loss(model, x0, t, torch.randn_like(x0), ABAR, prediction=prediction)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval().requires_grad_(False)
        models[prediction] = as_eps_fn(model, prediction)
        models[f"{prediction}_losses"] = losses
    return models, data


@pytest.mark.learning
def test_tiny_models_loss_falls(tiny_trained_models):
    models, _ = tiny_trained_models
    measured(**{f"{p}_{part}": np.mean(models[f"{p}_losses"][sl]) for p in ("eps", "v")
                for part, sl in (("first10", slice(0, 10)), ("last50", slice(-50, None)))})
    # measured: eps 0.65 -> 0.053 (0.08 times), v 0.90 -> 0.36 (0.39 times: v's target at high noise is -x0, which
    # the 4 images leave uncertain, where eps's is x_t itself)
    for prediction, ratio in (("eps", 0.15), ("v", 0.5)):
        losses = models[f"{prediction}_losses"]
        assert np.mean(losses[:10]) > 0.5, prediction
        assert np.mean(losses[-50:]) < ratio * np.mean(losses[:10]), prediction


def sample_distances(model_fn, data, sampler, steps):
    """Distance of each of 32 samples to the nearest of the 4 training images (mean squared, pixels in [-1, 1]; the
    images are 2.0 apart, and not one of the 32 noise images is within 0.1 of them)."""
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    noise_images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (nearest_distance(noise_images, data) > 0.1).all()
    samples = ddpm.sample_images(model_fn, x, alphas_cumprod(), sampler, steps,
                                 generator=torch.Generator().manual_seed(2))
    return nearest_distance(samples, data)


@pytest.mark.learning
@pytest.mark.parametrize("sampler,steps", SAMPLERS[:3])
def test_samples_of_a_trained_model_land_near_the_training_images(tiny_trained_models, sampler, steps):
    """The v-predicting model after 400 steps: every sampler as the script runs it (x0 clipped) lands near the
    training images, where none of the 32 noise images is within 0.1 of one. Over 3 training seeds and on AVX2
    kernels (benchmark/RESULTS.md section 7): mean distance 0.037 to 0.095 (DDIM-20), 0.037 to 0.072
    (DPM-Solver++-20), 0.023 to 0.049 (DDPM-100); within 0.1: 78% to 97% (one seed of an AMD CPU and an Intel one both
    gave 78 to 84% where 90% was once asked). Asserted: mean below 0.15 and 60% within 0.1. DDPM-1000 (measured 0.03
    on a longer-trained eps model) is left to the exact-denoiser test above."""
    models, data = tiny_trained_models
    nearest = sample_distances(models["v"], data, sampler, steps)
    measured(mean=nearest.mean(), within_0_1=(nearest < 0.1).float().mean())
    assert nearest.mean() < 0.15 and (nearest < 0.1).float().mean() >= 0.6, nearest


@pytest.mark.learning
def test_v_prediction_brings_the_ode_samplers_to_the_data_where_eps_prediction_does_not(tiny_trained_models):
    """The cause behind RESULTS.md 2e's few-step samplers, on the same budget, data, draws and noise: a model that
    predicts eps has small eps errors at the high-noise end that are large x0 errors there (x0 = (x_t - sqrt(1 -
    abar) eps) / sqrt(abar), sqrt(abar_999) = 0.006), which the deterministic solvers carry to the end; the ancestral
    sampler's fresh noise washes part of it out. A v-predicting model's x0 = sqrt(abar) x_t - sqrt(1 - abar) v stays
    bounded. Measured after 400 steps, mean distance eps / v: DDIM-20 0.66 / 0.05, DPM-Solver++-20 0.63 / 0.05,
    DDPM-100 0.19 / 0.04. Over 3 training seeds and AVX2 kernels (RESULTS.md section 7): eps's ODE
    distances 0.68 to 0.74, v's 0.037 to 0.095 (at most 0.14 of eps's), eps's DDPM-100 0.28 to 0.34 (at most 0.50 of
    its ODE distances). Asserted with margins: > 0.4; < 0.25 x; < 0.45 and < 0.65 x."""
    models, data = tiny_trained_models
    eps_ode = []
    for sampler, steps in [("ddim", 20), ("dpm++", 20)]:
        eps_ode.append(float(sample_distances(models["eps"], data, sampler, steps).mean()))
        v_distance = float(sample_distances(models["v"], data, sampler, steps).mean())
        measured(**{f"{sampler}_eps": eps_ode[-1], f"{sampler}_v": v_distance})
        # eps far from the data is the point (this budget is chosen to show it), v near it
        assert eps_ode[-1] > 0.4 and v_distance < 0.25 * eps_ode[-1], (sampler, eps_ode[-1], v_distance)
    eps_ddpm = float(sample_distances(models["eps"], data, "ddpm", 100).mean())
    measured(ddpm_eps=eps_ddpm)
    assert eps_ddpm < 0.45 and eps_ddpm < 0.65 * min(eps_ode)  # the ancestral sampler suffers less from the eps model


@pytest.mark.learning
def test_clipping_x0_brings_the_ode_samplers_near_the_training_images(tiny_trained_models):
    """The first cause behind RESULTS.md section 2's diverging few-step samplers: the eps model, the same noise,
    DDIM-20 and DPM-Solver++-20 with and without clipping x0 to [-1, 1] at every step. Over 3 training seeds and AVX2
    kernels (RESULTS.md section 7): mean distance 1.43 to 1.55 unclipped, 0.68 to 0.74 clipped (0.44
    to 0.51 of it: "half" was once asserted and failed on one seed). Asserted: > 1.0 unclipped, < 0.65 x clipped."""
    models, data = tiny_trained_models
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def mean_distance(x_0):
        return float(nearest_distance(((x_0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), data).mean())

    for sample in (ddpm.ddim_sample, ddpm.dpm_solver_sample):
        unclipped = mean_distance(sample(models["eps"], x, alphas_cumprod(), 20))
        clipped = mean_distance(sample(models["eps"], x, alphas_cumprod(), 20, clip_denoised=True))
        measured(**{f"{sample.__name__}_unclipped": unclipped, f"{sample.__name__}_clipped": clipped})
        assert unclipped > 1.0 and clipped < 0.65 * unclipped, (sample.__name__, unclipped, clipped)


# ---------------------------------------------------------------------------------------------------------------------
# The script as a user runs it


def test_ema_decay_warms_up_to_the_given_decay():
    assert ddpm.ema_decay_at(0, 0.9999) == pytest.approx(0.1)  # the first update takes 90% of the trained weights
    assert ddpm.ema_decay_at(90, 0.9999) == pytest.approx(0.91)
    assert ddpm.ema_decay_at(89_990, 0.9999) == pytest.approx(0.9999)  # the warm-up ends near step 90k
    assert ddpm.ema_decay_at(800_000, 0.9999) == 0.9999
    assert ddpm.ema_decay_at(5, 0.0) == 0.0  # --ema-decay 0: the EMA is the trained model
    # at the paper's 800k steps the initial weights' share of the EMA is negligible with or without the warm-up
    share = math.exp(sum(math.log(ddpm.ema_decay_at(t, 0.9999)) for t in range(800_000)))
    assert share < 1e-30 and 0.9999 ** 800_000 < 1e-30


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    result = run_script(SCRIPT, *TINY, "--seed", 1 + SEED_SHIFT, "--output-dir", out)
    return only_run_dir(out), result


@pytest.mark.learning
def test_tiny_preset_writes_events_config_samples_and_a_safe_checkpoint(tiny_run):
    run_dir, result = tiny_run
    assert run_dir.name.startswith(f"shapes__ddpm_cifar10__{1 + SEED_SHIFT}__")
    scalars = read_scalars(run_dir)
    measured(loss_first=scalars["losses/mse"][0][1], loss_last=scalars["losses/mse"][-1][1],
             ratio=scalars["losses/mse"][-1][1] / scalars["losses/mse"][0][1])
    for tag in ("losses/mse", "charts/learning_rate", "charts/grad_norm", "charts/SPS"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert "perf/mfu" not in scalars  # MFU on CUDA only: on a CPU the throughput is the figure
    steps = [s for s, _ in scalars["losses/mse"]]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    assert scalars["losses/mse"][-1][1] < 0.65 * scalars["losses/mse"][0][1]  # it learns (measured: 0.68 -> 0.34)
    assert "samples/ema" in read_image_tags(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "tiny" and config["total_steps"] == 60
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert checkpoint["script"] == SCRIPT and checkpoint["step"] == 60
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])
    assert (run_dir / "samples" / "step00000060.png").exists()
    assert "saved checkpoint at step 60" in result.stdout
    assert "parameters" in result.stdout
    # the run's length is announced from its first steps (timed from step 1 to 6), not at the first log
    estimate = r"estimated time to the end of training: 0 min \d+ s \([\d.e-]+ s per step on cpu, 54 steps to go,"
    assert re.search(estimate, result.stdout), result.stdout


def judge_step0_and_logged(run_dir):
    """The judge's scores of the run's untrained model (step 0: the U-Net's zero-initialised output conv outputs 0,
    which is eps = 0, or v = 0 with --prediction v) on the evaluation's noise, and the scores the run logged at each
    evaluation: tag -> [(step, value)]."""
    args, _ = ddpm.parse_args(["--config", str(run_dir / "config.json"), "--data-dir", str(ROOT / "data")])
    abar = ddpm.make_alphas_cumprod(ddpm.make_beta_schedule(args.beta_schedule, args.timesteps, args.beta_start,
                                                            args.beta_end))
    untrained = ddpm.build_model(args).eval()
    samples = ddpm.generate_samples(untrained, abar, args, args.num_eval_samples)
    judge, heldout, heldout_labels = ddpm.make_shapes_judge(args, args.num_eval_samples)  # the run's cached judge
    logged = {k[len("eval/judge_"):]: v for k, v in read_scalars(run_dir).items() if k.startswith("eval/judge_")}
    return ddpm.judge_scores(judge, samples, None, heldout, heldout_labels), logged


# The cpu preset shortened: its first CPU_SHORT_STEPS steps with every training setting kept (model, 8192 images, batch
# 64, lr 1e-3 and its warm-up, EMA 0.995 warmed up, v-prediction, DPM-Solver++-20), 32 evaluation samples, not 128.
CPU_SHORT_STEPS = 40


@pytest.fixture(scope="module")
def cpu_preset_short(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_short")
    run_script(SCRIPT, "--preset", "cpu", "--seed", 1 + SEED_SHIFT, "--total-steps", CPU_SHORT_STEPS, "--eval-every", CPU_SHORT_STEPS,
               "--save-every", CPU_SHORT_STEPS, "--num-eval-samples", 32, "--output-dir", out)
    return only_run_dir(out)


@pytest.mark.learning
def test_cpu_preset_shortened_beats_step_0_by_a_stated_margin(cpu_preset_short):
    """The judge at step 40 of the cpu preset against its untrained model (step 0) on the same noise. Measured:
    Frechet 36,000 at step 0, 9,750 at step 40 (0.27 times; 4,280 at step 60; real-vs-real 113), recognised 0 at
    both: 40 steps, inside the lr warm-up, are what 120 s of the suite allow beside DiT's; shapes appear by step 500
    (RESULTS 2d: recognised 0.98 and 0.90). With the paper's eps-prediction, 60 steps measured 39,900 and 27,500
    (0.69 times)."""
    step0, logged = judge_step0_and_logged(cpu_preset_short)
    final = {name: values[-1][1] for name, values in logged.items()}
    measured(**{f"step0_{k}": v for k, v in step0.items()}, **final, frechet_ratio=final["frechet"] / step0["frechet"])
    assert [s for s, _ in logged["recognised"]] == [CPU_SHORT_STEPS]
    assert step0["recognised"] <= 0.1 and final["recognised_real"] >= 0.9
    assert final["frechet"] <= 0.4 * step0["frechet"]  # better than step 0 by a stated margin ...
    assert final["frechet_real"] <= final["frechet"] <= 15_000  # ... and inside [floor, ceiling]
    assert final["recognised"] >= step0["recognised"]


@pytest.mark.learning
def test_the_judge_scores_each_evaluation_and_the_trained_model_beats_step_0(tiny_run):
    """eval/judge_* at each evaluation of the tiny run (60 steps of batch 16, v-prediction, DPM-Solver++-10, 16
    samples; measured: Frechet 38,200 at step 0, 5,190 at step 30, 2,710 at step 60, real-vs-real 523; no sample is
    a recognised shape yet: 60 steps draw blobs of the right colours, --preset cpu draws the shapes)."""
    run_dir, result = tiny_run
    step0, logged = judge_step0_and_logged(run_dir)
    assert set(logged) == {"recognised", "recognised_real", "frechet", "frechet_real", "class_accuracy_real"}
    assert all([s for s, _ in values] == [30, 60] for values in logged.values()), logged
    final = {name: values[-1][1] for name, values in logged.items()}
    measured(**{f"step0_{k}": v for k, v in step0.items()}, **final, frechet_30=logged["frechet"][0][1],
             frechet_ratio=final["frechet"] / step0["frechet"])
    assert "judge at step 60: recognised" in result.stdout
    assert step0["recognised"] <= 0.1 and final["recognised_real"] >= 0.9  # noise is not a shape; real images are
    frechet = [value for _, value in logged["frechet"]]
    assert step0["frechet"] > frechet[0] > frechet[1]  # better at each evaluation ...
    assert frechet[1] <= step0["frechet"] / 5  # ... by a stated margin ...
    assert final["frechet_real"] <= final["frechet"] <= 8_000  # ... and inside [floor, ceiling]


def test_sample_only_writes_png_and_uint8_npz(tiny_run):
    run_dir, _ = tiny_run
    result = run_script(SCRIPT, "--resume", run_dir, "--sample-only", "--num-samples", "5", "--sampler", "dpm++",
                        "--num-sampling-steps", "5")
    npz_files = sorted((run_dir / "samples").glob("sample_only_dpm++5_*.npz"))
    assert len(npz_files) == 1, result.stdout
    with np.load(npz_files[0], allow_pickle=False) as f:
        images = f["arr_0"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert images.std() > 10  # an image, not a constant
    assert npz_files[0].with_suffix(".png").exists()


def test_config_file_reproduces_the_run_settings(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    args, _ = ddpm.parse_args(["--config", str(run_dir / "config.json"), "--total-steps", "7"])
    assert args.channels == 32 and args.channel_mult == (1, 2) and args.total_steps == 7 and args.dataset == "shapes"


def tiny_data_run(out, *args):
    return run_script(SCRIPT, *TINY, "--output-dir", out, "--total-steps", "3", "--save-every", "3",
                      "--eval-every", "3", "--num-sampling-steps", "2", "--num-eval-samples", "4", *args)


def test_runs_on_cifar10_format_data(cifar10_binary_dir, tmp_path):
    tiny_data_run(tmp_path, "--dataset", "cifar10", "--data-dir", cifar10_binary_dir, "--img-size", "32",
                  "--no-download")
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("cifar10__")
    assert {"losses/mse", "charts/SPS"} <= set(read_scalars(run_dir))
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 3


def test_cifar10_loader_reads_the_images(cifar10_binary_dir):
    images_bin, labels_bin = ddpm.load_cifar10(str(cifar10_binary_dir), download=False)
    assert images_bin.shape == (100, 3, 32, 32) and images_bin.dtype == np.uint8
    assert labels_bin.dtype == np.int64 and labels_bin.max() <= 9
    assert (images_bin[:, 0, 0, 0] == labels_bin * 25).all()  # channel-major layout read right


def test_runs_on_an_image_folder(image_folder, tmp_path):
    # 18 images, batch 24: it trains (a batch crosses epochs) and says so
    result = tiny_data_run(tmp_path, "--dataset", "folder", "--data-dir", image_folder, "--img-size", "16",
                           "--batch-size", "24")
    assert "notice: 18 images, fewer than --batch-size 24: each batch holds images more than once" in result.stdout
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith(f"{image_folder.name}__")
    assert "samples/ema" in read_image_tags(run_dir)
    images, labels, classes = ddpm.load_image_folder(str(image_folder), 16)
    assert images.shape == (18, 3, 16, 16) and classes == ["blue", "green", "red"]
    red = images[labels == classes.index("red")]
    assert (red[:, 0, 8, 8] > 150).all() and (red[:, 2, 8, 8] < 100).all()  # RGB order, not BGR


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume, signals, torchrun


RESUME_ARGS = [*TINY, "--total-steps", "40", "--save-every", "20", "--eval-every", "1000", "--dropout", "0.1"]


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_script(SCRIPT, *RESUME_ARGS, "--output-dir", reference)
    run_until_line_then_kill(SCRIPT, *RESUME_ARGS, "--output-dir", interrupted,
                             line_startswith="saved checkpoint at step 20")
    run_dir = only_run_dir(interrupted)
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 20
    run_script(SCRIPT, "--resume", run_dir)
    assert_checkpoints_bitwise_equal(only_run_dir(reference) / "checkpoints" / "latest.pt",
                                     run_dir / "checkpoints" / "latest.pt")
    steps = [s for s, _ in read_scalars(run_dir)["losses/mse"]]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no point logged twice after the resume


def test_sigterm_saves_and_exits_zero(tmp_path):
    run_until_line_then_kill(SCRIPT, *TINY, "--total-steps", "100000", "--output-dir", tmp_path,
                            "--save-every", "5", line_startswith="saved checkpoint at step 5",
                            sig=__import__("signal").SIGTERM)
    run_dir = only_run_dir(tmp_path)
    step = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"]
    assert step >= 5 and step < 100000
    # the run can go on from where SIGTERM stopped it
    run_script(SCRIPT, "--resume", run_dir, "--total-steps", str(step + 2))
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == step + 2


def test_torchrun_two_processes_match_one_process(tmp_path):
    common = [*TINY, "--total-steps", "3", "--batch-size", "8", "--dropout", "0", "--save-every", "3",
              "--eval-every", "1000", "--num-eval-samples", "4"]
    run_script(SCRIPT, *common, "--output-dir", tmp_path / "one")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / SCRIPT), *common,
           "--output-dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    one = checkpoint_tensors(only_run_dir(tmp_path / "one") / "checkpoints" / "latest.pt")
    two = checkpoint_tensors(only_run_dir(tmp_path / "two") / "checkpoints" / "latest.pt")
    model_keys = [k for k in one if k.startswith("/model/")]
    assert model_keys
    initial = ddpm.build_model(ddpm.parse_args(TINY)[0])
    assert any(not torch.equal(one[f"/model/{k}"], v) for k, v in initial.state_dict().items())  # it trained
    for key in model_keys + [k for k in one if k.startswith("/ema/")]:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing lost


@pytest.fixture()
def saved_run(tiny_run, tmp_path):
    """A copy of the tiny run, and the hash of its checkpoint (which a failed command must leave untouched)."""
    run_dir = tmp_path / tiny_run[0].name
    shutil.copytree(tiny_run[0], run_dir)
    return run_dir, file_hash(run_dir / "checkpoints" / "latest.pt")


def test_error_cifar10_missing_offline(tmp_path):
    result = run_script(SCRIPT, "--data-dir", tmp_path, "--no-download", check=False)
    assert_one_line_error(result, "cifar-10-binary.tar.gz", str(tmp_path))


def test_error_cifar10_download_fails_without_network(tmp_path):
    env = script_env()
    env.update(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")  # a closed port: no network
    result = subprocess.run([PYTHON, str(ROOT / SCRIPT), "--data-dir", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert_one_line_error(result, "cifar-10-binary.tar.gz", str(tmp_path))
    assert not any(tmp_path.iterdir())  # no partial download left behind


def test_error_cifar10_archive_corrupt(tmp_path):
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"not a tar archive")
    result = run_script(SCRIPT, "--data-dir", tmp_path, check=False)
    assert_one_line_error(result, "corrupt", "md5")


def test_cifar10_archive_is_verified_and_extracted(tmp_path, cifar10_binary_dir, monkeypatch):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar10_binary_dir / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    monkeypatch.setattr(ddpm, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    images, labels = ddpm.load_cifar10(str(tmp_path), download=False)
    assert images.shape == (100, 3, 32, 32) and labels.shape == (100,)


def test_error_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    result = run_script(SCRIPT, "--dataset", "folder", "--data-dir", tmp_path, check=False)
    assert_one_line_error(result, "no PNG/JPG images", str(tmp_path))


def test_error_corrupt_checkpoint(saved_run):
    run_dir, _ = saved_run
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"\x00garbage")
    assert_one_line_error(run_script(SCRIPT, "--resume", run_dir, check=False), "cannot load checkpoint")


def test_error_checkpoint_of_another_script(saved_run, tmp_path):
    run_dir, _ = saved_run
    other = tmp_path / "other.pt"
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    torch.save(dict(checkpoint, script="dit_cifar10.py"), other)
    assert_one_line_error(run_script(SCRIPT, "--resume", other, check=False), "dit_cifar10.py")


def test_error_checkpoint_with_another_model_shape(saved_run, tmp_path):
    run_dir, _ = saved_run
    other = tmp_path / "other.pt"
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    checkpoint["args"]["channels"] = 64
    torch.save(checkpoint, other)
    assert_one_line_error(run_script(SCRIPT, "--resume", other, "--sample-only", check=False), "do not fit")


def test_error_changed_flag_on_resume_leaves_checkpoint_untouched(saved_run):
    run_dir, digest = saved_run
    result = run_script(SCRIPT, "--resume", run_dir, "--learning-rate", "0.1", check=False)
    assert_one_line_error(result, "--learning-rate")
    assert file_hash(run_dir / "checkpoints" / "latest.pt") == digest


def test_a_checkpoint_older_than_a_flag_resumes_with_the_flags_default(saved_run):
    """A checkpoint written before --prediction existed (no such key in its args) samples as eps, and naming the
    default on the command line is no change (it once said "--prediction is None in the checkpoint")."""
    run_dir, _ = saved_run
    path = run_dir / "checkpoints" / "latest.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["args"]["prediction"]
    torch.save(checkpoint, path)
    result = run_script(SCRIPT, "--resume", run_dir, "--sample-only", "--num-samples", "2", "--sampler", "ddim",
                        "--num-sampling-steps", "2", "--prediction", "eps")
    assert list((run_dir / "samples").glob("sample_only_ddim2_*.npz")), result.stdout
    refused = run_script(SCRIPT, "--resume", run_dir, "--sample-only", "--prediction", "v", check=False)
    assert_one_line_error(refused, "--prediction is 'eps' in the checkpoint")


def test_error_malicious_checkpoint_is_refused_without_running_code(saved_run, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"script": SCRIPT, "payload": Evil()}, evil)
    assert_one_line_error(run_script(SCRIPT, "--resume", evil, check=False), "cannot load checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("flags,words", [
    (["--num-sampling-steps", "0"], ["--num-sampling-steps"]),
    (["--channels", "48"], ["--channels", "32"]),
    (["--img-size", "15"], ["--img-size"]),
    (["--sample-only"], ["--resume"]),
])
def test_error_impossible_settings(flags, words, tmp_path):
    result = run_script(SCRIPT, *TINY, "--output-dir", tmp_path, *flags, check=False)
    assert_one_line_error(result, *words)
    assert not any(tmp_path.iterdir())  # nothing written for a run that never started


def test_error_batch_not_divisible_by_world_size(tmp_path):
    env = dict(script_env(), WORLD_SIZE="3", RANK="0", LOCAL_RANK="0")
    result = subprocess.run([PYTHON, str(ROOT / SCRIPT), *TINY, "--output-dir", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "--batch-size 16", "3")


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_script(SCRIPT, *TINY, "--output-dir", tmp_path, "--learning-rate", "1e30", "--warmup-steps", "1",
                        "--save-every", "1", "--total-steps", "50", check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "non-finite" in result.stderr.strip().splitlines()[-1]
    checkpoint = torch.load(only_run_dir(tmp_path) / "checkpoints" / "latest.pt", weights_only=True)
    assert 1 <= checkpoint["step"] < 50
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


# ---------------------------------------------------------------------------------------------------------------------
# FID code path (a small stand-in feature extractor: the Inception weights cannot be downloaded here)


class StandInFeatures(torch.nn.Module):
    """A fixed random projection of 4x4-pooled images: (N, 3, H, W) uint8 -> (N, 8) features."""

    def __init__(self):
        super().__init__()
        self.projection = torch.nn.Linear(48, 8)
        torch.nn.init.normal_(self.projection.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return self.projection(pooled)


def frechet_distance_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^(1/2)) = sum of the square roots of the (real, non-negative) eigenvalues of S_a S_b
    trace_sqrt = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


def test_fid_code_path_with_a_stand_in_feature_extractor():
    pytest.importorskip("torchmetrics")
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (64, 3, 16, 16), generator=gen, dtype=torch.uint8)
    fake = (real.float() * 0.7 + 40).to(torch.uint8)
    extractor = StandInFeatures()
    metric = ddpm.make_fid_metric(extractor)
    args, cpu = ddpm.replace(ddpm.Args(), fid_num_samples=64, sample_batch_size=20), torch.device("cpu")
    fid = ddpm.evaluate_fid(metric, lambda num: fake.numpy(), real.numpy(), args, cpu)
    with torch.no_grad():
        expected = frechet_distance_by_hand(extractor(fake), extractor(real))
    assert fid > 0.01
    assert fid == pytest.approx(expected, rel=1e-3)
    assert ddpm.evaluate_fid(metric, lambda num: real.numpy(), real.numpy(), args, cpu) == pytest.approx(0.0, abs=1e-3)


def test_fid_in_a_run_is_logged_with_its_sample_count(tmp_path, monkeypatch):
    pytest.importorskip("torchmetrics")
    real_make = ddpm.make_fid_metric
    monkeypatch.setattr(ddpm, "make_fid_metric", lambda feature_extractor=None: real_make(StandInFeatures()))
    monkeypatch.chdir(tmp_path)
    ddpm.main(*ddpm.parse_args([*TINY, "--total-steps", "2", "--eval-fid", "--fid-num-samples", "24",
                                "--num-sampling-steps", "2", "--output-dir", str(tmp_path / "runs")]))
    scalars = read_scalars(only_run_dir(tmp_path / "runs"))
    assert scalars["eval/fid_num_samples"] == [(2, 24.0)]
    assert scalars["eval/fid"][0][0] == 2 and scalars["eval/fid"][0][1] > 0


def test_error_fid_without_inception_weights(tmp_path):
    result = run_script(SCRIPT, *TINY, "--output-dir", tmp_path, "--eval-fid", check=False)
    assert_one_line_error(result, "Inception")
