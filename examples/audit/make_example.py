"""Write the files of the README's "Audit your own model" example into a folder.

    python examples/audit/make_example.py --out audit-example

It trains the small CNN of ``net.py`` on scikit-learn's 8x8 digits (real handwritten digits,
1,797 images, shipped with scikit-learn) for a few seconds on a CPU, and writes what a user
brings to an audit, in every form redblue reads:

- ``net.py`` (the architecture) + ``net.safetensors`` (weights) and ``net.pt`` (the same
  weights as a ``torch.save`` state dict);
- ``net_torchscript.pt`` (``torch.jit.trace``) and ``net.onnx`` (``torch.onnx.export``);
- ``digits.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``; uint8, NCHW) and
  ``digits_png/train/<class>/*.png``, ``digits_png/test/<class>/*.png`` (the same images);
- ``rgb.npz`` (a generated 3x32x32 three-class set, NHWC floats in [0, 1]) with a model
  trained on inputs normalised by mean 0.5 and std 0.25 (``rgb.safetensors``, ``build_rgb``).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
N_TRAIN = 1400
RGB_MEAN, RGB_STD = 0.5, 0.25


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0])
        for start in range(0, x.shape[0], 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    images = np.round(data.images / 16.0 * 255).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    return images, data.target.astype(np.int64)


def rgb_set(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose dominant colour channel is the class (NHWC float32 in [0, 1])."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.uniform(0.0, 0.45, (n, 32, 32, 3)).astype(np.float32)
    x[np.arange(n), :, :, y] += 0.5
    return x, y.astype(np.int64)


def make_example(out: Path) -> dict[str, float]:
    """Write every file into ``out``; returns the test accuracies of the two models."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "net.py", out / "net.py")
    spec = importlib.util.spec_from_file_location("audit_example_net", HERE / "net.py")
    assert spec is not None and spec.loader is not None
    net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net)
    build, build_rgb = net.build, net.build_rgb

    x, y = digits()
    np.savez(out / "digits.npz", x_train=x[:N_TRAIN], y_train=y[:N_TRAIN], x_test=x[N_TRAIN:], y_test=y[N_TRAIN:])
    for split, images, labels in (("train", x[:N_TRAIN], y[:N_TRAIN]), ("test", x[N_TRAIN:], y[N_TRAIN:])):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = out / "digits_png" / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0]).save(folder / f"{i:04d}.png")
    x_t = torch.from_numpy(x).float() / 255
    y_t = torch.from_numpy(y)
    model = _fit(build(), x_t[:N_TRAIN], y_t[:N_TRAIN], epochs=20)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "net.safetensors")
    torch.save(state, out / "net.pt")
    example = x_t[N_TRAIN : N_TRAIN + 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), out / "net_torchscript.pt")
        buffer = io.BytesIO()
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}})  # fmt: skip
    (out / "net.onnx").write_bytes(buffer.getvalue())
    with torch.no_grad():
        digits_accuracy = float((model(x_t[N_TRAIN:]).argmax(1) == y_t[N_TRAIN:]).float().mean())

    xr, yr = rgb_set()
    np.savez(out / "rgb.npz", x_test=xr, y_test=yr)
    xr_t = (torch.from_numpy(xr).permute(0, 3, 1, 2) - RGB_MEAN) / RGB_STD  # the model sees normalised inputs
    rgb_model = _fit(build_rgb(), xr_t, torch.from_numpy(yr), epochs=10)
    save_file({k: v.contiguous() for k, v in rgb_model.state_dict().items()}, out / "rgb.safetensors")
    with torch.no_grad():
        rgb_accuracy = float((rgb_model(xr_t).argmax(1) == torch.from_numpy(yr)).float().mean())
    return {"digits_test_accuracy": digits_accuracy, "rgb_accuracy": rgb_accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="audit-example", help="Folder to write (created).")
    args = parser.parse_args()
    accuracies = make_example(Path(args.out))
    print(f"wrote {args.out}/: digits CNN {100 * accuracies['digits_test_accuracy']:.1f}% on the 397 test digits, "
          f"RGB CNN {100 * accuracies['rgb_accuracy']:.1f}% on its 96 images")  # fmt: skip


if __name__ == "__main__":
    main()
