"""Build hook, nothing else (the project's metadata is in pyproject.toml).

The shipped default engine lives in ``engines/`` at the top of the repository, where the design
puts it and where an editable install (the README's) reads it. A wheel holds only packages, so
a plain ``pip install .`` or ``pip install git+URL`` would leave ``mer`` without its engine:
this hook copies the default engine and its manifest into the wheel as ``realtime_mer/engines/``,
where ``realtime_mer.runtime.default_engine_path`` looks when there is no repository beside it.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# The default engine of realtime_mer/runtime/backends.py (_DEFAULT_ENGINE); tests/test_install.py
# builds a wheel and checks that it carries exactly that engine, byte for byte.
DEFAULT_ENGINE = "ststnet_cv6_mirror_shift2_cal_3db.onnx"
ROOT = Path(__file__).resolve().parent


class BuildPyWithEngine(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads engines/ in place
        target = Path(self.build_lib) / "realtime_mer" / "engines"
        target.mkdir(parents=True, exist_ok=True)
        for name in (DEFAULT_ENGINE, DEFAULT_ENGINE + ".json"):
            shutil.copyfile(ROOT / "engines" / name, target / name)


setup(cmdclass={"build_py": BuildPyWithEngine})
