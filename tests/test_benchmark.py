"""benchmark/: plot.py on real tiny runs and on hand-written event files, the Atari HNS/IQM aggregation against
hand-computed values, and smoke runs of speed.py and samplers.py (no timing is asserted anywhere)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PYTHON, ROOT, read_scalars, run_script, script_env


def run_tool(tool: str, *args, cwd=None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `python benchmark/<tool> <args>` as a user would."""
    cmd = [PYTHON, str(ROOT / "benchmark" / tool), *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd or ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                    f"stderr:\n{result.stderr[-5000:]}")
    return result


def load_tool(tool: str):
    import importlib.util

    name = f"benchmark_{Path(tool).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmark" / tool)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_events(run_dir: Path, scalars: dict, purge_step=None):
    """Writes tag -> [(step, value)] into a TensorBoard event file in run_dir."""
    from torch.utils.tensorboard import SummaryWriter

    before = set(Path(run_dir).glob("events.out.tfevents.*"))
    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    # Readers take a folder's event files in name order. Two writers in the same second are told apart only by a
    # process-wide counter, which sorts as text (writer 10 before writer 9): name the files in the order written.
    for new_file in set(Path(run_dir).glob("events.out.tfevents.*")) - before:
        new_file.rename(new_file.with_name(f"events.out.tfevents.{1_000_000_000 + len(before)}.test"))


# ----------------------------------------------------------------------------------------------------------------------
# plot.py


@pytest.fixture(scope="module")
def tiny_ddpm_runs(tmp_path_factory) -> Path:
    """Two seeds of a shortened `ddpm_cifar10.py --preset tiny`, as a user would run them (about 5 s each)."""
    out = tmp_path_factory.mktemp("tiny_runs")
    for seed in (1, 2):
        run_script("ddpm_cifar10.py", "--preset", "tiny", "--seed", seed, "--output-dir", out, "--total-steps", 20,
                   "--log-every", 5, "--save-every", 20, "--eval-every", 20, "--num-eval-samples", 4,
                   "--num-sampling-steps", 5, timeout=600)
    return out


def test_plot_on_tiny_runs_png_and_table_equal_logged_values(tiny_ddpm_runs, tmp_path):
    out = tmp_path / "plots"
    result = run_tool("plot.py", tiny_ddpm_runs, "--tag", "losses/mse", "--tag", "charts/grad_norm",
                      "--out-dir", out)
    runs = sorted(p for p in tiny_ddpm_runs.iterdir() if p.is_dir())
    assert len(runs) == 2
    logged = {int(p.name.split("__")[2]): read_scalars(p) for p in runs}
    assert set(logged) == {1, 2}

    for tag in ("losses/mse", "charts/grad_norm"):
        png = out / f"{tag.replace('/', '_')}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        import matplotlib.image

        assert matplotlib.image.imread(png).shape[0] > 100  # a real, decodable image

    rows = {row["tag"]: row for row in json.loads((out / "final_values.json").read_text())}
    table = (out / "final_values.md").read_text()
    assert table in result.stdout
    for tag in ("losses/mse", "charts/grad_norm"):
        row = rows[tag]
        assert (row["env"], row["exp_name"], row["seeds"], row["n"]) == ("shapes", "ddpm_cifar10", [1, 2], 2)
        finals = [logged[seed][tag][-1][1] for seed in (1, 2)]
        assert logged[1][tag][-1][0] == 20  # the last point is at the last step
        assert row["per_seed"] == {"1": finals[0], "2": finals[1]}  # exactly the logged float32 values
        assert row["mean"] == pytest.approx(np.mean(finals), rel=1e-12)
        assert row["std"] == pytest.approx(np.std(finals, ddof=1), rel=1e-12)
        assert f"{np.mean(finals):.6g} +- {np.std(finals, ddof=1):.6g} (2)" in table
    assert "| ddpm_cifar10.py | shapes | ddpm_cifar10 |" in table  # the script from the run's config.json
    assert all(row["script"] == "ddpm_cifar10.py" for row in rows.values())


def test_plot_groups_envs_and_seeds_with_known_values(tmp_path):
    """Hand-written runs: two envs, two exp_names, uneven step grids, a duplicated seed (newest wins), a resumed run
    whose purge_step drops the points the killed run logged after its checkpoint, and a folder that is not a run."""
    runs = tmp_path / "runs"
    # env A, exp "algo": seeds 1, 2, 3 with known curves on the same grid
    for seed, finals in ((1, 10.0), (2, 14.0), (3, 21.0)):
        write_events(runs / f"Pong-v5__algo__{seed}__1000", {
            "charts/episodic_return": [(0, 0.0), (100, finals / 2), (200, finals)],
            "losses/loss": [(0, 1.0), (200, 0.5)]})
    # seed 3 again, older: ignored
    write_events(runs / "Pong-v5__algo__3__900", {"charts/episodic_return": [(0, 0.0), (200, 999.0)]})
    # env A, exp "other": one seed
    write_events(runs / "Pong-v5__other__1__1000", {"charts/episodic_return": [(0, 1.0), (200, 3.0)]})
    # env B (exp name with double underscores inside), two seeds on different grids; seed 2 was killed and resumed:
    # the first event file logged steps 0..300, the resumed writer purges from step 200 on and logs 200, 400.
    write_events(runs / "Breakout-v5__my__exp__1__2000", {"charts/episodic_return": [(0, 0.0), (150, 3.0), (400, 8.0)]})
    resumed = runs / "Breakout-v5__my__exp__2__2000_"  # a name clash got a trailing underscore
    write_events(resumed, {"charts/episodic_return": [(0, 0.0), (100, 1.0), (200, 50.0), (300, 60.0)]})
    write_events(resumed, {"charts/episodic_return": [(200, 2.0), (400, 6.0)]}, purge_step=200)
    (runs / "not_a_run").mkdir()
    write_events(runs / "not_a_run", {"charts/episodic_return": [(0, 1.0)]})

    plot = load_tool("plot.py")
    out = tmp_path / "plots"
    rows = plot.main([str(runs), "--tag", "charts/episodic_return", "--out-dir", str(out), "--band", "std"])
    by_group = {(r["env"], r["exp_name"]): r for r in rows}
    assert set(by_group) == {("Pong-v5", "algo"), ("Pong-v5", "other"), ("Breakout-v5", "my__exp")}
    a = by_group[("Pong-v5", "algo")]
    assert a["per_seed"] == {"1": 10.0, "2": 14.0, "3": 21.0}
    assert a["mean"] == pytest.approx(15.0) and a["std"] == pytest.approx(math.sqrt(((5 ** 2) + 1 + 36) / 2))
    assert by_group[("Pong-v5", "other")]["per_seed"] == {"1": 3.0}
    assert math.isnan(by_group[("Pong-v5", "other")]["std"])
    b = by_group[("Breakout-v5", "my__exp")]
    assert b["per_seed"] == {"1": 8.0, "2": 6.0}  # the purged 50 and 60 are gone
    table = (out / "final_values.md").read_text()
    assert "| - | Pong-v5 | algo | - | 15 +- 5.56776 (3) |" in table  # no config.json: script, config unknown
    assert "| - | Pong-v5 | other | - | 3 (1) |" in table
    assert "| - | Breakout-v5 | my__exp | - | 7 +- 1.41421 (2) |" in table
    assert (out / "charts_episodic_return.png").stat().st_size > 5000

    # the resumed seed reads as 0, 1, 2, 6 at steps 0, 100, 200, 400; the two seeds are interpolated onto one grid
    scalars = plot.read_scalars(resumed)["charts/episodic_return"]
    assert scalars[0].tolist() == [0, 100, 200, 400] and scalars[1].tolist() == [0.0, 1.0, 2.0, 6.0]
    steps, values = plot.align([(np.array([0, 150, 400]), np.array([0.0, 3.0, 8.0])), scalars])
    assert steps.tolist() == [0, 100, 150, 200, 400]
    assert values[0].tolist() == pytest.approx([0, 2, 3, 4, 8])
    assert values[1].tolist() == pytest.approx([0, 1, 1.5, 2, 6])

    # mean of the last 2 points; bands: 95% CI uses t_{0.975, 2} = 4.303 for 3 seeds
    rows = plot.main([str(runs), "--tag", "charts/episodic_return", "--out-dir", str(out), "--final-window", "2"])
    assert {r["exp_name"]: r["per_seed"] for r in rows}["algo"] == {"1": 7.5, "2": 10.5, "3": 15.75}
    values = np.array([[10.0], [14.0], [21.0]])
    low, high = plot.band(values, "ci95")
    assert high[0] - 15.0 == pytest.approx(4.303 * values.std(ddof=1) / math.sqrt(3))
    assert plot.ema_smooth(np.array([1.0, 1.0, 1.0]), 0.9).tolist() == pytest.approx([1, 1, 1])  # debiased


def test_plot_keeps_two_scripts_runs_with_one_exp_name_apart_and_names_their_steps(tmp_path, monkeypatch):
    """A DIAMOND run and a video run on Breakout with the same exp_name, seed and time (in two runs folders): two
    groups, two panels, each x axis named by its script's global step; the output goes beside the runs."""
    fields = {"diamond_atari.py": ["denoiser_steps_per_epoch", "imagination_horizon", "exp_name"],
              "video_diffusion.py": ["context_frames", "long_video_frames", "exp_name"]}
    for folder, (script, names), final in zip(("runs_a", "runs_b"), fields.items(), (3.0, 5.0)):
        run = tmp_path / folder / "Breakout-v5__same__1__1000"
        write_events(run, {"losses/x": [(0, 1.0), (10, final)]})
        (run / "config.json").write_text(json.dumps({name: 1 for name in names}))
    plot = load_tool("plot.py")
    monkeypatch.chdir(tmp_path)
    panels = []
    real_plot_tag = plot.plot_tag
    monkeypatch.setattr(plot, "plot_tag", lambda *a: panels.extend(real_plot_tag(*a)) or panels)
    rows = plot.main([str(tmp_path / "runs_a"), str(tmp_path / "runs_b"), "--tag", "losses/x"])
    assert {(r["script"], r["exp_name"]): r["per_seed"] for r in rows} == {
        ("diamond_atari.py", "same"): {"1": 3.0}, ("video_diffusion.py", "same"): {"1": 5.0}}
    assert panels == [("Breakout-v5 (diamond_atari.py)", "global step (gradient updates of the three models)"),
                      ("Breakout-v5 (video_diffusion.py)", "global step (optimizer steps)")]
    assert (tmp_path / "runs_a" / "plots" / "losses_x.png").exists() and not (tmp_path / "plots").exists()
    table = (tmp_path / "runs_a" / "plots" / "final_values.md").read_text()
    assert "| diamond_atari.py | Breakout-v5 | same | no preset | 3 (1) |" in table
    assert "| video_diffusion.py | Breakout-v5 | same | no preset | 5 (1) |" in table
    # a run folder given alone: the plots go beside it
    plot.main([str(tmp_path / "runs_b" / "Breakout-v5__same__1__1000"), "--tag", "losses/x"])
    assert (tmp_path / "runs_b" / "plots" / "final_values.md").exists()


def test_plot_keeps_presets_apart_and_says_what_it_merges_and_drops(tmp_path, capsys):
    """Issue #25: a 15-minute cpu-preset run was silently replaced by a newer tiny run of the same script, exp_name and
    seed. Runs differing only by preset are two groups; runs differing only by seed and the flags a resume may change
    (run length, cadence, sampling) are seeds of one; the older of two runs of one seed and a run without the tag are
    dropped; each merge, split and drop is one line on stderr."""
    runs = tmp_path / "runs"
    base = {"exp_name": "dit_cifar10", "patch": 2, "depth": 4, "learning_rate": 1e-3, "seed": 1}

    def run(name, config, scalars):
        write_events(runs / name, scalars)
        (runs / name / "config.json").write_text(json.dumps(config))
        return (runs / name).resolve()

    def accuracy(final):
        return {"eval/judge_class_accuracy": [(0, 0.1), (100, final)]}

    run("shapes__dit_cifar10__1__1000", {**base, "preset": "cpu", "total_steps": 2048}, accuracy(0.75))
    run("shapes__dit_cifar10__1__2000", {**base, "preset": "tiny", "total_steps": 1024}, accuracy(0.25))
    newer = run("shapes__dit_cifar10__2__1000", {**base, "preset": "cpu", "seed": 2, "total_steps": 4096,
                                                 "eval_every": 256, "num_sampling_steps": 20}, accuracy(0.5))
    older = run("shapes__dit_cifar10__2__500", {**base, "preset": "cpu", "seed": 2}, accuracy(0.0))
    untagged = run("shapes__dit_cifar10__3__1000", {**base, "preset": "cpu", "seed": 3}, {"losses/mse": [(0, 1.0)]})
    plot = load_tool("plot.py")
    rows = plot.main([str(runs), "--tag", "eval/judge_class_accuracy", "--out-dir", str(tmp_path / "plots")])
    assert {r["config"]: (r["per_seed"], r["n"]) for r in rows} == {"cpu": ({"1": 0.75, "2": 0.5}, 2),
                                                                     "tiny": ({"1": 0.25}, 1)}
    out, err = capsys.readouterr()
    assert "| dit_cifar10.py | shapes | dit_cifar10 | cpu | 0.625 +- 0.176777 (2) |" in out
    assert "| dit_cifar10.py | shapes | dit_cifar10 | tiny | 0.25 (1) |" in out
    assert "(3 runs in 2 rows)" in out
    assert err.splitlines() == [
        f"note: dropping {older}: {newer} is a newer run of the same script, env, exp_name, configuration and seed",
        f"note: leaving out {untagged}: it logged no tag matching eval/judge_class_accuracy",
        "note: dit_cifar10.py shapes dit_cifar10: runs of 2 configurations (cpu; tiny), kept apart",
        "note: averaging 2 seeds (1, 2) of dit_cifar10.py shapes dit_cifar10 (config cpu): same configuration"]
    assert (plot.plural(1, "seed"), plot.plural(2, "seed"), plot.plural(1, "run")) == ("1 seed", "2 seeds", "1 run")
    # a flag that is not a preset's: the config column names it, for every configuration of the exp_name
    run("shapes__dit_cifar10__4__1000", {**base, "preset": "cpu", "seed": 4, "learning_rate": 2e-3}, accuracy(0.5))
    rows = plot.main([str(runs), "--tag", "eval/judge_class_accuracy", "--out-dir", str(tmp_path / "plots")])
    assert {r["config"]: r["seeds"] for r in rows} == {
        "cpu --learning-rate 0.001": [1, 2], "cpu --learning-rate 0.002": [4], "tiny --learning-rate 0.001": [1]}


def test_plot_ignores_every_flag_a_resume_may_change():
    """plot.NOT_CONFIGURATION holds every flag a script marks RESUME_MUTABLE (read from the scripts' source)."""
    import ast

    plot = load_tool("plot.py")
    for script in plot.SCRIPT_FIELDS:
        tree = ast.parse((ROOT / script).read_text())
        args = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
        mutable = {field.target.id for field in args.body if isinstance(field, ast.AnnAssign) and any(
            getattr(node, "id", None) == "RESUME_MUTABLE" for node in ast.walk(field.annotation))}
        assert len(mutable) > 10, script
        assert mutable <= plot.NOT_CONFIGURATION, (script, mutable - plot.NOT_CONFIGURATION)


def test_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    write_events(tmp_path / "runs" / "Pong-v5__algo__1__1000", {"losses/x": [(0, 1.0)]})
    env = {**script_env(), "PYTHONPATH": str(shim.parent)}
    result = subprocess.run([PYTHON, str(ROOT / "benchmark" / "plot.py"), str(tmp_path / "runs")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "pip install matplotlib" in result.stderr and "[plot]" in result.stderr


def test_plot_errors_are_one_line(tmp_path):
    result = run_tool("plot.py", tmp_path / "missing", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    write_events(tmp_path / "runs" / "Pong-v5__algo__1__1000", {"losses/x": [(0, 1.0)]})
    result = run_tool("plot.py", tmp_path / "runs", "--tag", "eval/nothing", check=False)
    assert result.returncode == 2 and "losses/x" in result.stderr and result.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------------
# atari_scores.py


def test_hns_and_iqm_against_hand_computed_values():
    atari = load_tool("atari_scores.py")
    assert len(atari.RANDOM_HUMAN) == 26 and set(atari.RANDOM_HUMAN) == set(atari.DIAMOND_PAPER_SCORES)
    # HNS = (score - random) / (human - random), by hand from the Random and Human columns of DIAMOND's Table 1
    assert float(atari.human_normalized_score("Breakout-v5", 30.5)) == pytest.approx(1.0)
    assert float(atari.human_normalized_score("ALE/Breakout-v5", 1.7)) == pytest.approx(0.0)
    assert float(atari.human_normalized_score("PongNoFrameskip-v4", 20.4)) == pytest.approx(41.1 / 35.3)
    assert float(atari.human_normalized_score("mspacman", 307.3 + 6644.3 / 2)) == pytest.approx(0.5)
    # IQM = scipy.stats.trim_mean(x, 0.25): N = 10 drops int(2.5) = 2 at each end, no fractional weights
    assert atari.iqm([300, 0, 1, 200, 2, 0, 3, 100, 4, 0]) == pytest.approx((0 + 1 + 2 + 3 + 4 + 100) / 6)
    assert atari.iqm(np.arange(130.0)) == pytest.approx(np.arange(32, 98).mean())  # DIAMOND's 130 runs: middle 66
    assert atari.iqm([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # int(0.75) = 0: the plain mean

    # Two games x 3 seeds, by hand: Boxing HNS = (s - 0.1) / 12; Pong HNS = (s + 20.7) / 35.3
    scores = {("Boxing", 1): 12.1, ("Boxing", 2): 24.1, ("Boxing", 3): 0.1,
              ("Pong", 1): -20.7, ("Pong", 2): 14.6, ("Pong", 3): 49.9}
    boxing, pong = [1.0, 2.0, 0.0], [0.0, 1.0, 2.0]
    _, result = atari.report(scores)
    assert result["mean_hns"] == pytest.approx((1.0 + 1.0) / 2)
    # 6 runs: int(1.5) = 1 dropped at each end of [0, 0, 1, 1, 2, 2] -> mean(0, 1, 1, 2) = 1
    assert result["iqm"] == pytest.approx(1.0)
    assert result["superhuman"] == 2 and result["num_runs"] == 6 and result["num_games"] == 2
    assert atari.aggregate_hns({"a": boxing, "b": pong})["median_hns"] == pytest.approx(1.0)

    # The paper's own per-game means give its mean HNS 1.46, 11 superhuman games, and an IQM of 0.757 over the
    # 26 per-game means (the paper's 0.64 is over the 130 runs, which it does not list).
    text, paper = atari.report({(game, 1): s for game, s in atari.DIAMOND_PAPER_SCORES.items()})
    assert round(paper["mean_hns"], 2) == 1.46 and paper["superhuman"] == 11
    assert paper["iqm"] == pytest.approx(0.757, abs=5e-4)
    assert "| Breakout | 1 | 132.5 | 4.542 | 132.5 | 4.542 |" in text


def test_atari_scores_reads_event_files_and_csv(tmp_path):
    runs = tmp_path / "runs"
    # the final value of eval/test_episodic_return is the score; an older duplicate of (Breakout, 1) is ignored
    write_events(runs / "Breakout-v5__diamond_atari__1__2000",
                 {"eval/test_episodic_return": [(10, 5.0), (1000, 30.5)]})
    write_events(runs / "Breakout-v5__diamond_atari__1__1000", {"eval/test_episodic_return": [(1000, 999.0)]})
    write_events(runs / "Breakout-v5__diamond_atari__2__2000", {"eval/test_episodic_return": [(1000, 59.3)]})
    write_events(runs / "Pong-v5__diamond_atari__1__2000", {"eval/test_episodic_return": [(1000, -20.7)]})
    write_events(runs / "Pong-v5__diamond_atari__2__2000", {"losses/x": [(1000, 1.0)]})  # no score yet: left out
    csv_file = tmp_path / "scores.csv"
    csv_file.write_text("game,seed,score\nBoxing,1,12.1\nBoxing,2,0.1\n")
    out = tmp_path / "report.md"
    result = run_tool("atari_scores.py", runs, "--csv", csv_file, "--out", out, "--bootstrap", 200)
    # HNS: Breakout [1, 2], Pong [0], Boxing [1, 0] -> per-game means 1.5, 0, 0.5 -> mean 2/3;
    # 5 runs [0, 0, 1, 1, 2]: int(1.25) = 1 dropped at each end -> mean(0, 1, 1) = 2/3
    assert "| mean HNS (of per-game means) | 0.667 [" in result.stdout
    assert "| IQM HNS (all runs, 25% trimmed) | 0.667 [" in result.stdout
    assert "| Breakout | 2 | 44.9 +- 20.4 | 1.500 |" in result.stdout
    assert "5 runs on 3 games (missing: Alien" in result.stdout
    assert out.read_text() in result.stdout + "\n"
    bad = tmp_path / "bad.csv"
    bad.write_text("game,seed,score\nNotAGame,1,3\n")
    result = run_tool("atari_scores.py", "--csv", bad, check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: 'NotAGame' is not one of")


# ----------------------------------------------------------------------------------------------------------------------
# speed.py (no timing is asserted: only that the peers are the same models and the report's arithmetic)


def test_speed_peers_are_the_same_models():
    """The peer models speed.py times against have the configs they claim: same parameter count (DDPM) and the same
    FLOPs per image as ours, counted on the meta device (nothing runs)."""
    import torch

    speed = load_tool("speed.py")
    ddpm, dit = speed.load_script("ddpm_cifar10.py"), speed.load_script("dit_cifar10.py")
    with torch.device("meta"):
        models = {"ddpm": ddpm.UNet(), "peer_ddpm": speed.diffusers_ddpm_unet(), "dit": dit.DiT(),
                  "peer_dit": speed.diffusers_dit()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert params == {"ddpm": 35_746_307, "peer_ddpm": 35_746_307, "dit": 16_543_536, "peer_dit": 17_797_296}
    x, t, y = torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    for train in (False, True):
        ours = speed.model_flops(models["ddpm"], lambda m, x, t: m(x, t), (x, t), train)
        peer = speed.model_flops(models["peer_ddpm"], lambda m, x, t: m(x, t).sample, (x, t), train)
        assert ours == peer and ours / (3 if train else 1) == pytest.approx(12.44e9, rel=0.01)
        ours = speed.model_flops(models["dit"], lambda m, x, t, y: m(x, t, y), (x, t, y), train)
        peer = speed.model_flops(models["peer_dit"], lambda m, x, t, y: m(x, timestep=t, class_labels=y,
                                                                           return_dict=False)[0], (x, t, y), train)
        assert ours == pytest.approx(peer, rel=0.005)  # diffusers' per-block embedders add 0.2%


def test_speed_round_robin_and_report_arithmetic():
    import torch

    speed = load_tool("speed.py")
    order = []
    candidates = [speed.Candidate(name, (lambda name=name: order.append(name)), items, flops, is_peer=peer, params=1)
                  for name, items, flops, peer in (("a", 4, 8e9, False), ("b", 4, 8e9, True))]
    reference = speed.Candidate("matmul", lambda: order.append("m"), 1, 1e9, is_reference=True)
    cfg = type("Cfg", (), dict(device=torch.device("cpu"), warmup_steps=1, target_seconds=0.0, repeats=3,
                               max_steps_per_repeat=5, compile=False, peak_flops=float("nan")))()
    speed.run_round_robin(candidates + [reference], cfg)
    # one warm-up each, then 3 rounds of one step each, the order rotated every round
    assert order == ["a", "b", "m", "a", "b", "m", "b", "m", "a", "m", "a", "b"]
    candidates[0].times, candidates[1].times, reference.times = [2.0, 1.0, 3.0], [4.0, 4.0, 8.0], [0.1, 0.1, 0.1]
    text, rows = speed.report("title", "train", candidates, reference, cfg, [])
    a, b = rows
    assert a["median_s"] == 2.0 and a["items_per_s"] == 2.0 and a["ratio_vs_peer"] == 2.0  # peer median 4 / ours 2
    assert a["utilisation"] == pytest.approx((8e9 / 2.0) / (1e9 / 0.1))  # achieved FLOP/s over the matmul's
    assert "| a | 0.00M | 2000.0 [1000.0, 3000.0] | 2.0 | 2.00x | 4.00x | 0.40 | 8.0 |" in text
    assert "best of ours: a, 2.00x the best peer variant (b)" in text


def test_speed_smoke_dit(tmp_path):
    """speed.py as a user runs it, shrunk: DiT and its diffusers peer, batch 2, one repetition."""
    out = tmp_path / "speed.json"
    result = run_tool("speed.py", "--quick", "--only", "dit", "--batch-size", "2", "--repeats", "1", "--json", out,
                      timeout=300)
    assert "vs diffusers DiTTransformer2DModel" in result.stdout and "best of ours: dit_cifar10.DiT" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kind"], r["label"]) for r in rows} == {(k, m) for k in ("train", "sample")
                                                       for m in ("dit_cifar10.DiT", "diffusers DiTTransformer2DModel")}
    for kind in ("train", "sample"):
        ours, peer = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["is_peer"])
        assert ours["ratio_vs_peer"] == pytest.approx(peer["median_s"] / ours["median_s"])
        achieved = ours["flops_per_step"] / ours["median_s"]
        assert ours["utilisation"] == pytest.approx(achieved / ours["matmul_flops_per_s"])
    result = run_tool("speed.py", "--only", "nothing", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown benchmark nothing")
    import torch

    if not torch.cuda.is_available():
        result = run_tool("speed.py", "--device", "cuda", check=False)
        assert result.returncode == 2 and result.stderr.startswith("error: --device cuda but CUDA is not available")


def test_speed_against_a_commit(tmp_path):
    """--against COMMIT times each script now beside the same script at that commit (`git show`), in place of the
    peers: here HEAD, DiT's training step, batch 2, one repetition; a commit git does not know is one line, exit 2."""
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    out = tmp_path / "speed.json"
    run_tool("speed.py", "--quick", "--only", "dit", "--batch-size", "2", "--repeats", "1", "--skip-sampling",
             "--against", "HEAD", "--json", out, timeout=300)
    now, then = sorted(json.loads(out.read_text())["rows"], key=lambda r: r["is_peer"])
    assert (now["label"], then["label"]) == ("dit_cifar10.DiT", "dit_cifar10.DiT @ HEAD")
    assert now["params"] == then["params"] and now["flops_per_step"] == then["flops_per_step"]
    assert now["ratio_vs_peer"] == pytest.approx(then["median_s"] / now["median_s"])
    result = run_tool("speed.py", "--only", "dit", "--against", "no-such-commit", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: --against no-such-commit: git cannot show")


# ----------------------------------------------------------------------------------------------------------------------
# samplers.py


def test_frechet_distance_against_hand_computed_values():
    samplers = load_tool("samplers.py")
    a = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])  # mean (1, 1), covariance 4/3 I (ddof 1)
    b = 2 * a + 1  # mean (3, 3), covariance 16/3 I
    # diagonal case: |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2 = 8 + 2 (4/3) (1 - 2)^2
    assert samplers.frechet_distance(a, b) == pytest.approx(8 + 8 / 3)
    assert samplers.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    # a full covariance: tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)), rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 1
    sa, sb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(sa @ sb).real.clip(0)).sum()
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * trace_sqrt
    assert samplers.frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert samplers.parse_samplers("ddpm-1000,ddim-20,dpm++-10") == [("ddpm", 1000), ("ddim", 20), ("dpm++", 10)]
    with pytest.raises(samplers.UserError):
        samplers.parse_samplers("euler-10")


def test_samplers_smoke_on_a_tiny_run(tiny_ddpm_runs, tmp_path):
    """samplers.py on a tiny run (the table, the grids, the FD of every sampler; the numbers mean nothing here)."""
    run = sorted(p for p in tiny_ddpm_runs.iterdir() if p.is_dir())[0]
    out = tmp_path / "samplers"
    result = run_tool("samplers.py", "--run", run, "--samplers", "ddpm-4,ddim-2,dpm++-3,ddim-clip-2",
                      "--num-samples", 40,
                      "--feature-steps", 3, "--out-dir", out)
    data = json.loads((out / "results.json").read_text())
    assert [(r["sampler"], r["nfe"]) for r in data["rows"]] == [("ddpm", 4), ("ddim", 2), ("dpm++", 3),
                                                                ("ddim-clip", 2)]
    assert all(np.isfinite(r["fd"]) and r["fd"] > 0 for r in data["rows"]) and data["floor"] >= 0
    assert "| DDIM (eta 0, uniform spacing) | 2 |" in result.stdout and "not FID" in result.stdout
    assert {p.name for p in out.glob("*.png")} == {"ddpm-4.png", "ddim-2.png", "dpm++-3.png", "ddim-clip-2.png"}
    # the default model: the MLP trained in-process (a few steps here)
    result = run_tool("samplers.py", "--model", "mlp", "--train-steps", 10, "--samplers", "ddim-2", "--num-samples", 20,
                      "--feature-steps", 2, "--out-dir", tmp_path / "mlp")
    assert "MLPDenoiser (2,106,048 parameters" in result.stdout and "10 Adam steps" in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# run_atari100k.py (with a stand-in script: the runner's scheduling, logs, markers and resume, not DIAMOND itself)


def test_atari_runner_parallel_markers_and_resume(tmp_path):
    fake = tmp_path / "fake_diamond.py"
    fake.write_text(
        "import sys, pathlib, time\n"
        "args = sys.argv[1:]\n"
        "print('args', args)\n"
        "if '--resume' in args:\n"
        "    sys.exit(0)\n"
        "env, seed = args[args.index('--env-id') + 1], args[args.index('--seed') + 1]\n"
        "out = args[args.index('--output-dir') + 1]\n"
        "run = pathlib.Path(out) / f'{env}__diamond_atari__{seed}__{int(time.time())}'\n"
        "(run / 'checkpoints').mkdir(parents=True)\n"
        "(run / 'checkpoints' / 'latest.pt').write_bytes(b'x')\n"
        "sys.exit(3 if (env, seed) == ('Pong-v5', '2') else 0)\n")
    out = tmp_path / "atari"
    args = ["--script", fake, "--games", "Pong,Breakout-v5", "--seeds", "1-2", "--workers", 2, "--output-dir", out]
    result = run_tool("run_atari100k.py", *args, "--", "--preset", "tiny", check=False)
    assert result.returncode == 1 and "3 finished, 1 failed" in result.stdout
    assert sorted(p.name for p in (out / "logs").glob("*.done")) == ["Breakout__1.done", "Breakout__2.done",
                                                                     "Pong__1.done"]
    assert "'--preset', 'tiny'" in (out / "logs" / "Breakout__1.log").read_text()
    # again: the three done runs are skipped, the failed one is resumed from its run folder
    result = run_tool("run_atari100k.py", *args)
    assert "4 runs, 3 already done, 1 to go" in result.stdout and "1 finished, 0 failed" in result.stdout
    log = (out / "logs" / "Pong__2.log").read_text()
    assert "--resume" in log.split("$")[-1] and "Pong-v5__diamond_atari__2__" in log.split("$")[-1]
    listed = run_tool("run_atari100k.py", "--print-commands", "--seeds", "1,3").stdout.splitlines()
    assert len(listed) == 52 and "--env-id Alien-v5 --seed 1" in listed[0] and "--seed 3" in listed[-1]
    bad = run_tool("run_atari100k.py", "--games", "Tetris", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --games: 'Tetris'")


# ----------------------------------------------------------------------------------------------------------------------
# unet_vs_dit.py


def test_unet_vs_dit_trains_both_for_the_budget_and_scores_their_samples(tmp_path):
    """Both scripts run as users run them, stopped by SIGTERM at the budget (they save and exit 0), then sampled."""
    out = tmp_path / "cmp"
    result = run_tool("unet_vs_dit.py", "--budget-seconds", 20, "--img-size", 8, "--num-samples", 24,
                      "--num-sampling-steps", 3, "--feature-steps", 3, "--output-dir", out, timeout=600)
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert list(rows) == ["U-Net (ddpm_cifar10.py)", "DiT (dit_cifar10.py)"]
    unet_vs_dit = load_tool("unet_vs_dit.py")
    for label, row in rows.items():
        script = "ddpm_cifar10.py" if "U-Net" in label else "dit_cifar10.py"
        checkpoint = torch.load(Path(row["run"]) / "checkpoints" / "latest.pt", weights_only=True)
        assert row["steps"] == checkpoint["step"] > 0  # stopped inside its run length by the budget, and saved
        module = unet_vs_dit.load_script(script)
        args = module.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["args"].items()})
        assert row["parameters"] == sum(p.numel() for p in module.build_model(args).parameters())
        assert args.img_size == 8 and args.dataset == "shapes" and args.batch_size == 64
        assert np.isfinite(row["fd_shapes_cnn"]) and row["fd_shapes_cnn"] > 0 and row["train_gflop_per_image"] > 0
    assert json.loads((Path(rows["DiT (dit_cifar10.py)"]["run"]) / "config.json").read_text())["num_classes"] == 0
    assert "| U-Net (ddpm_cifar10.py) |" in result.stdout and "FD-shapes-CNN floor" in result.stdout
    bad = run_tool("unet_vs_dit.py", "--budget-seconds", 0, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")


# ----------------------------------------------------------------------------------------------------------------------
# diamond_learns.sh: DIAMOND shown to learn at CPU scale (about an hour); here its whole pipeline with tiny sizes


def test_diamond_learns_pipeline_with_tiny_sizes(tmp_path):
    """The recipe as written (runs in parallel, baselines with the script's own AtariEnv, the pooled table, the
    plots), shrunk through its environment variables to --preset tiny, one game and seed, 30-step episodes."""
    import dataclasses

    diamond = load_tool("../diamond_atari.py")
    cpu = dataclasses.replace(diamond.Args(), preset="cpu", **diamond.PRESETS["cpu"])
    diamond.check_args(cpu, world_size=1)  # the measured settings are ones the script accepts
    assert cpu.num_epochs == 20 and cpu.obs_size == 32 and cpu.test_episodes == 100
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = script_env() | {"PYTHON": PYTHON, "GAMES": "Breakout-v5", "SEEDS": "3", "OUT": str(out), "LOGS": str(logs),
                          "PRESET": "tiny", "MAX_EPISODE_STEPS": "30", "BASELINE_EPISODES": "2", "SCREEN_EPISODES": "1",
                          "NICE": "0", "EXTRA": "--num-epochs 1 --first-epoch-denoiser-steps 5 --first-epoch-reward-steps 5 "
                                                "--test-episodes 3"}
    result = subprocess.run(["bash", str(ROOT / "benchmark" / "diamond_learns.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:],
                                    [p.read_text()[-2000:] for p in logs.glob("*.log")])
    log = (logs / "diamond_learns_Breakout-v5_3.log").read_text()
    assert "3 test episodes after" in log and (logs / "diamond_learns_summary.md").exists()
    base = json.loads((out / "baselines.json").read_text())["Breakout-v5"]
    assert base["random"]["n"] == base["best_action"]["n"] == 2 and list(base["screen"]) == [
        "NOOP", "FIRE", "RIGHT", "LEFT"]
    row = [line for line in result.stdout.splitlines() if line.startswith("| Breakout-v5 | seed")]
    assert len(row) == 1 and "(n=3)" in row[0] and "seed 3:" in row[0]
    assert list((out / "plots").rglob("*.png"))
    # a run stopped early and tested with --eval-only is read from the line --eval-only prints
    (logs / "diamond_learns_Breakout-v5_4.log").write_text(
        "100 test episodes with the agent of epoch 7: mean return 2.50 (std 1.00); human-normalised score 0.03\n")
    rows = load_tool("diamond_baselines.py").agent_runs(out, logs)["Breakout-v5"]
    assert rows[-1] == (4, 100, 2.5, 1.0, 7, -1)
    # the pooled figures equal the episodes' own mean and CI (per-run mean and population std -> pooled sample std)
    baselines = load_tool("diamond_baselines.py")
    a, b = np.array([1.0, 2.0, 4.0]), np.array([0.0, 5.0])
    got = baselines.pooled([(1, 3, a.mean(), a.std(), 1, 1), (2, 2, b.mean(), b.std(), 1, 1)])
    both = np.concatenate([a, b])
    assert math.isclose(got["mean"], both.mean()) and math.isclose(got["std"], both.std(ddof=1))
    assert math.isclose(got["ci95"], 1.96 * both.std(ddof=1) / math.sqrt(5)) and got["n"] == 5


# ----------------------------------------------------------------------------------------------------------------------
# The GPU recipes (benchmark/*.sh): they need a GPU and days, so here they are parsed, and every flag they pass must be
# one that a script or a benchmark tool accepts (a renamed flag would otherwise surface only on a rented GPU).


def test_recipes_parse_and_pass_only_known_flags():
    import dataclasses
    import re
    import typing

    known = {"--standalone", "--nproc_per_node"}  # torchrun's
    for script in ("ddpm_cifar10.py", "dit_cifar10.py", "video_diffusion.py", "diamond_atari.py"):
        module = load_tool(f"../{script}")
        hints = typing.get_type_hints(module.Args)  # Annotated[bool, ...] -> bool
        for f in dataclasses.fields(module.Args):
            flag = "--" + f.name.replace("_", "-")
            known |= {flag, "--no-" + f.name.replace("_", "-")} if hints[f.name] is bool else {flag}
        known |= set(getattr(module, "FLAG_ALIASES", {}))
    for tool in ("speed.py", "samplers.py", "plot.py", "atari_scores.py", "run_atari100k.py", "unet_vs_dit.py",
                 "play_fps.py", "play_steering.py", "diamond_baselines.py", "diamond_catch_diagnosis.py"):
        known |= set(re.findall(r"--[a-z][a-z0-9_-]*", run_tool(tool, "--help").stdout))
    recipes = sorted((ROOT / "benchmark").glob("*.sh"))
    assert len(recipes) >= 6
    for recipe in recipes:
        assert subprocess.run(["bash", "-n", str(recipe)]).returncode == 0, recipe
        code = "\n".join(line for line in recipe.read_text().splitlines() if not line.lstrip().startswith("#"))
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", code))
        assert flags <= known, (recipe.name, sorted(flags - known))


def test_diamond_catch_recipe_runs_the_catch_preset_and_tabulates_each_seed(tmp_path):
    """benchmark/diamond_catch.sh: its diamond_atari.py command parses to --preset catch on Catch, which check_args
    accepts; then the recipe as written, shrunk through EXTRA to two short epochs and 3 test games, for one seed given
    as its argument: the run's log, the table row (catch rate = (mean return + 1) / 2, the updates from the run's
    config.json) and the curve's row of epoch 2's evaluation (the agent kept then, on 200 games)."""
    diamond = load_tool("../diamond_atari.py")
    recipe = (ROOT / "benchmark" / "diamond_catch.sh").read_text()
    command = re.search(r'"\$PY" diamond_atari\.py (.*?) \$EXTRA', recipe, re.S).group(1).replace("\\\n", " ")
    argv = [token.strip('"').replace("$seed", "1").replace("$OUT", str(tmp_path)) for token in command.split()]
    args, given = diamond.parse_args(argv)
    diamond.check_args(args, world_size=1)
    assert (args.preset, args.env_id, args.seed, args.test_episodes) == ("catch", "Catch", 1, 200)
    assert {"env_id", "preset", "seed"} <= given and args.obs_size == 32
    out = tmp_path / "out"
    env = script_env() | {"PYTHON": PYTHON, "OUT": str(out),
                          "EXTRA": "--num-epochs 2 --first-epoch-denoiser-steps 2 --first-epoch-reward-steps 2 "
                                   "--denoiser-steps-per-epoch 2 --reward-steps-per-epoch 2 "
                                   "--actor-critic-steps-per-epoch 2 --eval-episodes 2 --test-episodes 3"}
    result = subprocess.run(["bash", str(ROOT / "benchmark" / "diamond_catch.sh"), "7"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:],
                                    [p.read_text()[-2000:] for p in out.glob("*.log")])
    log = (out / "catch_seed7.log").read_text()
    # the plan names the env steps of this run (--num-epochs 2), not the preset's budget of 8000
    assert "the run: 2 epochs, 5400 env steps" in log and "first collection: 5000 env steps" in log
    mean = float(re.search(r"^3 test episodes after 2 epochs, 5400 env steps: mean return (-?[\d.]+)", log,
                           re.M).group(1))
    row = [line for line in result.stdout.splitlines() if line.startswith("| 7 |")]
    # no actor-critic update in epoch 1 (the preset starts it after epoch 1), 2 in epoch 2
    assert len(row) == 1 and f"| 3 | {mean:+.2f} | {(mean + 1) / 2:.3f} | 4 / 4 / 2 | 5400 |" in row[0], row
    curve = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| 2 | 5400 |")]
    assert len(curve) == 1 and len(curve[0]) == 9 and curve[0][-1] == "0.2 |", curve
    # the kept agent's catch rate and the imagined minus real return (the last epoch's games are the final test)
    assert 0 <= float(curve[0][2]) <= 1 and abs(float(curve[0][7])) <= 2
    assert (out / "summary.md").read_text() == result.stdout


def test_figures_recipe_makes_the_readme_pictures_at_tiny_sizes(tmp_path):
    """benchmark/figures.sh, which makes README's DIAMOND and video pictures in docs/figures/, as written, shrunk
    through its DIAMOND and VIDEO flags to tiny runs: both PNGs come out and decode; the ones in docs/figures/
    decode, are under 100 KB, and README shows them."""
    import cv2

    figures = tmp_path / "figures"
    env = script_env() | {"PYTHON": PYTHON, "FIGURES": str(figures), "OUT": str(tmp_path / "runs"),
                          "DIAMOND": "--env-id Catch --preset tiny --num-epochs 1 --test-episodes 1",
                          "VIDEO": "--preset tiny --total-steps 2 --num-eval-samples 8 --sample-batch-size 8"}
    result = subprocess.run(["bash", str(ROOT / "benchmark" / "figures.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:],
                                    [p.read_text()[-2000:] for p in (tmp_path / "runs").glob("*.log")])
    readme = (ROOT / "README.md").read_text()
    for name in ("diamond_catch_rollout.png", "video_cpu_step2000.png"):
        for folder in (figures, ROOT / "docs" / "figures"):
            image = cv2.imread(str(folder / name))
            assert image is not None and image.shape[0] > 40, folder / name
        assert (ROOT / "docs" / "figures" / name).stat().st_size < 100_000 and f"(docs/figures/{name})" in readme
    assert "bash benchmark/figures.sh" in readme


# ----------------------------------------------------------------------------------------------------------------------
# play_fps.py and play_steering.py (their full runs are in RESULTS.md; here the parts, at tiny sizes)


def test_play_fps_measures_headless_play_of_the_papers_networks():
    rows = load_tool("play_fps.py").main(["--size", "32", "--frames", "2", "--steps", "1", "--no-window"])
    assert [row["sampling_steps"] for row in rows] == [1] and rows[0]["headless_fps"] > 0


def test_play_steering_reads_the_sprites_moves_step_by_step():
    steering = load_tool("play_steering.py")
    vd = steering.load_script("video_diffusion.py")
    data = vd.make_sprites_dataset(1, 6, 8, num_distractors=0, seed=3)
    meanings = [name.upper() for name in vd.SPRITE_ACTIONS]

    def game():
        return vd.real_sprites(data.sprite_states[0], data.actions[:3], 8, torch.arange(5))

    frames = vd.play_keys(game, vd.parse_play_keys("RDLU", meanings), meanings, 32)["frames"]
    positions = vd.sprite_positions(data.sprite_states[0], np.array([*data.actions[:3], 4, 2, 3, 1]), 8)[2:]
    expected = [vd.direction_of_displacement(b - a) for a, b in zip(positions[:-1], positions[1:])]
    assert steering.steps_moved(vd, frames).tolist() == expected and max(expected) >= 0


# ----------------------------------------------------------------------------------------------------------------------
# digits.py (scikit-learn's bundled digits; the bench extra, which CI does not install)


def test_digits_benchmark_smoke(tmp_path):
    pytest.importorskip("sklearn")
    digits = load_tool("digits.py")
    images, labels = digits.make_digits_folder(tmp_path / "folder", 8)
    assert images.shape == (1797, 8, 8) and sorted({p.name for p in (tmp_path / "folder").iterdir()}) == \
        [str(k) for k in range(10)]
    assert len(list((tmp_path / "folder" / "3").glob("*.png"))) == (labels == 3).sum()
    judge, accuracy, _ = digits.train_judge(images, labels)
    assert accuracy > 0.9  # the judge knows real digits
    # both scripts end to end at a toy size: a handful of steps, 10 samples of 2 DDIM steps each
    result = run_tool("digits.py", "--model", "both", "--work-dir", tmp_path / "work", "--img-size", 8, "--patch", 4,
                      "--width", 32, "--depth", 1, "--heads", 2, "--batch-size", 256, "--epochs", 1, "--ddpm-steps", 2,
                      "--samples-per-class", 1, "--sampling-steps", 2, "--cfg-scales", 3, timeout=600)
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| guidance | class accuracy") and table[2].startswith("| 3 | ")
    assert 0 <= float(table[2].split(" | ")[1]) <= 1 and len(table) == 3
    assert "class histogram:" in result.stdout and "confident (p > 0.9):" in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# gpu_diamond.sh: DIAMOND's update and imagination-step times beside the paper on one GPU; here on the CPU with the
# tiny preset and torch.compile's eager backend, so that the prepared GPU script cannot rot


def test_gpu_diamond_script_runs_on_the_cpu_with_tiny_sizes(tmp_path):
    env = script_env() | {"PYTHON": PYTHON, "LOG": str(tmp_path / "gpu_diamond.txt"),
                          "SPEED_ARGS": "--device cpu --preset tiny --num-sampling-steps 1 --repeats 1 --warmup 1 "
                                        f"--backend eager --json {tmp_path / 'speed.json'}"}
    result = subprocess.run(["bash", str(ROOT / "benchmark" / "gpu_diamond.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    out = result.stdout
    log = tmp_path / "gpu_diamond.txt"
    assert out == log.read_text() + f"gpu_diamond.sh: exit 0; log in {log}\n"  # the whole output is logged
    # the fast path's outputs match eager's from identical inputs, and the compiled steps ran
    check = [line for line in out.splitlines() if line.startswith("fast path vs eager")]
    assert len(check) == 1 and ": match;" in check[0] and re.search(r"; [1-9]\d* compiled calls", check[0])
    # each figure beside the paper's, for both paths, and the epoch and days they imply
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in out.splitlines()
            if line.startswith("| ")}
    for label, paper in (("denoiser update", "88.0 ms"), ("reward/end update", "115.0 ms"),
                         ("actor-critic update", "340.0 ms"), ("imagination step", "20.4 ms")):
        cells = rows[f"{label} (median [min, max])"]
        assert cells[0] == paper and len(cells) == 4 and all(c.endswith("]") or c.endswith("] |") for c in cells[1:])
    assert rows["epoch (400 + 400 + 400 updates)"][0] == "217 s"
    figures = json.loads((tmp_path / "speed.json").read_text())
    assert list(figures["figures"]) == ["fast path (eager)", "eager", "eager, --torch-deterministic"]
    assert figures["check"]["ok"] and figures["counters"]["graphs compiled"] == 3  # each function compiled once
    assert figures["counters"]["graph breaks"] == 0
    fast = figures["figures"]["fast path (eager)"]
    days = float(rows["Atari 100k (1000 epochs), days"][1])
    epoch = sum(400 * fast[k]["median_ms"] for k in ("denoiser update", "reward/end update", "actor-critic update"))
    first = 10_000 * (fast["denoiser update"]["median_ms"] + fast["reward/end update"]["median_ms"]) + \
        5000 * fast["actor-critic update"]["median_ms"]
    assert days == pytest.approx((first + 999 * epoch) / 1000 / 86400, abs=0.006)


def test_gpu_diamond_smoke_runs_an_epoch_then_resumes_on_the_cpu(tmp_path):
    """gpu_diamond_smoke.sh as written, shrunk by EXTRA (its flags come last, so they win): epoch 1 with its
    evaluation and checkpoint, then the resume that trains epoch 2 and plays the test episodes."""
    shrink = ("--preset tiny --no-cuda --initial-collection-steps 100 --max-initial-collection-steps 150 "
              "--first-epoch-denoiser-steps 2 --first-epoch-reward-steps 2 --first-epoch-actor-critic-steps 2 "
              "--denoiser-steps-per-epoch 1 --reward-steps-per-epoch 1 --actor-critic-steps-per-epoch 1")
    env = script_env() | {"PYTHON": PYTHON, "OUT": str(tmp_path / "runs"), "EXTRA": shrink}
    older = tmp_path / "runs" / "Breakout-v5__gpu__1__1000000000"  # an earlier smoke's folder: not the one resumed
    older.mkdir(parents=True)
    os.utime(older, (1_000_000_000, 1_000_000_000))
    result = subprocess.run(["bash", str(ROOT / "benchmark" / "gpu_diamond_smoke.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    out = result.stdout
    for line in ("saved checkpoint at epoch 1", "resuming at epoch 2", "saved checkpoint at epoch 2",
                 "2 test episodes after 2 epochs", "gpu_diamond_smoke.sh: exit 0"):
        assert line in out, out
    assert "imag-real gap" in out  # the evaluation ran, with its imagined-vs-real diagnostic


def test_gpu_diamond_rows_stop_at_their_limits_and_the_table_says_so(tmp_path):
    """Each row is hard-limited: a millisecond per row stops every row before its first figure, whatever the
    machine; the table marks the cells, the rows after a stopped one still run, and with no check the exit is 1."""
    result = subprocess.run([PYTHON, str(ROOT / "benchmark" / "diamond_speed.py"), "--device", "cpu", "--preset",
                             "tiny", "--num-sampling-steps", "1", "--backend", "eager", "--part-limit", "0.001",
                             "0.001", "0.001"],
                            env=script_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    stopped = [line for line in result.stdout.splitlines() if "stopped at its limit of 0.001 s" in line]
    assert [line.split(":")[0] for line in stopped] == ["fast path (eager)", "eager", "eager, --torch-deterministic"]
    assert "| denoiser update (median [min, max]) | 88.0 ms | " + " | ".join(["(stopped: --part-limit)"] * 3) in \
        result.stdout


TOOLS_WITH_FLAGS = sorted(p.name for p in (ROOT / "benchmark").glob("*.py") if "ArgumentParser(" in p.read_text())


def test_every_tool_with_flags_is_found():
    assert len(TOOLS_WITH_FLAGS) >= 12 and "samplers_cpu.py" in TOOLS_WITH_FLAGS and "plot.py" in TOOLS_WITH_FLAGS


@pytest.mark.parametrize("tool", TOOLS_WITH_FLAGS)
def test_a_tools_unknown_flag_is_one_line_exit_2(tool, monkeypatch, capsys):
    """argparse's own errors (an unknown flag here; a value of the wrong type in samplers_cpu's test) are one line,
    as every other bad input, not the usage block."""
    module = load_tool(tool)
    monkeypatch.setattr(sys, "argv", [tool, "--no-such-flag"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("tool, argv, message", [
    ("diamond_speed.py", ["--part-limit", "-1", "5", "5"], "--part-limit must be positive seconds, not -1 5 5"),
    ("diamond_speed.py", ["--part-limit", "0", "0", "0"], "--part-limit must be positive seconds"),
    ("diamond_speed.py", ["--preset", "nosuch"], "--preset must be one of tiny, cpu, catch"),
    ("diamond_speed.py", ["--repeats", "0"], "--repeats must be >= 1"),
    ("diamond_speed.py", ["--device", "cpu", "--num-sampling-steps", "0"], "--num-sampling-steps must be in [1, 1000]"),
    ("diamond_speed.py", ["--json", "/nonexistent/x.json"], "--json: no folder /nonexistent"),
    ("diamond_catch_diagnosis.py", [".", "--every", "0"], "--every must be >= 1, not 0"),
    ("diamond_catch_diagnosis.py", [".", "--test-games", "-3"], "--test-games must be >= 1, not -3"),
    ("diamond_catch_diagnosis.py", [".", "--lr", "nan"], "--lr must be a positive number, not nan"),
    ("diamond_catch_diagnosis.py", [".", "--seed", "99999999999999999999"], "--seed must be in [0, 2**62)"),
    ("diamond_catch_diagnosis.py", ["."], "no checkpoint at checkpoints/latest.pt: give a diamond_atari.py run")])
def test_diamond_tools_refuse_bad_values_in_one_line_before_any_work(tool, argv, message, capsys):
    """Values argparse accepts but the tool cannot use (found by a break-it pass: tracebacks after minutes of work, a
    limit of 0 that silently meant none) are one line and exit 2 before anything runs."""
    assert load_tool(tool).main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_samplers_cpu_smoke_on_a_tiny_run(tiny_ddpm_runs, tmp_path):
    """samplers_cpu.py on a tiny run (every sampler of the table, two seeds, the judge's excess Frechet distance and
    the 1.5x check; the numbers mean nothing at this size)."""
    run = sorted(p for p in tiny_ddpm_runs.iterdir() if p.is_dir())[0]
    out = tmp_path / "samplers_cpu"
    result = run_tool("samplers_cpu.py", "--run", run, "--samplers", "ddpm-5,ddim-2,dpm++-20,ddim_noclip-2,ddim_eta1-3",
                      "--num-samples", 8, "--seeds", "1,2", "--noise-error-images", 16, "--out-dir", out)
    data = json.loads((out / "results.json").read_text())
    assert [(r["sampler"], r["nfe"], r["seed"]) for r in data["rows"]] == [
        ("ddpm", 5, 1), ("ddim", 2, 1), ("dpm++", 20, 1), ("ddim_noclip", 2, 1), ("ddim_eta1", 3, 1),
        ("ddpm", 5, 2), ("ddim", 2, 2), ("dpm++", 20, 2), ("ddim_noclip", 2, 2), ("ddim_eta1", 3, 2)]
    for r in data["rows"]:
        assert r["excess"] == pytest.approx(r["frechet"] - r["frechet_real"]) and 0 <= r["recognised"] <= 1
    assert "| DDIM (eta 0, x0 clipped) | 2 |" in result.stdout and "not FID" in result.stdout
    assert "| DDIM (eta 0), x0 not clipped | 2 |" in result.stdout
    assert set(data["within_1.5x_of_ddpm"]) == {"dpm++-20"} and "within 1.5x DDPM-5's excess" in result.stdout
    assert len(list(out.glob("*.png"))) == 10
    samplers_cpu = load_tool("samplers_cpu.py")  # bad flags in-process (the exit-2 line is checked once below)
    for bad_flags, words in ((["--samplers", "euler-10"], "euler"), (["--samplers", "ddim-1001"], "1001"),
                             (["--seeds", "a,b"], "--seeds"), (["--sample-batch-size", "0"], "--sample-batch-size"),
                             (["--noise-error-images", "0"], "--noise-error-images"),
                             (["--noise-error-images", "10001"], "10,000")):
        with pytest.raises(samplers_cpu.UserError, match=words) as error:
            samplers_cpu.main(["--run", str(run), *bad_flags])
        assert "\n" not in str(error.value)
    with pytest.raises(SystemExit):  # a value of the wrong type: argparse's error, one line (checked for every tool)
        samplers_cpu.main(["--run", str(run), "--noise-error-images", "abc"])
    bad = run_tool("samplers_cpu.py", "--run", tmp_path / "nothing", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --run ") and len(bad.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------------
# threshold_spread.py: the range of each learning test's values over configurations, from a hand-written log


def test_threshold_spread_report_ranges_values_per_test_and_configuration(tmp_path, capsys):
    spread = load_tool("threshold_spread.py")
    log = tmp_path / "spread.jsonl"
    lines = [{"test": "tests/test_ddpm_cifar10.py::test_a", "seed_shift": s, "threads": t, "cpu_capability": c,
              "values": {"share": v}} for s, t, c, v in [(0, 1, "default", 0.9), (1, 1, "default", 0.78),
                                                          (0, 2, "default", 0.95), (0, 1, "avx2", 0.8)]]
    lines.append({"config": True, "seed_shift": 1, "threads": 1, "cpu_capability": "default", "exit": 1,
                  "summary": "1 failed", "failed": ["tests/test_ddpm_cifar10.py::test_a"], "seconds": 5})
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = spread.report(log).splitlines()
    assert table[0] == "| test | value | min | max | s+0 t1 | s+1 t1 | s+0 t2 | s+0 t1 avx2 |"
    assert table[2] == "| ddpm_cifar10::test_a | share | 0.78 | 0.95 | 0.9 | 0.78 | 0.95 | 0.8 |"
    assert table[-1] == "- s+1 t1: exit 1, 1 failed, 5 s; tests/test_ddpm_cifar10.py::test_a"
    spread.main(["--report", str(log)])
    assert capsys.readouterr().out.splitlines()[2] == table[2]
    for bad, words in ((["--threads", "0"], "--threads 0"), (["--seed-shifts", "a"], "--seed-shifts"),
                       (["--report", str(tmp_path / "missing.jsonl")], "not a file")):
        with pytest.raises(SystemExit) as exit_:
            spread.main(bad)
        assert exit_.value.code == 2 and words in capsys.readouterr().err
