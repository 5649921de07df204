"""The base install and its extras: what a gateway host gets, and the one line a missing extra prints.

The CLI is run for real (`python -m proxy ...` in a child process), with an optional package made
unimportable in that child by a meta-path finder installed before the CLI starts: exactly what a host
without the extra sees. The dependency lists are read from pyproject.toml itself.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"

# A child that cannot import the comma-separated top-level names in argv[1], then runs the CLI.
_PRELUDE = """
import sys
blocked = sys.argv[1].split(",")
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Refuse())
from proxy.commands.cli import main
sys.exit(main(sys.argv[2:]))
"""


def cli_without(blocked: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PRELUDE, blocked, *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(("blocked", "args", "extra"), [
    ("moto", ["demo"], "demo"),
    ("jsonschema", ["parity", "--a", "http://127.0.0.1:9", "--b", "http://127.0.0.1:9", "--golden",
                    str(PYPROJECT.parent / "loadtest/golden/sample.jsonl")], "tools"),
])
def test_a_missing_extra_is_one_line_naming_the_install_command(blocked, args, extra):
    r = cli_without(blocked, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"needs the '{extra}' extra" in lines[0]
    assert f"pip install 'spotinference[{extra}]'" in lines[0]
    assert f"pip install -e '.[{extra}]'" in lines[0]
    assert "Traceback" not in r.stderr


def test_a_missing_module_that_is_no_extra_is_a_bug_and_raises():
    r = cli_without("msgspec", "check-config", "--help")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ModuleNotFoundError" in r.stderr
    assert "extra" not in r.stderr


def test_the_gateway_commands_need_no_extra():
    # serve, keys, usage, check-config, backend and sim run on the base install: no tool package.
    blocked = "openai,pydantic,jsonschema,moto,flask,werkzeug,locust,gevent"
    for command in ("serve", "keys", "usage", "sim", "check-config", "backend", "bench"):
        r = cli_without(blocked, command, "--help")
        assert r.returncode == 0, (command, r.stderr)


def _requirement_names(reqs: list[str]) -> set[str]:
    names = set()
    for req in reqs:
        name = req.split(";")[0]
        for sep in "<>=![ ":
            name = name.split(sep)[0]
        names.add(name.lower())
    return names


def test_the_base_install_holds_no_tool_and_dev_holds_every_extra():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    base = _requirement_names(project["dependencies"])
    assert base.isdisjoint({"openai", "moto", "locust", "jsonschema", "pydantic", "pytest"}), base
    extras = project["optional-dependencies"]
    dev = set(extras["dev"])
    for name, reqs in extras.items():
        if name in ("dev", "gpu"):  # vLLM runs on GPU hosts only, never in the test suite
            continue
        assert set(reqs) <= dev, (name, set(reqs) - dev)
