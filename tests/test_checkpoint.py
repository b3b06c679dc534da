import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import metabatch as mb


def test_roundtrip_and_no_temporaries(tmp_path):
    path = tmp_path / "a" / "last.pt"
    state = {"w": torch.arange(3.0), "step": 7, "name": "x", "nested": [1, (2.5, None)]}
    assert mb.checkpoint.save(state, path) == path
    got = mb.checkpoint.load(path)
    assert torch.equal(got["w"], state["w"]) and got["step"] == 7 and got["nested"] == [1, (2.5, None)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    mb.checkpoint.save({"step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    # A child process dies (os._exit) in the middle of torch.save's write.
    code = textwrap.dedent(f"""
        import os, torch, metabatch as mb
        real = torch.save
        def dying(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            f.flush()
            os._exit(3)
        torch.save = dying
        mb.checkpoint.save({{"step": 2}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 3
    assert path.read_bytes() == before
    assert mb.checkpoint.load(path)["step"] == 1
    stale = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(stale) == 1 and stale[0].startswith(".last.pt.") and stale[0].endswith(".tmp")
    # The next save removes the dead writer's temporary: stale files never accumulate.
    mb.checkpoint.save({"step": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert mb.checkpoint.load(path)["step"] == 3


def test_live_writers_temporary_is_left_alone(tmp_path):
    path = tmp_path / "last.pt"
    live = tmp_path / f".last.pt.{os.getppid()}.abcd1234.tmp"  # a live process (our parent)
    live.write_bytes(b"in progress")
    mb.checkpoint.save({"step": 1}, path)
    assert live.exists()


def test_load_refuses_code_and_names_the_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"x": Evil()}, f, pickle_module=pickle)
    with pytest.raises(ValueError, match=r"evil\.pt.*weights_only=True"):
        mb.checkpoint.load(path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nothing\.pt"):
        mb.checkpoint.load(tmp_path / "nothing.pt")
    bad = tmp_path / "trunc.pt"
    mb.checkpoint.save({"w": torch.ones(100)}, bad)
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"trunc\.pt.*not a readable checkpoint"):
        mb.checkpoint.load(bad)


def test_save_json_round_trip_and_crash_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "run" / "metrics.json"
    mb.checkpoint.save_json({"step": 1, "mse": [0.5, 0.25]}, path)
    assert path.read_text() == '{\n  "step": 1,\n  "mse": [\n    0.5,\n    0.25\n  ]\n}\n'
    before = path.read_bytes()

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)  # the new file's bytes are written, then the disk fails
    with pytest.raises(OSError, match="No space left"):
        mb.checkpoint.save_json({"step": 2, "mse": [0.1]}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]
    with pytest.raises(TypeError, match="not JSON serializable"):
        mb.checkpoint.save_json({"step": object()}, path)
    assert path.read_bytes() == before
