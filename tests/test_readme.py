"""Every example of the README runs as written, in order, as a user runs them in one shell session (on CPU,
from a scratch folder standing in for the repository root): ``.venv/bin/`` means this interpreter's
environment, the variables a bash block exports reach the later blocks, and ``mktemp`` makes its folders under
a scratch ``TMPDIR``. Each python block runs in a fresh interpreter. Blocks preceded by
``<!-- readme-test: skip (why) -->`` are not run (the install command, the test suite itself).

A second session then runs again every block that wrote files in the first, as a second run (or a second user
of the machine) does: fixed paths would collide there ("non-empty folder"). And every bash block must stop at
its first failing command: a block that runs on after one would act on a stale or foreign checkpoint.
"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
BLOCK = re.compile(r"(?P<marker><!-- readme-test: skip[^>]*-->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)
BIN = pathlib.Path(sys.executable).parent


def readme_blocks() -> list[tuple[str, str, bool]]:
    """``(language, code, skipped)`` of every fenced block, in order."""
    text = (ROOT / "README.md").read_text()
    return [(m["lang"], m["code"], m["marker"] is not None) for m in BLOCK.finditer(text)]


def test_the_readme_has_its_two_setup_commands_first():
    (lang1, code1, skip1), (lang2, code2, skip2) = readme_blocks()[:2]
    assert "scripts/install.sh" in code1 and ".venv/bin/quarkmoe demo" in code1
    assert ".venv/bin/python -m pytest" in code2 and skip1 and skip2
    ci = (ROOT / ".ci" / "run").read_text()
    assert code1.strip() in ci and code2.strip() in ci  # CI runs exactly these


class Session:
    """One user's shell session: the environment that the bash blocks export carries over to later blocks."""

    def __init__(self, scratch: pathlib.Path):
        self.scratch = scratch
        self.state = scratch / ".session-env"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "JAX_PLATFORMS": "cpu",
            "TMPDIR": str(scratch / "tmp"),
        }

    def run(self, lang: str, code: str) -> subprocess.CompletedProcess:
        code = code.replace(".venv/bin/", f"{BIN}/")
        if lang == "bash":  # as typed into an interactive shell: no -e; on exit, the environment is kept
            script = f"trap 'env -0 > \"{self.state}\"' EXIT\n{code}"
            command = ["bash", "-c", script]
        elif lang == "python":
            command = [sys.executable, "-c", code]
        else:
            raise AssertionError(f"README block of language {lang!r}: mark it skipped or teach this test")
        cwd = self.scratch / "repo"
        result = subprocess.run(command, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=600)
        if lang == "bash" and self.state.exists():
            pairs = (item.split("=", 1) for item in self.state.read_text().split("\0") if "=" in item)
            self.env = dict(pairs)
            self.state.unlink()
        return result


def _files(folder: pathlib.Path) -> set[pathlib.Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_every_readme_example_runs_in_order_and_runs_again(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "tmp").mkdir()
    blocks = [(lang, code) for lang, code, skipped in readme_blocks() if not skipped]
    assert len(blocks) >= 4
    for _, code in blocks:
        assert "/tmp/" not in code, f"a fixed path under /tmp is shared by every run and user:\n{code}"

    def run_session(blocks):
        session, writers = Session(tmp_path), []
        try:
            for lang, code in blocks:
                before = _files(tmp_path)
                result = session.run(lang, code)
                assert result.returncode == 0, f"README block failed:\n{code}\n--- stderr:\n{result.stderr[-3000:]}"
                if _files(tmp_path) - before:
                    writers.append((lang, code))
        finally:  # the session's user stops the server it started (the second session reruns only the start)
            server = session.env.get("QUARKMOE_SERVER")
            if server:
                subprocess.run(["kill", server], capture_output=True)
        return session, writers

    first, writers = run_session(blocks)
    examples = pathlib.Path(first.env["QUARKMOE_EXAMPLES"])
    assert (examples / "y.npy").exists() and tmp_path / "tmp" in examples.parents
    assert len(writers) >= 2  # the checkpoint and the run-layer blocks
    second, _ = run_session(writers)  # a second run on the same machine: every block that wrote files, again
    assert pathlib.Path(second.env["QUARKMOE_EXAMPLES"]) != examples


def test_each_readme_bash_block_stops_at_its_first_failing_command(tmp_path):
    """Every tool a block calls is replaced by one that logs its call and fails: each block must stop after
    the first call, with a non-zero status."""
    stubs, log = tmp_path / "stubs", tmp_path / "calls.log"
    stubs.mkdir()
    for tool in ("quarkmoe", "python"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "$0 $*" >> "{log}"\nexit 1\n')
        (stubs / tool).chmod(0o755)
    (stubs / "curl").write_text("#!/bin/sh\nexit 7\n")  # no server answers (another test's may be on the port)
    (stubs / "curl").chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    checked = 0
    for lang, code, skipped in readme_blocks():
        if skipped or lang != "bash" or ".venv/bin/" not in code:
            continue  # a block that calls none of the tools (e.g. `kill`) has no tool failure to stop at
        log.unlink(missing_ok=True)
        script = code.replace(".venv/bin/", f"{stubs}/")
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
        calls = log.read_text().splitlines() if log.exists() else []
        assert len(calls) == 1 and result.returncode != 0, f"block ran on after a failure:\n{code}\ncalls: {calls}"
        checked += 1
    assert checked >= 3
