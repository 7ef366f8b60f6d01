"""Audit any model: the README's example run command by command, every model source, user
data (.npz, image folders, RGB), the CI gate and the hostile inputs of each source.

The models are real: the small CNN of ``examples/audit/net.py`` trained on scikit-learn's 8x8
digits (1,797 real handwritten digits) by ``examples/audit/make_example.py``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from redblue import onnx_graph
from redblue.cli import main
from redblue.data import load_user_dataset
from redblue.model_sources import ModelOptions, load_any_model

from .conftest import run_cli
from .hostile_helpers import one_line_exit_2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "audit"))
from make_example import make_example  # noqa: E402


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- audit-example: begin -->", 1)[1].split("<!-- audit-example: end -->", 1)[0]
    lines = [line.strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "```"))]


def _metrics(folder: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "secure_ai_outputs" / "metrics" / f"{name}_metrics.json").read_text())
    return data


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every command of the README's audit example, each in a subprocess as a user types it."""
    cwd = tmp_path_factory.mktemp("readme_audit")
    commands = _readme_commands()
    assert commands[0].startswith("make install"), commands[0]
    for command in commands[1:]:
        args = shlex.split(command.split("  #", 1)[0])
        if args[0] == "cd":
            cwd = cwd / args[1]
            continue
        if args[0] == "python":  # a script of the repository, as from its root; what it writes goes to cwd
            proc = subprocess.run([sys.executable, str(ROOT / args[1]), *args[2:]], cwd=cwd, capture_output=True, text=True, check=False,
                                  timeout=600)  # fmt: skip
        else:
            assert args[0] == "redblue", command
            proc = run_cli(*args[1:], cwd=cwd)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
    return cwd


def test_readme_routes_agree_and_record_their_files(readme_run: Path) -> None:
    runs = {name: _metrics(readme_run, name) for name in ("net-module", "net-checkpoint", "net-torchscript", "net-onnx")}
    robust = {name: r["metrics"]["robust_accuracy"] for name, r in runs.items()}
    clean = {name: r["metrics"]["clean_accuracy"] for name, r in runs.items()}
    # the same deterministic attack (PGD, seed 0) on the same weights: identical through PyTorch,
    # within 0.1 pp through the ONNX graph
    assert robust["net-module"] == robust["net-checkpoint"] == robust["net-torchscript"], robust
    assert abs(robust["net-onnx"] - robust["net-module"]) <= 0.001, robust
    assert len(set(clean.values())) == 1, clean
    assert 0.85 <= clean["net-module"] <= 1.0 and robust["net-module"] < clean["net-module"]
    expected_files = {
        "net-module": ["net.py", "net.safetensors"], "net-checkpoint": ["net.py", "net.pt"],
        "net-torchscript": ["net_torchscript.pt"], "net-onnx": ["net.onnx"],
    }  # fmt: skip
    for name, files in expected_files.items():
        model = runs[name]["model"]
        assert model["files"] == {f: _sha256(readme_run / f) for f in files}, model
        assert model["input_shape"] == [1, 8, 8] and model["num_classes"] == 10
        assert runs[name]["dataset"]["files"] == {"digits.npz": _sha256(readme_run / "digits.npz")}
    assert runs["net-onnx"]["model"]["source"] == "onnx"
    assert 0.0 <= runs["net-onnx"]["model"]["onnx_parity_max_abs_diff"] <= 1e-3
    assert runs["net-module"]["model"]["weights_sha256"] != runs["net-checkpoint"]["model"]["weights_sha256"]


def test_readme_image_folder_and_rgb(readme_run: Path) -> None:
    folder = _metrics(readme_run, "net-png")
    npz_clean = _metrics(readme_run, "net-onnx")["metrics"]["clean_accuracy"]
    # the PNGs hold the same 397 test digits as the .npz (uint8, lossless): same clean accuracy
    assert folder["metrics"]["n_examples"] == 397
    assert abs(folder["metrics"]["clean_accuracy"] - npz_clean) < 1e-9
    assert folder["dataset"]["class_names"] == [str(c) for c in range(10)]
    rgb = _metrics(readme_run, "rgb")
    assert rgb["model"]["class_names"] == ["red", "green", "blue"]
    assert rgb["model"]["mean"] == [0.5] and rgb["model"]["std"] == [0.25]
    assert rgb["model"]["input_shape"] == [3, 32, 32]
    assert rgb["metrics"]["clean_accuracy"] >= 0.9  # the normalisation layer is applied
    assert set(rgb["metrics"]["attacks"]) == {"apgd-ce"}
    report = (readme_run / "secure_ai_outputs" / "report.html").read_text(encoding="utf-8")
    for name in ("net-onnx", "rgb", "net-torchscript", "net-png"):
        assert name in report
    assert (readme_run / "secure_ai_outputs" / "images" / "rgb_examples.png").is_file()


# --- the same routes in-process, and what each refuses ------------------------------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audit_example")
    accuracies = make_example(folder)
    assert accuracies["digits_test_accuracy"] > 0.85
    return folder


@pytest.fixture
def in_example(example: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(example)
    yield example


def _fails(capsys: pytest.CaptureFixture[str], args: list[str], *needles: str) -> str:
    """``redblue ARGS`` ends with exit 2 and one stderr line naming every needle; writes nothing."""
    code = main([*args, "--out", "never_written"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not Path("never_written").exists()
    return err


def test_model_sources_give_identical_logits(example: Path) -> None:
    probe = load_user_dataset(example / "digits.npz").x_test[:64].float() / 255
    module = load_any_model(f"{example}/net.py:build", ModelOptions(weights=str(example / "net.safetensors")), probe=probe)
    outputs = {
        "checkpoint": load_any_model(f"{example}/net.py:build", ModelOptions(weights=str(example / "net.pt"), input_shape=(1, 8, 8))),
        "torchscript": load_any_model(str(example / "net_torchscript.pt"), probe=probe),
        "onnx": load_any_model(str(example / "net.onnx"), probe=probe),
    }
    with torch.no_grad():
        reference = module.model(probe)
        for name, loaded in outputs.items():
            got = loaded.model(probe)
            tolerance = 1e-4 if name == "onnx" else 0.0
            assert (got - reference).abs().max() <= tolerance, name
    # white-box: the gradient reaches the input through the ONNX graph and equals PyTorch's
    x = probe[:8].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(outputs["onnx"].model(x), torch.arange(8)).backward()
    x_ref = probe[:8].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(module.model(x_ref), torch.arange(8)).backward()
    assert x.grad is not None and x_ref.grad is not None
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert not any(p.requires_grad for p in outputs["onnx"].model.parameters())


def test_npz_layouts_and_float_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)  # NHWC
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "nhwc.npz", x_test=x, y_test=y)
    data = load_user_dataset(tmp_path / "nhwc.npz")
    assert tuple(data.x_test.shape) == (6, 3, 5, 7) and data.x_test.dtype == torch.uint8
    assert torch.equal(data.x_test, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert data.num_classes == 3 and data.x_train.shape[0] == 0
    np.savez(tmp_path / "gray.npz", x_test=(x[..., 0] / 255.0).astype(np.float32), y_test=y)  # N x H x W floats
    gray = load_user_dataset(tmp_path / "gray.npz")
    assert tuple(gray.x_test.shape) == (6, 1, 5, 7) and gray.x_test.dtype == torch.float32
    assert gray.files == {"gray.npz": _sha256(tmp_path / "gray.npz")}


def test_image_folder_reads_rgb_and_names_classes(tmp_path: Path) -> None:
    for i, (name, colour) in enumerate([("cat", (200, 10, 10)), ("dog", (10, 200, 10)), ("cat", (180, 0, 0))]):
        (tmp_path / "pics" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), colour).save(tmp_path / "pics" / name / f"{i}.png")
    data = load_user_dataset(tmp_path / "pics")
    assert data.class_names == ("cat", "dog")
    assert tuple(data.x_test.shape) == (3, 3, 4, 6)
    assert data.y_test.tolist() == [0, 0, 1]
    assert data.x_test[2, :, 0, 0].tolist() == [10, 200, 10]


def test_gate_exit_codes(in_example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["attack", "--model", "net.onnx", "--dataset", "digits.npz", "--attack", "fgsm", "--eps", "0.1",
            "--no-checks", "--out", "gated"]  # fmt: skip
    assert main([*base, "--fail-under", "0"]) == 0
    metrics = json.loads((in_example / "gated" / "metrics" / "net-onnx_fgsm_metrics.json").read_text())["metrics"]
    robust = metrics["robust_accuracy"]
    capsys.readouterr()
    assert main([*base, "--fail-under", f"{100 * robust + 0.5:.2f}"]) == 1  # a percentage above the result
    assert "gate failed" in capsys.readouterr().err
    assert main([*base, "--fail-under", f"{robust - 0.005:.4f}"]) == 0  # a fraction just below it
    assert main([*base, "--fail-on-warning"]) == 0  # checks off: no warning
    capsys.readouterr()
    _fails(capsys, [*base[:-2], "--fail-under", "150"], "--fail-under 150")


def test_fail_on_warning_with_a_softmax_model(tmp_path: Path, example: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "soft.py").write_text(
        (example / "net.py").read_text()
        + "\n\ndef soft():\n    return nn.Sequential(build(), nn.Softmax(dim=1))\n"
        + "\n\ndef log_soft():\n    return nn.Sequential(build(), nn.LogSoftmax(dim=1))\n"
    )
    state = {f"0.{k}": v for k, v in load_any_model(f"{example}/net.py:build", ModelOptions(
        weights=str(example / "net.safetensors")), probe=torch.rand(2, 1, 8, 8)).model.state_dict().items()}  # fmt: skip
    save_file(state, tmp_path / "soft.safetensors")
    monkeypatch.chdir(tmp_path)
    for factory, warning in (("soft", "outputs-not-logits"), ("log_soft", "outputs-log-probabilities")):
        code = main(["attack", "--model", f"soft.py:{factory}", "--weights", "soft.safetensors", "--dataset",
                     str(example / "digits.npz"), "--attack", "fgsm", "--eps", "0.05", "--n-examples", "100",
                     "--fail-on-warning", "--out", "o", "--name", factory])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 1, err
        assert f"warning [{warning}]" in err and "gate failed" in err
        result = json.loads((tmp_path / "o" / "metrics" / f"{factory}_metrics.json").read_text())
        assert warning in {w["id"] for w in result["warnings"]}


def test_bad_module_sources(in_example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (in_example / "bad.py").write_text(
        "from torch import nn\n\ndef not_a_module():\n    return 3\n\ndef broken():\n    raise RuntimeError('boom')\n\n"
        "def wide():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12))\n\n"
        "def rgb_only():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))\n"
    )
    data = ["--dataset", "digits.npz", "--attack", "fgsm"]
    _fails(capsys, ["attack", "--model", "missing.py:build", "--weights", "net.safetensors", *data], "missing.py", "not found")
    _fails(capsys, ["attack", "--model", "net.py:nothing", "--weights", "net.safetensors", *data], "no function or class 'nothing'")
    _fails(capsys, ["attack", "--model", "bad.py:not_a_module", "--weights", "net.safetensors", *data],
           "returned int", "torch.nn.Module")  # fmt: skip
    _fails(capsys, ["attack", "--model", "bad.py:broken", "--weights", "net.safetensors", *data], "RuntimeError: boom")
    _fails(capsys, ["attack", "--model", "net.py", "--weights", "net.safetensors", *data], "net.py:build")
    _fails(capsys, ["attack", "--model", "net.py:build", *data], "--weights")
    # weights that do not fit: the missing, unexpected and mis-shaped keys are named
    state = load_any_model("net.py:build", ModelOptions(weights="net.safetensors"), probe=torch.rand(2, 1, 8, 8)).model.state_dict()
    state = {k: v for k, v in state.items() if k != "0.bias"}
    state["extra.weight"] = torch.zeros(2)
    state["6.weight"] = torch.zeros(10, 5)
    save_file(state, in_example / "misfit.safetensors")
    _fails(capsys, ["attack", "--model", "net.py:build", "--weights", "misfit.safetensors", *data],
           "missing 0.bias", "unexpected extra.weight", "mis-shaped 6.weight")  # fmt: skip
    wide = {"1.weight": torch.zeros(12, 64), "1.bias": torch.zeros(12)}
    save_file(wide, in_example / "wide.safetensors")
    _fails(capsys, ["attack", "--model", "bad.py:wide", "--weights", "wide.safetensors", "--num-classes", "10", *data],
           "outputs 12 scores", "--num-classes is 10")  # fmt: skip
    # the model rejects the data's shape; the data does not match --input-shape
    _fails(capsys, ["attack", "--model", "net.py:build_rgb", "--weights", "rgb.safetensors", *data],
           "rejects inputs of shape (16, 1, 8, 8)")  # fmt: skip
    _fails(capsys, ["attack", "--model", "net.onnx", "--input-shape", "3,8,8", *data], "--input-shape 3,8,8", "1x8x8")
    _fails(capsys, ["attack", "--model", "net.onnx", "--mean", "0.5", *data], "--mean and --std")


def test_checkpoints_and_archives_are_scanned_before_loading(in_example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = in_example / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {}, "payload": Payload()}, in_example / "evil.pt")
    data = ["--dataset", "digits.npz", "--attack", "fgsm"]
    _fails(capsys, ["attack", "--model", "net.py:build", "--weights", "evil.pt", *data], "evil.pt", "redblue scan")
    (in_example / "evil.pkl").write_bytes(pickle.dumps(Payload()))
    _fails(capsys, ["attack", "--model", "evil.pkl", *data], "evil.pkl", "refused")
    _fails(capsys, ["attack", "--model", "net.pt", *data], "not a TorchScript archive")  # a state dict is no model
    assert not marker.exists()


def test_bad_onnx_files(in_example: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx
    from onnx import TensorProto, helper

    data = ["--dataset", "digits.npz", "--attack", "fgsm"]
    (in_example / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    _fails(capsys, ["attack", "--model", "garbage.onnx", *data], "garbage.onnx", "not a valid ONNX model")
    graph = helper.make_graph(
        [helper.make_node("Hardmax", ["x"], ["y"], axis=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), in_example / "hardmax.onnx")
    _fails(capsys, ["attack", "--model", "hardmax.onnx", *data], "not supported by redblue: Hardmax")
    # a conversion that disagrees with onnxruntime is refused at load
    monkeypatch.setitem(onnx_graph.OPS, "Relu", lambda inputs, attrs: inputs[0])
    _fails(capsys, ["attack", "--model", "net.onnx", *data], "parity check against onnxruntime")


def test_bad_user_data(in_example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = ["attack", "--model", "net.onnx", "--attack", "fgsm"]
    marker = in_example / "pwned_npz"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    np.savez(in_example / "objects.npz", x_test=np.array([Payload()], dtype=object), y_test=np.array([0]))
    _fails(capsys, [*model, "--dataset", "objects.npz"], "object arrays", "refused")
    assert not marker.exists()
    digits = np.load(in_example / "digits.npz")
    np.savez(in_example / "labels.npz", x_test=digits["x_test"], y_test=np.where(digits["y_test"] == 9, 10, digits["y_test"]))
    _fails(capsys, [*model, "--dataset", "labels.npz"], "labels go up to 10", "out of range")
    np.savez(in_example / "nolabels.npz", x_test=digits["x_test"])
    _fails(capsys, [*model, "--dataset", "nolabels.npz"], "no 'y_test' array")
    np.savez(in_example / "range.npz", x_test=digits["x_test"].astype(np.float32), y_test=digits["y_test"])
    _fails(capsys, [*model, "--dataset", "range.npz"], "float pixels outside [0, 1]")
    for i, size in enumerate([(8, 8), (8, 8), (9, 8)]):
        folder = in_example / "mixed" / str(i % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", size, 128).save(folder / f"{i}.png")
    _fails(capsys, [*model, "--dataset", "mixed"], "mixed sizes", "8x8", "9x8")
    _fails(capsys, [*model, "--dataset", "nowhere/data.npz"], "nowhere/data.npz", "not found")


def test_cli_bad_model_is_one_line_in_a_subprocess(example: Path) -> None:
    proc = run_cli("attack", "--model", "net.py:missing", "--weights", "net.safetensors", "--dataset", "digits.npz",
                   "--out", "never", cwd=example)  # fmt: skip
    one_line_exit_2(proc, "no function or class 'missing'")
    assert not (example / "never").exists()


def test_onnx_graph_ops_match_torch() -> None:
    """Padding, strides, batch norm, average pooling and reshapes through an exported graph."""
    import io

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1), nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5), nn.Sigmoid(),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = torch.rand(4, 3, 12, 12)
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    module, shape = onnx_graph.onnx_module(buffer.getvalue(), "test")
    assert shape == [4, 3, 12, 12]
    with torch.no_grad():
        assert torch.allclose(module(x), net(x), atol=1e-5)


def test_defend_fine_tunes_the_users_module(in_example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Adversarial fine-tuning of a user's module on the user's training data: the weights are
    saved as the module's own state dict, and PGD accuracy on the same images goes up."""
    from redblue.attacks import pgd

    code = main(["defend", "--model", "net.py:build", "--weights", "net.safetensors", "--dataset", "digits.npz",
                 "--recipe", "fgsm-rs", "--eps", "0.1", "--epochs", "10", "--guard-size", "100", "--n-examples", "100",
                 "--device", "cpu", "--out", "tuned", "--name", "net-ft"])  # fmt: skip
    err = capsys.readouterr().err  # read here, so the refusals below are checked on their own output
    assert code == 0, err
    assert "net-ft epoch 1/10: loss " in err  # stderr is captured, not a terminal: one plain line per epoch
    result = json.loads((in_example / "tuned" / "metrics" / "net-ft_metrics.json").read_text())
    assert result["model"]["model_name"] == "user-module"
    assert result["model"]["base"]["files"] == {"net.py": _sha256(in_example / "net.py"),
                                                "net.safetensors": _sha256(in_example / "net.safetensors")}  # fmt: skip
    assert result["training"]["fine_tuned_from"]["factory"] == "build"
    data = load_user_dataset(in_example / "digits.npz")
    x, y = data.x_test[:200].float() / 255, data.y_test[:200]
    base = load_any_model("net.py:build", ModelOptions(weights="net.safetensors"), probe=x)
    tuned = load_any_model("net.py:build", ModelOptions(weights="tuned/models/net-ft.safetensors"), probe=x)
    accuracy = {}
    for name, loaded in (("base", base), ("tuned", tuned)):
        x_adv = pgd(loaded.model, x, y, eps=0.1, alpha=0.025, steps=10)
        with torch.no_grad():
            accuracy[name] = float((loaded.model(x_adv).argmax(1) == y).float().mean())
    assert accuracy["tuned"] >= accuracy["base"] + 0.05, accuracy
    # the record says how to load the weights, and refuses to be loaded as a redblue model
    _fails(capsys, ["attack", "--model", "tuned/models/net-ft.json", "--dataset", "digits.npz"],
           "--model net.py:build --weights")  # fmt: skip
    _fails(capsys, ["defend", "--model", "net.onnx", "--dataset", "digits.npz", "--epochs", "1"], "cannot be fine-tuned")
    _fails(capsys, ["defend", "--model", "net.onnx", "--dataset", "rgb.npz"], "rejects inputs")


def test_a_users_view_model_runs_in_the_default_layout(in_example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user's module that flattens with ``.view`` after a convolution
    (``tests/user_models.py``), which the channels_last layout breaks: attack (white-box
    attacks, Square and the sanity checks), audit-backdoor with fine-pruning and defend's
    fine-tuning all run on it, and the derived models are saved as its own state dict."""
    from safetensors.torch import load_file

    from .user_models import ViewNet

    shutil.copyfile(ROOT / "tests" / "user_models.py", "viewnet.py")
    data = load_user_dataset(Path("digits.npz"))
    x, y = data.x_train.float() / 255, data.y_train
    torch.manual_seed(0)
    net = ViewNet()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimiser.step()
    save_file(net.state_dict(), "view.safetensors")
    keys = {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    model = ["--model", "viewnet.py:build", "--weights", "view.safetensors", "--dataset", "digits.npz", "--device", "cpu"]
    code = main(["attack", *model, "--attack", "fgsm,pgd,square", "--eps", "0.1", "--n-examples", "100", "--out", "v"])
    assert code == 0, capsys.readouterr().err
    (metrics,) = Path("v/metrics").glob("*_metrics.json")
    result = json.loads(metrics.read_text())["metrics"]
    assert result["clean_accuracy"] > 0.8 and 0.0 <= result["robust_accuracy"] < result["clean_accuracy"]
    code = main(["audit-backdoor", *model, "--epochs", "2", "--steps-per-epoch", "5", "--no-strip", "--repair",
                 "fine-prune", "--repair-epochs", "1", "--out", "v", "--name", "view"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (pruned,) = Path("v/models").glob("*fine_prune.safetensors")
    assert set(load_file(pruned)) == keys
    code = main(["defend", *model, "--recipe", "fgsm-rs", "--eps", "0.1", "--epochs", "1", "--guard-size", "100",
                 "--n-examples", "50", "--out", "v", "--name", "view-ft"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert set(load_file("v/models/view-ft.safetensors")) == keys


def test_normalisation_is_the_first_layer(example: Path) -> None:
    """--mean/--std: the model sees (x - mean) / std, per channel, and eps stays in pixel units."""
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    spec, weights = f"{example}/net.py:build_rgb", str(example / "rgb.safetensors")
    plain = load_any_model(spec, ModelOptions(weights=weights), probe=x).model
    wrapped = load_any_model(spec, ModelOptions(weights=weights, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)), probe=x)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(wrapped.model(x), plain((x - mean) / std), atol=1e-6)
        assert not torch.allclose(wrapped.model(x), plain(x), atol=1e-3)
    assert wrapped.record["mean"] == [0.4, 0.5, 0.6] and wrapped.record["std"] == [0.2, 0.25, 0.3]


def test_cache_identity_follows_what_defines_model_and_data(tmp_path: Path, example: Path) -> None:
    """Results are reused by identity: a change the files on the command line do not show (a
    helper module, an empty class folder that shifts every label) must change it."""
    (tmp_path / "helper.py").write_text("from torch import nn\nACT = nn.ReLU\n")
    (tmp_path / "net2.py").write_text(
        "import sys, pathlib\nsys.path.insert(0, str(pathlib.Path(__file__).parent))\nfrom torch import nn\n"
        "import helper\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), helper.ACT(), nn.Linear(16, 10))\n"
    )
    torch.manual_seed(0)
    state = {"1.weight": torch.randn(16, 64), "1.bias": torch.randn(16), "3.weight": torch.randn(10, 16), "3.bias": torch.randn(10)}
    save_file(state, tmp_path / "w.safetensors")
    probe = torch.rand(4, 1, 8, 8)
    options = ModelOptions(weights=str(tmp_path / "w.safetensors"))
    first = load_any_model(f"{tmp_path}/net2.py:build", options, probe=probe).record["weights_sha256"]
    assert load_any_model(f"{tmp_path}/net2.py:build", options, probe=probe).record["weights_sha256"] == first
    (tmp_path / "helper.py").write_text("from torch import nn\nACT = nn.Tanh\n")
    sys.modules.pop("helper", None)
    assert load_any_model(f"{tmp_path}/net2.py:build", options, probe=probe).record["weights_sha256"] != first
    for label in ("a", "b", "c"):
        (tmp_path / "pics" / label).mkdir(parents=True)
    for i, label in enumerate(("b", "c")):
        Image.new("L", (4, 4), 50 * i).save(tmp_path / "pics" / label / f"{i}.png")
    with_empty = load_user_dataset(tmp_path / "pics")
    (tmp_path / "pics" / "a").rmdir()
    without = load_user_dataset(tmp_path / "pics")
    assert with_empty.y_test.tolist() == [1, 2] and without.y_test.tolist() == [0, 1]
    assert with_empty.files == without.files and with_empty.identity() != without.identity()


def test_hostile_npz_and_image_files(tmp_path: Path) -> None:
    from redblue.errors import DataError

    np.save(tmp_path / "plain.npy", np.zeros((2, 2)))
    (tmp_path / "plain.npy").rename(tmp_path / "renamed.npz")
    with pytest.raises(DataError, match=r"not an \.npz file"):
        load_user_dataset(tmp_path / "renamed.npz")
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        archive.writestr("x_test.npy", header.getvalue() + b"\0" * 64)
        archive.writestr("y_test.npy", header.getvalue())
    with pytest.raises(DataError, match="header claims"):
        load_user_dataset(tmp_path / "bomb.npz")
    for label in ("0", "1"):
        (tmp_path / "pics" / label).mkdir(parents=True)
        Image.new("L", (4, 4), 9).save(tmp_path / "pics" / label / "ok.png")
    (tmp_path / "pics" / "1" / "fake.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n")
    with pytest.raises(DataError, match="not a readable PNG/JPEG"):
        load_user_dataset(tmp_path / "pics")
    (tmp_path / "pics" / "1" / "fake.png").unlink()
    Image.fromarray(np.full((4, 4), 63000, dtype=np.uint16)).save(tmp_path / "pics" / "1" / "deep.png")
    with pytest.raises(DataError, match="16-bit or float"):
        load_user_dataset(tmp_path / "pics")


def test_hostile_models_are_one_line(in_example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    data = ["--dataset", "digits.npz", "--attack", "fgsm"]
    (in_example / "lazy.py").write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.LazyLinear(10))\n")
    _fails(capsys, ["attack", "--model", "lazy.py:build", "--weights", "net.safetensors", *data], "lazy layers")
    (in_example / "adir").mkdir()
    _fails(capsys, ["attack", "--model", "net.py:build", "--weights", "adir", *data], "--weights", "adir")
    # an ONNX graph that the checker accepts and onnxruntime refuses (float + int64)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Add", ["f", "k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(np.zeros(64, dtype=np.int64), "k")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), in_example / "mixed.onnx")
    _fails(capsys, ["attack", "--model", "mixed.onnx", *data], "mixed.onnx")
    two = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 10]) for n in ("x", "z")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
    )  # fmt: skip
    onnx.save(helper.make_model(two, opset_imports=[helper.make_opsetid("", 17)]), in_example / "two.onnx")
    _fails(capsys, ["attack", "--model", "two.onnx", *data], "two.onnx", "2 inputs")
    _fails(capsys, ["attack", "--model", "net.onnx", "--attack", "apgd-t", "--dataset", "rgb.npz", "--input-shape", "3,32,32"],
           "rejects inputs")  # fmt: skip
    _fails(capsys, ["attack", "--model", "net.py:build_rgb", "--weights", "rgb.safetensors", "--dataset", "rgb.npz",
                    "--attack", "standard"], "at least 4 classes")  # fmt: skip
    _fails(capsys, ["attack", "--model", "net.onnx", "--dataset", "digits.npz", "--norm", "l2", "--eps", "9",
                    "--attack", "pgd"], "--eps 9")  # fmt: skip
    _fails(capsys, ["train", "--dataset", "digits.npz", "--epochs", "1"], "1x8x8", "1x28x28")


def _onnx_case(nodes: list[Any], shape: list[int], out_shape: list[Any], opset: int = 17,
               initializers: list[Any] | None = None) -> None:  # fmt: skip
    """Our graph module against onnxruntime on random inputs of ``shape``."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializers or [])  # fmt: skip
    payload = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(payload))
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    expected = ort.InferenceSession(payload, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    module, _ = onnx_graph.onnx_module(payload, "case")
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_onnx_attribute_variants_match_onnxruntime() -> None:
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((2, 3, 3, 3)).astype(np.float32), "w")
    _onnx_case([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])], [1, 3, 7, 6],
               [1, 2, 4, 3], initializers=[w])  # fmt: skip
    _onnx_case([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2, 2])], [1, 3, 7, 6],
               [1, 2, 4, 3], initializers=[w])  # fmt: skip
    _onnx_case([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[0, 0, 1, 1], strides=[2, 2])],
               [1, 2, 6, 6], [1, 2, 3, 3])  # fmt: skip
    _onnx_case([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[0, 1, 1, 0],
                                 count_include_pad=1)], [1, 2, 5, 5], [1, 2, 4, 4])  # fmt: skip
    _onnx_case([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[1, 0, 0, 1], strides=[2, 2])],
               [1, 1, 5, 5], [1, 1, 3, 3])  # fmt: skip
    _onnx_case([helper.make_node("Flatten", ["x"], ["y"], axis=4)], [2, 1, 3, 3], [18, 1])
    _onnx_case([helper.make_node("Flatten", ["x"], ["y"], axis=0)], [2, 1, 3, 3], [1, 18])
    _onnx_case([helper.make_node("Softmax", ["x"], ["y"], axis=1)], [2, 3, 2, 2], [2, 3, 2, 2], opset=11)
    _onnx_case([helper.make_node("LogSoftmax", ["x"], ["y"])], [2, 3, 4], [2, 3, 4], opset=13)
    _onnx_case([helper.make_node("Slice", ["x"], ["y"], starts=[1], ends=[3], axes=[2])], [1, 2, 4, 4], [1, 2, 2, 4], opset=9)
    pads = numpy_helper.from_array(np.array([1, 2, 0, 1], dtype=np.int64), "p")
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "a")
    _onnx_case([helper.make_node("Pad", ["x", "p", "", "a"], ["y"], mode="edge")], [1, 1, 3, 3], [1, 1, 4, 6], opset=18,
               initializers=[pads, axes])  # fmt: skip
    _onnx_case([helper.make_node("Shape", ["x"], ["s"], start=1, end=3), helper.make_node("Cast", ["s"], ["y"], to=1)],
               [2, 3, 4, 5], [2], opset=15)  # fmt: skip
    _onnx_case([helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0, noop_with_empty_axes=1)], [2, 3], [2, 3], opset=18)
