"""Every command in the README's code blocks, as written, on the tiny fixture: the README's
placeholder variable (MODEL, "your local HF directory") set to the fixture's directory, nothing
else changed. What needs a GPU, a run of the real model or the network is checked with --help;
install commands are checked against pyproject.toml's extras; the test suite is collected."""
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# Commands that need GPUs, a run of the real model or the network: their program's --help.
HELP_ONLY = (
    ("python", "-m", "abscot_jax.demo"),  # minutes; tests/test_rounds.py runs the same driver
    ("python", "-m", "abscot_jax.train"),
    ("python", "-m", "abscot_jax.eval"),
    ("bash", "scripts/gpu_check.sh"),
    ("hf", "download"),
)


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, a line split at `&&` into its commands."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [part.strip() for block in blocks for line in block.splitlines() if line.strip()
            for part in line.split(" && ")]


def check_install(args: list[str]) -> None:
    """pip install: the extras named exist in pyproject.toml and a constraints file is there."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for arg in args:
        match = re.fullmatch(r"\.\[(.*)\]", arg)
        for extra in match.group(1).split(",") if match else ():
            assert extra in extras, f"README installs the extra {extra!r}, which pyproject.toml does not define"
    if "-c" in args:
        assert (REPO / args[args.index("-c") + 1]).is_file()


def run(args: list[str], cwd: Path, env: dict) -> None:
    program = [sys.executable, *args[1:]] if args[0] == "python" else args
    done = subprocess.run(program, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{shlex.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_every_readme_command_runs_as_written(tmp_path, tiny_hf_dir):
    work = tmp_path / "clone"  # where the commands run: the repository's files, outputs kept apart
    work.mkdir()
    for name in ("configs", "convert", "scripts"):
        (work / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OUT": str(tmp_path / "gpu_check")}
    placeholders = {"MODEL": str(tiny_hf_dir)}
    commands = readme_commands()
    assert len(commands) >= 10
    ran = []
    for command in commands:
        args = shlex.split(command, comments=True)
        assignment = re.fullmatch(r"([A-Z_]+)=(.*)", args[0]) if len(args) == 1 else None
        if assignment:  # a placeholder the README tells the reader to set
            name = assignment.group(1)
            assert name in placeholders, f"README sets {name}; this test knows no value for it"
            env[name] = placeholders[name]
            continue
        args = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], a) for a in args]  # as the shell expands them
        if args[0].endswith("pip") and args[1] == "install":
            check_install(args)
        elif args[:3] == ["python", "-m", "venv"]:
            pass  # the standard library's
        elif args[:3] == ["python", "-m", "pytest"]:
            run([*args, "--collect-only", "-q"], REPO, env)  # the suite runs on its own, not inside itself
        elif any(tuple(args[:len(prefix)]) == prefix for prefix in HELP_ONLY) or "runs/" in command:
            program = args[:2] if args[0] == "hf" or args[1] != "-m" else args[:3]
            run([*program, "--help"], work, env)
        else:
            run(args, work, env)
            ran.append(args[1] if args[0] == "python" and args[1] != "-m" else " ".join(args[:3]))
    # What ran for real: the architecture check and the conversions, on the tiny fixture.
    assert ran == ["python -m abscot_jax.plan", "convert/qwen3_tokenizer.py", "convert/hf_to_flax.py",
                   "convert/flax_to_hf.py"]
    assert (work / "hf" / "qwen3-4b" / "config.json").is_file()
