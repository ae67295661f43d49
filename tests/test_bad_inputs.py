"""Every bad input gets one line and exit 2, every fault during a run one line and exit 1, and nothing saved is lost
(docs/PROMISES.md section 7; issue 9's classes). Each class is checked in process through the scripts' own functions
for every script it applies to, and once per script through the whole path (a subprocess as a user runs it).

Classes: 1 numeric flags outside their domain; 2 bad --config files; 3 an output folder that cannot be written, a disk
that fills or a folder that turns read-only during a save; 4 incomplete, non-finite or malicious checkpoints;
6 signals during sampling and start-up, and the handler installed before the run folder exists; 7 flags spelled with
underscores on --resume; 10 guidance with a null condition never trained; 11 MFU on CUDA only;
12 messages that say what is true. Elsewhere: class 5 (data files) in test_bad_data.py, classes 8 and 9 (samplers
over their whole range, a schedule that reaches noise) in test_sampler_range.py, ALE's banner before the one line in
test_diamond_atari.py, guidance refused at --sample-only from such a checkpoint in test_video_diffusion.py."""
import errno
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest
import torch
from conftest import ROOT, assert_one_line_error, file_hash, load_module, only_run_dir, run_script, script_env

SCRIPTS = ["ddpm_cifar10.py", "dit_cifar10.py", "video_diffusion.py", "diamond_atari.py"]
GENERATIVE = ["ddpm_cifar10.py", "dit_cifar10.py", "video_diffusion.py"]
TINY = {"ddpm_cifar10.py": ["--preset", "tiny"], "dit_cifar10.py": ["--preset", "tiny"],
        "video_diffusion.py": ["--preset", "tiny"], "diamond_atari.py": ["--env-id", "Breakout-v5", "--preset", "tiny"]}
# A short run of each generative script, with a checkpoint at its end: two optimizer steps.
SHORT = {"ddpm_cifar10.py": ["--total-steps", "2", "--save-every", "1", "--eval-every", "2", "--num-sampling-steps",
                             "4", "--sampler", "ddim"],
         "dit_cifar10.py": ["--total-steps", "2", "--save-every", "1", "--eval-every", "2", "--num-sampling-steps", "4",
                            "--sampler", "ddim"],
         "video_diffusion.py": ["--total-steps", "2", "--save-every", "1", "--eval-every", "2",
                                "--num-sampling-steps", "4", "--sampler", "ddim"]}
# The issue's examples, in every script that has the flag.
ISSUE_EXAMPLES = [("seed", "-1"), ("learning_rate", "-1"), ("dropout", "2"), ("patch", "0"), ("heads", "0"),
                  ("noop_max", "-1"), ("sample_batch_size", "0"), ("num_eval_samples", "0")]


def module(script: str):
    return load_module(script)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def numeric(hint) -> bool:
    """int, float, Optional of them, or a tuple of them."""
    if hint in (int, float):
        return True
    return get_origin(hint) is not None and any(numeric(arg) for arg in get_args(hint) if arg is not Ellipsis)


def outside(domain: str, is_int: bool) -> list:
    """Values outside a domain written in the notation of the marks beside Args' fields, plus non-finite ones for
    float flags."""
    if domain.startswith(">="):
        bad = [float(domain[2:]) - 1]
    elif domain.startswith(">"):
        bad = [float(domain[1:]), float(domain[1:]) - 1]
    else:
        low, high = (float(b) for b in domain[1:-1].split(","))
        bad = [low - 1, high + 1] + ([low] if domain[0] == "(" else []) + ([high] if domain[-1] == ")" else [])
    bad = [int(v) if is_int else v for v in bad if not is_int or v == int(v)]
    return bad + ([] if is_int else [math.nan, math.inf])


def tiny_args(script: str):
    return module(script).parse_args(TINY[script])[0]


# ---- class 1: every numeric flag inside its domain, checked at start-up


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_has_a_domain(script):
    m = module(script)
    hints = get_type_hints(m.Args)
    domains = m.flag_marks()[0]
    missing = [name for name, hint in hints.items() if numeric(hint) and name not in domains]
    assert not missing, f"{script}: numeric flags without a domain beside them in Args: {missing}"
    assert set(domains) <= set(hints)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_value_outside_a_domain_is_refused_naming_its_flag(script):
    m = module(script)
    args = tiny_args(script)
    m.check_args(args, 1)  # the tiny preset itself passes
    hints = get_type_hints(m.Args)
    for name, domain in m.flag_marks()[0].items():
        current = getattr(args, name)
        is_int = int in (hints[name], *get_args(hints[name]))
        for bad in outside(domain, is_int):
            value = (bad,) + tuple(current[1:]) if isinstance(current, tuple) and current else bad
            if isinstance(current, tuple) and not current:
                value = (bad,)
            with pytest.raises(m.UserError, match=flag(name)):
                m.check_args(replace(args, **{name: value}), 1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_non_finite_value_is_refused_as_not_finite(script):
    m = module(script)
    args = tiny_args(script)
    name = next(n for n, d in m.flag_marks()[0].items() if d.startswith(">") and isinstance(getattr(args, n), float))
    with pytest.raises(m.UserError, match=f"{flag(name)} must be a finite number"):
        m.check_args(replace(args, **{name: math.inf}), 1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_config_value_outside_a_choice_lists_the_choices(script, tmp_path):
    m = module(script)
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float64"}))
    with pytest.raises(m.UserError, match="(?i)expected one of .*float32.*bfloat16.*float16"):
        m.parse_args(["--config", str(tmp_path / "config.json")])


def test_yaml_on_and_off_are_the_choices_not_booleans(tmp_path):
    """YAML 1.1 reads a bare on/off as true/false: --imagination-graphs' on/off choices take them back."""
    m = module("diamond_atari.py")
    for word in ("on", "off"):
        (tmp_path / "config.yaml").write_text(f"imagination_graphs: {word}\n")
        assert m.parse_args(["--config", str(tmp_path / "config.yaml")])[0].imagination_graphs == word
    (tmp_path / "config.yaml").write_text("torch_deterministic: off\n")  # a real bool stays a bool
    assert m.parse_args(["--config", str(tmp_path / "config.yaml")])[0].torch_deterministic is False


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_issue_examples_are_refused_through_the_parser(script):
    m = module(script)
    names = {f.name for f in fields(m.Args)}
    examples = [(name, value) for name, value in ISSUE_EXAMPLES if name in names]
    assert examples
    for name, value in examples:
        args, given = m.parse_args([*TINY[script], flag(name), value])
        assert name in given
        with pytest.raises(m.UserError, match=flag(name)):
            m.check_args(args, 1)


@pytest.mark.parametrize("script, given, refusal", [
    ("diamond_atari.py", ["--resume", "R", "--eval-only", "--play-keys", "NN"], "--eval-only and --play are two uses"),
    ("video_diffusion.py", ["--resume", "R", "--sample-only", "--play-keys", "RR"], "--sample-only and --play are two"),
    ("ddpm_cifar10.py", ["--channel-mult"], "--channel-mult needs at least one value"),
    ("video_diffusion.py", ["--channel-mult"], "--channel-mult needs at least one value")])
def test_two_uses_of_a_checkpoint_at_once_and_an_empty_list_are_refused(script, given, refusal):
    """Two things to do with a checkpoint would leave one silently undone; a list flag given no values would build a
    network with no levels: each is one line at start-up."""
    m = module(script)
    args, _ = m.parse_args([*TINY[script], *given])
    with pytest.raises(m.UserError, match=refusal):
        m.check_args(args, 1)


def test_a_data_folder_that_is_a_file_or_missing_is_named_so(tmp_path):
    """CIFAR-10's --data-dir and DIAMOND's --dataset-dir that are a file (or gone, on a resume) say so, not that the
    data is missing from them; an env id one typo from Catch is told so."""
    afile = tmp_path / "a.npz"
    afile.write_bytes(b"")
    for script in ("ddpm_cifar10.py", "dit_cifar10.py"):
        with pytest.raises(module(script).UserError, match=f"--data-dir {afile} is a file: give the folder"):
            module(script).load_cifar10(str(afile))
    dia = module("diamond_atari.py")
    for path in (afile, tmp_path / "gone"):
        with pytest.raises(dia.UserError, match=f"--dataset-dir {path} is not a folder: give the folder"):
            dia.load_dataset_dir(dia.Args(dataset_dir=str(path)), None, 3)
    with pytest.raises(dia.UserError, match="did you mean Catch"):
        dia.canonical_env_id("Cathc")
    fifo = tmp_path / "cats" / "f.png"  # reading a FIFO would block for ever
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    for script in ("ddpm_cifar10.py", "dit_cifar10.py"):
        with pytest.raises(module(script).UserError, match="f.png: not a regular file; move it out of --data-dir"):
            module(script).load_image_folder(str(tmp_path / "cats"), 8)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_plain_pickle_for_a_checkpoint_is_the_error_line_alone(script, tmp_path):
    """torch's own warning about a file that is not a torch checkpoint is not printed beside the error line."""
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"script": script}, protocol=4))
    m = module(script)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(m.UserError, match="cannot load checkpoint"):
        warnings.simplefilter("always")
        m.load_checkpoint(path)
    assert not caught


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_value_is_one_line_before_anything_is_written(script, tmp_path):
    result = run_script(script, *TINY[script], "--seed", "-1", "--output-dir", tmp_path / "runs", check=False)
    assert_one_line_error(result, "--seed")
    assert not (tmp_path / "runs").exists()


# ---- class 2: --config files


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_config_files_are_refused_by_name(script, tmp_path):
    m = module(script)
    cases = {
        "binary.json": (b"\x80\x81\xfe\xff\x00garbage", "not a text file"),
        "list.json": (b"[1, 2, 3]", "object"),
        "broken.json": (b'{"seed": 1,', "not valid JSON"),
        "wrong_type.json": (json.dumps({"seed": "one"}).encode(), "seed"),
        "bool_as_int.json": (json.dumps({"cuda": 1}).encode(), "cuda"),
        "float_as_int.json": (json.dumps({"seed": 1.5}).encode(), "seed"),
        "unknown.json": (json.dumps({"no_such_flag": 1}).encode(), "no_such_flag"),
        "broken.yaml": (b"seed: [1, 2\n", "YAML"),
        "config.yaml.json": (b"seed: 3\n", "YAML needs a .yaml"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(m.UserError, match=words):
            m.parse_args(["--config", str(tmp_path / name)])


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_config_given_with_resume_is_refused_not_ignored(script, tmp_path):
    """A resumed run's arguments are its checkpoint's: a --config beside --resume would be silently ignored."""
    m = module(script)
    (tmp_path / "c.json").write_text(json.dumps({"seed": 3}))
    with pytest.raises(m.UserError, match="--config with --resume"):
        m.parse_args(["--resume", str(tmp_path), "--config", str(tmp_path / "c.json")])


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_yaml_config_is_read(script, tmp_path):
    pytest.importorskip("yaml")
    m = module(script)
    (tmp_path / "config.yaml").write_text("seed: 7\nexp_name: from_yaml\n")
    args, _ = m.parse_args(["--config", str(tmp_path / "config.yaml")])
    assert (args.seed, args.exp_name) == (7, "from_yaml")
    # a config written by a run (tuples as JSON lists) reads back as the same Args
    (tmp_path / "config.json").write_text(json.dumps(m.asdict(tiny_args(script))))
    read = m.parse_args(["--config", str(tmp_path / "config.json")])[0]
    assert read == replace(tiny_args(script), config=str(tmp_path / "config.json"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_binary_config_is_one_line(script, tmp_path):
    (tmp_path / "config.json").write_bytes(bytes(range(256)))
    result = run_script(script, "--config", tmp_path / "config.json", check=False)
    assert_one_line_error(result, "--config")


# ---- class 3: folders that cannot be written, a full disk, a folder turned read-only


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EROFS])
def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(script, fault, tmp_path,
                                                                                    monkeypatch):
    m = module(script)
    path = tmp_path / "checkpoints" / "latest.pt"
    m.save_checkpoint(path, {"step": 1, "weights": torch.arange(4.0)})
    before = file_hash(path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # the disk fills (or turns read-only) in the middle of the write
        raise OSError(fault, os.strerror(fault))

    monkeypatch.setattr(m.torch, "save", failing_save)
    with pytest.raises(m.TrainingFailure, match="the previous latest.pt is intact"):
        m.save_checkpoint(path, {"step": 2, "weights": torch.zeros(4)})
    assert file_hash(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]


def failing_savez(error: BaseException):
    """np.savez that writes half a file, then fails as a full disk (or a second Ctrl-C) does."""
    def savez(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            with open(file, "wb") as f:
                f.write(b"half an episode")
        else:
            file.write(b"half an episode")
        raise error
    return savez


EPISODE = {"obs": torch.zeros(3, 8, 8, 3, dtype=torch.uint8).numpy(), "actions": [0, 1], "rewards": [0.0, 1.0],
           "terminated": [False, True], "truncated": [False, False]}


def test_a_failed_episode_write_names_the_file_leaves_no_temporary_file_and_says_how_to_go_on(tmp_path,
                                                                                              monkeypatch):
    """Issue 23: a disk that fills while DIAMOND writes an episode left episodes/.episode_*.tmp*.npz behind, and the
    line named no file and said "then --resume" before any checkpoint existed."""
    m = module("diamond_atari.py")
    run_dir = tmp_path / "run"
    buffer = m.ReplayBuffer(run_dir / "episodes", None, 4)
    monkeypatch.setattr(m.np, "savez", failing_savez(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    episode_file = run_dir / "episodes" / "episode_000000.npz"
    for checkpoint in (False, True):
        if checkpoint:
            m.save_checkpoint(run_dir / "checkpoints" / "latest.pt", {"step": 1})
        with pytest.raises(m.TrainingFailure) as failed:
            buffer.add(EPISODE)
        message = str(failed.value)
        assert "\n" not in message and f"cannot write the episode {episode_file} (No space left on device)" in message
        assert message.endswith(f"then --resume {run_dir}" if checkpoint else "then start the run again"), message
        assert list((run_dir / "episodes").iterdir()) == [] and buffer.episodes == []
    monkeypatch.setattr(m.np, "savez", failing_savez(m.Interrupted()))  # a second Ctrl-C in the middle of the write
    with pytest.raises(m.Interrupted):
        buffer.add(EPISODE)
    assert list((run_dir / "episodes").iterdir()) == []


def test_a_failed_write_of_a_recorded_atari_episode_names_it_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """video_diffusion.py records Atari episodes the same way (a temporary file, then a rename): a failed write is
    one line naming the episode, with no temporary file left, whatever stopped it."""
    m = module("video_diffusion.py")
    gym_id, _, game = m.atari_ids("Breakout")
    monkeypatch.setattr(m.np, "savez", failing_savez(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(m.TrainingFailure) as failed:
        m.record_atari_episodes(gym_id, tmp_path, 1, 3, 16, 0, game)
    message = str(failed.value)
    assert "\n" not in message
    assert f"cannot write the recorded episode {tmp_path / 'episode_00000.npz'} (No space left on device)" in message
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(m.np, "savez", failing_savez(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        m.record_atari_episodes(gym_id, tmp_path, 1, 3, 16, 0, game)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_output_dir_that_is_a_file_is_one_line(script, tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    result = run_script(script, *TINY[script], "--output-dir", tmp_path / "runs", check=False)
    assert_one_line_error(result, "--output-dir")
    assert (tmp_path / "runs").read_text() == "not a folder"


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """One short run of each generative script, with its checkpoint (shared by the resume tests below)."""
    runs = {}
    for script in GENERATIVE:
        out = tmp_path_factory.mktemp(Path(script).stem)
        run_script(script, *TINY[script], *SHORT[script], "--output-dir", out)
        runs[script] = only_run_dir(out)
    return runs


# A run whose every checkpoint write fails as a full disk does: the script as a user runs it, torch.save patched.
FULL_DISK = """import errno, os, runpy, sys, torch
def failing_save(obj, f, *args, **kwargs):
    f.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
torch.save = failing_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", GENERATIVE)
def test_a_full_disk_during_a_run_is_one_line_exit_1_and_loses_nothing(script, short_runs, tmp_path):
    run_dir = short_runs[script]
    latest = run_dir / "checkpoints" / "latest.pt"
    before = file_hash(latest)
    length = ["--total-steps", "3"]

    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(ROOT / script), "--resume", str(run_dir), *length],
                            cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert file_hash(latest) == before
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.pt"]


# ---- class 4: checkpoints that are incomplete, non-finite or malicious


def a_checkpoint(m) -> dict:
    return {"script": m.SCRIPT_NAME, "format_version": m.CHECKPOINT_FORMAT_VERSION,
            **{key: {"w": torch.zeros(2)} for key in m.CHECKPOINT_KEYS}}


@pytest.mark.parametrize("script", SCRIPTS)
def test_incomplete_non_finite_and_malicious_checkpoints_are_refused(script, tmp_path):
    m = module(script)
    complete = a_checkpoint(m)
    torch.save(complete, tmp_path / "complete.pt")
    assert m.load_checkpoint(tmp_path / "complete.pt").keys() == complete.keys()
    for key in sorted(m.CHECKPOINT_KEYS)[:3]:
        torch.save({k: v for k, v in complete.items() if k != key}, tmp_path / "missing.pt")
        with pytest.raises(m.UserError, match=f"lacks {key}"):
            m.load_checkpoint(tmp_path / "missing.pt")
    for bad in (math.nan, math.inf):
        broken = a_checkpoint(m)
        broken[sorted(m.CHECKPOINT_KEYS)[0]]["w"][1] = bad
        torch.save(broken, tmp_path / "non_finite.pt")
        with pytest.raises(m.UserError, match="non-finite"):
            m.load_checkpoint(tmp_path / "non_finite.pt")

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"script": m.SCRIPT_NAME, "x": Exploit()}, tmp_path / "malicious.pt")
    with pytest.raises(m.UserError) as refused:
        m.load_checkpoint(tmp_path / "malicious.pt")
    assert "could run code" in str(refused.value) and "weights_only=False" not in str(refused.value)
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(m.UserError, match="corrupt or not a checkpoint") as refused:
        m.load_checkpoint(tmp_path / "garbage.pt")
    assert "weights_only" not in str(refused.value)


@pytest.mark.parametrize("script", GENERATIVE)
def test_a_checkpoint_with_nan_weights_is_one_line_and_stays_as_it_was(script, short_runs, tmp_path):
    checkpoint = torch.load(short_runs[script] / "checkpoints" / "latest.pt", weights_only=True)
    name = next(k for k, v in checkpoint["ema"].items() if v.is_floating_point())
    checkpoint["ema"][name].view(-1)[0] = math.nan
    torch.save(checkpoint, tmp_path / "nan.pt")
    before = file_hash(tmp_path / "nan.pt")
    result = run_script(script, "--resume", tmp_path / "nan.pt", "--sample-only", check=False)
    assert_one_line_error(result, "non-finite", "ema")
    assert file_hash(tmp_path / "nan.pt") == before


# ---- class 6: signals


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_signal_handler_is_installed_before_the_run_folder_exists(script, tmp_path, monkeypatch):
    """A SIGTERM before the handler kills a process that has written nothing; after it, the run saves a checkpoint.
    So the handler must be in place when the run folder is created."""
    m = module(script)
    seen = {}

    class Created(Exception):
        pass

    def open_writer(args, run_dir, step, run_id):  # which creates a new run's folder
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        raise Created

    monkeypatch.setattr(m, "open_writer", open_writer)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Created):
        m.main(*m.parse_args([*TINY[script], "--output-dir", str(tmp_path)]))
    handler = seen["handler"]
    assert getattr(handler, "__self__", None).__class__.__name__ == "StopFlag", handler
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def signal_on_first_sampler_call(m, monkeypatch, sig):
    """Patches the script's sampler entry so that the process signals itself when sampling starts, and counts the
    network evaluations that follow: a stop flag checked inside sampling allows none."""
    name = "sample_videos" if hasattr(m, "sample_videos") else "sample_images"
    original, calls = getattr(m, name), []

    def sampler(model_fn, *args, **kwargs):
        os.kill(os.getpid(), sig)

        def counted(*a, **k):
            calls.append(1)
            return model_fn(*a, **k)

        return original(counted, *args, **kwargs)

    monkeypatch.setattr(m, name, sampler)
    return calls


@pytest.mark.parametrize("script", GENERATIVE)
def test_sigterm_during_the_evaluation_abandons_it_saves_and_stops(script, short_runs, tmp_path, monkeypatch,
                                                                   capsys):
    m = module(script)
    run_dir = tmp_path / "run"
    shutil.copytree(short_runs[script], run_dir)
    calls = signal_on_first_sampler_call(m, monkeypatch, signal.SIGTERM)
    length = ["--total-steps", "3"]
    m.main(*m.parse_args(["--resume", str(run_dir), *length, "--eval-every", "1"]))
    out = capsys.readouterr().out
    assert "stopped by signal at" in out, out
    assert len(calls) <= 1  # abandoned at its first network evaluation, not after the whole sampler
    saved = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    before = torch.load(short_runs[script] / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["step"] == before["step"] + 1  # the step that was evaluated is saved
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("script", GENERATIVE)
def test_sigint_during_sample_only_is_one_line_not_a_traceback(script, short_runs, tmp_path, monkeypatch, capsys):
    m = module(script)
    calls = signal_on_first_sampler_call(m, monkeypatch, signal.SIGINT)
    m.main(*m.parse_args(["--resume", str(short_runs[script]), "--sample-only"]))
    out = capsys.readouterr().out
    assert "stopped by signal" in out and len(calls) <= 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_while_the_process_exits_cannot_kill_it(script, tmp_path):
    """Python's exit puts its signal handlers back to the default, so a SIGTERM landing after the run's last line
    (a scheduler's, a user's) used to kill a finished run with 143: at exit the signals are ignored instead. Checked
    from an exit hook that runs after the script's own (exit hooks run last registered, first run)."""
    code = ("import atexit, runpy, signal, sys; "
            "atexit.register(lambda: print('at exit', signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, "
            "signal.getsignal(signal.SIGINT) == signal.SIG_IGN)); "
            f"sys.argv = [{str(ROOT / script)!r}, '--resume', {str(tmp_path / 'none')!r}]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=script_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "at exit True True" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_during_start_up_is_one_line(script, monkeypatch, capsys):
    m = module(script)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(m, "setup_device", interrupted)
    monkeypatch.setattr(sys, "argv", [script, *TINY[script]])
    with pytest.raises(SystemExit) as exit_:
        m.run_main(m.main)
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: interrupted"), err


@pytest.mark.parametrize("script", SCRIPTS)
def test_only_rank_0_prints_the_error(script, monkeypatch, capsys):
    m = module(script)
    monkeypatch.setattr(sys, "argv", [script, *TINY[script], "--seed", "-1"])
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            m.run_main(m.main)
        assert exit_.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == lines


# ---- class 7: flags spelled with underscores


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_flag_counts_as_given_whatever_its_spelling(script):
    m = module(script)
    for argv in (["--exp_name", "x"], ["--exp-name", "x"], ["--exp_name=x"], ["--exp-name=x"]):
        assert "exp_name" in m.parse_args(argv)[1], argv
    assert "cuda" in m.parse_args(["--no_cuda"])[1] and "cuda" in m.parse_args(["--no-cuda"])[1]


@pytest.mark.parametrize("script", GENERATIVE)
def test_resume_with_underscore_flags_samples_and_refuses_as_with_hyphens(script, short_runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(short_runs[script], run_dir)
    latest = run_dir / "checkpoints" / "latest.pt"
    before = file_hash(latest)
    result = run_script(script, "--resume", run_dir, "--sample_only", "--num_samples", "4", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert file_hash(latest) == before  # sampled, not trained on and overwritten
    assert any(p.name.startswith("sample_only") for p in (run_dir / "samples").iterdir())
    result = run_script(script, "--resume", run_dir, "--learning_rate", "0.5", check=False)
    assert_one_line_error(result, "--learning-rate")
    assert file_hash(latest) == before


# ---- class 10: guidance needs a trained null condition


@pytest.mark.parametrize("script, dropout_flag", [("dit_cifar10.py", "--class-dropout"),
                                                  ("video_diffusion.py", "--null-cond-prob")])
def test_guidance_without_a_trained_null_condition_is_refused(script, dropout_flag):
    m = module(script)
    for scale, refused in (("3", True), ("0", True), ("1", False)):
        args, _ = m.parse_args([*TINY[script], dropout_flag, "0", "--cfg-scale", scale])
        if refused:
            with pytest.raises(m.UserError, match=dropout_flag):
                m.check_args(args, 1)
        else:
            m.check_args(args, 1)
    m.check_args(m.parse_args([*TINY[script], dropout_flag, "0.1", "--cfg-scale", "3"])[0], 1)


# ---- class 11: MFU on CUDA only


@pytest.mark.parametrize("script", SCRIPTS)
def test_mfu_has_a_peak_on_cuda_and_none_on_a_cpu(script, monkeypatch):
    """A CPU has no MFU (its throughput is the figure to read). On CUDA the peak is the table's dense bf16/fp16 rate,
    half of it for float32 (TF32), NaN for a GPU the table does not know."""
    m = module(script)
    assert m.peak_flops(m.Setup(torch.device("cpu")), "float32") is None
    gpu = m.Setup(torch.device("cuda"))
    for name, dtype, peak in (("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
                              ("NVIDIA H100 80GB HBM3", "float32", 494.5e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
                              ("NVIDIA A100-SXM4-40GB", "float16", 312e12), ("NVIDIA L40S", "bfloat16", 362e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert m.peak_flops(gpu, dtype) == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU of the future")
    assert math.isnan(m.peak_flops(gpu, "bfloat16"))


@pytest.mark.parametrize("script", GENERATIVE)
def test_the_meter_reads_mfu_only_given_a_peak(script):
    """MFU = achieved FLOP/s per process / peak FLOP/s, a training step counting its FLOPs per sample; no peak (a
    CPU): no MFU, the throughput alone."""
    m = module(script)
    for peak in (None, 1e12):
        meter = m.Meter(torch.device("cpu"), 3e9, peak, world_size=2)
        meter.add(torch.tensor(1.0), torch.tensor(2.0), 8)
        values = meter.read()
        assert values["loss"] == 1.0 and values["grad_norm"] == 2.0 and values["SPS"] > 0
        if peak is None:
            assert "mfu" not in values
        else:
            assert values["mfu"] == pytest.approx(values["SPS"] / 2 * 3e9 / 1e12)


@pytest.mark.parametrize("script", GENERATIVE)  # DIAMOND announces its epochs instead (no StepTimer)
def test_the_run_time_estimate_comes_from_the_first_steps_and_a_day_on_a_cpu_is_one_notice(script):
    m = module(script)
    cpu, gpu = m.Setup(torch.device("cpu")), m.Setup(torch.device("cuda"))
    lines = m.run_time_notice(10.0, 800_000, cpu)  # 8,000,000 s = 92 d 51,200 s = 92 d 14 h 13 min 20 s
    assert lines == ["estimated time to the end of training: 92 d 14 h 13 min (10 s per step on cpu, 800,000 steps "
                     "to go, evaluations not counted)", "notice: on this CPU the run takes more than a day: the "
                     "defaults are the paper's GPU settings (--preset tiny runs in seconds, --preset cpu is sized for "
                     "one)"]
    assert len(m.run_time_notice(10.0, 800_000, gpu)) == 1  # on a GPU the paper's settings are what is meant
    assert m.run_time_notice(0.5, 125, cpu) == [  # under an hour: minutes and seconds
        "estimated time to the end of training: 1 min 2 s (0.5 s per step on cpu, 125 steps to go, evaluations not "
        "counted)"]
    assert "(0.5 s per step on cpu, 1 step to go," in m.run_time_notice(0.5, 1, cpu)[0]
    # the timer of a run resumed at step 100: the clock starts after step 101 (the warm-up step) and reads once,
    # 5 steps later; not at all when no step would be left to announce
    timer = m.StepTimer(100, 1000, cpu, timed_steps=5)
    readings = [timer.seconds_per_step(step) for step in range(101, 110)]
    assert readings[:5] == [None] * 5 and readings[5] > 0 and readings[6:] == [None] * 3
    short = m.StepTimer(100, 106, cpu, timed_steps=5)
    assert [short.seconds_per_step(step) for step in range(101, 107)] == [None] * 6


@pytest.mark.parametrize("script", GENERATIVE)
def test_a_cpu_run_logs_its_throughput_and_no_mfu(script, short_runs):
    from conftest import read_scalars

    scalars = read_scalars(short_runs[script])
    assert scalars["charts/SPS"] and all(value > 0 for _, value in scalars["charts/SPS"])
    assert "perf/mfu" not in scalars


# ---- class 12: messages that say what is true


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_non_finite_message_says_whether_a_checkpoint_exists(script, tmp_path):
    m = module(script)
    assert "no checkpoint was saved yet" in str(m.non_finite_failure("at step 3", tmp_path))
    assert "no checkpoint was saved yet" in str(m.non_finite_failure("at step 3", None))
    m.save_checkpoint(tmp_path / "checkpoints" / "latest.pt", {"step": 1})
    assert "last good checkpoint is kept" in str(m.non_finite_failure("at step 3", tmp_path))


# ---- a training step that cannot fit in memory (issue 13): refused before anything is allocated at full size


@pytest.mark.parametrize("script", ["ddpm_cifar10.py"])
def test_a_step_that_cannot_fit_under_rlimit_as_is_one_line_naming_the_batch_size(script, tmp_path):
    import resource

    limit = 6 * 2**30  # address space for python, torch and the data; the paper's step at batch 128 needs ~7 GiB more

    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, str(ROOT / script), "--dataset", "shapes", "--num-shapes-images", "64", "--total-steps", "1",
           "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_address_space)
    assert_one_line_error(result, "--batch-size 128", "GiB")
    fits = int(re.search(r"use --batch-size (\d+)", result.stderr).group(1))
    assert 1 <= fits < 128
    assert not any(tmp_path.iterdir())  # refused before the run folder


# ---- found by trying to break the scripts: the command line, where a resumed run writes, damaged states


@pytest.mark.parametrize("script", SCRIPTS)
def test_command_line_errors_are_one_line_and_help_is_whole(script, capsys):
    m = module(script)
    with pytest.raises(m.UserError, match="--batch-size"):
        m.parse_args(["--batch-size", "abc"])
    with pytest.raises(m.UserError, match="unknown flag --batch_sise .*--batch-size"):
        m.parse_args(["--batch_sise", "8"])
    with pytest.raises(m.UserError, match="--dtype"):
        m.parse_args(["--dtype", "float64"])
    for argv in (["--torch-deterministic", "false"], ["--torch-deterministic=false"], ["--no-cuda", "False"]):
        with pytest.raises(m.UserError, match=f"{argv[0].split('=')[0].replace('--no-', '--')} takes no value .*--no-"):
            m.parse_args(argv)  # an on/off flag given a value: the message names both spellings
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        m.parse_args(["--help"])
    assert exit_.value.code == 0 and "--batch-size" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_continues_only_from_a_runs_latest_checkpoint(script, tmp_path):
    """Resuming training from any other file would overwrite a newer checkpoint, or another run's."""
    m = module(script)
    run = tmp_path / "run"
    elsewhere = (run / "keep" / "other.pt", run / "checkpoints" / "backup.pt", tmp_path / "loose.pt")
    for path in (run / "checkpoints" / "latest.pt", *elsewhere):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**a_checkpoint(m), "args": m.asdict(m.Args())}, path)

    def run_dir_of(path: Path, trains: bool) -> Path:  # the folder a resumed run writes in
        return m.resume_run(m.Args(resume=str(path)), set(), trains)[2]

    assert run_dir_of(run / "checkpoints" / "latest.pt", trains=True) == run
    for path in elsewhere:
        with pytest.raises(m.UserError, match="latest.pt"):
            run_dir_of(path, trains=True)
    m.RUN_LOCKS.pop(run).close()  # taken as the run's trainer
    assert run_dir_of(run / "checkpoints" / "backup.pt", trains=False) == run  # sampling writes into the run
    assert run_dir_of(tmp_path / "loose.pt", trains=False) == tmp_path  # ...or beside a loose file


@pytest.mark.parametrize("script", GENERATIVE)
def test_a_damaged_state_in_a_checkpoint_is_one_line(script, short_runs, tmp_path):
    m = module(script)
    checkpoint = torch.load(short_runs[script] / "checkpoints" / "latest.pt", weights_only=True)
    for damage in ("optimizer", "rng", "step"):
        broken = dict(checkpoint)
        if damage == "optimizer":
            broken["optimizer"] = {**checkpoint["optimizer"], "param_groups": []}
        elif damage == "rng":
            broken["rng"] = {**checkpoint["rng"], "torch": torch.zeros(3, dtype=torch.uint8)}
        else:
            broken["step"] = "7"
        (tmp_path / damage / "checkpoints").mkdir(parents=True)
        torch.save(broken, tmp_path / damage / "checkpoints" / "latest.pt")
        with pytest.raises(m.UserError, match="damaged"):
            m.main(*m.parse_args(["--resume", str(tmp_path / damage)]))
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---- issue 23: one run, one writer; a bounded --config; signals that answer


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_config_that_never_ends_is_one_line(script):
    with pytest.raises(module(script).UserError, match="--config /dev/zero is larger than 1024 KiB"):
        module(script).parse_args(["--config", "/dev/zero"])


# A live trainer of a run folder: it holds the run's flock until it is killed.
HOLD_LOCK = """import fcntl, sys, time
lock = open(sys.argv[1], "w")
fcntl.flock(lock, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def lock_holder():
    """Starts a process that holds RUN/train.lock, as a live trainer does; each is killed at the end."""

    children = []

    def hold(run_dir: Path):
        child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / "train.lock")],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "locked"
        children.append(child)
        return child

    yield hold
    for child in children:
        child.kill()
        child.wait()


def lock_is_free(run_dir: Path) -> bool:
    import fcntl

    with open(run_dir / "train.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def event_files(run_dir: Path) -> dict:
    return {p.name: file_hash(p) for p in run_dir.glob("events.out.tfevents.*")}


@pytest.mark.parametrize("script", GENERATIVE)
def test_a_second_trainer_of_a_run_is_refused_and_a_reader_purges_nothing(script, short_runs, tmp_path, lock_holder,
                                                                          capsys):
    """Process A trains RUN (it holds the flock on RUN/train.lock). B, resuming RUN to train on, is refused in one line
    naming the lock file, with nothing written; --sample-only is allowed. A killed A leaves no stale lock; B asking
    for fewer steps than RUN has done says so and writes nothing (no purging writer), then B trains on."""
    m = module(script)
    run_dir = tmp_path / "run"
    shutil.copytree(short_runs[script], run_dir)
    trainer = lock_holder(run_dir)
    before, checkpoint = event_files(run_dir), file_hash(run_dir / "checkpoints" / "latest.pt")
    for total_steps in ("4", "1"):  # refused before the checkpoint is read: B cannot know it has nothing to train
        with pytest.raises(m.UserError) as refused:
            m.main(*m.parse_args(["--resume", str(run_dir), "--total-steps", total_steps]))
        assert f"{run_dir} is being trained by another process, which holds {run_dir / 'train.lock'}" in str(
            refused.value)
    m.main(*m.parse_args(["--resume", str(run_dir), "--sample-only", "--num-samples", "2"]))
    trainer.kill()  # A is SIGKILLed: the OS releases its lock
    trainer.wait()
    capsys.readouterr()
    m.main(*m.parse_args(["--resume", str(run_dir), "--total-steps", "1"]))
    assert "the run is already at step 2 of --total-steps 1" in capsys.readouterr().out
    assert event_files(run_dir) == before and file_hash(run_dir / "checkpoints" / "latest.pt") == checkpoint
    m.main(*m.parse_args(["--resume", str(run_dir), "--total-steps", "3", "--eval-every", "100"]))
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 3
    assert lock_is_free(run_dir)  # released when the run ended
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_trainer_is_refused_before_it_reads_the_checkpoint(script, tmp_path, lock_holder):
    """A trainer locks the run before it reads checkpoints/latest.pt: read first, a checkpoint the live trainer then
    replaced could be trained on and saved over its newer one. Here the file is garbage: the lock is what is named."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"\x00garbage")
    lock_holder(run_dir)
    result = run_script(script, "--resume", run_dir, check=False)
    assert_one_line_error(result, f"{run_dir} is being trained by another process")


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_run_lock_is_taken_by_the_one_trainer_and_released_by_its_end(script, tmp_path, lock_holder):
    """open_writer, which only a process that trains calls, takes the lock: refused while another process holds it,
    with no event file written; held until close_writer."""
    m = module(script)
    holder = lock_holder(tmp_path)
    with pytest.raises(m.UserError, match="being trained by another process"):
        m.open_writer(tiny_args(script), tmp_path, 0, "")
    assert not list(tmp_path.glob("events.*"))
    holder.kill()
    holder.wait()
    _, writer = m.open_writer(tiny_args(script), tmp_path, 0, "")
    assert not lock_is_free(tmp_path)
    m.close_writer(tiny_args(script), writer)
    assert lock_is_free(tmp_path)


# Stop at the second checkpoint write: Ctrl-C twice in it. The script as a user runs it; torch.save patched to signal.
SECOND_CTRL_C = """import os, runpy, signal, sys, torch
calls, save = [], torch.save
def save_then_ctrl_c(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)  # acknowledged at once
        print("after the first Ctrl-C", flush=True)
        os.kill(os.getpid(), signal.SIGINT)  # quit without saving
        print("not reached", flush=True)
    save(obj, f, *args, **kwargs)
torch.save = save_then_ctrl_c
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_second_ctrl_c_quits_without_saving_and_the_last_checkpoint_stays(short_runs, tmp_path):

    run_dir = tmp_path / "run"
    shutil.copytree(short_runs["ddpm_cifar10.py"], run_dir)
    result = subprocess.run([sys.executable, "-c", SECOND_CTRL_C, str(ROOT / "ddpm_cifar10.py"), "--resume",
                             str(run_dir), "--total-steps", "6", "--save-every", "2", "--eval-every", "100"],
                            cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr
    out = result.stdout.splitlines()
    ack = "stopping after this step, then saving; Ctrl-C again to quit without saving"
    assert out.index(ack) < out.index("after the first Ctrl-C") and "not reached" not in out  # said at once
    assert "saved checkpoint at step 4" in out and "saved checkpoint at step 6" not in out
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # beside the progress bar
    assert errors == ["error: interrupted by a second Ctrl-C: quit without saving (the last checkpoint, if any, is "
                      "intact)"] and "Traceback" not in result.stderr
    # the second write (step 6) was abandoned: the first one's checkpoint (step 4) is the last, whole
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest.pt"]  # no temporary file
    assert lock_is_free(run_dir)


@pytest.mark.parametrize("script", SCRIPTS)
def test_signals_after_the_first_change_nothing_but_a_second_ctrl_c(script, capsys):
    """In process, one StopFlag: the first SIGTERM is acknowledged once; more SIGTERMs (a scheduler's repeated
    preemption, which must never abort a save) change nothing; a SIGINT after them raises Interrupted. Under the
    entry point the handlers stay after restore() and ignore signals while the process exits."""
    m = module(script)
    previous = signal.getsignal(signal.SIGTERM)
    stop = m.StopFlag()
    stop.busy = "the compilation"
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
    out = capsys.readouterr().out
    assert out.count("stopping after this step, then saving; the compilation must end first; Ctrl-C again") == 1
    with pytest.raises(m.Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is previous  # an in-process caller gets its handlers back
    m.StopFlag.keep_handlers = True
    try:
        stop = m.StopFlag()
        stop.restore()
        os.kill(os.getpid(), signal.SIGTERM)  # the run is over: ignored, the process goes on exiting
        os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) == stop.request
    finally:
        m.StopFlag.keep_handlers = False
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_exp_name_that_is_not_a_plain_short_name_is_refused_at_start_up(script):
    m = module(script)
    for bad in ("a/b", "..", "../up", "a\\b", ""):
        with pytest.raises(m.UserError, match="must be a plain name"):
            m.check_args(replace(tiny_args(script), exp_name=bad), 1)
    with pytest.raises(m.UserError, match="--exp-name is 300 bytes long: give at most 200"):
        m.check_args(replace(tiny_args(script), exp_name="x" * 300), 1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_failed_write_of_a_new_file_says_it_was_not_written_and_names_it(script, tmp_path, monkeypatch):
    """The agent copy of DIAMOND failed in a read-only folder while latest.pt was saved: the message is about the
    file that failed, not 'no checkpoint was saved'."""
    m = module(script)

    def failing_save(obj, f, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(m.torch, "save", failing_save)
    with pytest.raises(m.TrainingFailure) as failed:
        m.save_checkpoint(tmp_path / "agent_epoch_00005.pt", {"w": torch.zeros(2)})
    assert f"cannot write {tmp_path / 'agent_epoch_00005.pt'} (Read-only file system); it was not written" in str(
        failed.value)


# ---- --compile compiles once per use (the GPU-ready issue): counted with a counting eager backend, in process


@pytest.mark.parametrize("script", GENERATIVE)
def test_compile_compiles_the_training_model_once_over_a_run_with_evaluations(script, tmp_path, monkeypatch):
    """The training step's model is compiled once (fixed shapes: every global batch is full, batches cross epochs);
    sampling and the evaluations run the EMA model eagerly. The backend is called once per graph it compiles: a
    recompile (another shape, stride or grad mode) or a graph break would call it again."""
    m = module(script)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(m, "COMPILE_BACKEND", counting_backend)
    import torch._dynamo

    torch._dynamo.reset()
    cheap = {"ddpm_cifar10.py": ["--num-eval-samples", "2"], "dit_cifar10.py": ["--samples-per-class", "1"],
             "video_diffusion.py": ["--num-eval-samples", "2", "--sample-batch-size", "2"]}[script]
    # a training step after an evaluation: an evaluation that changed what the compiled model sees would recompile
    m.main(*m.parse_args([*TINY[script], "--total-steps", "3", "--eval-every", "2", "--save-every", "3", "--compile",
                          "--num-sampling-steps", "2", *cheap, "--output-dir", str(tmp_path)]))
    assert len(graphs) == 1 and graphs[0] > 50, graphs
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---- issue 25: a first hour that tells the truth: the run's time within its first steps (DIAMOND: before its first
# collection), a CPU-sized preset named when it is above a day on a CPU, and a first picture early in the cpu presets

LONGER_THAN_A_DAY = {"ddpm_cifar10.py": ["--preset", "tiny", "--total-steps", "100000000"],
                     "dit_cifar10.py": ["--preset", "tiny", "--total-steps", "100000000"],
                     "video_diffusion.py": ["--preset", "tiny", "--total-steps", "100000000"],
                     "diamond_atari.py": ["--env-id", "Breakout-v5", "--preset", "tiny",
                                          "--first-epoch-denoiser-steps", "100000000"]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_above_a_day_on_a_cpu_says_so_and_names_a_cpu_preset_within_its_first_steps(script, tmp_path):
    """The tiny preset made long enough to take more than a day: the estimate and the notice come within the first
    steps (after step 6; DIAMOND: before its first collection ends, timed on copies before it starts), then the run
    is killed on the notice line."""
    from conftest import run_until_line_then_kill

    stdout = run_until_line_then_kill(script, *LONGER_THAN_A_DAY[script], "--no-cuda", "--output-dir", tmp_path,
                                      line_startswith="notice: on this CPU the run takes more than a day",
                                      cwd=tmp_path, timeout=120)
    lines = stdout.splitlines()
    estimate = next(i for i, line in enumerate(lines) if line.startswith("estimated time to the end of"))
    notice = lines[estimate + 1]
    assert notice.startswith("notice: on this CPU the run takes more than a day") and " d " in lines[estimate]
    if script == "diamond_atari.py":  # before the first collection ends: nothing of it said yet
        assert "--env-id Catch --preset catch" in notice and "--preset cpu" in notice
        steps = int(re.search(r"([\d,]+) steps to go", lines[estimate]).group(1).replace(",", ""))
        assert steps > 100_000_030  # epoch 1's 1e8 denoiser updates, then 10 in each of 3 epochs, and the others
        assert not any(line.startswith(("first collection:", "epoch 1: collect done")) for line in lines)
    else:  # after step 6 of 100,000,000
        assert "--preset tiny" in notice and "99,999,994 steps to go" in lines[estimate]


@pytest.mark.parametrize("script", GENERATIVE)
def test_first_sample_at_writes_a_small_unjudged_picture_long_before_the_first_evaluation(script, tmp_path):
    """--first-sample-at (the cpu presets: step 100, their first evaluation at 500 or 1000): a small grid (video: a
    strip of 8 clips beside their MP4) in samples/, and one line saying when it came; no judge scores at that step."""
    import numpy as np
    from conftest import run_until_line_then_kill

    cpu = module(script).PRESETS["cpu"]
    assert cpu["first_sample_at"] == 100 < cpu["eval_every"]
    stdout = run_until_line_then_kill(script, *TINY[script], "--first-sample-at", "2", "--num-sampling-steps", "2",
                                      "--output-dir", tmp_path, line_startswith="first samples at step 2,",
                                      cwd=tmp_path, timeout=120)
    path = Path(stdout.splitlines()[-1].split(": ", 1)[1])
    assert path == only_run_dir(tmp_path) / "samples" / "step00000002.png" and path.exists()
    shown = np.load(path.with_suffix(".npz"))["arr_0"]
    assert len(shown) == {"ddpm_cifar10.py": 16, "dit_cifar10.py": 20, "video_diffusion.py": 8}[script]
    assert "judge" not in stdout and "eval at step 2" not in stdout
