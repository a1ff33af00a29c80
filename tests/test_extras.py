"""Optional extras: the package metadata and ``extras.EXTRAS`` agree, and using a part whose extra
is missing ends in one line naming the extra (a core install is simulated by hiding its modules)."""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from braintumor.cli import app
from braintumor.extras import EXTRAS, MissingExtraError, missing_modules, require
from braintumor.models.network import TorchNetwork, load_network

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``modules`` unimportable for this test, as on an install without them."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_every_extra_is_in_the_package_metadata_and_all_installs_them() -> None:
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(optional)
    assert optional["all"] == [f"braintumor[{','.join(EXTRAS)}]"]
    assert all(missing_modules(extra) == [] for extra in EXTRAS), "the test environment installs [all]"


def test_constraints_pin_every_direct_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in (ROOT / "constraints.txt").read_text().split()
              if "==" in line}
    wanted = project["dependencies"] + [r for name, reqs in project["optional-dependencies"].items()
                                        if name != "all" for r in reqs]
    names = {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in wanted}
    assert names - pinned == set()


def test_require_names_the_extra_and_the_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "uvicorn")
    with pytest.raises(MissingExtraError, match=r"^web page needs the 'serve' extra.*no uvicorn.*braintumor\[serve\]"):
        require("serve", "web page")
    require("pacs", "DICOM output")  # installed: no error


@pytest.mark.parametrize(
    ("module", "package"), [("fastapi", "braintumor.serving"), ("highdicom", "braintumor.pacs")]
)
def test_importing_an_optional_package_without_its_extra_says_which(
    monkeypatch: pytest.MonkeyPatch, module: str, package: str
) -> None:
    hide(monkeypatch, module)
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingExtraError, match="extra"):
        importlib.import_module(package)


@pytest.mark.parametrize(
    ("arguments", "module", "extra"),
    [
        (["serve", "--port", "8765"], "fastapi", "serve"),
        (["dicom-node", "--queue", "{tmp}/q", "--send-to", "PACS@127.0.0.1:104"], "pynetdicom", "pacs"),
        (["export", "--out", "{tmp}/m.onnx"], "onnxscript", "export"),
        (["predict", "{tmp}", "--dicom-out", "{tmp}/out"], "highdicom", "pacs"),
    ],
)
def test_a_command_without_its_extra_fails_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, arguments: list[str], module: str, extra: str
) -> None:
    hide(monkeypatch, module)
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in arguments])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'braintumor[{extra}]'" in lines[0] and module in lines[0]
    assert not (tmp_path / "q").exists() and not (tmp_path / "out").exists()


def test_auto_backend_runs_torch_when_weights_need_an_export_that_is_not_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_weights: Path
) -> None:
    monkeypatch.setenv("BRAINTUMOR_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "tiny.safetensors"
    weights.write_bytes(tiny_weights.read_bytes())  # no exported graph beside it or in the cache
    hide(monkeypatch, "onnxscript")
    assert isinstance(load_network(weights, backend="auto", device="cpu"), TorchNetwork)
    with pytest.raises(MissingExtraError, match="export"):
        load_network(weights, backend="onnx", device="cpu")
