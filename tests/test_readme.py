"""The README's Python examples run as written (on a real clip in place of interview.mp4)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(_python_blocks()) == 4


@pytest.mark.parametrize("index", range(4))
def test_a_readme_example_runs(index, media_dir, tmp_path, monkeypatch, capsys):
    code = _python_blocks()[index]
    monkeypatch.chdir(tmp_path)
    code = code.replace('"interview.mp4"', repr(str(media_dir / "single_face.mp4")))
    exec(compile(code, f"README example {index + 1}", "exec"), {})
    if '"report/"' in code:
        assert (tmp_path / "report" / "summary.json").is_file()
    if "writers=" in code:  # a writer of one's own: nothing written, its counts printed
        assert list(tmp_path.iterdir()) == []
        assert capsys.readouterr().out.strip().startswith("{")
    if index == 0:  # the iterator printed the facts and the events of single_face.mp4
        assert capsys.readouterr().out.splitlines()[0] == "640 360 30.0"


def test_public_names_are_what_they_say_after_every_submodule_is_imported():
    """`from realtime_mer import analyze` must give the function even once the submodules are
    loaded (a submodule of the same name would take its place on the package)."""
    import importlib
    import types

    import realtime_mer

    for module in set(realtime_mer._PUBLIC.values()):
        importlib.import_module(f"realtime_mer.{module}")
    for name in realtime_mer.__all__:
        assert not isinstance(getattr(realtime_mer, name), types.ModuleType), name
