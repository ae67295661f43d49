"""Tests of dit_cifar10.py: the DiT model against the reference's facts, guidance, the adaLN variants, learning, the
samplers against diffusers, and the promises of docs/PROMISES.md (smoke, exact resume, torchrun, bad inputs).

The subprocess runs use one thread each (OMP_NUM_THREADS=1) and run two at a time where they are independent: the
models are tiny, and two single-threaded processes use the 2 cores far better than one process that spins two
threads (and much better still on a machine that is busy).
"""
import math
import os
import signal
import subprocess
import typing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (PYTHON, ROOT, SEED_SHIFT, THREADS, checkpoint_tensors, load_module, measured, only_run_dir,
                      read_image_tags, read_scalars, run_script)

SCRIPT = ROOT / "dit_cifar10.py"
ENV = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
    ENV.pop(name, None)
dit = load_module("dit_cifar10.py")


def start(*args, cwd, torchrun=False):
    """Starts the script (or torchrun with 2 CPU processes) with stdout and stderr in files under cwd."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    command = ([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun
               else [PYTHON]) + [str(SCRIPT), *map(str, args)]
    stdout, stderr = open(cwd / "stdout.txt", "w"), open(cwd / "stderr.txt", "w")
    process = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=stdout, stderr=stderr, text=True)
    process.out_path, process.err_path = cwd / "stdout.txt", cwd / "stderr.txt"
    return process


def finish(process, timeout=300):
    """Waits for a started run; returns (returncode, stdout, stderr)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, process.out_path.read_text(), process.err_path.read_text()


def run_dir_of(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("run folder: "))
    return Path(line[len("run folder: "):])


def kill_on_line(*args, cwd, line: str, timeout=300):
    """Starts the script (one thread), SIGKILLs it as soon as stdout shows `line`; returns the stdout seen so far."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([PYTHON, str(SCRIPT), *map(str, args)], cwd=cwd, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for out_line in process.stdout:
            seen.append(out_line)
            if line in out_line:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=timeout)
    assert any(line in s for s in seen), "".join(seen)
    return "".join(seen)


def load_ema_model(run_dir: Path):
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    args = dit.Args(**checkpoint["args"])
    model = dit.build_model(args)
    model.load_state_dict(checkpoint["ema"])
    return model.eval(), args, checkpoint


TINY = ["--preset", "tiny", "--seed", str(1 + SEED_SHIFT)]


# ----------------------------------------------------------------------------------------------------------------------
# Shared runs (module scope): the tiny run, and the same run killed on its first checkpoint line and resumed.


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dit_tiny")
    reference = start(*TINY, "--output-dir", base / "runs", cwd=base / "reference")  # runs beside the killed one
    killed_stdout = kill_on_line(*TINY, "--output-dir", base / "runs", cwd=base / "killed",
                                 line="saved checkpoint at step")
    killed_dir = run_dir_of(killed_stdout)
    resumed = subprocess.run([PYTHON, str(SCRIPT), "--resume", killed_dir], cwd=base, env=ENV,
                             capture_output=True, text=True, timeout=300)
    code, stdout, stderr = finish(reference)
    assert code == 0, stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"dir": run_dir_of(stdout), "stdout": stdout, "killed_dir": killed_dir, "killed_stdout": killed_stdout,
            "resumed_stdout": resumed.stdout}


# ----------------------------------------------------------------------------------------------------------------------
# The model


def test_parameter_count_matches_reference_dit_at_seed_config():
    args = dit.Args()
    assert (args.img_size, args.patch, args.width, args.depth, args.heads, args.batch_size) == (32, 4, 384, 6, 6, 128)
    assert dit.run_length_in_steps(args, set(), 50_000, None).total_steps == 39_063  # the seed's 100 epochs
    assert (args.timesteps, args.beta_start, args.beta_end, args.learning_rate, args.weight_decay, args.ema_decay) == \
        (1000, 1e-4, 0.02, 1e-4, 0.0, 0.9999)
    assert args.max_grad_norm == 0 and args.warmup_steps == 0 and args.adaln == "zero" and args.num_classes == 10
    model = dit.build_model(args)
    # facebookresearch/DiT with learn_sigma=False, 10 classes, class_dropout 0.1: 16,543,536 trainable parameters;
    # its parameters() says 16,568,112 because its fixed position embedding (64 x 384) is a frozen Parameter.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16_543_536
    assert sum(p.numel() for p in model.parameters()) == 16_543_536
    assert model.pos_embed.numel() == 24_576 and "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()  # a function of the config, not a weight


def test_every_block_is_identity_and_output_zero_at_init(torch_threads):
    torch.manual_seed(0)
    model = dit.build_model(dit.Args())
    x = torch.randn(3, 3, 32, 32)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([1, 7, 10])  # 10 = the null class
    with torch.no_grad():
        assert torch.equal(model(x, t, y), torch.zeros_like(x))
        tokens = torch.randn(3, 64, 384)
        c = torch.randn(3, 384)
        for block in model.blocks:
            assert torch.equal(block(tokens, c), tokens)
    # adaLN-Diagonal blocks start as the identity too (zero diagonal scales); every variant predicts 0.
    for adaln in ("plain", "single", "diagonal"):
        model = dit.DiT(16, 4, 3, 64, 2, 4, 4.0, 10, adaln)
        with torch.no_grad():
            assert torch.equal(model(torch.randn(2, 3, 16, 16), torch.tensor([3, 900]), torch.tensor([0, 10])),
                               torch.zeros(2, 3, 16, 16))
            if adaln == "diagonal":
                tokens = torch.randn(2, 16, 64)
                assert torch.equal(model.blocks[0](tokens, torch.randn(2, 64)), tokens)


def test_embeddings_match_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

    ours = dit.sincos_pos_embed_2d(384, 8)
    theirs = get_2d_sincos_pos_embed(384, 8, base_size=8, interpolation_scale=1.0, output_type="pt")
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)
    t = torch.tensor([0, 1, 17, 500, 999])
    torch.testing.assert_close(dit.timestep_embedding(t, 256),  # DiT: cos first, frequencies / half
                               get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0),
                               rtol=0, atol=1e-5)


def test_unpatchify_inverts_patch_order():
    model = dit.DiT(16, 4, 3, 64, 1, 4, 4.0, 10)
    x = torch.randn(2, 3, 16, 16)
    # the token of patch (row i, col j) holds that patch's pixels in (row, column, channel) order
    tokens = x.reshape(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 48)
    assert torch.equal(model.unpatchify(tokens), x)


def randomised(model, seed=0):
    """The model with every parameter perturbed, so that outputs depend on t, y and x."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def test_guidance_scale_one_is_conditional_and_zero_unconditional(torch_threads):
    torch.manual_seed(0)
    model = randomised(dit.DiT(16, 4, 3, 64, 2, 4, 4.0, 10, "zero"))
    x, t, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 10, 200, 600, 999]), torch.tensor([0, 3, 9, 3, 5])
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    with torch.no_grad():
        eps_cond = model(x, t, y)
        eps_uncond = model(x, t, torch.full_like(y, 10))
        assert (eps_cond - eps_uncond).abs().max() > 1e-3  # the label matters
        calls.clear()
        torch.testing.assert_close(dit.guided_model_fn(model, y, 1.0)(x, t), eps_cond, rtol=0, atol=1e-6)
        torch.testing.assert_close(dit.guided_model_fn(model, y, 0.0)(x, t), eps_uncond, rtol=0, atol=1e-6)
        torch.testing.assert_close(dit.guided_model_fn(model, y, 4.0)(x, t), eps_uncond + 4.0 * (eps_cond - eps_uncond),
                                   rtol=0, atol=1e-5)
    assert calls == [5, 10, 10]  # s = 1: one plain forward; otherwise one batched forward of both halves


def variant_counts(width=384, depth=6):
    return {adaln: sum(p.numel() for p in dit.DiT(32, 4, 3, width, depth, 6, 4.0, 10, adaln).parameters())
            for adaln in ("zero", "plain", "single", "diagonal")}


def test_adaln_variant_parameter_counts():
    counts = variant_counts()
    d, depth = 384, 6
    assert counts == {"zero": 16_543_536, "plain": 14_769_456, "single": 11_827_248, "diagonal": 14_774_064}
    assert counts["zero"] - counts["plain"] == depth * (2 * d * d + 2 * d)  # no gate rows
    assert counts["diagonal"] - counts["plain"] == depth * 2 * d  # two diagonal scales per block
    # single: the per-block Linear(D, 6D) becomes one shared Linear(D, 6D) plus a (6, D) table per block, and the
    # final layer's Linear(D, 2D) a (2, D) table
    assert counts["zero"] - counts["single"] == (depth - 1) * (6 * d * d + 6 * d) - depth * 6 * d + (2 * d * d)
    assert counts["single"] < counts["plain"] < counts["diagonal"] < counts["zero"]
    # the paper's DiT-S/2 at 32 px with 10 classes: about 32.5M parameters with adaLN-Zero, 22.5M with adaLN-Single
    for adaln, expected in (("zero", 32.5e6), ("single", 22.5e6)):
        model = dit.build_model(dit.Args(**{**dit.PRESETS["dit-s2"], "adaln": adaln}))
        assert abs(sum(p.numel() for p in model.parameters()) / expected - 1) < 0.005


# ----------------------------------------------------------------------------------------------------------------------
# Samplers against diffusers' schedulers, on a fixed deterministic model_fn

ALPHAS_CUMPROD = dit.make_alphas_cumprod(dit.make_beta_schedule("linear", 1000, 1e-4, 0.02))


def fixed_model_fn(x, t):
    """A deterministic stand-in for a trained network: eps = sqrt(1-abar_t) x + sqrt(abar_t) f(x, t), whose predicted
    x0 = sqrt(abar_t) x - sqrt(1-abar_t) f stays of order 1, so an absolute tolerance means something."""
    abar = ALPHAS_CUMPROD[t].to(x.dtype)[:, None, None, None]
    phase = t.to(x.dtype)[:, None, None, None] / 1000.0
    wiggle = 0.5 * torch.tanh(2 * x) * torch.cos(3 * phase) + 0.3 * torch.sin(5 * phase + x)
    return (1 - abar).sqrt() * x + abar.sqrt() * wiggle


def x_T_for_samplers():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def diffusers_loop(scheduler, num_steps, generator=None):
    scheduler.set_timesteps(num_steps)
    x = x_T_for_samplers()
    for t in scheduler.timesteps:
        eps = fixed_model_fn(x, torch.full((x.shape[0],), int(t)))
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ddpm_sampler_matches_diffusers(variance, torch_threads):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              variance_type=variance, clip_sample=True)
    theirs = diffusers_loop(scheduler, 1000, torch.Generator().manual_seed(1))
    ours = dit.ddpm_sample(fixed_model_fn, x_T_for_samplers(), ALPHAS_CUMPROD, None, variance=variance,
                           clip_denoised=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_ddim_sampler_matches_diffusers(torch_threads):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False)
    theirs = diffusers_loop(scheduler, 50)
    ours = dit.ddim_sample(fixed_model_fn, x_T_for_samplers(), ALPHAS_CUMPROD, 50, eta=0.0, spacing="uniform")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_steps", [10, 20])
def test_dpm_solver_matches_diffusers(num_steps, torch_threads):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear")
    theirs = diffusers_loop(scheduler, num_steps)
    ours = dit.dpm_solver_sample(fixed_model_fn, x_T_for_samplers(), ALPHAS_CUMPROD, num_steps)
    assert 0.1 < ours.abs().mean() < 2  # a sample of order 1, not noise blown up
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# End to end: smoke, learning, resume


@pytest.mark.learning
def test_tiny_run_smoke(tiny_runs):
    run_dir, stdout = tiny_runs["dir"], tiny_runs["stdout"]
    assert (run_dir / "config.json").is_file() and (run_dir / "checkpoints" / "latest.pt").is_file()
    assert "DiT with adaLN-zero, 259,952 parameters" in stdout
    assert [line for line in stdout.splitlines() if line.startswith("saved checkpoint")] == [
        f"saved checkpoint at step {s}" for s in (256, 512, 768, 1024)]
    scalars = read_scalars(run_dir)
    for tag in ("losses/mse", "charts/learning_rate", "charts/grad_norm", "charts/SPS"):
        assert scalars[tag], tag
    assert "perf/mfu" not in scalars  # MFU on CUDA only
    assert read_image_tags(run_dir) == ["samples/ema"]
    losses = [v for _, v in scalars["losses/mse"]]
    measured(loss_first=losses[0], loss_last=losses[-1], ratio=losses[-1] / losses[0])
    assert losses[-1] < 0.5 * losses[0]
    # the sample grids: one row per class (10 classes x 4 per class)
    final = np.load(run_dir / "samples" / "step00001024.npz")
    assert final["arr_0"].shape == (40, 16, 16, 3) and final["arr_0"].dtype == np.uint8
    assert final["arr_1"].tolist() == [k for k in range(10) for _ in range(4)]
    import cv2

    height, width = cv2.imread(str(run_dir / "samples" / "step00001024.png")).shape[:2]
    assert height == 10 * 18 + 2 and width == 4 * 18 + 2


PALETTE = torch.cat([torch.full((1, 3), 20.0), torch.from_numpy(dit.SHAPE_COLOURS).float()])


def colour_rule(images: torch.Tensor) -> torch.Tensor:
    """The share of each image's pixels nearest to each of the 8 shape colours (the background excluded), (N, 8):
    class k of the shapes set is drawn in colour k % 8, so the most common colour names the class."""
    pixels = images.float().permute(0, 2, 3, 1).reshape(len(images), -1, 3)
    nearest = torch.cdist(pixels, PALETTE[None].expand(len(images), -1, -1)).argmin(-1)
    return torch.stack([(nearest == j + 1).float().mean(1) for j in range(8)], dim=1)


@pytest.mark.learning
def test_tiny_model_generates_the_asked_class_and_guidance_sharpens_it(tiny_runs, torch_threads):
    """The sampling (EMA) model of a short run, asked for each class, draws it far above chance. With the paper's EMA
    decay (the tiny preset's) this caught #14: without a warm-up the EMA of 1,024 steps is 90% the initial model."""
    model, args, _ = load_ema_model(tiny_runs["dir"])
    assert args.ema_decay == 0.9999  # the paper's
    per_class = 12
    labels = torch.arange(10).repeat_interleave(per_class)  # all ten classes in one batch
    x_T = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(100))
    accuracy, margin = {}, {}
    for scale in (0.0, 1.0, 3.0):
        images = dit.sample_images(dit.guided_model_fn(model, labels, scale), x_T, ALPHAS_CUMPROD, "ddim", 20)
        votes = colour_rule(images)
        asked = labels % 8  # the colour of the asked class
        others = votes.scatter(1, asked[:, None], -1.0)
        accuracy[scale] = (votes.argmax(1) == asked).float().mean().item()
        margin[scale] = (votes.gather(1, asked[:, None])[:, 0] - others.max(1).values).mean().item()
    measured(**{f"accuracy_{s}": v for s, v in accuracy.items()}, **{f"margin_{s}": v for s, v in margin.items()})
    assert accuracy[3.0] >= 0.4  # chance is 1/8
    assert margin[0.0] < margin[1.0] < margin[3.0]


def judge_step0(run_dir) -> dict:
    """The judge's scores of the run's untrained model (step 0: the zero-initialised final layer predicts eps = 0) on
    the same noise, labels and sampler as the run's evaluations."""
    _, args, _ = load_ema_model(run_dir)
    args = replace(args, data_dir=str(ROOT / "data"))
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    untrained = dit.build_model(args).eval()
    samples = dit.generate_samples(untrained, len(labels), labels, args, ALPHAS_CUMPROD, torch.autocast("cpu",
                                   enabled=False), type("NoStop", (), {"check": lambda self: None})())
    judge, heldout, heldout_labels = dit.make_shapes_judge(args, len(labels))
    return dit.judge_scores(judge, samples, labels.numpy(), heldout, heldout_labels)


# The cpu preset shortened: its first epoch (64 of 2,048 steps) with every training setting kept (patch 2, width 128,
# depth 4, 4096 images, batch 64, lr 1e-3, EMA 0.999 warmed up, DDIM-50, guidance 3), 2 samples per class, not 12.
@pytest.fixture(scope="module")
def cpu_preset_short(tmp_path_factory):
    out = tmp_path_factory.mktemp("dit_cpu_short")
    run_script(SCRIPT, "--preset", "cpu", "--seed", 1 + SEED_SHIFT, "--epochs", 1, "--samples-per-class", 2,
               "--output-dir", out)
    return only_run_dir(out)


@pytest.mark.learning
def test_cpu_preset_shortened_beats_step_0_by_a_stated_margin(cpu_preset_short, torch_threads):
    """The judge after the cpu preset's first epoch against its untrained model (step 0), same noise and labels.
    Measured (2 samples per class): Frechet 67,500 at step 0, 52,400 at step 64 (0.78 times; real-vs-real 291),
    recognised 0 and 0.10: one epoch is what 120 s of the suite allow beside DDPM's; the asked classes appear by step
    1024 (RESULTS 2d: class acc. 0.69)."""
    logged = {k[len("eval/judge_"):]: v for k, v in read_scalars(cpu_preset_short).items()
              if k.startswith("eval/judge_")}
    assert [s for s, _ in logged["recognised"]] == [64]
    final = {name: values[-1][1] for name, values in logged.items()}
    step0 = judge_step0(cpu_preset_short)
    measured(**{f"step0_{k}": v for k, v in step0.items()}, **final, frechet_ratio=final["frechet"] / step0["frechet"])
    assert step0["recognised"] <= 0.1 and final["recognised_real"] >= 0.9
    assert final["frechet"] <= 0.85 * step0["frechet"]  # better than step 0 by a stated margin ...
    assert final["frechet_real"] <= final["frechet"] <= 60_000  # ... and inside [floor, ceiling]
    assert final["recognised"] >= step0["recognised"]


@pytest.mark.learning
def test_the_judge_scores_each_evaluation_and_guidance_raises_its_class_accuracy(tiny_runs, torch_threads):
    """eval/judge_* at each evaluation of the tiny run (1,024 steps, 4 samples per class), guided (scale 3) and at
    guidance 1 (_cfg1) from the same noise. Measured: step 0 recognised 0; step 1,024 recognised 0.625 guided and
    0.425 unguided, class accuracy 0.575 guided and 0.35 unguided (chance 0.1, real images 0.725)."""
    run_dir = tiny_runs["dir"]
    logged = {k[len("eval/judge_"):]: v for k, v in read_scalars(run_dir).items() if k.startswith("eval/judge_")}
    for name in ("recognised", "recognised_real", "frechet", "frechet_real", "class_accuracy", "class_accuracy_real"):
        assert [s for s, _ in logged[name]] == [512, 1024] and [s for s, _ in logged[f"{name}_cfg1"]] == [512, 1024]
    final = {name: values[-1][1] for name, values in logged.items()}
    step0 = judge_step0(run_dir)
    measured(**{f"step0_{k}": v for k, v in step0.items()}, **final, frechet_ratio=final["frechet"] / step0["frechet"])
    assert step0["recognised"] <= 0.1 and final["recognised_real"] >= 0.9
    assert final["recognised"] >= step0["recognised"] + 0.3 and final["frechet"] <= step0["frechet"] / 3
    assert final["frechet_real"] <= final["frechet"]
    assert 0.3 <= final["class_accuracy"] <= final["class_accuracy_real"] + 0.1  # chance is 0.1
    assert final["class_accuracy"] >= final["class_accuracy_cfg1"] + 0.1  # guidance raises class accuracy


@pytest.mark.learning
def test_sample_only_one_class(tiny_runs, tmp_path):
    run_dir = tiny_runs["dir"]
    result = subprocess.run([PYTHON, str(SCRIPT), "--resume", run_dir, "--sample-only", "--class-label", "3",
                             "--num-samples", "24"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = sorted((run_dir / "samples").glob("sample_only_ddim20_class3_cfg3_step1024_*.npz"))
    assert len(files) == 1
    samples = np.load(files[0])
    assert samples["arr_0"].shape == (24, 16, 16, 3) and samples["arr_1"].tolist() == [3] * 24
    votes = colour_rule(torch.from_numpy(samples["arr_0"]).permute(0, 3, 1, 2))
    measured(class3_share=(votes.argmax(1) == 3).float().mean())
    # yellow squares, at least twice chance (1/8): over 3 seeds and AVX2 kernels the share of 12
    # samples was 0.33 to 0.67 (RESULTS.md section 7; 0.4 was once asserted and failed on one seed)
    assert (votes.argmax(1) == 3).float().mean() >= 0.25


def test_resume_after_sigkill_is_bitwise_exact(tiny_runs):
    assert "saved checkpoint at step 256" in tiny_runs["killed_stdout"]
    assert "saved checkpoint at step 1024" in tiny_runs["resumed_stdout"]
    reference = torch.load(tiny_runs["dir"] / "checkpoints" / "latest.pt", weights_only=True)
    resumed = torch.load(tiny_runs["killed_dir"] / "checkpoints" / "latest.pt", weights_only=True)
    assert reference["step"] == resumed["step"] == 1024
    # every tensor: weights, EMA, optimizer moments, scheduler, every RNG state, the training generator
    ours = checkpoint_tensors(tiny_runs["dir"] / "checkpoints" / "latest.pt")
    theirs = checkpoint_tensors(tiny_runs["killed_dir"] / "checkpoints" / "latest.pt")
    assert ours.keys() == theirs.keys() and len(ours) > 50
    different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not different, different[:5]
    # the resumed run's TensorBoard has no point twice (purge_step drops what the killed run logged after its save)
    steps = [s for s, _ in read_scalars(tiny_runs["killed_dir"])["losses/mse"]]
    assert steps == sorted(set(steps)) and steps[-1] == 1024


# ----------------------------------------------------------------------------------------------------------------------
# The adaLN variants train; torchrun matches one process; bad inputs


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dit_variants")
    short = [*TINY, "--total-steps", 128, "--eval-every", 128, "--save-every", 128, "--output-dir", base / "runs"]
    processes = {adaln: start(*short, "--adaln", adaln, cwd=base / adaln) for adaln in ("plain", "single", "diagonal")}
    processes["unconditional"] = start(*short, "--num-classes", 0, "--cfg-scale", 3, cwd=base / "unconditional")
    return {name: finish(process) for name, process in processes.items()}


@pytest.mark.learning
@pytest.mark.parametrize("adaln", ["plain", "single", "diagonal"])
def test_adaln_variant_trains(variant_runs, adaln):
    code, stdout, stderr = variant_runs[adaln]
    assert code == 0, stderr[-2000:]
    args = dit.Args(**{**dit.PRESETS["tiny"], "adaln": adaln})
    count = sum(p.numel() for p in dit.build_model(args).parameters())
    assert f"DiT with adaLN-{adaln}, {count:,} parameters" in stdout
    assert count < 259_952  # every variant is smaller than adaLN-Zero at the tiny config
    losses = [v for _, v in read_scalars(run_dir_of(stdout))["losses/mse"]]
    measured(ratio=losses[-1] / losses[0])
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.learning
def test_unconditional_run(variant_runs):
    code, stdout, stderr = variant_runs["unconditional"]
    assert code == 0, stderr[-2000:]
    assert "DiT with adaLN-zero, 259,248 parameters" in stdout and "unconditional" in stdout  # no label table
    run_dir = run_dir_of(stdout)
    samples = np.load(run_dir / "samples" / "step00000128.npz")
    assert samples.files == ["arr_0"] and samples["arr_0"].shape == (8 * 4, 16, 16, 3)  # 8 rows, no labels
    losses = [v for _, v in read_scalars(run_dir)["losses/mse"]]
    measured(ratio=losses[-1] / losses[0])
    assert losses[-1] < 0.6 * losses[0]


def test_torchrun_two_processes_match_one(tmp_path):
    common = [*TINY, "--total-steps", 4, "--num-shapes-images", 128, "--eval-every", 4, "--save-every", 4,
              "--output-dir", tmp_path / "runs"]  # 4 optimizer steps at global batch 32
    single = start(*common, "--exp-name", "single", cwd=tmp_path / "single")
    code, stdout, stderr = finish(start(*common, "--exp-name", "ddp", cwd=tmp_path / "ddp", torchrun=True))
    assert code == 0, stderr[-3000:]
    code1, stdout1, stderr1 = finish(single)
    assert code1 == 0, stderr1[-3000:]
    two = torch.load(run_dir_of(stdout) / "checkpoints" / "latest.pt", weights_only=True)
    one = torch.load(run_dir_of(stdout1) / "checkpoints" / "latest.pt", weights_only=True)
    assert two["step"] == one["step"] == 4
    for part in ("model", "ema"):
        for key, value in one[part].items():
            torch.testing.assert_close(two[part][key], value, rtol=0, atol=1e-5, msg=f"{part}/{key}")
    moved = sum((one["model"][k] - dit.build_model(dit.Args(**dit.PRESETS["tiny"])).state_dict()[k]).abs().sum()
                for k in one["model"])
    assert moved > 0


def test_bad_inputs_exit_2_with_one_line(tiny_runs, image_folder, tmp_path):
    cases = {
        "patch": ([*TINY, "--patch", 5], "--patch 5 does not divide --img-size 16"),
        "heads": ([*TINY, "--heads", 5], "--heads 5 does not divide --width 64"),
        "class_label": (["--resume", tiny_runs["dir"], "--sample-only", "--class-label", 10],
                        "--class-label 10 is out of range"),
        "num_classes": ([*TINY, "--dataset", "folder", "--data-dir", image_folder, "--num-classes", 10],
                        "--num-classes 10 disagrees with the data"),
    }
    processes = {name: start(*args, "--output-dir", tmp_path / "runs", cwd=tmp_path / name)
                 for name, (args, _) in cases.items()}
    for name, process in processes.items():
        code, stdout, stderr = finish(process)
        lines = stderr.strip().splitlines()
        assert code == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and cases[name][1] in lines[0], (name, stderr)
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_folder_dataset_classes_and_unconditional(image_folder, tmp_path):
    args = dit.Args(dataset="folder", data_dir=str(image_folder), img_size=16, num_classes=3)
    images, labels, _, class_names = dit.load_dataset(args)
    assert images.shape == (18, 3, 16, 16) and labels.tolist() == [k for k in range(3) for _ in range(6)]
    assert class_names == ["blue", "green", "red"]  # the subfolders, sorted
    # an image outside the class subfolders has no class: an error for a conditional model, fine without classes
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    shutil.copy(next((folder / "red").glob("*.png")), folder / "stray.png")
    with pytest.raises(dit.UserError, match="no class"):
        dit.load_dataset(dit.Args(dataset="folder", data_dir=str(folder), img_size=16, num_classes=3))
    assert len(dit.load_dataset(dit.Args(dataset="folder", data_dir=str(folder), img_size=16, num_classes=0))[0]) == 19
    model = dit.build_model(dit.Args(**{**dit.PRESETS["tiny"], "num_classes": 0}))
    assert model.y_embedder is None
    fn = dit.guided_model_fn(model, None, 4.0)  # unconditional: guidance does not apply
    assert fn(torch.zeros(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 3, 16, 16)


# ----------------------------------------------------------------------------------------------------------------------
# The run length and cadence count optimizer steps, as in ddpm and video; --epochs and format-1 checkpoints convert


def small_run(*flags, output_dir) -> list[str]:
    """dit.main in process on a tiny model (one sample per class, DDIM-2): the lines it printed."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dit.main(*dit.parse_args([*TINY, "--width", "32", "--depth", "1", "--heads", "2", "--samples-per-class", "1",
                                  "--num-sampling-steps", "2", "--output-dir", str(output_dir), *map(str, flags)]))
    return out.getvalue().splitlines()


def test_save_and_eval_cadence_count_steps_and_a_folder_smaller_than_the_batch_trains(image_folder, tmp_path,
                                                                                    torch_threads):
    lines = small_run("--dataset", "folder", "--data-dir", image_folder, "--num-classes", 3, "--total-steps", 100,
                      "--save-every", 50, "--eval-every", 100, "--log-every", 50, output_dir=tmp_path)
    assert [line for line in lines if line.startswith("saved checkpoint")] == [
        "saved checkpoint at step 50", "saved checkpoint at step 100"]
    run_dir = only_run_dir(tmp_path)
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step00000100.png"]  # evaluated at 100
    assert [s for s, _ in read_scalars(run_dir)["losses/mse"]] == [50, 100]
    # a batch holds each of the 18 images at least once and crosses epochs; the order is a function of the step
    first = dit.global_batch_indices(0, 32, 18, 1)
    assert len(first) == 32 and set(first.tolist()) == set(range(18))
    assert torch.equal(first, dit.global_batch_indices(0, 32, 18, 1))


def test_epochs_convert_to_steps_and_both_are_refused(tmp_path):
    args = dit.Args(**{**dit.PRESETS["tiny"], "epochs": 3})
    assert dit.run_length_in_steps(replace(args, total_steps=None), {"epochs"}, 100, None).total_steps == 10  # 300/32
    assert dit.run_length_in_steps(args, {"epochs"}, 100, None).epochs is None  # saved as steps, not as both
    with pytest.raises(dit.UserError, match="--epochs 3 and --total-steps 1024 both set the run length"):
        dit.run_length_in_steps(args, {"epochs", "total_steps"}, 100, None)


def test_a_format_1_checkpoint_counting_epochs_resumes_with_its_cadence_in_steps(tmp_path, torch_threads):
    """Format 1 counted --epochs, --save-every and --eval-every in epochs of N // B steps (the last partial batch
    dropped): 100 images at batch 32 made 3 steps per epoch. Its run of 4 epochs, saving every 2 and evaluating every
    4, resumes at its step as 12 steps, saving every 6 and evaluating every 12."""
    small_run("--num-shapes-images", 100, "--total-steps", 3, "--save-every", 3, "--eval-every", 3,
              output_dir=tmp_path)
    run_dir = only_run_dir(tmp_path)
    path = run_dir / "checkpoints" / "latest.pt"
    checkpoint = torch.load(path, weights_only=True)
    old_args = {k: v for k, v in checkpoint["args"].items() if k != "total_steps"}
    torch.save({**checkpoint, "format_version": 1, "args": {**old_args, "epochs": 4, "save_every": 2,
                                                            "eval_every": 4}}, path)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dit.main(*dit.parse_args(["--resume", str(run_dir)]))
    lines = out.getvalue().splitlines()
    assert [line for line in lines if line.startswith("saved checkpoint")] == [
        "saved checkpoint at step 6", "saved checkpoint at step 12"]
    resumed = torch.load(path, weights_only=True)
    assert resumed["format_version"] == 2 and resumed["step"] == 12
    assert (resumed["args"]["total_steps"], resumed["args"]["save_every"], resumed["args"]["eval_every"],
            resumed["args"]["epochs"]) == (12, 6, 12, None)
    assert sorted(p.name for p in (run_dir / "samples").glob("step*.png")) == ["step00000003.png", "step00000012.png"]


def test_every_numeric_flag_has_a_domain_and_bad_values_are_refused():
    hints = typing.get_type_hints(dit.Args)
    numeric = {name for name, hint in hints.items() if {int, float} & {hint, *typing.get_args(hint)}}
    assert numeric == set(dit.flag_marks()[0])
    dit.check_args(dit.Args(), 1)  # the defaults are valid
    for name, bad in {"seed": -1, "learning_rate": -1.0, "class_dropout": 1.0, "patch": 0, "heads": 0, "width": 0,
                      "mlp_ratio": 0.0, "sample_batch_size": 0, "num_classes": -1,
                      "cfg_scale": -1.0, "ema_decay": 1.5, "epochs": 0, "beta_start": float("nan")}.items():
        with pytest.raises(dit.UserError, match=f"--{name.replace('_', '-')} must be"):
            dit.check_args(replace(dit.Args(), **{name: bad}), 1)


def test_guidance_needs_a_trained_null_class():
    with pytest.raises(dit.UserError, match="--class-dropout 0 never trains"):
        dit.check_args(dit.Args(class_dropout=0.0), 1)  # the default --cfg-scale 1.5 mixes in the null class
    dit.check_args(dit.Args(class_dropout=0.0, cfg_scale=1.0), 1)  # no guidance: fine
    dit.check_args(dit.Args(class_dropout=0.0, num_classes=0), 1)  # unconditional: the scale is unused
    for changes, message in (({"patch": 5}, "--patch 5 does not divide --img-size 32"),
                             ({"heads": 5}, "--heads 5 does not divide --width 384"),
                             ({"class_label": "10"}, "--class-label 10 is out of range"),
                             ({"class_label": "-1"}, "--class-label -1 is out of range"),
                             ({"class_label": "10"}, r"10 classes \(0 to 9, or a name\)"),
                             ({"class_label": "cat", "num_classes": 0}, "--class-label cat is out of range"),
                             ({"class_label": "cat", "num_classes": 0}, r"0 classes \(unconditional\)"),
                             ({"class_label": "cat"}, "--class-label picks the class of --sample-only's samples")):
        with pytest.raises(dit.UserError, match=message):
            dit.check_args(replace(dit.Args(), **changes), 1)


def test_dit_loss_at_init_is_the_noise_power():
    # the final layer starts at zero, so eps_theta = 0 and L_simple = mean(eps^2), whatever x0, y and t
    model = dit.DiT(16, 4, 3, 64, 2, 4, 4.0, 10)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(4, 3, 16, 16, generator=generator)
    loss = dit.dit_loss(model, x0, torch.tensor([0, 3, 10, 7]), torch.tensor([0, 10, 500, 999]), noise,
                        ALPHAS_CUMPROD.float())
    torch.testing.assert_close(loss, noise.pow(2).mean())
    loss.backward()  # and it trains: the zero-initialised output layer gets a gradient
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Issue #14: with the paper's EMA decay (0.9999) and no warm-up, a short run sampled a mostly initial model
# (0.9999^1024 keeps 90% of the initial weights). The tiny preset keeps the paper's decay, so the tiny run tests it
# (test_tiny_model_generates_the_asked_class...; the exact resume covers the warm-up, still going on at the kill).


def test_ema_decay_warms_up_to_the_given_decay():
    assert dit.ema_decay_at(0, 0.9999) == pytest.approx(0.1)  # the first update takes 90% of the trained weights
    assert dit.ema_decay_at(90, 0.9999) == pytest.approx(0.91)
    assert dit.ema_decay_at(89_990, 0.9999) == pytest.approx(0.9999)  # the warm-up ends near step 90k
    assert dit.ema_decay_at(400_000, 0.9999) == 0.9999
    assert dit.ema_decay_at(5, 0.0) == 0.0  # --ema-decay 0: the EMA is the trained model
    decays = [dit.ema_decay_at(t, 0.999) for t in range(10_000)]  # 0.999 from step 8,990 on
    assert all(a <= b for a, b in zip(decays, decays[1:])) and max(decays) == 0.999


@pytest.mark.learning
def test_short_run_ema_is_near_the_trained_weights_not_the_initial_ones(tiny_runs):
    ema, args, checkpoint = load_ema_model(tiny_runs["dir"])
    torch.manual_seed(args.seed)  # the script seeds, then builds the model first: its initial weights
    initial = dit.build_model(args).state_dict()
    trained, averaged = checkpoint["model"], ema.state_dict()
    to_trained = sum((averaged[k] - trained[k]).pow(2).sum() for k in trained).sqrt()
    to_initial = sum((averaged[k] - initial[k]).pow(2).sum() for k in trained).sqrt()
    travelled = sum((trained[k] - initial[k]).pow(2).sum() for k in trained).sqrt()
    measured(to_trained=to_trained, to_initial=to_initial, ratio=to_trained / to_initial)
    # Without the warm-up: ema = 0.9 initial + 0.1 (an average of the trained path), near the initial weights.
    assert to_trained < 0.5 * to_initial


# ----------------------------------------------------------------------------------------------------------------------
# Issue #25: the sample-only grid has one row per class, the class names are printed, saved and accepted by
# --class-label, and a run says where it resumes and where it ends


def wrote_npz(lines: list[str]) -> Path:
    """The .npz a --sample-only run wrote, from its "wrote N samples ... to PNG and NPZ" line."""
    line = next(line for line in lines if line.startswith("wrote "))
    return Path(line.rsplit(" and ", 1)[1])


def test_sample_only_grid_has_a_row_per_class_and_class_names_round_trip(tmp_path, torch_threads):
    import cv2

    names = dit.SHAPES_CLASSES
    assert names[:2] == ["red square", "green square"] and names[8:] == ["red disc", "green disc"]
    lines = small_run("--total-steps", 2, "--save-every", 2, "--eval-every", 2, "--log-every", 2, output_dir=tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert "classes: " + ", ".join(f"{k} {name}" for k, name in enumerate(names)) in lines
    assert lines[-1] == f"done: step 2, checkpoint at {run_dir / 'checkpoints' / 'latest.pt'}"
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["class_names"] == names
    # the evaluation grid (1 per class here) and the sample-only grid: one row per class, 18 px apart
    height, width = cv2.imread(str(run_dir / "samples" / "step00000002.png")).shape[:2]
    assert (height - 2) // 18 == 10 and width == 18 + 2
    lines = small_run("--resume", run_dir, "--sample-only", "--num-samples", 16, output_dir=tmp_path)
    assert any("wrote 20 samples, 2 of each of the 10 classes (--num-samples 16 rounded up to fill the rows)" in line
               for line in lines), lines
    npz = wrote_npz(lines)
    assert np.load(npz)["arr_1"].tolist() == [k for k in range(10) for _ in range(2)]
    height, width = cv2.imread(str(npz.with_suffix(".png"))).shape[:2]
    assert (height - 2) // 18 == 10 and (height - 2) % 18 == 0
    # --class-label by name samples what the index does
    by_index = np.load(wrote_npz(small_run("--resume", run_dir, "--sample-only", "--num-samples", 3, "--class-label", 3,
                                           output_dir=tmp_path)))
    lines = small_run("--resume", run_dir, "--sample-only", "--num-samples", 3, "--class-label", "yellow square",
                      output_dir=tmp_path)
    assert any("wrote 3 samples of class 3 (yellow square)" in line for line in lines), lines
    by_name = np.load(wrote_npz(lines))
    assert by_name["arr_1"].tolist() == by_index["arr_1"].tolist() == [3, 3, 3]
    assert np.array_equal(by_name["arr_0"], by_index["arr_0"])
    # an unknown name: one line that lists the names
    with pytest.raises(dit.UserError) as error:
        small_run("--resume", run_dir, "--sample-only", "--class-label", "purple square", output_dir=tmp_path)
    assert "\n" not in str(error.value) and "'purple square' is not a class" in str(error.value)
    assert "'red square', 'green square'" in str(error.value)
    # a checkpoint from before the names were saved: the data's names
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    del checkpoint["class_names"]
    torch.save(checkpoint, run_dir / "checkpoints" / "latest.pt")
    lines = small_run("--resume", run_dir, "--sample-only", "--num-samples", 1, "--class-label", "red disc",
                      output_dir=tmp_path)
    assert np.load(wrote_npz(lines))["arr_1"].tolist() == [8]


def test_a_resumed_run_says_where_it_resumes(tmp_path, torch_threads):
    small_run("--total-steps", 2, "--save-every", 2, "--eval-every", 2, "--log-every", 2, output_dir=tmp_path)
    run_dir = only_run_dir(tmp_path)
    lines = small_run("--resume", run_dir, "--total-steps", 3, output_dir=tmp_path)
    assert "resuming at step 2 of 3" in lines
    assert lines[-1] == f"done: step 3, checkpoint at {run_dir / 'checkpoints' / 'latest.pt'}"
