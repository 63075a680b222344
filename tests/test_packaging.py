import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_of_vqa2cli_goes_into_the_wheel():
    # A package missing from this list installs without it: `vqa2` then dies on import (the CI wheel check
    # found vqa2cli.finetune missing), while these tests, importing the source tree, pass.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "vqa2cli").rglob("__init__.py")}
    assert on_disk <= set(setuptools["packages"])
