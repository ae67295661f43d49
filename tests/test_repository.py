"""The repository is self-contained: what its files cite is in it (issue 22).

- No file cites the promises under their old name, or a folder outside the repository that users do not have.
- Every relative path a file names resolves to a file or folder of the repository: a Markdown link `[text](path)`,
  and a path token with a folder part ending in .md, .py, .sh or .json (`benchmark/RESULTS.md`, `tests/conftest.py`),
  taken relative to the file's folder or to the repository root.
- docs/PROMISES.md exists with numbered sections, README.md links to it, and every "docs/PROMISES.md section N" cited
  anywhere is one of its sections.
Reads the files only (git lists them): no script runs."""
import posixpath
import re
import subprocess

import pytest
from conftest import ROOT

# Written in two halves, so that this file does not hold what it looks for.
FORBIDDEN = ["CONTRACT" + ".md", "CONTRACT" + " section", ".." + "/shared", "shared" + "/reference"]
# Raw outputs, kept as the tools printed them (RESULTS.md quotes them): scanned for nothing.
UNSCANNED = ("benchmark/logs/",)
PROMISES = "docs/PROMISES.md"

MARKDOWN_LINK = re.compile(r"\[[^\]\n]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
# A path token: folder parts, then a file name ending in one of the checked extensions. A bare file name (no folder)
# is not checked: it is mostly a file the code writes or reads at run time (results.json, config.json). Template and
# glob characters ({out}/x.json, $OUT/x.md, runs/<run>/config.json, benchmark/*.sh) next to or inside a token make
# it no path, so the pattern does not take it.
PATH_TOKEN = re.compile(r"(?<![\w./{}<>$*~-])((?:\.\.?/)*[\w.-]+(?:/[\w.-]+)+\.(?:md|py|sh|json))(?![\w/-]|\.\w)")
# A path in another repository, named just before it on the same line: "facebookresearch/DiT diffusion/respace.py",
# "eloialonso/diamond, src/agent.py" (the owner is no folder of this repository).
OTHER_REPOSITORY = re.compile(r"\b([\w.-]+)/[\w.-]+(?:'s|,|:)?\s+$")
PROMISES_CITATION = re.compile(r"docs/PROMISES\.md,? sections? (\d+(?:(?:,| and|, and) \d+)*)")


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def files() -> list[str]:
    """The repository's files: tracked ones and new ones not yet committed (not those git ignores), deleted ones
    left out."""
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", "-z")
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    return sorted({name for name in listed.stdout.split("\0") if name and (ROOT / name).is_file()})


@pytest.fixture(scope="module")
def texts(files) -> dict[str, str]:
    """The text files to scan (binary files, such as the figures, are not)."""
    out = {}
    for name in files:
        if name.startswith(UNSCANNED):
            continue
        try:
            out[name] = (ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return out


def test_no_file_cites_the_old_contract_or_a_folder_outside_the_repository(texts):
    found = [f"{name}:{number}: {word}" for name, text in texts.items()
             for number, line in enumerate(text.splitlines(), 1) for word in FORBIDDEN if word in line]
    assert not found, "cite docs/PROMISES.md (its section) or a public source instead:\n" + "\n".join(found)


def test_every_relative_path_a_file_names_resolves_in_the_repository(files, texts):
    targets = set(files) | {posixpath.dirname(name) for name in files}  # files and the folders that hold them
    while "" not in targets:
        targets |= {posixpath.dirname(target) for target in targets}
    top_level = {name.split("/")[0] for name in files}

    def resolves(path: str, folders: tuple[str, ...]) -> bool:
        for folder in folders:
            joined = posixpath.normpath(posixpath.join(folder, path))
            if not joined.startswith("../") and joined in targets:
                return True
        return False

    broken = []
    for name, text in texts.items():
        folder = posixpath.dirname(name)
        for number, line in enumerate(text.splitlines(), 1):
            if name.endswith(".md"):
                for link in MARKDOWN_LINK.finditer(line):
                    target = link.group(1).split("#")[0]
                    if target and ":" not in target and not resolves(target, (folder,)):  # a URL has a scheme
                        broken.append(f"{name}:{number}: link {link.group(1)}")
            for token in PATH_TOKEN.finditer(line):
                path, start = token.group(1), token.start(1)
                word_start = line.rfind(" ", 0, start) + 1
                if "://" in line[word_start:start]:  # part of a URL
                    continue
                other = OTHER_REPOSITORY.search(line[:start])
                if other and other.group(1) not in top_level:
                    continue
                if resolves(path, (folder, "")):
                    continue
                candidates = {posixpath.normpath(posixpath.join(base, path)) for base in (folder, "")}
                if any(git("check-ignore", "-q", "--no-index", candidate).returncode == 0
                       for candidate in candidates if not candidate.startswith("../")):
                    continue  # what a run writes (runs/, data/, benchmark/out/): git ignores it
                broken.append(f"{name}:{number}: {path}")
    assert not broken, "paths that name nothing in the repository:\n" + "\n".join(broken)


def test_the_promises_are_numbered_linked_from_the_readme_and_cited_by_existing_sections(texts):
    assert PROMISES in texts, f"{PROMISES} is missing"
    sections = [int(n) for n in re.findall(r"^## (\d+)\. ", texts[PROMISES], flags=re.M)]
    assert sections and sections == list(range(1, len(sections) + 1)), sections
    assert re.search(r"\]\(docs/PROMISES\.md(?:#[^)]*)?\)", texts["README.md"]), "README.md does not link it"
    cited = [(name, int(n)) for name, text in texts.items() for match in PROMISES_CITATION.finditer(text)
             for n in re.findall(r"\d+", match.group(1))]
    assert len({name for name, _ in cited}) >= 4  # the scripts and the tests cite it
    wrong = [f"{name}: section {n}" for name, n in cited if n not in sections]
    assert not wrong, f"{PROMISES} has sections 1 to {len(sections)}:\n" + "\n".join(wrong)
