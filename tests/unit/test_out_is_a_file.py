"""An --out that names a file is refused in one sentence before any work (here: before the
model, which does not exist, is even looked for)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mechscope.cli.main import app


@pytest.mark.parametrize("args", [
    ["icl", "--task", "antonyms", "--model", "{missing}"],
    ["probe", "--labels", "capitalised", "--model", "{missing}"],
    ["confusion", "--model", "{missing}"],
    ["vision", "train", "--epochs", "1"],
    ["vision", "circuit", "--model", "{missing}", "--concept", "3"],
    ["vision", "compose", "--model", "{missing}"],
    ["vision", "attack", "--model", "{missing}"],
    ["vision", "eap", "--model", "{missing}", "--clean", "3", "--corrupt", "5"],
])
def test_out_naming_a_file_is_refused_first(tmp_path, args):
    f = tmp_path / "taken.txt"
    f.write_text("not a folder")
    r = CliRunner().invoke(app, [a.replace("{missing}", str(tmp_path / "no-model")) for a in args] + ["--out", str(f)])
    assert r.exit_code == 2, r.output
    assert f"{f} is a file; --out must name a folder." in " ".join(r.output.split()) and "Traceback" not in r.output
    assert f.read_text() == "not a folder"
