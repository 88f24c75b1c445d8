"""The README's commands and links exist.

Every command line in the shell code blocks (bash, sh or no language; output goes in `text`
blocks) of the README and of the docs/ pages it links to must name something real: a
`cascade-clip` sub-command with flags (and choice values) its parser accepts, a make target or
variable, a stage module with the flags it reads, a script, or a tool the project depends on.
Their relative links must point to an existing file and heading, and the repository paths they
name in backticks must exist.
"""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from pathlib import Path


from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

SHELL_LANGUAGES = {"", "bash", "sh", "shell"}
TOOLS = {"dvc": "dvc", "mlflow": "mlflow", "prefect": "prefect", "torchrun": "torch"}  # command -> dependency providing it
SHELL_COMMANDS = {"source", "export", "cd", "git", "find", "cat", "ls", "ln", "cp", "kill", "time"}  # nothing to check
SEPARATORS = {"&&", "||", ";", "|", "&"}
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_.]*$|[<>]|\.\.\.")  # FILE, NAME, <name>, ...
REPO_PATH = re.compile(r"^(?:scripts|benchmarks|pipeline|stages|tests|presets|docs)/[\w./-]+\.\w+$")


# --- reading the README ---------------------------------------------------------------------

def code_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """Fenced code blocks as (language, line number of the first content line, lines)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^\s*(```+)\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence.group(1))), len(lines))
        blocks.append((fence.group(2).lower(), i + 2, lines[i + 1:end]))
        i = end + 1
    return blocks


def shell_commands(text: str) -> list[tuple[int, list[str]]]:
    """Simple commands of the shell blocks as (line number, words): comments dropped, lines split
    at `&&`, `;`, `|` and `&`, leading VAR=value assignments and `time` removed."""
    commands = []
    for language, first, lines in code_blocks(text):
        if language not in SHELL_LANGUAGES:
            continue
        for number, line in enumerate(lines, first):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            try:
                words = list(lexer)
            except ValueError as exc:  # unbalanced quotes
                commands.append((number, [f"<unparsable: {exc}>"]))
                continue
            current: list[str] = []
            for word in [*words, ";"]:
                if word not in SEPARATORS:
                    current.append(word)
                    continue
                while current and (ENV_ASSIGNMENT.match(current[0]) or current[0] == "time"):
                    current.pop(0)
                if current:
                    commands.append((number, current))
                current = []
    return commands


def dependencies() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(d for extra in project.get("optional-dependencies", {}).values() for d in extra)]
    return {re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower() for spec in specs}


def make_names() -> tuple[set[str], set[str]]:
    """The Makefile's targets and variables."""
    targets, variables = set(), set()
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith(("\t", "#")):
            continue
        if variable := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:+]?=", line):
            variables.add(variable.group(1))
        elif target := re.match(r"^([^\s:=#][^:=#]*?)\s*:(?!=)", line):
            targets.update(t for t in target.group(1).split() if not t.startswith("."))
    return targets, variables


# --- checking one command -------------------------------------------------------------------

def _clean(word: str) -> str:
    return word.strip("[]")


def cli_problems(words: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`cascade-clip SUB [SUB2] --flag value ...`: sub-commands, flags and choice values exist."""
    rest, path, problems = [_clean(w) for w in words], ["cascade-clip"], []
    while subparsers := next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None):
        if not rest or rest[0] not in subparsers.choices:
            got = rest[0] if rest else "nothing"
            return [f"`{' '.join(path)}` has no sub-command {got!r} (choices: {', '.join(subparsers.choices)})"]
        path.append(rest.pop(0))
        parser = subparsers.choices[path[-1]]
    options = {o: a for a in parser._actions for o in a.option_strings}
    for i, word in enumerate(rest):
        if not word.startswith("-") or word == "-":
            continue
        flag = word.split("=", 1)[0]
        action = options.get(flag)
        if action is None:
            problems.append(f"`{' '.join(path)}` has no option {flag} (options: {', '.join(sorted(options))})")
            continue
        if action.choices is None:
            continue
        values = [word.split("=", 1)[1]] if "=" in word else []
        if not values:
            for value in rest[i + 1:]:
                if value.startswith("-") or (values and action.nargs in (None, "?")):
                    break
                values.append(value)
        for value in values:
            if not PLACEHOLDER.search(value) and value not in action.choices:
                problems.append(f"`{' '.join(path)} {flag}`: {value!r} is not a choice ({', '.join(map(str, action.choices))})")
    return problems


def stage_problems(module: str, args: list[str]) -> list[str]:
    """`python -m stages.X [--flag ...]`: stages/X.py exists and reads each flag."""
    name = module.removeprefix("stages.")
    path = REPO / "stages" / f"{name}.py"
    if not re.fullmatch(r"\w+", name) or not path.is_file():
        return [f"no stage module {module} (stages/{name}.py)"]
    if name == "shared_server":  # runs the command after it
        return command_problems(args)
    source = path.read_text()
    if "run_stage(" in source:  # the stage framework's own arguments
        source += (REPO / "stages" / "common.py").read_text()
    known = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
    return [f"python -m {module} reads no option {flag}" for flag in (_clean(a).split("=", 1)[0] for a in args)
            if flag.startswith("--") and flag not in known]


def command_problems(words: list[str]) -> list[str]:
    """What is wrong with one simple command (empty when nothing is)."""
    command, args = words[0], words[1:]
    if command.startswith("<unparsable"):
        return [command]
    if command == "cascade-clip":
        return cli_problems(args, build_parser())
    if command == "make":
        targets, variables = make_names()
        problems = []
        for arg in args:
            if "=" in arg:
                if arg.split("=", 1)[0] not in variables:
                    problems.append(f"the Makefile sets no variable {arg.split('=', 1)[0]} (variables: {', '.join(sorted(variables))})")
            elif not arg.startswith("-") and arg not in targets:
                problems.append(f"the Makefile has no target {arg!r} (targets: {', '.join(sorted(targets))})")
        return problems
    if command in ("python", "python3"):
        if args[:1] == ["-m"] and len(args) > 1:
            module = args[1]
            if module.startswith("stages."):
                return stage_problems(module, args[2:])
            if module == "pytest":
                return [] if "pytest" in dependencies() else ["pytest is not a dependency of the project"]
            if module.startswith(("pipeline.", "benchmarks.")):
                parts = module.split(".")
                exists = (REPO.joinpath(*parts).with_suffix(".py")).is_file() or (REPO.joinpath(*parts) / "__init__.py").is_file()
                return [] if exists else [f"no module {module}"]
            return [f"python -m {module}: not a module of this project"]
        if args and args[0].endswith(".py"):
            return [] if (REPO / args[0]).is_file() else [f"no script {args[0]}"]
        return [f"python {' '.join(args)}: expected `-m MODULE` or a script path"]
    if command in ("bash", "sh"):
        return [] if args and (REPO / args[0]).is_file() else [f"no script {' '.join(args[:1])}"]
    if command in TOOLS:
        problems = [] if TOOLS[command] in dependencies() else [f"{command}: {TOOLS[command]} is not a dependency of the project"]
        if "-m" in args[:-1] and args[args.index("-m") + 1].startswith("stages."):  # torchrun ... -m stages.train
            module_at = args.index("-m") + 1
            problems += stage_problems(args[module_at], args[module_at + 1:])
        return problems
    if command in SHELL_COMMANDS:
        return []
    return [f"unknown command {command!r}: not cascade-clip, make, python, a stage, a script or a project tool"]


def readme_command_problems(text: str, name: str = "README.md") -> list[str]:
    return [f"{name} line {number}: `{' '.join(words)}`: {problem}"
            for number, words in shell_commands(text) for problem in command_problems(words)]


# --- links ----------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+?)\s*$", path.read_text(), flags=re.M)}


def link_problems(text: str, base: Path, name: str) -> list[str]:
    """The problems of the relative links and repository paths in `text`."""
    problems = []
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # links inside code blocks are not links
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (base / file).resolve() if file else base / name
        relative = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
        if not path.exists():
            problems.append(f"{name}: link to {target}: no file {relative}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{name}: link to {target}: {relative} has no heading #{anchor}")
    for quoted in re.findall(r"`([^`\s]+)`", prose):
        if REPO_PATH.match(quoted) and not PLACEHOLDER.search(quoted) and not (REPO / quoted).exists():
            problems.append(f"{name}: names `{quoted}`, which does not exist")
    return problems


def linked_docs_pages() -> list[str]:
    """The docs/ pages the README links to."""
    prose = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.M | re.S)
    return sorted({m for m in re.findall(r"\]\((docs/[^)#\s]+\.md)", prose) if (REPO / m).is_file()})


def all_link_problems() -> list[str]:
    """The README's links, and those of the docs/ pages it links to."""
    problems = link_problems(README.read_text(), REPO, "README.md")
    for page in linked_docs_pages():
        problems += link_problems((REPO / page).read_text(), (REPO / page).parent, page)
    return problems


# --- the tests ------------------------------------------------------------------------------

def test_every_command_in_the_readme_exists():
    commands = shell_commands(README.read_text())
    assert len(commands) > 20, "the README's shell code blocks were not found"
    assert {"cascade-clip", "make", "python", "dvc"} <= {w[0] for _, w in commands}
    problems = readme_command_problems(README.read_text())
    assert not problems, "\n".join(problems)


def test_every_command_in_the_linked_docs_pages_exists():
    pages = linked_docs_pages()
    assert "docs/reliability.md" in pages
    problems = [p for page in pages for p in readme_command_problems((REPO / page).read_text(), page)]
    assert not problems, "\n".join(problems)


def test_quick_start_is_the_two_make_commands():
    first_block = next(lines for language, _, lines in code_blocks(README.read_text()) if language in SHELL_LANGUAGES)
    assert [line.split("#")[0].strip() for line in first_block] == ["make repro", "make test"]


def test_every_link_in_the_readme_and_its_docs_pages_resolves():
    problems = all_link_problems()
    assert not problems, "\n".join(problems)



BAD_README = """\
# x

```bash
cascade-clip predcit photos/ --classes "a,b"
cascade-clip predict photos/ --class "a,b" [--overwrite]
cascade-clip bench inference --preset coc --variant cascade zegclipp
cascade-clip bench
make tset PYTEST_WORKER=4
python -m stages.trian --params p.yaml
python -m stages.pipeline_flow --preset coco --nmae x
python scripts/no_such_script.py
torchrun --nproc_per_node 2 -m stages.train --param p.yaml
frobnicate --all
```

See [the demo](docs/no-such-page.md), [a section](#no-such-heading) and `scripts/gone.py`.
"""

GOOD_README = """\
# x

## Tests

```bash
make test PYTEST_WORKERS=4   # a comment with cascade-clip predcit in it
cascade-clip predict photos/ --classes "a,b" --out p/ [--model FILE] [--threshold 0.5] && dvc repro
cascade-clip bench inference --preset coco [--variant cascade zegclip] [--dtype bf16] [--json FILE]
GOMP_SPINCOUNT=0 make repro
python -m stages.shared_server dvc repro
CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu &
```

```text
this is output: frobnicate --all
```

[Tests](#tests), [reliability](docs/reliability.md#resume-key), `scripts/setup-env.sh`.
"""


def test_the_checker_finds_mistyped_commands_flags_and_links():
    problems = readme_command_problems(BAD_README)
    expected = [
        "has no sub-command 'predcit'",
        "`cascade-clip predict` has no option --class",
        "'coc' is not a choice",
        "'zegclipp' is not a choice",
        "`cascade-clip bench` has no sub-command 'nothing'",
        "no target 'tset'",
        "no variable PYTEST_WORKER",
        "no stage module stages.trian",
        "python -m stages.pipeline_flow reads no option --nmae",
        "no script scripts/no_such_script.py",
        "python -m stages.train reads no option --param",
        "unknown command 'frobnicate'",
    ]
    for text in expected:
        assert sum(text in p for p in problems) == 1, f"{text!r} not reported once in:\n" + "\n".join(problems)
    assert len(problems) == len(expected), "\n".join(problems)
    links = link_problems(BAD_README, REPO, "README.md")
    assert len(links) == 3 and "no file docs/no-such-page.md" in links[0] and "#no-such-heading" in links[1]
    assert "`scripts/gone.py`" in links[2]


def test_the_checker_accepts_correct_commands_and_links():
    assert readme_command_problems(GOOD_README) == []
    assert link_problems(GOOD_README, REPO, "README.md") == []
