"""Any name the OS allows reaches every output, and special files are never opened (issue 22, Names):
a name that is not UTF-8 in predict's CSV and table and in explain's figures, a name near the
file system's limit in explain's heat maps, a FIFO in a folder or named directly."""

from __future__ import annotations

import csv
import os
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from braintumor.cli import _png_name, app
from braintumor.data.inputs import expand_inputs, read_scan
from braintumor.errors import InvalidImageError, printable_name

ROOT = Path(__file__).resolve().parents[1]
SCAN = sorted((ROOT / "examples" / "scans" / "glioma").glob("*.jpg"))[0]
runner = CliRunner()
NOT_UTF8 = os.fsdecode(b"scan-\xff\xfe.jpg")


@pytest.fixture
def awkward_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SCAN, folder / "plain.jpg")
    shutil.copy(SCAN, folder / NOT_UTF8)
    shutil.copy(SCAN, folder / ("x" * 247 + ".jpg"))  # 251 characters: its .png would pass 255
    return folder


def test_printable_name_escapes_the_bytes_that_are_not_utf8() -> None:
    assert printable_name(NOT_UTF8) == "scan-\\xff\\xfe.jpg"
    assert printable_name("café.jpg") == "café.jpg"
    assert printable_name("\ud800.jpg") == "\\ud800.jpg"  # a lone surrogate no file system byte stands for


@pytest.mark.slow
def test_predict_reports_every_name_in_the_csv_and_the_table(awkward_folder: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(awkward_folder), "--csv", str(tmp_path / "out.csv")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "out.csv").open(encoding="utf-8")))
    assert len(rows) == 3 and all(row["label"] for row in rows)
    assert any(row["path"].endswith("scan-\\xff\\xfe.jpg") for row in rows)
    assert "scan-\\xff\\xfe.jpg" in result.stdout


@pytest.mark.slow
def test_explain_writes_a_heat_map_for_every_name(awkward_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    result = runner.invoke(app, ["explain", str(awkward_folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(out.iterdir())
    assert len(written) == 3 and all(len(os.fsencode(p.name)) <= 255 for p in written)


def test_heat_map_names_stay_short_and_unique() -> None:
    used: set[str] = set()
    first, second = _png_name("a" * 300 + "1.jpg", used), _png_name("a" * 300 + "2.jpg", used)
    assert first != second and all(len(n.encode()) <= 200 for n in (first, second))
    assert _png_name(NOT_UTF8, used) == "scan-__.jpg.png"
    assert _png_name("/scans/MR #1/IM#2.dcm", used) == "IM_2.dcm.png"  # a '#' of the name itself
    assert _png_name("/scans/MR #1/multi.dcm#frame=3", used) == "multi.dcm_frame3.png"


@pytest.fixture
def fifo_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SCAN, folder / "plain.jpg")
    os.mkfifo(folder / "pipe")  # extensionless, as DICOM exports are: opening it would block
    return folder


def test_a_fifo_in_a_folder_is_skipped_with_one_line_and_never_opened(
    fifo_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    found: list[Path] = []
    walker = threading.Thread(target=lambda: found.extend(expand_inputs([fifo_folder])), daemon=True)
    walker.start()
    walker.join(timeout=10)
    assert not walker.is_alive(), "the folder walk blocked opening the FIFO"
    assert found == [fifo_folder / "plain.jpg"]
    assert [r.getMessage() for r in caplog.records] == [f"{fifo_folder / 'pipe'}: skipped, it is a FIFO (named pipe), "
                                                        "not a file"]


def test_a_fifo_named_directly_is_refused_without_being_opened(fifo_folder: Path) -> None:
    with pytest.raises(InvalidImageError, match=r"pipe: is a FIFO \(named pipe\), not a file: not read"):
        read_scan(fifo_folder / "pipe")
