"""Packaging glue: ship templates/, models/ and model.yaml inside the installed package.

In a source checkout the package reads them from the repository root; an installed package
reads them from gpt2gen/_data/ (see gpt2gen/resources.py).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA = ["templates", "models", "model.yaml"]


class build_py_with_data(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "gpt2gen" / "_data"
        for name in DATA:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, dest / name, dirs_exist_ok=True)
            elif src.is_file():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)


setup(cmdclass={"build_py": build_py_with_data})
