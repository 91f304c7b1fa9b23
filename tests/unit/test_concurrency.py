"""Two processes, one output (session 39's concurrency sweep): a second command into an --out
another run is writing is refused in one sentence, the lock goes with its process however it
ends, auto-named folders never collide, a result of two files from two saves is refused, and a
checkpoint appears only once it is whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechscope import lock
from mechscope.errors import MechscopeError
from tests.helpers.cli_inprocess import run_cli

_HOLDER = """
import sys, time
sys.path.insert(0, {src!r})
from mechscope import lock
ok = lock.try_lock(sys.argv[1], shared=sys.argv[2] == "shared") is None
print("held" if ok else "busy", flush=True)
time.sleep(60)
"""


def _holder(tmp_path: Path, target: Path, shared: bool = False) -> subprocess.Popen:
    """Another process holding the lock on ``target`` until killed."""
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER.format(src=str(Path(lock.__file__).parents[1])))
    p = subprocess.Popen([sys.executable, str(script), str(target), "shared" if shared else "exclusive"],
                         stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


@pytest.fixture(autouse=True)
def _own_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))


def test_a_second_command_into_a_busy_out_is_refused_and_the_lock_dies_with_its_process(tmp_path, tiny_gpt2_dir):
    out = tmp_path / "run"
    holder = _holder(tmp_path, out)
    try:
        r = run_cli("lens", "When Mary and John went", "--model", tiny_gpt2_dir, "--out", str(out))
        assert r.returncode == 2
        assert f"another mechscope run (pid {holder.pid}, started" in r.stderr and "give this run its own --out" in r.stderr
        assert not out.exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run_cli("lens", "When Mary and John went", "--model", tiny_gpt2_dir, "--out", str(out)).returncode == 0
    # the command released its lock when it ended: the same process runs it again, and so does another
    assert run_cli("lens", "When Mary and John went", "--model", tiny_gpt2_dir, "--out", str(out)).returncode == 0
    assert lock.held() == set()
    _holder(tmp_path, out).kill()


def test_auto_named_folders_skip_a_name_another_run_holds(tmp_path, monkeypatch):
    from mechscope.cli import common

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common.time, "strftime", lambda fmt: "20261207-000000")
    holder = _holder(tmp_path, tmp_path / "mechscope-x-20261207-000000")
    try:
        got = common.handles_errors(lambda: common.fresh_dir("x"))()
        assert got == Path("mechscope-x-20261207-000000-1")
    finally:
        holder.kill()
        holder.wait()


def test_a_shared_lock_knows_when_it_is_alone(tmp_path):
    db = tmp_path / "units.db"
    holder = _holder(tmp_path, db, shared=True)
    try:
        assert lock.try_lock(db, shared=True) is None
        assert not lock.sole_holder(db)  # the other pass still writes it: its database is not removed
    finally:
        holder.kill()
        holder.wait()
    assert lock.sole_holder(db)
    lock.release()


def test_a_result_whose_two_files_come_from_two_saves_is_refused(tmp_path, tiny_gpt2):
    from mechscope.lens.tuned import TunedLens

    a, b = TunedLens.identity(tiny_gpt2), TunedLens.identity(tiny_gpt2)
    with torch.no_grad():
        b.bias.add_(0.5)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert torch.equal(TunedLens.load(tmp_path / "b").bias, b.bias)
    (tmp_path / "a" / "tuned_lens.safetensors").write_bytes((tmp_path / "b" / "tuned_lens.safetensors").read_bytes())
    with pytest.raises(MechscopeError, match="from another save than its JSON"):
        TunedLens.load(tmp_path / "a")
    # equal results write equal files: the digest is of the content
    a.save(tmp_path / "a2")
    assert (tmp_path / "a" / "tuned_lens.json").read_text() == (tmp_path / "a2" / "tuned_lens.json").read_text()


def test_a_circuit_json_beside_another_saves_mask_is_refused(tmp_path):
    from mechscope.results import check_tensors_match, save_with_json

    save_with_json(tmp_path / "r", "x.json", {"k": 1}, "x.safetensors", {"t": torch.arange(4)})
    doc = json.loads((tmp_path / "r" / "x.json").read_text())
    check_tensors_match(doc, tmp_path / "r" / "x.safetensors", "r")
    save_with_json(tmp_path / "s", "x.json", {"k": 2}, "x.safetensors", {"t": torch.arange(5)})
    with pytest.raises(MechscopeError, match="r holds x.safetensors from another save"):
        check_tensors_match(doc, tmp_path / "s" / "x.safetensors", "r")
    from safetensors.torch import save_file

    save_file({"t": torch.arange(3)}, str(tmp_path / "old.safetensors"))  # both written before digests: read as before
    check_tensors_match({"k": 1}, tmp_path / "old.safetensors", "r")
    with pytest.raises(MechscopeError, match="from another save"):  # new tensors beside a JSON from before digests
        check_tensors_match({"k": 1}, tmp_path / "s" / "x.safetensors", "r")


def test_a_checkpoint_folder_appears_only_when_whole(tmp_path, monkeypatch):
    import transformers

    from mechscope.heads.dynamics import find_checkpoints
    from mechscope.heads.train import save_checkpoint_dir
    from tests.conftest import _tiny_tokenizer

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=512, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    tok = _tiny_tokenizer()
    save_checkpoint_dir(tmp_path / "ckpt_000000", model, tok)

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    with pytest.raises(OSError):
        save_checkpoint_dir(tmp_path / "ckpt_000010", model, tok)
    assert not (tmp_path / "ckpt_000010").exists()
    assert [p.name for _, p in find_checkpoints(tmp_path)] == ["ckpt_000000"]


def test_dynamics_flags_checkpoints_short_of_the_planned_steps_after_the_run_finished():
    from mechscope.heads.dynamics import _run_notes

    notes = _run_notes([0, 50, 141], {"settings": {"steps": 600}, "done": True})
    assert notes["unfinished"] and notes["steps_reached"] == 141 and "still training" in notes["note"]
    assert not _run_notes([0, 300, 600], {"settings": {"steps": 600}, "done": True})["unfinished"]


def test_exemplars_refuses_a_pass_already_running_and_keeps_a_database_another_pass_holds(tmp_path, tiny_gpt2_dir, corpus):
    """The same pass twice at once deleted the other's checkpoint files and, failing, its
    database: the second is now refused at once, and a failed pass removes the database it
    created only when no other pass holds it."""
    db = tmp_path / "u.db"
    args = ["exemplars", "--model", tiny_gpt2_dir, "--units", "mlp", "--tokens", "256", "--corpus", corpus,
            "--context-len", "16", "--batch-size", "4", "--k", "4", "--db", str(db)]
    assert run_cli(*args, "--keep-checkpoint").returncode == 0
    (key,) = [p.name for p in Path(f"{db}.exemplars").iterdir()]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    holder = _holder(tmp_path, Path(f"{db}.exemplars") / key)  # that pass is running
    try:
        r = run_cli(*args)
        assert r.returncode == 2 and "another mechscope run" in r.stderr and "--checkpoint" in r.stderr
        assert not db.exists()
    finally:
        holder.kill()
        holder.wait()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    failing = [a if a != corpus else str(bad) for a in args]
    assert run_cli(*failing).returncode == 2 and not db.exists()  # alone: it leaves nothing behind, as before
    holder = _holder(tmp_path, db, shared=True)  # another pass (other layers) writes this database
    try:
        assert run_cli(*failing).returncode == 2
        assert db.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_filesystem_without_flock_runs_unlocked(tmp_path, monkeypatch):
    """ENOLCK (NFS without lockd, Lustre noflock) is not "another run holds it": commands ran
    refused, and an auto-named folder was never found (session 39 review)."""
    import errno

    from mechscope.cli import common

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    assert lock.try_lock(tmp_path / "x") is None and lock.held() == set()
    assert lock.sole_holder(tmp_path / "x")  # nothing is known of others: as before locks
    monkeypatch.chdir(tmp_path)
    assert common.handles_errors(lambda: common.fresh_dir("y"))().name.startswith("mechscope-y-")
    lock.release()


def test_commands_that_write_into_their_input_folder_lock_it(tmp_path, tiny_gpt2, corpus):
    from mechscope.lens.tuned import TunedLens

    folder = tmp_path / "tl"
    TunedLens.identity(tiny_gpt2).save(folder)
    holder = _holder(tmp_path, folder)
    try:
        r = run_cli("--quiet", "tuned-lens", "eval", str(folder), "--corpus", corpus, "--tokens", "64", "--device", "cpu")
        assert r.returncode == 2 and "another mechscope run" in r.stderr, r.stderr
        assert not (folder / "eval.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_database_another_pass_is_removing_is_refused(tmp_path):
    from mechscope.cli import common

    db = tmp_path / "u.db"
    holder = _holder(tmp_path, db)  # exclusive: a failed pass removing the database it created
    try:
        import typer

        with pytest.raises(typer.Exit) as exc:
            common.handles_errors(lambda: common.hold_shared(db))()
        assert exc.value.exit_code == 2
    finally:
        holder.kill()
        holder.wait()
    assert lock.held() == set()
