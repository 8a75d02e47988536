"""Every example of the README runs as written, in order (on CPU, in a scratch folder): the bash blocks with
``.venv/bin/`` meaning this interpreter's environment and ``/tmp/`` a fresh temporary folder, each python
block in a fresh interpreter. Blocks preceded by ``<!-- readme-test: skip (why) -->`` are not run (the
install command, the test suite itself)."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
BLOCK = re.compile(r"(?P<marker><!-- readme-test: skip[^>]*-->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


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


def test_every_readme_example_runs_in_order(tmp_path):
    bin_dir = pathlib.Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "JAX_PLATFORMS": "cpu"}
    ran = 0
    for lang, code, skipped in readme_blocks():
        if skipped:
            continue
        code = code.replace("/tmp/", f"{tmp_path}/").replace(".venv/bin/", f"{bin_dir}/")  # bin_dir may be in /tmp
        if lang == "bash":
            command = ["bash", "-euo", "pipefail", "-c", code]
        elif lang == "python":
            command = [sys.executable, "-c", code]
        else:
            raise AssertionError(f"README block of language {lang!r}: mark it skipped or teach this test")
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README block failed:\n{code}\n--- stderr:\n{result.stderr[-3000:]}"
        ran += 1
    assert ran >= 4
    assert (tmp_path / "y.npy").exists()
