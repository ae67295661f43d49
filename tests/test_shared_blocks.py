"""The text meant to be identical in several scripts is identical (issue 9: written once, drift fails CI).

- The shared machinery (flags, config, checkpoints, RNG, device, torchrun, run folder, signals, MFU, entry point): one
  fenced block at the end of all four scripts, byte-identical, followed only by the `__main__` stanza.
- Every name the block reads from its script is defined in each script.
- One meaning per flag: a flag that several generative scripts share has one type and one unit in all of them."""
import ast
import re
from typing import Annotated, Literal, Optional, Union, get_args, get_origin, get_type_hints

import pytest
from conftest import ROOT, load_module

SCRIPTS = ["ddpm_cifar10.py", "dit_cifar10.py", "video_diffusion.py", "diamond_atari.py"]
BEGIN, END = "# BEGIN SHARED MACHINERY", "# END SHARED MACHINERY"
# What the block reads from the script that holds it (its first comment says so).
SCRIPT_NAMES = ["SCRIPT_NAME", "CHECKPOINT_FORMAT_VERSION", "OLDER_CHECKPOINT_FORMATS", "CHECKPOINT_KEYS", "Args", "PRESETS", "ARG_DOMAINS",
                "RESUME_MUTABLE_FIELDS", "FLAG_ALIASES"]


def fenced(text: str, begin: str, end: str) -> str:
    """The text from the ruler line above `begin` to the ruler line below `end`."""
    start, stop = text.index(begin), text.index(end)
    start = text.rindex("\n# ====", 0, start) + 1
    stop = text.index("\n", text.index("\n", stop) + 1) + 1
    return text[start:stop]


@pytest.fixture(scope="module")
def texts():
    return {script: (ROOT / script).read_text() for script in SCRIPTS}


def test_the_shared_machinery_is_byte_identical_in_every_script(texts):
    blocks = {script: fenced(text, BEGIN, END) for script, text in texts.items()}
    reference = blocks["ddpm_cifar10.py"]
    assert reference.count("\ndef ") + reference.count("\nclass ") > 20  # the block holds the machinery, not a stub
    for script, block in blocks.items():
        assert block == reference, f"{script}'s shared block differs from ddpm_cifar10.py's: copy it back"
        assert texts[script].count(BEGIN) == 1 and texts[script].count(END) == 1


def test_the_block_ends_each_script_and_only_the_entry_point_follows(texts):
    for script, text in texts.items():
        after = text[text.index(END):].split("\n", 2)[2]
        assert after.strip() == 'if __name__ == "__main__":\n    run_main(main)', (script, after)


def test_every_name_the_block_reads_is_defined_by_each_script(texts):
    for script, text in texts.items():
        above = text[:text.index(BEGIN)]
        defined = {node.targets[0].id for node in ast.parse(above).body
                   if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
        defined |= {node.target.id for node in ast.parse(above).body
                    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
        defined |= {node.name for node in ast.parse(above).body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        missing = [name for name in SCRIPT_NAMES + ["check_args", "main"] if name not in defined]
        assert not missing, f"{script} does not define {missing}"


def test_nothing_above_the_block_redefines_a_name_of_the_block(texts):
    """A script-specific copy of a shared function (drift waiting to happen) is refused."""
    for script, text in texts.items():
        block = fenced(text, BEGIN, END)
        shared = set(re.findall(r"^(?:def|class) (\w+)", block, flags=re.M))
        above = set(re.findall(r"^(?:def|class) (\w+)", text[:text.index(BEGIN)], flags=re.M))
        assert not shared & above, f"{script} redefines {sorted(shared & above)} outside the shared block"


def test_the_judge_block_is_byte_identical_in_the_three_generative_scripts(texts):
    """The judge (classifier, cache, Frechet distance, scores) is one text in ddpm, dit and video."""
    begin, end = "# ==== BEGIN SHARED JUDGE", "# ==== END SHARED JUDGE ===="
    blocks = {}
    for script in ("ddpm_cifar10.py", "dit_cifar10.py", "video_diffusion.py"):
        text = texts[script]
        assert text.count(begin) == 1 and text.count(end) == 1, script
        blocks[script] = text[text.index(begin): text.index(end) + len(end)]
    reference = blocks["ddpm_cifar10.py"]
    for name in ("JudgeNet", "train_judge", "load_or_train_judge", "frechet_distance", "judge_scores"):
        assert re.search(rf"^(?:def|class) {name}\b", reference, flags=re.M), f"{name} is not in the judge block"
    assert all(len(line) <= 120 for line in reference.splitlines())
    for script, block in blocks.items():
        assert block == reference, f"{script}'s judge block differs from ddpm_cifar10.py's: copy it back"


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


def test_the_data_order_is_one_text_in_the_generative_scripts(texts):
    """One name, one behaviour: the global batch of a step crosses epochs in ddpm, dit and video alike (DiT once
    dropped the last partial batch of each epoch, and so could not train on a dataset smaller than the batch)."""
    for name in ("epoch_permutation", "global_batch_indices"):
        bodies = {script: re.search(rf"^def {name}\(.*?(?=^\S)", texts[script], flags=re.M | re.S).group(0)
                  for script in GENERATIVE}
        assert len(set(bodies.values())) == 1, f"{name} differs between {list(bodies)}"
