"""Optional parts can go (issue 26): a researcher who wants a script without its judge or its play deletes its blocks
and a few marked lines with one sed command, and the script still runs, the same apart from what the part did.

A part of a script is every line from `# ==== BEGIN OPTIONAL: <part> ====` to `# ==== END OPTIONAL: <part> ====` (a
part may have several such blocks: play's flags in Args are one, its code another) and every line that ends in
`# optional: <part>` (a call site outside the blocks, written so that deleting the whole line leaves valid Python).
strip_optional() deletes them as the sed command in the opening comment of the part's main block does."""
import ast
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import ROOT, assert_checkpoints_bitwise_equal, only_run_dir, read_scalars, run_script

# The optional parts of each script.
OPTIONAL_PARTS = {"ddpm_cifar10.py": ["judge"], "dit_cifar10.py": ["judge"], "video_diffusion.py": ["judge", "play"],
                  "diamond_atari.py": ["play"]}
FENCE = re.compile(r"# ==== (BEGIN|END) OPTIONAL\b")  # a fence line starts with it
MARK = re.compile(r"# optional: (\w+)$")  # a marked line ends with it
# Each script's tiny preset, cut short. The generative ones: the first samples at step 1, an evaluation and a checkpoint
# at step 2 (and at step 4: ddpm and dit); video's evaluation on 4 clips of one DDIM step, without long videos.
# DIAMOND: one epoch of 60 env steps and a few updates on Catch (no ROM), its evaluation and one test episode.
TINY = {
    **dict.fromkeys(["ddpm_cifar10.py", "dit_cifar10.py"], [
        "--preset", "tiny", "--total-steps", 4, "--log-every", 2, "--eval-every", 2, "--save-every", 2,
        "--first-sample-at", 1, "--output-dir", "runs"]),
    "video_diffusion.py": ["--preset", "tiny", "--total-steps", 2, "--log-every", 2, "--eval-every", 2, "--save-every", 2,
                           "--first-sample-at", 1, "--num-sampling-steps", 1, "--num-eval-samples", 4,
                           "--long-video-frames", 8, "--output-dir", "runs"],
    "diamond_atari.py": ["--env-id", "Catch", "--preset", "tiny", "--env-step-budget", 60, "--initial-collection-steps",
                         60, "--max-initial-collection-steps", 60, "--final-epochs-without-collection", 0,
                         "--first-epoch-denoiser-steps", 3, "--first-epoch-reward-steps", 3,
                         "--first-epoch-actor-critic-steps", 2, "--test-episodes", 1, "--max-episode-steps", 20,
                         "--num-heldout-transitions", 8, "--output-dir", "runs"],
}
# What each tiny run ends with: its last line, and the checkpoint tensors that must be bitwise the same without a part.
DONE = {"ddpm_cifar10.py": "done: step 4", "dit_cifar10.py": "done: step 4", "video_diffusion.py": "done: step 2",
        "diamond_atari.py": "done after"}
WEIGHTS = {"diamond_atari.py": ("/models", "/optimizers")}  # the generative scripts: /model, /ema, /optimizer
PART_TAGS = {"judge": "eval/judge_"}  # the TensorBoard tags that only the part writes (play writes none)
# The words no identifier may hold once the part is gone (identifier_words splits at underscores and capitals, so
# `display` is not `play`); what these do not catch, a definition left behind, unused_definitions does.
PART_WORDS = {"judge": {"judge"}, "play": {"play", "pygame"}}
CASES = [pytest.param(script, (part,), id=f"{script}-{part}") for script, parts in OPTIONAL_PARTS.items()
         for part in parts]
# Each part alone, and (statically: it compiles, names nothing of either, carries no dead code) both together.
BOTH = [pytest.param(script, tuple(parts), id=f"{script}-{'+'.join(parts)}") for script, parts in OPTIONAL_PARTS.items()
        if len(parts) > 1]


def fences(part: str) -> tuple[str, str]:
    return f"# ==== BEGIN OPTIONAL: {part} ====", f"# ==== END OPTIONAL: {part} ===="


def strip_optional(text: str, part: str) -> str:
    """The script's text without its optional part: the lines from each of the part's BEGIN fences to the next END
    fence, both included, and every line that ends in "# optional: <part>", deleted."""
    begin, end = fences(part)
    kept, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == begin:
            inside = True
        elif inside:
            inside = line.rstrip("\n") != end
        elif not line.rstrip("\n").endswith(f"# optional: {part}"):
            kept.append(line)
    return "".join(kept)


def strip_parts(text: str, parts: tuple[str, ...]) -> str:
    for part in parts:
        text = strip_optional(text, part)
    return text


def blocks(lines: list[str], part: str) -> list[list[str]]:
    """The part's blocks, each the lines from a BEGIN fence to its END fence (both included)."""
    begin, end = fences(part)
    starts = [i for i, line in enumerate(lines) if line == begin]
    return [lines[i: lines.index(end, i) + 1] for i in starts if end in lines[i:]]


def identifier_words(tree: ast.AST) -> set[str]:
    """The words (split at underscores and capitals, lower case) of every name the code defines or refers to."""
    names = set()
    for node in ast.walk(tree):
        for field in ("id", "attr", "arg", "name", "asname"):
            if isinstance(getattr(node, field, None), str):
                names.add(getattr(node, field))
    return {word.lower() for name in names for word in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", name)}


def unused_definitions(tree: ast.Module) -> list[str]:
    """Top-level defs, classes and assigned names that nothing the script runs refers to (tests/test_shared_blocks.py's
    rule): what deleting a part would leave behind as dead code."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    found[target.id] = node
    defining = {id(node) for node in found.values()}
    used, todo = set(), [n.id for root in tree.body if id(root) not in defining for n in ast.walk(root)
                         if isinstance(n, ast.Name)]
    while todo:
        name = todo.pop()
        if name in found and name not in used:
            used.add(name)
            todo += [n.id for n in ast.walk(found[name]) if isinstance(n, ast.Name)]
    return [name for name in found if name not in used]


@pytest.mark.parametrize("script", sorted(OPTIONAL_PARTS))
def test_each_optional_part_has_its_fences_in_pairs_and_every_marked_line_a_fenced_part(script):
    lines = (ROOT / script).read_text().splitlines()
    for part in OPTIONAL_PARTS[script]:
        begin, end = fences(part)
        order = [line for line in lines if line in (begin, end)]
        assert order and order == [begin, end] * (len(order) // 2), (
            f"{script}: each {begin!r} is followed by its {end!r}, before the next BEGIN")
        commands = [line for block in blocks(lines, part) for line in block if f"d' {script} > " in line]
        assert len(commands) == 1, f"{script}: the comment that opens the {part} block shows the sed command, once"
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):  # nothing but the exact fences of the parts named above
            assert line in {fence for part in OPTIONAL_PARTS[script] for fence in fences(part)}, (script, number, line)
        if "# optional:" in line and not line.lstrip().startswith("#"):  # a marker with a typo or text after it
            assert MARK.search(line) and MARK.search(line)[1] in OPTIONAL_PARTS[script], (script, number, line)


@pytest.mark.parametrize("script,parts", CASES)
def test_the_documented_sed_command_deletes_exactly_what_strip_optional_does(script, parts, tmp_path):
    if shutil.which("sed") is None:
        pytest.skip("no sed on this machine")
    (part,) = parts
    text = (ROOT / script).read_text()
    block = "\n".join(line for block in blocks(text.splitlines(), part) for line in block)
    (command,) = re.findall(rf"^#\s+sed ('[^']*') {re.escape(script)} > ", block, re.M)
    (tmp_path / script).write_text(text)
    result = subprocess.run(["sed", command.strip("'"), script], cwd=tmp_path, capture_output=True, text=True,
                            check=True)
    assert result.stdout == strip_optional(text, part)


@pytest.mark.parametrize("script,parts", CASES + BOTH)
def test_without_an_optional_part_the_script_compiles_and_names_nothing_of_it(script, parts):
    text = (ROOT / script).read_text()
    stripped = strip_parts(text, parts)
    assert len(stripped.splitlines()) < len(text.splitlines()) - 20, f"{script}: the {parts} block was not deleted"
    tree = ast.parse(stripped)
    compile(tree, script, "exec")
    for part in parts:
        named = PART_WORDS[part] & identifier_words(tree)
        assert not named, (f"{script} without its {part} still names {named}: move that into the block or mark its "
                           f"line `# optional: {part}`")
    assert unused_definitions(tree) == [], f"{script} without its {parts} carries definitions only they used"


def run_alone(folder, script: str, text: str) -> tuple:
    """The script's text alone in an empty folder, run as a researcher runs it: (its run folder, its stdout)."""
    folder.mkdir()
    (folder / script).write_text(text)
    result = run_script(folder / script, *TINY[script], cwd=folder)  # an absolute path: ROOT / it is it
    return only_run_dir(folder / "runs"), result.stdout


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory):
    """Each script's whole tiny run, once for the module (video's judge and play cases compare with the same one)."""
    runs = {}

    def get(script: str) -> tuple:
        if script not in runs:
            runs[script] = run_alone(tmp_path_factory.mktemp("whole") / "whole", script, (ROOT / script).read_text())
        return runs[script]

    return get


@pytest.mark.parametrize("script,parts", CASES)
def test_without_an_optional_part_the_tiny_preset_runs_the_same_less_that_part(script, parts, tmp_path, whole_runs):
    """The script alone in an empty folder, its part deleted, run as a researcher runs it: it writes its samples and
    checkpoint, and the same weights, samples and scalars as the whole script (which also logs eval/judge_*)."""
    (part,) = parts
    stripped, stdout = run_alone(tmp_path / "stripped", script, strip_optional((ROOT / script).read_text(), part))
    whole, _ = whole_runs(script)
    assert (stripped / "checkpoints" / "latest.pt").is_file() and DONE[script] in stdout, stdout[-2000:]
    samples = sorted(path.name for path in (whole / "samples").iterdir())  # PNGs, MP4s and the .npz of their pixels
    assert samples and samples == sorted(path.name for path in (stripped / "samples").iterdir())
    for name in (name for name in samples if name.endswith(".npz")):
        assert np.array_equal(np.load(stripped / "samples" / name)["arr_0"], np.load(whole / "samples" / name)["arr_0"])
    assert_checkpoints_bitwise_equal(stripped / "checkpoints" / "latest.pt", whole / "checkpoints" / "latest.pt",
                                     WEIGHTS.get(script, ("/model", "/ema", "/optimizer")))
    scalars, whole_scalars = read_scalars(stripped), read_scalars(whole)
    dropped = {tag for tag in whole_scalars if tag.startswith(PART_TAGS.get(part, "-"))}
    assert dropped or part not in PART_TAGS, f"the whole {script} logged no {PART_TAGS[part]}*"
    assert set(scalars) == set(whole_scalars) - dropped
    loss = "losses/denoiser" if script == "diamond_atari.py" else "losses/mse"
    assert scalars[loss] == whole_scalars[loss]
