"""The documentation cannot rot: what README.md and docs/ show is run here.

* **Every documented command.** Each shell line of a ```bash block in README.md and docs/**/*.md
  that starts with ``clbench``, ``python -m clbench`` or ``python run_suite.py`` (after ``&&``
  too), and each such command written as inline code in their text, runs in a scratch folder
  (each distinct one once): a sweep with ``--dry-run`` added (it plans, checks and prints,
  and trains nothing); a sub-command is parsed by its own parser (an unknown option fails as
  it would for a user) and answers ``--help``. A sweep must exit 0, or, on a real benchmark
  whose data or pretrained weights are not on this machine, exit 2 having printed its plan with
  no failed check but those (and the disk space for its checkpoints, which depends on the
  machine as they do; docs/troubleshooting.md documents that exit). A line that
  shows an error on purpose says so in its comment (``# exit 2``) and must exit with that code.
  ``/data`` in a command is the scratch folder's ``data/``, which holds a small folder of class
  folders for ``--bench folder:/data/my_birds``.
* **The examples are files that run.** ``docs/examples/head_only.py`` (the method of "Adding a
  method") and ``docs/examples/my_plugin.py`` (the plugin) learn one task here; every code block
  preceded by ``<!-- file: PATH -->`` must equal that file, and each example is shown somewhere.
* **Links and size.** Every relative link resolves (its #anchor too), every docs page is linked
  from the README, and the README stays within 10,000 bytes.

The commands (about 90 runs of the command line) run in one driver process that imports torch
once and forks per command: under a second each instead of a torch import each, so the whole file
takes well under a minute on an idle 2-core machine. POSIX only (``os.fork``), as the harness.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clbench import catalog
from clbench.benchmarks import BENCHMARKS
from clbench.catalog import add_recipe_dir, import_plugins
from clbench.cli import SUBCOMMANDS
from clbench.methods import METHODS
from clbench.protocol import Run
from clbench.recipes import resolve_config
from clbench.request import check_request

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").rglob("*.md"))
DOCUMENTS = [README, *PAGES]
CHANGELOG = REPO / "CHANGELOG.md"
EXAMPLES = REPO / "docs" / "examples"
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
README_LIMIT = 10_000

FENCE = re.compile(r"^\s*```(\S*)\s*$")  # in a list item too
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
EXIT_NOTE = re.compile(r"\bexit (\d+)\b")
# The checks a dry run on a real benchmark may fail on a machine without its data, its weights,
# or the disk space its checkpoints need (a 155-run SLURM sweep: about 99 GiB)
MISSING_FILES = re.compile(r"^FAIL ((data|weights) of |output folder .* GiB free on its file system)")


# ----------------------------------------------------------------------------- reading the docs


def blocks(path: Path) -> list[tuple[str, int, str, str]]:
    """The fenced code blocks of a Markdown file: (language, first line number, text, the line
    before the fence)."""
    found, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        before = lines[i - 1] if i > 0 else ""
        found.append((opening.group(1), i + 2, "\n".join(lines[i + 1:end]) + "\n", before))
        i = end + 1
    return found


@dataclass
class Command:
    where: str  # file:line
    entry: str  # "clbench" or "run_suite.py"
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    expect: int | None = None  # an exit code the docs announce (# exit N)
    kind: str = "run"  # run: as given (a sweep gets --dry-run); parse: a sub-command's parser only

    def __str__(self) -> str:
        return f"{self.where}: {self.entry} {shlex.join(self.argv)}"


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its comment: from the first ``#`` outside quotes that starts a word."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:]
    return line, ""


def commands_in(text: str, where: str) -> list[Command]:
    """The clbench command lines of a shell block (continuation lines joined; ``&&`` and ``;``
    split), each with its environment assignments and the exit code its comment announces."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        code, comment = split_comment(line)
        try:
            tokens = shlex.split(code)
        except ValueError as err:
            raise AssertionError(f"{where}: cannot parse the shell line {line!r}: {err}") from None
        note = EXIT_NOTE.search(comment)
        part: list[str] = []
        for token in tokens + [";"]:
            if token not in ("&&", ";", "||"):
                part.append(token)
                continue
            env = {}
            while part and ASSIGNMENT.match(part[0]):
                name, _, value = part.pop(0).partition("=")
                env[name] = value
            entry, argv = None, []
            if part[:1] == ["clbench"]:
                entry, argv = "clbench", part[1:]
            elif part[:3] == ["python", "-m", "clbench"]:
                entry, argv = "clbench", part[3:]
            elif part[:2] == ["python", "run_suite.py"]:
                entry, argv = "run_suite.py", part[2:]
            if entry is not None:
                argv = [re.sub(r"^(folder:)?/data(?=/|$)", r"\1data", a) for a in argv]  # the scratch data/
                found.append(Command(where, entry, argv, env, int(note.group(1)) if note else None))
            part = []
    return found


INLINE_COMMAND = re.compile(r"`((?:clbench|python -m clbench|python run_suite\.py)(?: [^`]*)?)`")


def documented_commands() -> list[Command]:
    """Every command the documents show, in shell blocks and as inline code in the text, each
    distinct one once."""
    found: dict[str, Command] = {}
    for path in DOCUMENTS:
        shown = []
        for language, line, text, _ in blocks(path):
            if language in SHELL_BLOCKS:
                shown += commands_in(text, f"{path.relative_to(REPO)}:{line}")
        prose = re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.S | re.M)
        for span in INLINE_COMMAND.findall(prose):
            shown += commands_in(span, f"{path.relative_to(REPO)} (inline)")
        for command in shown:
            found.setdefault(json.dumps([command.entry, command.argv, command.env, command.expect]), command)
    return list(found.values())


def runs_of(command: Command) -> list[Command]:
    """What the test runs for one documented command: a sweep with --dry-run; a sub-command
    parsed, then asked for --help; anything with --help as it is."""
    argv = command.argv
    if "--help" in argv or "-h" in argv:
        return [command]
    if argv and argv[0] in SUBCOMMANDS:
        return [Command(command.where, command.entry, argv, command.env, command.expect, kind="parse"),
                Command(command.where, command.entry, [argv[0], "--help"], command.env)]
    return [Command(command.where, command.entry, argv if "--dry-run" in argv else [*argv, "--dry-run"],
                    command.env, command.expect)]


# ----------------------------------------------------------------------------- running them

# Imports torch and the command line once, then runs each command in a fork of itself, its output
# to files; prints one JSON line of exit codes.
DRIVER = r"""
import argparse, importlib, json, os, runpy, sys, time, traceback
import torch  # noqa: F401  (once, before the forks)
import clbench.cli as cli
import clbench.preflight, clbench.sweep  # noqa: F401
jobs = json.loads(sys.stdin.read())
codes = []
for job in jobs:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.environ.update(job["env"])
            argv = job["argv"]
            if job["kind"] == "parse":
                module, about = cli.SUBCOMMANDS[argv[0]]
                add_arguments, _ = importlib.import_module(module).COMMANDS[argv[0]]
                parser = argparse.ArgumentParser(prog="clbench " + argv[0], description=about)
                add_arguments(parser)
                parser.parse_args(argv[1:])
                code = 0
            elif job["entry"] == "run_suite.py":
                sys.argv = [job["script"], *argv]
                runpy.run_path(job["script"], run_name="__main__")
                code = 0
            else:
                sys.argv = ["clbench", *argv]
                code = cli.main(argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    deadline = time.time() + job["timeout_s"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes.append(os.waitstatus_to_exitcode(status))
            break
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            codes.append("timeout")
            break
        time.sleep(0.05)
print(json.dumps(codes))
"""


def scratch_folder(root: Path) -> Path:
    """Where the commands run: the repository's docs/ (the examples' paths), and data/ with a
    folder of class folders for the "your own data" example; nothing else."""
    root.mkdir(parents=True)
    (root / "docs").symlink_to(REPO / "docs")
    birds = root / "data" / "my_birds"
    rng = np.random.RandomState(0)
    for c in range(10):
        (birds / f"bird_{c}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.randint(0, 255, (24, 24, 3), dtype=np.uint8)).save(birds / f"bird_{c}" / f"{i}.png")
    return root


def run_all(runs: list[Command], scratch: Path, logs: Path) -> list[tuple[Command, int | str, str, str]]:
    jobs = []
    for i, run in enumerate(runs):
        jobs.append({**asdict(run), "script": str(REPO / "run_suite.py"), "timeout_s": 300,
                     "stdout": str(logs / f"{i}.out"), "stderr": str(logs / f"{i}.err")})
    env = {k: v for k, v in os.environ.items() if k not in ("CLBENCH_RESULTS", "CLBENCH_DATA", "CLBENCH_SLURM_PROFILE")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", CLBENCH_JOBS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(jobs), capture_output=True, text=True,
                          cwd=scratch, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    return [(run, code, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
            for i, (run, code) in enumerate(zip(runs, codes))]


def problem(run: Command, code: int | str, out: str, err: str) -> str | None:
    """Why a documented command's run does not do what its page says, or None."""
    if run.expect is not None and run.kind == "run":
        return None if code == run.expect else f"exit {code}, the page says exit {run.expect}"
    if code == 0:
        return None
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    if (code == 2 and run.kind == "run" and "runs planned" in out and failed
            and all(MISSING_FILES.match(line) for line in failed)):
        return None  # a real benchmark's plan, printed, whose data or weights are not here
    return f"exit {code}"


# ----------------------------------------------------------------------------- the tests


def test_the_documents_show_enough_commands_to_test():
    commands = documented_commands()
    shown = {" ".join([c.entry, *c.argv]) for c in commands}
    assert "run_suite.py" in shown  # the quick start: `pip install -e . && python run_suite.py`
    assert any(c.argv[:1] == ["probe"] for c in commands)
    assert len(commands) >= 30, [str(c) for c in commands]


def test_every_documented_command_runs(tmp_path):
    scratch = scratch_folder(tmp_path / "scratch")
    logs = tmp_path / "logs"
    logs.mkdir()
    runs = [run for command in documented_commands() for run in runs_of(command)]
    failures = []
    for run, code, out, err in run_all(runs, scratch, logs):
        why = problem(run, code, out, err)
        if why:
            failures.append(f"{run} ({run.kind}): {why}\n{(out + err)[-1500:]}")
    assert not failures, f"{len(failures)} of {len(runs)} documented commands fail:\n\n" + "\n\n".join(failures)


# -- the examples


@pytest.fixture
def registries():
    """The method and benchmark registries, recipe folders and plugin modules as they were
    before the test: an example registers into them, and no later test must see it."""

    saved = (dict(METHODS), dict(BENCHMARKS), list(catalog.PLUGIN_RECIPE_DIRS), dict(catalog._PLUGIN_FILES),
             set(sys.modules))
    yield
    for registry, before in ((METHODS, saved[0]), (BENCHMARKS, saved[1]), (catalog._PLUGIN_FILES, saved[3])):
        registry.clear()
        registry.update(before)
    catalog.PLUGIN_RECIPE_DIRS[:] = saved[2]
    for name in set(sys.modules) - saved[4]:
        if name.startswith("clbench_plugin_"):
            del sys.modules[name]


def learn_first_task(bench: str, num_tasks: int, method: str, out: Path, overrides: dict | None = None):
    """One task of a run, through the run's public steps: the accuracy after it, and the run."""
    run = Run(resolve_config(bench, num_tasks, method, 0, overrides=overrides, device="cpu"), out, progress=False)
    run.prepare()
    task = run.task(0)
    trainable = run.learn(task)
    correct, total = run.evaluate(0)
    return 100 * sum(correct) / sum(total), trainable, run


def test_the_method_example_learns_a_task_and_resumes(tmp_path, registries, one_thread):
    assert check_request(["toy"], [3], ["head_only"], [0], None)  # unknown until it is registered
    import_plugins([str(EXAMPLES / "head_only.py")])
    refused = check_request(["toy"], [3], ["head_only"], [0], None)  # registered, but no recipe yet
    assert len(refused) == 1 and "has no recipe" in refused[0]
    add_recipe_dir(EXAMPLES)
    assert check_request(["toy", "synth"], None, ["head_only"], [0], None) == []
    acc, trainable, run = learn_first_task("toy", 3, "head_only", tmp_path)  # toy: 4 solid colours per task
    assert acc > 25 and trainable == run.method.feature_dim * 4 + 4  # above chance; the head's new rows alone
    # a resumed run grows a fresh method through the finished tasks, then loads the state
    fresh = METHODS["head_only"](run.method.backbone, run.method.config, run.method.num_classes, 3)
    fresh.grow(run.task(0))
    fresh.load_state_dict(run.method.state_dict())
    x, _ = next(iter(run.task(0).batches()))
    assert (fresh.eval().predict(x) == run.method.predict(x)).all()


def test_the_plugin_example_brings_a_method_and_a_benchmark(tmp_path, registries, one_thread):
    import_plugins([str(EXAMPLES / "my_plugin.py")])
    assert "head_only" in METHODS and BENCHMARKS["blobs"].num_classes == 20
    config = resolve_config("blobs", 5, "head_only", 0, device="cpu")
    assert (config.train.epochs, config.train.batch_size, config.data.image_size or 32) == (20, 128, 32)
    # synth's backbone untrained (no 2-minute pretraining in a test); 40 small steps instead of 20 large ones
    acc, _, run = learn_first_task("blobs", 5, "head_only", tmp_path,
                                   {"backbone": {"pretrained": False}, "train": {"epochs": 5, "batch_size": 16}})
    assert run.scenario.sizes == [4] * 5
    assert acc > 25  # above chance (25%) on a task's 4 classes, even on an untrained backbone's features


def test_the_docs_show_the_example_files_as_they_are():
    shown = set()
    for path in DOCUMENTS:
        for _, line, text, before in blocks(path):
            marker = re.fullmatch(r"<!-- file: (\S+) -->", before.strip())
            if marker:
                source = REPO / marker.group(1)
                assert text == source.read_text(), (f"{path.relative_to(REPO)}:{line} differs from {marker.group(1)}; "
                                                    f"copy the file into the page again")
                shown.add(marker.group(1))
    assert shown >= {"docs/examples/head_only.py", "docs/examples/head_only.yaml", "docs/examples/my_plugin.py"}


# -- links and the README


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_every_relative_link_resolves():
    broken = []
    for path in [*DOCUMENTS, CHANGELOG]:
        text = re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_short_and_links_every_page():
    assert len(README.read_bytes()) <= README_LIMIT
    readme = README.read_text()
    pages = [p for p in PAGES if p.parent == REPO / "docs"] + [REPO / "docs" / "methods" / "README.md"]
    assert len(pages) >= 14
    unlinked = [str(p.relative_to(REPO)) for p in pages if f"]({p.relative_to(REPO)})" not in readme]
    assert not unlinked, f"pages the README does not link: {unlinked}"


def test_the_synth_table_reads_the_same_in_the_readme_and_its_page():
    def table(path: Path) -> str:
        text = path.read_text()
        start = text.index("| Method | N=10 Acc | N=10 AAA |")
        return text[start:text.index("\n\n", start)]

    assert table(README) == table(REPO / "docs" / "synthetic-benchmark.md")
