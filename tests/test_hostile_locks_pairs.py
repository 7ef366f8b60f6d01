"""Hostile inputs, locks and pairs: every command that writes under ``--out`` holds its lock,
and a model's weights and record are published so that a reader never pairs two runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import redblue.artifacts
import redblue.utils
from redblue.artifacts import find_reusable, load_model, save_model
from redblue.cli import main
from redblue.errors import IntegrityError
from redblue.models import build_model
from redblue.utils import output_lock


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn")


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_every_writing_command_takes_the_output_lock(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    model = str(tiny_model_dir / "models" / "baseline.json")
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[sweep]\nstage = "evaluate"\nmodel = "{model}"\n[data]\ndataset = "mnist-mini"\n'
                    '[axes]\nmodel = ["' + model + '"]\n')  # fmt: skip
    commands = [
        ("train", "--dataset", "mnist-mini", "--epochs", "1", "--device", "cpu"),
        ("evaluate", "--model", model, "--dataset", "mnist-mini"),
        ("attack", "--model", model, "--dataset", "mnist-mini", "--n-examples", "10", "--no-checks"),
        ("defend", "--dataset", "mnist-mini", "--epochs", "1"),
        ("poison", "--dataset", "mnist-mini", "--epochs", "1"),
        ("defend-backdoor", "--model", model, "--dataset", "mnist-mini"),
        ("run", "--quick", "--dataset", "mnist-mini"),
        ("report",),
        ("sweep", str(grid)),
    ]
    (out / "metrics").mkdir(parents=True)  # so that report gets as far as its lock
    with output_lock(out):
        for args in commands:
            assert main([*args, "--out", str(out)]) == 2, args
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "another redblue command is using this folder" in err[0], (args, err)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [".redblue.lock", "metrics"]  # nothing written


def test_the_lock_is_released_when_the_command_ends_even_on_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), output_lock(out):
        raise RuntimeError("boom")
    with output_lock(out):  # not left held
        pass


def test_a_reader_never_pairs_the_weights_of_one_run_with_the_record_of_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first, second = _model(1), _model(2)
    save_model(tmp_path, "m", first, {"model_name": "cnn", "run": 1})
    real_read = redblue.utils.read_regular_file
    published = []

    def read_while_another_run_publishes(path: Path, *args: object) -> bytes:
        if path.suffix == ".safetensors" and not published:  # the reader holds run 1's record
            published.append(save_model(tmp_path, "m", second, {"model_name": "cnn", "run": 2}))
        return real_read(path, *args)

    monkeypatch.setattr(redblue.utils, "read_regular_file", read_while_another_run_publishes)  # under read_input_file
    loaded = load_model(tmp_path / "models" / "m.json")
    assert loaded.record["run"] == 2 and _same(loaded.model, second)


def test_a_reader_between_the_two_renames_of_a_writer_waits_for_the_record(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first, second = _model(1), _model(2)
    save_model(tmp_path, "m", first, {"model_name": "cnn", "run": 1})
    real_write_json = redblue.artifacts.atomic_write_json
    pending: list[tuple[Path, object]] = []
    monkeypatch.setattr(redblue.artifacts, "atomic_write_json", lambda path, obj: pending.append((path, obj)))
    save_model(tmp_path, "m", second, {"model_name": "cnn", "run": 2})  # weights published, record not yet
    monkeypatch.setattr(redblue.artifacts.time, "sleep", lambda s: real_write_json(*pending[0]))  # ... now it is
    loaded = load_model(tmp_path / "models" / "m.json")
    assert loaded.record["run"] == 2 and _same(loaded.model, second)


def test_a_writer_killed_between_the_renames_leaves_a_pair_that_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    save_model(tmp_path, "m", _model(1), {"model_name": "cnn", "cache_key": "k"})

    def killed(path: Path, obj: object) -> None:
        raise KeyboardInterrupt  # the process dies after the weights, before the record

    monkeypatch.setattr(redblue.artifacts, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path, "m", _model(2), {"model_name": "cnn", "cache_key": "k"})
    monkeypatch.undo()
    monkeypatch.setattr(redblue.artifacts.time, "sleep", lambda s: None)
    with pytest.raises(IntegrityError, match="does not belong to this record"):
        load_model(tmp_path / "models" / "m.json")
    assert find_reusable(tmp_path, "m", "k") is None  # retrained, never reused half
