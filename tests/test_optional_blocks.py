"""Optional parts can go (issue 26): a researcher who wants a script without its judge (or, later, play) deletes one
block and a few marked lines with one sed command, and the script still runs, the same apart from what the part did.

A part of a script is every line from `# ==== BEGIN OPTIONAL: <part> ====` to `# ==== END OPTIONAL: <part> ====` and
every line that ends in `# optional: <part>` (a call site outside the block, written so that deleting the whole line
leaves valid Python). strip_optional() deletes them as the sed command in the block's opening comment does."""
import ast
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import ROOT, assert_checkpoints_bitwise_equal, only_run_dir, read_scalars, run_script

# The optional parts of each script (video_diffusion.py and diamond_atari.py: judge and play, to come).
OPTIONAL_PARTS = {"ddpm_cifar10.py": ["judge"], "dit_cifar10.py": ["judge"]}
FENCE = re.compile(r"# ==== (BEGIN|END) OPTIONAL\b")  # a fence line starts with it
MARK = re.compile(r"# optional: (\w+)$")  # a marked line ends with it
# The tiny preset, cut to 4 steps: the first samples at step 1, an evaluation and a checkpoint at steps 2 and 4.
TINY = ["--preset", "tiny", "--total-steps", 4, "--log-every", 2, "--eval-every", 2, "--save-every", 2,
        "--first-sample-at", 1, "--output-dir", "runs"]
PART_TAGS = {"judge": "eval/judge_"}  # the TensorBoard tags that only the part writes
CASES = [(script, part) for script, parts in OPTIONAL_PARTS.items() for part in parts]


def fences(part: str) -> tuple[str, str]:
    return f"# ==== BEGIN OPTIONAL: {part} ====", f"# ==== END OPTIONAL: {part} ===="


def strip_optional(text: str, part: str) -> str:
    """The script's text without its optional part: the lines from the part's BEGIN fence to its END fence, both
    included, and every line that ends in "# optional: <part>", deleted."""
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
def test_each_optional_part_has_its_fences_once_and_every_marked_line_a_fenced_part(script):
    lines = (ROOT / script).read_text().splitlines()
    for part in OPTIONAL_PARTS[script]:
        begin, end = fences(part)
        assert lines.count(begin) == 1 and lines.count(end) == 1, f"{script}: one {begin!r} and one {end!r}"
        assert lines.index(begin) < lines.index(end)
        command = [line for line in lines[lines.index(begin): lines.index(end)] if f"d' {script} > " in line]
        assert command, f"{script}: the comment that opens the {part} block shows the sed command that deletes it"
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):  # nothing but the exact fences of the parts named above
            assert line in {fence for part in OPTIONAL_PARTS[script] for fence in fences(part)}, (script, number, line)
        if "# optional:" in line and not line.lstrip().startswith("#"):  # a marker with a typo or text after it
            assert MARK.search(line) and MARK.search(line)[1] in OPTIONAL_PARTS[script], (script, number, line)


@pytest.mark.parametrize("script,part", CASES)
def test_the_documented_sed_command_deletes_exactly_what_strip_optional_does(script, part, tmp_path):
    if shutil.which("sed") is None:
        pytest.skip("no sed on this machine")
    text = (ROOT / script).read_text()
    block = text.split(fences(part)[0])[1].split(fences(part)[1])[0]
    (command,) = re.findall(rf"^#\s+sed ('[^']*') {re.escape(script)} > ", block, re.M)
    (tmp_path / script).write_text(text)
    result = subprocess.run(["sed", command.strip("'"), script], cwd=tmp_path, capture_output=True, text=True,
                            check=True)
    assert result.stdout == strip_optional(text, part)


@pytest.mark.parametrize("script,part", CASES)
def test_without_an_optional_part_the_script_compiles_and_names_nothing_of_it(script, part):
    text = (ROOT / script).read_text()
    stripped = strip_optional(text, part)
    assert len(stripped.splitlines()) < len(text.splitlines()) - 20, f"{script}: the {part} block was not deleted"
    tree = ast.parse(stripped)
    compile(tree, script, "exec")
    assert part not in identifier_words(tree), (f"{script} without its {part} still names something of it: move that "
                                                f"into the block or mark its line `# optional: {part}`")
    assert unused_definitions(tree) == [], f"{script} without its {part} carries definitions only the {part} used"


@pytest.mark.parametrize("script,part", CASES)
def test_without_an_optional_part_the_tiny_preset_runs_the_same_less_that_part(script, part, tmp_path):
    """The script alone in an empty folder, its part deleted, run as a researcher runs it: it writes its samples and
    checkpoint, and the same weights and scalars as the whole script (which also logs eval/judge_*)."""
    runs = {}
    for name, text in (("stripped", strip_optional((ROOT / script).read_text(), part)),
                       ("whole", (ROOT / script).read_text())):
        (tmp_path / name).mkdir()
        (tmp_path / name / script).write_text(text)
        result = run_script(tmp_path / name / script, *TINY, cwd=tmp_path / name)  # an absolute path: ROOT / it is it
        runs[name] = only_run_dir(tmp_path / name / "runs"), result.stdout
    (stripped, stdout), (whole, _) = runs["stripped"], runs["whole"]
    assert (stripped / "checkpoints" / "latest.pt").is_file() and "done: step 4" in stdout
    for stem in ("step00000001", "step00000002", "step00000004"):
        assert (stripped / "samples" / f"{stem}.png").is_file()
        assert np.array_equal(np.load(stripped / "samples" / f"{stem}.npz")["arr_0"],
                              np.load(whole / "samples" / f"{stem}.npz")["arr_0"])
    assert_checkpoints_bitwise_equal(stripped / "checkpoints" / "latest.pt", whole / "checkpoints" / "latest.pt")
    scalars, whole_scalars = read_scalars(stripped), read_scalars(whole)
    dropped = {tag for tag in whole_scalars if tag.startswith(PART_TAGS.get(part, "-"))}
    assert dropped or part not in PART_TAGS, f"the whole {script} logged no {PART_TAGS[part]}*"
    assert set(scalars) == set(whole_scalars) - dropped
    assert scalars["losses/mse"] == whole_scalars["losses/mse"]
