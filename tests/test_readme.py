"""The README is the user's manual: it is what ``scripts/build_readme.sh`` assembles, its Python snippet is the one
the API test runs, it quotes no unfilled placeholder, and every ``massedit edit|eval|train|stats`` command in its
shell blocks composes into a valid config (keys, options and values exist), so a renamed key cannot leave a stale
example behind."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# the data variables the README defines once ($CF, ...): composing does not read the files
VARS = {"CF": "counterfact.json", "CF_REDUCED": "counterfact_reduced_train.json", "ZSRE": "zsre_eval.json",
        "ZSRE_TRAIN": "zsre_train.json", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2"}
JOBS = ("edit", "eval", "train", "stats", "reproduce")


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """``(job, overrides)`` for every massedit job command of the README's shell blocks."""
    out = []
    for block in _shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for k, v in VARS.items():
                line = line.replace(f"${k}", v)
            words = shlex.split(line)
            if "massedit" not in words:
                continue
            i = words.index("massedit")
            if i + 1 >= len(words) or words[i + 1] not in JOBS:
                continue
            args = [w for w in words[i + 2:] if w not in ("--cfg", "--help")]
            out.append((words[i + 1], args))
    return out


def test_readme_is_assembled_from_its_parts(tmp_path):
    before = README.read_text()
    subprocess.run(["bash", str(REPO / "scripts" / "build_readme.sh")], check=True)
    after = README.read_text()
    if before != after:
        README.write_text(before)
    assert before == after, "README.md differs from docs/readme/*.md: run scripts/build_readme.sh"


def test_readme_has_no_unfilled_placeholders():
    assert "@@" not in README.read_text()


def test_readme_python_snippet_is_the_tested_one():
    from tests.test_api import SNIPPET

    assert SNIPPET.strip() in README.read_text()


COMMANDS = _commands(README.read_text())


def test_readme_has_commands_to_check():
    assert len(COMMANDS) >= 40, len(COMMANDS)


@pytest.mark.parametrize("job,args", COMMANDS, ids=[" ".join([j, *a])[:90] for j, a in COMMANDS])
def test_readme_command_composes(job, args, tmp_path):
    from massedit.tasks.config import compose

    args = list(args)
    config_dir: list[str] = []
    if "--config-dir" in args:  # the README's example of a user config dir: give it the file it names
        i = args.index("--config-dir")
        d = tmp_path / "my_configs"
        (d / "method").mkdir(parents=True)
        (d / "method" / "my_memit.yaml").write_text("_base_: memit\nmom2_update_weight: 5000\n")
        config_dir = [str(d)]
        del args[i:i + 2]
    overrides = [a for a in args if "=" in a]
    if job == "reproduce":  # `massedit reproduce EXPERIMENT key=value ...`
        overrides = args[:1] + overrides
    assert len(overrides) == len(args), f"unexpected arguments in a README command: {args}"
    if job == "reproduce":
        from massedit.tasks.reproduce import load_reproduce_config

        experiment, rest = args[0], args[1:]
        assert experiment in ("scaling", "table2"), args
        load_reproduce_config(experiment, rest)
        return
    if job == "stats":
        job = "edit"  # `massedit stats` composes the edit config (docs/readme/stats.md)
    if any(a.startswith("model.name_or_path=/") for a in overrides):
        pytest.skip("a local model directory the README names as an example")
    compose(job, overrides, config_dir)
