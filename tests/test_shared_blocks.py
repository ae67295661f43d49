"""Shared code is one text per definition, and no script carries code it never uses (issues 9 and 26).

- A top-level def, class or constant whose name two or more scripts define is the same text in all of them, unless
  ALLOWLIST names it with the reason it differs: drift fails CI, and what you learn in one script holds in the others.
- No script defines a top-level name that nothing it runs refers to: a researcher who copies one file carries no dead
  code. (Tests and benchmark/ calling a script's function do not count as a use.)
- Every name the shared code reads from its script is defined by each script, and each ends with one entry point.
- One meaning per flag: a flag that several generative scripts share has one type and one unit in all of them."""
import ast
import difflib
import re
from typing import Annotated, Literal, Optional, Union, get_args, get_origin, get_type_hints

import pytest
from conftest import ROOT, load_module

SCRIPTS = ["ddpm_cifar10.py", "dit_cifar10.py", "video_diffusion.py", "diamond_atari.py"]
# What the shared machinery reads from the script that holds it (the comment that opens it says so).
SCRIPT_NAMES = ["SCRIPT_NAME", "CHECKPOINT_FORMAT_VERSION", "OLDER_CHECKPOINT_FORMATS", "CHECKPOINT_KEYS", "Args", "PRESETS",
                "RESUME_MUTABLE", "FLAG_ALIASES"]
# Names that several scripts define with different texts, each with why. Keep it short: a definition that means the
# same thing in two scripts is one text; one that means something else deserves its own name.
ALLOWLIST = {
    # each script's own settings, read by the shared machinery
    "SCRIPT_NAME": "the script's own file name",
    "Args": "each script's own flags, each with its domain and whether --resume may change it",
    "PRESETS": "each script's own sizes (tiny, cpu, the paper's)",
    "FLAG_ALIASES": "each script's own flag aliases (DIAMOND's --game)",
    "CHECKPOINT_KEYS": "each script's checkpoint holds its own state",
    "CHECKPOINT_FORMAT_VERSION": "each script's checkpoint format has its own history",
    "OLDER_CHECKPOINT_FORMATS": "each script converts its own older formats",
    "check_args": "each script's own checks of its flags",
    "main": "each script's own run",
    # one role, each script's own model, data and files
    "build_model": "each script's own network",
    "load_dataset": "each script's own data",
    "step_memory_profile": "each script's own model and loss (the activations of one training step)",
    "open_run": "DiT's start names its adaLN variant and its classes",
    "sample_from_checkpoint": "DiT samples one class or a row per class, with guidance",
    "judge_samples": "DiT judges the class of each row, with and without guidance",
    "evaluate_fid": "DiT samples every class in turn, with guidance",
    "write_samples": "each script's own sample files (grid, class rows, MP4 clips)",
    "generate_samples": "DDPM samples unconditionally, DiT per class with guidance",
    "sample_images": "DDPM's and DiT's timestep spacing and x0 clipping follow their papers' code",
    "timestep_embedding": "DDPM's sinusoids (sin, cos) and DiT's (cos, sin), as each paper's code",
    "guided_model_fn": "DiT guides on class labels, video on the caption and the actions",
    "UNet": "DDPM's U-Net and DIAMOND's denoiser U-Net are different networks, each as its paper",
    "ResBlock": "DDPM's block (time embedding added) and DIAMOND's (adaptive group norm), each as its paper",
    "group_norm": "video's and DIAMOND's networks normalise differently (groups, eps, affine)",
    "to_uint8": "video returns numpy clips, DIAMOND a tensor of frames",
    "evaluate": "video scores clips, DIAMOND plays test episodes",
    "play": "video plays its sprites world, DIAMOND an Atari game (rewards, episodes)",
    "play_window": "video plays its sprites world, DIAMOND an Atari game (rewards, episodes)",
    "play_keys": "video plays its sprites world, DIAMOND an Atari game (rewards, episodes)",
    "parse_play_keys": "its messages name the model (video) or the game (DIAMOND)",
}


def top_level_definitions(script: str) -> dict[str, tuple[ast.stmt, str]]:
    """Each top-level def, class and assignment to a plain name of a script: its node and its text, the whole lines
    from its first decorator to its last line (a comment at the end of that line included, the comment lines above
    it not). A name defined twice (the second silently replaces the first) fails here."""
    text = (ROOT / script).read_text()
    lines = text.splitlines(keepends=True)
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
        for name in names:
            assert name not in found, f"{script} defines {name} twice at top level: keep one"
            found[name] = node, "".join(lines[first - 1: node.end_lineno])
    return found


@pytest.fixture(scope="module")
def definitions():
    return {script: top_level_definitions(script) for script in SCRIPTS}


@pytest.fixture(scope="module")
def texts():
    return {script: (ROOT / script).read_text() for script in SCRIPTS}


def test_a_definition_shared_by_several_scripts_is_one_text_in_all_of_them(definitions):
    holders = {}
    for script, found in definitions.items():
        for name in found:
            holders.setdefault(name, []).append(script)
    compared = {name for name, scripts in holders.items() if len(scripts) >= 2 and name not in ALLOWLIST}
    # the test compares the shared machinery, samplers, judge and data order, not a handful of stragglers
    assert {"parse_args", "load_checkpoint", "save_checkpoint", "StopFlag", "run_main", "peak_flops", "make_grid",
            "ddim_sample", "ddpm_sample", "make_beta_schedule", "make_alphas_cumprod", "judge_scores",
            "global_batch_indices"} <= compared
    problems = []
    for name in sorted(compared):
        reference, *others = holders[name]
        for script in others:
            a, b = definitions[reference][name][1], definitions[script][name][1]
            if a != b:
                diff = "".join(list(difflib.unified_diff(a.splitlines(True), b.splitlines(True), reference, script,
                                                         n=0))[:12])
                problems.append(f"{name} differs between {reference} and {script}:\n{diff}\nMake it the same text "
                                f"in {', '.join(holders[name])} (copy the one you changed into the others); if it "
                                f"means something else in one of them, rename it there; only if it must differ, add "
                                f"it to ALLOWLIST in tests/test_shared_blocks.py with a one-line reason.")
                break
    assert not problems, "\n\n".join(problems)


def test_the_allowlist_names_only_definitions_that_differ(definitions):
    for name, reason in ALLOWLIST.items():
        assert reason and "\n" not in reason, f"ALLOWLIST[{name!r}]: give a one-line reason"
        found = {script: found[name][1] for script, found in definitions.items() if name in found}
        assert len(found) >= 2, (f"ALLOWLIST names {name}, which {len(found)} script(s) define: remove it from "
                                 f"ALLOWLIST in tests/test_shared_blocks.py")
        assert len(set(found.values())) > 1, (f"ALLOWLIST names {name}, which is the same text in {', '.join(found)}: "
                                              f"remove it from ALLOWLIST in tests/test_shared_blocks.py")


def test_no_script_carries_a_definition_it_never_uses(definitions, texts):
    """Used: reachable by name from the script's statements other than definitions (the __main__ stanza, imports,
    module-level code), through the definitions they use, and so on. A definition that refers only to itself, or a
    group that only refers to one another, is not used."""
    unused = {}
    for script, found in definitions.items():
        defining_lines = {node.lineno for node, _ in found.values()}
        roots = [node for node in ast.parse(texts[script]).body if node.lineno not in defining_lines]
        used, todo = set(), [node.id for root in roots for node in ast.walk(root) if isinstance(node, ast.Name)]
        while todo:
            name = todo.pop()
            if name in found and name not in used:
                used.add(name)
                todo += [node.id for node in ast.walk(found[name][0]) if isinstance(node, ast.Name)]
        unused[script] = [name for name in found if name not in used]
    assert not any(unused.values()), "\n".join(
        f"{script} defines {', '.join(names)}, which nothing it runs uses (tests and benchmark/ do not count): delete "
        f"them from {script}; a test that calls one of them there goes to a script that uses it, or goes"
        for script, names in unused.items() if names)


def test_every_name_the_shared_code_reads_is_defined_by_each_script(definitions):
    for script, found in definitions.items():
        missing = [name for name in SCRIPT_NAMES + ["check_args", "main"] if name not in found]
        assert not missing, f"{script} does not define {missing}: the shared machinery reads them"


def test_each_script_ends_with_the_one_entry_point(texts):
    for script, text in texts.items():
        last = ast.parse(text).body[-1]
        assert ast.get_source_segment(text, last) == 'if __name__ == "__main__":\n    run_main(main)', (
            f"{script} must end with `if __name__ == \"__main__\":\n    run_main(main)`")


GENERATIVE = ["ddpm_cifar10.py", "dit_cifar10.py", "video_diffusion.py"]
# The count flags whose unit every script states (DIAMOND's in its own units: epochs for its loop, save and eval).
COUNTED = {"total_steps", "epochs", "num_epochs", "warmup_steps", "log_every", "save_every", "eval_every",
           "save_agent_every"}


def type_and_unit(hint) -> tuple[str, Optional[str]]:
    """A field's type with its unit (the --help metavar of Annotated[T, tyro.conf.arg(metavar=UNIT)]) taken out.
    None is not part of the type (Optional[int] is an int whose default None has a stated meaning), nor are a
    Literal's choices, which are each script's own (its datasets, its presets)."""
    unit = None
    if get_origin(hint) is Annotated:
        hint, *extras = get_args(hint)
        unit = next((extra.metavar for extra in extras if getattr(extra, "metavar", None)), None)
    if get_origin(hint) is Union and type(None) in get_args(hint):
        (hint,) = [arg for arg in get_args(hint) if arg is not type(None)]
    if get_origin(hint) is Literal:
        return f"Literal[{type(get_args(hint)[0]).__name__}]", unit
    return getattr(hint, "__name__", str(hint)), unit


def test_flags_shared_by_the_generative_scripts_agree_in_name_type_and_unit():
    fields = {script: {name: type_and_unit(hint) for name, hint in
                       get_type_hints(load_module(script).Args, include_extras=True).items()} for script in GENERATIVE}
    shared = [name for name in fields["ddpm_cifar10.py"] if sum(name in f for f in fields.values()) >= 2]
    assert {"total_steps", "save_every", "eval_every", "log_every", "warmup_steps", "batch_size"} <= set(shared)
    for name in shared:
        found = {script: f[name] for script, f in fields.items() if name in f}
        assert len(set(found.values())) == 1, f"--{name.replace('_', '-')} differs: {found}"
    for script, f in fields.items():
        assert f["total_steps"][1] == f["save_every"][1] == f["eval_every"][1] == "STEPS", script
    assert fields["dit_cifar10.py"]["epochs"][1] == "EPOCHS"  # the seed's unit, converted to steps
    diamond = {name: type_and_unit(hint) for name, hint in
               get_type_hints(load_module("diamond_atari.py").Args, include_extras=True).items()}
    assert diamond["num_epochs"][1] == diamond["save_every"][1] == diamond["eval_every"][1] == "EPOCHS"
    for script, f in {**fields, "diamond_atari.py": diamond}.items():
        assert all(f[name][1] for name in COUNTED & set(f)), f"{script}: a count flag without its unit"


@pytest.mark.parametrize("script,unit", [("dit_cifar10.py", "STEPS"), ("diamond_atari.py", "EPOCHS")])
def test_help_shows_each_count_flags_unit(script, unit, capsys):
    with pytest.raises(SystemExit):
        load_module(script).parse_args(["--help"])
    assert re.search(rf"--save-every {unit}\b", capsys.readouterr().out)


def test_main_fits_in_120_lines_and_no_line_is_over_120_characters(texts):
    """Lean scripts (issue 26): main() reads as phases in at most 120 lines (what moves out goes to functions named
    for what they do), and no line is over 120 characters (counted in characters, not bytes)."""
    problems = []
    for script, text in texts.items():
        main = next(node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef) and node.name == "main")
        if main.end_lineno - main.lineno + 1 > 120:
            problems.append(f"{script}: main() is {main.end_lineno - main.lineno + 1} lines; move a phase into a "
                            f"function named for what it does")
        problems += [f"{script}:{number}: {len(line)} characters; wrap it at 120" for number, line in
                     enumerate(text.splitlines(), 1) if len(line) > 120]
    assert not problems, "\n".join(problems)
