# cleanworlds benchmark: few-step samplers on the cpu preset's model, scored by the script's judge. Results: RESULTS.md
"""
Few-step samplers against DDPM-1000 on one trained ddpm_cifar10.py model of the generated shapes (the cpu preset's:
`python ddpm_cifar10.py --preset cpu`): DDPM-1000 (ancestral), DDIM-10/20/50 (eta 0) and DPM-Solver++(2M)-10/20,
each exactly as `--sampler S --num-sampling-steps N` runs it (ddpm_cifar10.sample_images: x0 clipped to [-1, 1] at
every step); DDPM-100, DDIM-50 and DPM-Solver++-20 without the clipping (ddpm_noclip, ddim_noclip, dpm++_noclip), and
DDIM-50 with eta 1 (ddim_eta1: `--ddim-eta 1`, stochastic), all from the same noise. First, the model's noise error
per timestep on real shapes (EMA and raw weights): where in t the x0 prediction goes wrong.

The score is the script's own judge (its optional judge block, the one that logs eval/judge_*): the Frechet distance of
the judge's features, N samples against N held-out real shapes, minus the same distance between two real sets of N
(the floor at this sample count): the "excess" Frechet distance. Not FID. Also the share the judge recognises as a
shape. Repeated for each noise seed (each with its own held-out sets); the issue's check: DDIM-50 and
DPM-Solver++-20 within 1.5 times DDPM-1000's excess.

    python benchmark/samplers_cpu.py --run runs/shapes__ddpm_cifar10__1__1700000000       # 2,000 samples, 2 seeds
    python benchmark/samplers_cpu.py --run runs/<run> --num-samples 256                   # RESULTS 2e (2 x 40 min)
    python benchmark/samplers_cpu.py --run runs/<run> --samplers ddim-50,dpm++-20 --num-samples 500 --seeds 1
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAMPLERS = ("ddpm-1000,ddim-10,ddim-20,ddim-50,dpm++-10,dpm++-20,"
                    "ddpm_noclip-100,ddim_noclip-50,dpm++_noclip-20,ddim_eta1-50")
LABELS = {"ddpm": "DDPM (ancestral, sigma^2 = beta, x0 clipped)", "ddim": "DDIM (eta 0, x0 clipped)",
          "dpm++": "DPM-Solver++(2M) (x0 clipped)", "ddpm_noclip": "DDPM (ancestral), x0 not clipped",
          "ddim_noclip": "DDIM (eta 0), x0 not clipped", "ddim_eta1": "DDIM, eta 1 (stochastic), x0 clipped",
          "dpm++_noclip": "DPM-Solver++(2M), x0 not clipped"}


MAX_NOISE_ERROR_IMAGES = 10_000  # a diagnostic table: its images and their noise are held in memory at once


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


def load_script(file_name: str):
    import importlib.util

    name = f"cleanworlds_{Path(file_name).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_samplers(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, steps = item.strip().rpartition("-")
        if name not in LABELS or not steps.isdigit() or int(steps) < 1:
            raise UserError(f"--samplers: {item!r} is not NAME-STEPS with NAME in {', '.join(LABELS)}")
        out.append((name, int(steps)))
    return out


NOISE_ERROR_TIMESTEPS = (999, 980, 950, 900, 800, 600, 400, 200, 100, 20)


@torch.no_grad()
def noise_error_by_timestep(ddpm, models: dict, args, alphas_cumprod, num_images: int = 512,
                            batch_size: int = 500) -> list[dict]:
    """The model's noise prediction on real shapes at each t of NOISE_ERROR_TIMESTEPS: the scale
    c = <eps_hat, eps> / <eps, eps>, rms(eps_hat - eps), and the rms error of x0_hat = (x_t - sqrt(1 - abar) eps_hat)
    / sqrt(abar), unclipped and clipped to [-1, 1] (what a sampler's first steps see), for each of `models`; the
    network sees batch_size images at a time."""
    images = ddpm.make_shapes_dataset(num_images, args.img_size, seed=77)[0]
    x0 = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for t in NOISE_ERROR_TIMESTEPS:
        abar = float(alphas_cumprod[t])
        x_t = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps
        row = {"t": t, "abar": abar}
        for key, model in models.items():
            t_batch = torch.full((len(x_t),), t)
            eps_hat = torch.cat([ddpm.eps_from_output(model(x, t_part), x, t_part, alphas_cumprod, args.prediction)
                                 for x, t_part in zip(x_t.split(batch_size), t_batch.split(batch_size))])
            x0_hat = (x_t - (1 - abar) ** 0.5 * eps_hat) / abar ** 0.5
            row[key] = {"scale": float((eps_hat * eps).sum() / (eps * eps).sum()),
                        "eps_rms_error": float((eps_hat - eps).square().mean().sqrt()),
                        "x0_rms_error": float((x0_hat - x0).square().mean().sqrt()),
                        "x0_clipped_rms_error": float((x0_hat.clamp(-1, 1) - x0).square().mean().sqrt())}
        rows.append(row)
    return rows


def run_sampler(ddpm, model_fn, x_T, alphas_cumprod, name, steps, generator):
    """uint8 samples: exactly the script's `--sampler S --num-sampling-steps N` (sample_images), or, for the
    *_noclip rows, its DDIM / DPM-Solver++ without the x0 clipping the script applies (the rows before the fix)."""
    if name == "ddpm_noclip":
        x = ddpm.ddpm_sample(model_fn, x_T, alphas_cumprod, steps if steps < len(alphas_cumprod) else None,
                             clip_denoised=False, generator=generator)
    elif name == "ddim_noclip":
        x = ddpm.ddim_sample(model_fn, x_T, alphas_cumprod, steps, clip_denoised=False)
    elif name == "dpm++_noclip":
        x = ddpm.dpm_solver_sample(model_fn, x_T, alphas_cumprod, steps, clip_denoised=False)
    elif name == "ddim_eta1":  # the script's `--sampler ddim --ddim-eta 1`
        return ddpm.sample_images(model_fn, x_T, alphas_cumprod, "ddim", steps, eta=1.0, generator=generator)
    else:
        return ddpm.sample_images(model_fn, x_T, alphas_cumprod, name, steps, generator=generator)
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a ddpm_cifar10.py run folder (or checkpoint) on the shapes data")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help=f"comma list (default {DEFAULT_SAMPLERS})")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples per sampler and seed (and real sets)")
    parser.add_argument("--seeds", default="1,2", help="noise seeds, comma separated")
    parser.add_argument("--sample-batch-size", type=int, default=500, help="samples per forward batch")
    parser.add_argument("--out-dir", default=None, help="results.json and grids (default <run>/samplers_cpu)")
    parser.add_argument("--noise-error-images", type=int, default=512,
                        help=f"real shapes in the noise-error table, 1 to {MAX_NOISE_ERROR_IMAGES:,} (default 512)")
    opts = parser.parse_args(argv)
    samplers = parse_samplers(opts.samplers)
    try:
        seeds = [int(s) for s in opts.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {opts.seeds!r}: give whole numbers separated by commas, e.g. 1,2") from None
    if opts.num_samples < 2:
        raise UserError("--num-samples must be at least 2 (a Frechet distance needs a covariance)")
    if not 1 <= opts.noise_error_images <= MAX_NOISE_ERROR_IMAGES:
        raise UserError(f"--noise-error-images must be between 1 and {MAX_NOISE_ERROR_IMAGES:,}, not "
                        f"{opts.noise_error_images}")
    if opts.sample_batch_size < 1:
        raise UserError(f"--sample-batch-size must be at least 1, not {opts.sample_batch_size}")
    if opts.out_dir and Path(opts.out_dir).exists() and not Path(opts.out_dir).is_dir():
        raise UserError(f"--out-dir {opts.out_dir} is a file: give a folder")
    ddpm = load_script("ddpm_cifar10.py")
    try:
        args, checkpoint, _ = ddpm.resume_run(ddpm.Args(resume=opts.run), set(), trains=False)
        path = Path(opts.run) / "checkpoints" / "latest.pt" if Path(opts.run).is_dir() else Path(opts.run)
    except ddpm.UserError as e:
        raise UserError(str(e).replace("--resume", "--run").replace("resume from", "give")) from None
    if args.dataset != "shapes":
        raise UserError(f"{opts.run} was trained on {args.dataset}: the judge knows the generated shapes only")
    for name, steps in samplers:
        if steps > args.timesteps:
            raise UserError(f"--samplers {name}-{steps}: at most {args.timesteps} steps (the model's T)")
    models = {}
    for key in ("ema", "model"):  # the EMA weights sample; the raw ones only enter the noise-error table
        models[key] = ddpm.build_model(args)
        models[key].load_state_dict(checkpoint[key])
        models[key].eval().requires_grad_(False)
    model = models["ema"]
    alphas_cumprod = ddpm.make_alphas_cumprod(ddpm.make_beta_schedule(args.beta_schedule, args.timesteps,
                                                                      args.beta_start, args.beta_end))
    noise_error = noise_error_by_timestep(ddpm, models, args, alphas_cumprod, opts.noise_error_images,
                                          opts.sample_batch_size)
    print("the noise prediction on real shapes, EMA / raw weights: scale c = <eps_hat, eps>/<eps, eps>, "
          "rms(eps_hat - eps), rms error of x0_hat unclipped and clipped to [-1, 1]")
    for row in noise_error:
        print(f"t {row['t']:4d} (abar {row['abar']:.2e}): " + " / ".join(
            f"c {row[k]['scale']:.4f}, {row[k]['eps_rms_error']:.4f}, x0 {row[k]['x0_rms_error']:.3f}, clipped "
            f"{row[k]['x0_clipped_rms_error']:.3f}" for k in ("ema", "model")), flush=True)
    judge = ddpm.make_shapes_judge(args, opts.num_samples)[0]  # the run's judge (cached in {data_dir}/judge/)
    out_dir = Path(opts.out_dir) if opts.out_dir else path.parent.parent / "samplers_cpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    n = opts.num_samples
    print(f"model: {path} (step {checkpoint['step']}, EMA weights, {args.prediction}-prediction); {n} samples per "
          f"sampler and seed, seeds {seeds}")

    def eps_fn(x, t):  # the EMA network's output as the noise the samplers take (v-prediction is converted)
        return ddpm.eps_from_output(model(x, t), x, t, alphas_cumprod, args.prediction)

    rows = []
    for seed in seeds:
        heldout, heldout_labels = ddpm.make_shapes_dataset(2 * n, args.img_size, seed=ddpm.JUDGE_HELDOUT_SEED + seed)
        for name, steps in samplers:
            generator = torch.Generator().manual_seed(seed)
            start, images = time.time(), []
            with torch.no_grad():
                for begin in range(0, n, opts.sample_batch_size):
                    x_T = torch.randn(min(opts.sample_batch_size, n - begin), 3, args.img_size, args.img_size,
                                      generator=generator)
                    images.append(run_sampler(ddpm, eps_fn, x_T, alphas_cumprod, name, steps,
                                              generator))
            images = torch.cat(images).numpy()
            seconds = time.time() - start
            scores = ddpm.judge_scores(judge, images, None, heldout, heldout_labels)
            ddpm.write_png(out_dir / f"{name}-{steps}_seed{seed}.png", ddpm.make_grid(images[:64]))
            rows.append({"sampler": name, "nfe": steps, "seed": seed, "seconds": seconds, **scores,
                         "excess": scores["frechet"] - scores["frechet_real"]})
            print(f"seed {seed} {name}-{steps}: excess Frechet {rows[-1]['excess']:.1f} (Frechet "
                  f"{scores['frechet']:.1f}, real-vs-real {scores['frechet_real']:.1f}), recognised "
                  f"{scores['recognised']:.3f}, {seconds:.0f} s", flush=True)
    print("\n| sampler | NFE | excess Frechet (judge; lower is better), per seed | recognised | seconds |")
    print("|---|---|---|---|---|")
    mean = {}
    for name, steps in samplers:
        mine = [r for r in rows if (r["sampler"], r["nfe"]) == (name, steps)]
        mean[(name, steps)] = float(np.mean([r["excess"] for r in mine]))
        cells = [", ".join(format(r[key], spec) for r in mine)
                 for key, spec in (("excess", ".1f"), ("recognised", ".3f"), ("seconds", ".0f"))]
        print(f"| {LABELS[name]} | {steps} | " + " | ".join(cells) + " |")
    verdicts = {}
    reference = max((key for key in mean if key[0] == "ddpm"), default=None, key=lambda key: key[1])
    if reference is not None:  # the check, against the ancestral sampler with the most steps (DDPM-1000)
        for key in (("ddim", 50), ("dpm++", 20)):
            if key in mean:
                label = f"{key[0]}-{key[1]}"
                verdicts[label] = mean[key] <= 1.5 * max(mean[reference], 0.0)
                print(f"{label} within 1.5x DDPM-{reference[1]}'s excess ({mean[key]:.1f} vs {mean[reference]:.1f}): "
                      f"{'yes' if verdicts[label] else 'no'}")
    print("(the judge's Frechet distance minus the real-vs-real value at this sample count: not FID)")
    result = {"run": str(path), "step": checkpoint["step"], "num_samples": n, "seeds": seeds, "rows": rows,
              "noise_error_by_timestep": noise_error,
              "within_1.5x_of_ddpm": verdicts}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
