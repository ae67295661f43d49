"""benchmark/: plot.py on real tiny runs and on hand-written event files, the Atari HNS/IQM aggregation against
hand-computed values, and smoke runs of speed.py and samplers.py (no timing is asserted anywhere)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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

    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


# ----------------------------------------------------------------------------------------------------------------------
# plot.py


@pytest.fixture(scope="module")
def tiny_ddpm_runs(tmp_path_factory) -> Path:
    """Two seeds of a shortened `ddpm_cifar10.py --preset tiny`, as a user would run them (about 5 s each)."""
    out = tmp_path_factory.mktemp("tiny_runs")
    for seed in (1, 2):
        run_script("ddpm_cifar10.py", "--preset", "tiny", "--seed", seed, "--output-dir", out, "--total-steps", 20,
                   "--log-every", 5, "--save-every", 20, "--eval-every", 20, "--num-eval-samples", 4,
                   "--num-sampling-steps", 5, timeout=120)
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
    assert "| shapes | ddpm_cifar10 |" in table


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
    write_events(runs / f"Pong-v5__algo__3__900", {"charts/episodic_return": [(0, 0.0), (200, 999.0)]})
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
    assert "| Pong-v5 | algo | 15 +- 5.56776 (3) |" in table
    assert "| Pong-v5 | other | 3 (1) |" in table
    assert "| Breakout-v5 | my__exp | 7 +- 1.41421 (2) |" in table
    assert (out / "charts_episodic_return.png").stat().st_size > 5000

    # the resumed seed reads as 0, 1, 2, 6 at steps 0, 100, 200, 400; the two seeds are interpolated onto one grid
    scalars = plot.read_scalars(resumed)["charts/episodic_return"]
    assert scalars[0].tolist() == [0, 100, 200, 400] and scalars[1].tolist() == [0.0, 1.0, 2.0, 6.0]
    steps, values = plot.align([(np.array([0, 150, 400]), np.array([0.0, 3.0, 8.0])), scalars])
    assert steps.tolist() == [0, 100, 150, 200, 400]
    assert values[0].tolist() == pytest.approx([0, 2, 3, 4, 8]) and values[1].tolist() == pytest.approx([0, 1, 1.5, 2, 6])

    # mean of the last 2 points; bands: 95% CI uses t_{0.975, 2} = 4.303 for 3 seeds
    rows = plot.main([str(runs), "--tag", "charts/episodic_return", "--out-dir", str(out), "--final-window", "2"])
    assert {r["exp_name"]: r["per_seed"] for r in rows}["algo"] == {"1": 7.5, "2": 10.5, "3": 15.75}
    values = np.array([[10.0], [14.0], [21.0]])
    low, high = plot.band(values, "ci95")
    assert high[0] - 15.0 == pytest.approx(4.303 * values.std(ddof=1) / math.sqrt(3))
    assert plot.ema_smooth(np.array([1.0, 1.0, 1.0]), 0.9).tolist() == pytest.approx([1, 1, 1])  # debiased


def test_plot_errors_are_one_line(tmp_path):
    result = run_tool("plot.py", tmp_path / "missing", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    write_events(tmp_path / "runs" / "Pong-v5__algo__1__1000", {"losses/x": [(0, 1.0)]})
    result = run_tool("plot.py", tmp_path / "runs", "--tag", "eval/nothing", check=False)
    assert result.returncode == 2 and "losses/x" in result.stderr and result.stderr.count("\n") == 1
