"""STRIP and the repairs from the model alone (Neural Cleanse's unlearning, fine-pruning):
entropies by hand, a backdoor's triggered inputs caught at 1% false rejections, the
backdoor unlearned on a tiny model of real digits, pruning baked into the weights, and
``redblue audit-backdoor --repair`` end to end on a user's module."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from redblue.artifacts import LoadedModel
from redblue.cli.poison import read_indices
from redblue.config import BackdoorAuditConfig, TrainConfig
from redblue.data import Dataset
from redblue.defenses.repair import channel_activations, fine_prune, last_conv, unlearn
from redblue.defenses.strip import strip, strip_entropy
from redblue.errors import ConfigError
from redblue.stages.backdoor_audit import check_repairs
from redblue.train import check_layout

from .conftest import run_cli, stamp_digits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "audit"))
from net import build  # noqa: E402


def _rates(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(clean accuracy, ASR of the 2x2 patch on the non-7 images)."""
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
        asr = float((model(stamp_digits(x[y != 7])).argmax(1) == 7).float().mean())
    return clean, asr


def test_strip_entropy_by_hand() -> None:
    """A model whose logits do not depend on the input: every blend has the entropy of
    softmax([0, ln 3]) = [1/4, 3/4], i.e. -(1/4 ln 1/4 + 3/4 ln 3/4)."""

    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([0.0, math.log(3.0)]).expand(x.shape[0], 2) + 0 * x.flatten(1).sum(1, keepdim=True)

    x = torch.rand(7, 1, 4, 4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    h = strip_entropy(Fixed(), x, torch.rand(5, 1, 4, 4), n_copies=3)
    assert torch.allclose(h, torch.full((7,), expected), atol=1e-6)


def test_strip_blends_are_clipped_sums() -> None:
    """The model sees x + overlay clipped to [0, 1], n_copies per input."""
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 3)

    x = torch.full((2, 1, 2, 2), 0.75)
    overlays = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 0.125)])
    spy = check_layout(Spy(), x)  # the layout probe (two images) done before, so `seen` holds the blends only
    seen.clear()
    h = strip_entropy(spy, x, overlays, n_copies=4)
    blends = torch.cat(seen)
    assert blends.shape == (8, 1, 2, 2)
    assert set(blends.flatten().tolist()) <= {1.0, 0.875}  # 0.75 + 0.5 clipped, 0.75 + 0.125
    assert torch.allclose(h, torch.full((2,), math.log(3.0)))  # uniform over 3 classes


def test_strip_catches_the_trigger_at_one_percent_false_rejections(digits_backdoor: dict) -> None:
    """Threshold from half the clean test images, false rejections measured on the other half,
    overlays from the training images: the patched inputs are caught."""
    model, x, y = digits_backdoor["poisoned"], digits_backdoor["x_test"], digits_backdoor["y_test"]
    overlays = digits_backdoor["x_train"]
    triggered = stamp_digits(x[y != 7])
    result = strip(model, x[:200], overlays, held_out=x[200:], triggered=triggered, frr=0.01, n_copies=32)
    assert result.frr <= 0.05, result.frr  # 1% set on 200 images, measured on 197 others
    assert result.far is not None and result.far <= 0.05, result.far
    assert sorted(result.triggered_entropy or [])[len(triggered) // 2] < sorted(result.clean_entropy)[100]  # medians
    assert all(0.0 <= h <= math.log(10) + 1e-6 for h in result.clean_entropy)
    # on the clean twin the patch is no shortcut: almost every patched input passes as clean
    clean_model = digits_backdoor["clean"]
    control = strip(clean_model, x[:200], overlays, held_out=x[200:], triggered=triggered, frr=0.01, n_copies=32)
    assert control.far is not None and control.far >= 0.5


def test_unlearning_removes_the_backdoor_and_leaves_the_model_given(digits_backdoor: dict) -> None:
    """Unlearning with the true patch as the 'reversed' trigger (mask 1 on the patch, white
    pattern): the ASR falls, clean accuracy holds, and the model given is not changed."""
    model = digits_backdoor["poisoned"]
    x_train, y_train = digits_backdoor["x_train"], digits_backdoor["y_train"]
    x, y = digits_backdoor["x_test"], digits_backdoor["y_test"]
    clean_before, asr_before = _rates(model, x, y)
    assert asr_before > 0.9
    mask = torch.zeros(1, 8, 8)
    mask[0, 6:8, 6:8] = 1.0
    weights = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(epochs=3, lr=1e-3, seed=0, device="cpu")
    result = unlearn(model, x_train[:1000], y_train[:1000], mask, torch.ones(1, 1, 8, 8), cfg,
                     x_val=x_train[1000:], y_val=y_train[1000:], share=0.2)  # fmt: skip
    clean_after, asr_after = _rates(result.model, x, y)
    assert asr_after <= 0.2, asr_after
    # 397 test images of a model fitted on 1,400: a few images' worth of movement (full MNIST: docs/backdoor.md)
    assert clean_after >= clean_before - 0.1, (clean_before, clean_after)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert result.details["share"] == 0.2 and result.details["images"] == 1000


def test_fine_pruning_bakes_the_pruned_channels_into_the_weights(digits_backdoor: dict) -> None:
    model = digits_backdoor["poisoned"]
    x_train, y_train = digits_backdoor["x_train"], digits_backdoor["y_train"]
    conv, bn = last_conv(model)
    assert conv is model[3] and bn is None  # net.build: the second Conv2d, no BatchNorm
    activation = channel_activations(model, conv, x_train[:200])
    assert activation.shape == (32,) and float(activation.min()) >= 0.0
    result = fine_prune(model, x_train[:1000], y_train[:1000], TrainConfig(epochs=1, lr=1e-3, seed=0, device="cpu"),
                        x_val=x_train[1000:], y_val=y_train[1000:], max_drop=0.04)  # fmt: skip
    pruned = result.details["pruned_channels"]
    assert len(pruned) == result.details["pruned"] >= 1
    # the least active channels go first
    assert set(pruned) == set(torch.argsort(channel_activations(model, conv, x_train[:1000]))[: len(pruned)].tolist())
    assert result.details["val_accuracy_pruned"] >= result.details["val_accuracy_start"] - 0.04
    tuned_conv, _ = last_conv(result.model)
    assert float(tuned_conv.weight.detach()[pruned].abs().sum()) == 0.0 and float(tuned_conv.bias.detach()[pruned].abs().sum()) == 0.0
    with torch.no_grad():  # the pruned channels are silent without any hook
        out = tuned_conv(torch.rand(4, 16, 4, 4))
    assert float(out[:, pruned].abs().sum()) == 0.0
    assert not tuned_conv._forward_hooks and conv.weight.abs().sum() > 0  # the model given is untouched


def test_repair_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="--repair 'prune': expected one of unlearn, fine-prune"):
        BackdoorAuditConfig(repair=("prune",))
    with pytest.raises(ConfigError, match="named twice"):
        BackdoorAuditConfig(repair=("unlearn", "unlearn"))
    with pytest.raises(ConfigError, match="--strip-frr"):
        BackdoorAuditConfig(strip_frr=1.0)


@pytest.mark.parametrize("affine", [True, False])
def test_pruning_through_a_batchnorm_is_baked_exactly(affine: bool) -> None:
    """Conv -> BatchNorm (with or without its scale and shift) -> ReLU: after fine-pruning the
    pruned channels leave the BatchNorm at exactly 0, in eval and in train mode, with no hook."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6, affine=affine), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 8 * 8, 3))  # fmt: skip
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,))
    with torch.no_grad():  # running statistics that differ from 0 and 1
        net.train()
        net(x)
    net.eval()
    result = fine_prune(net, x, y, TrainConfig(epochs=1, lr=1e-3, seed=0, device="cpu"), x_val=x, y_val=y, max_drop=1.0)
    pruned = result.details["pruned_channels"]
    assert len(pruned) == 5  # every channel but one: a drop of 100 pp is allowed
    seen: list[torch.Tensor] = []
    bn = result.model[1]
    assert not bn._forward_hooks
    bn.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    for mode in (False, True):
        result.model.train(mode)
        result.model(torch.rand(16, 1, 8, 8))
        assert float(seen[-1][:, pruned].abs().max()) == 0.0, mode


def test_last_conv_finds_a_batchnorm_after_it() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    conv, bn = last_conv(net)
    assert conv is net[0] and bn is net[1]
    with pytest.raises(ConfigError, match="needs a model with a convolution"):
        last_conv(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_repairs_are_refused_before_any_work(digits_backdoor: dict) -> None:
    """A model redblue cannot fine-tune (TorchScript, ONNX), a model without a convolution for
    fine-pruning, --unlearn-classes without unlearning or out of range: one ConfigError each."""
    data = Dataset(name="digits", x_train=digits_backdoor["x_train"], y_train=digits_backdoor["y_train"],
                   x_test=digits_backdoor["x_test"], y_test=digits_backdoor["y_test"], source="test")  # fmt: skip

    def loaded(model: nn.Module, source: str | None) -> LoadedModel:
        return LoadedModel(model=model, record={"source": source}, json_path=Path("m.json"), weights_path=Path("m"))

    cnn = digits_backdoor["poisoned"]
    with pytest.raises(ConfigError, match="a torchscript model cannot be fine-tuned"):
        check_repairs(loaded(cnn, "torchscript"), data, BackdoorAuditConfig(repair=("unlearn",)), "m")
    with pytest.raises(ConfigError, match="needs a model with a convolution"):
        check_repairs(loaded(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), None), data,
                      BackdoorAuditConfig(repair=("fine-prune",)), "m")  # fmt: skip
    with pytest.raises(ConfigError, match="only used with --repair unlearn"):
        check_repairs(loaded(cnn, None), data, BackdoorAuditConfig(unlearn_classes=(7,)), "m")
    with pytest.raises(ConfigError, match="--unlearn-classes 12: the model has classes 0 to 9"):
        check_repairs(loaded(cnn, None), data, BackdoorAuditConfig(repair=("unlearn",), unlearn_classes=(12,)), "m")
    check_repairs(loaded(cnn, "module"), data, BackdoorAuditConfig(repair=("unlearn", "fine-prune")), "m")


def _u8(t: torch.Tensor) -> np.ndarray:
    return (t * 255).round().to(torch.uint8).numpy()


def _user_model(folder: Path, model: nn.Module) -> None:
    """The user's files: the module's definition (net.py) and its weights (suspect.safetensors)."""
    from safetensors.torch import save_file

    shutil.copyfile(ROOT / "examples" / "audit" / "net.py", folder / "net.py")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "suspect.safetensors")


def test_audit_backdoor_cli_flags_and_repairs_a_users_model(digits_backdoor: dict, tmp_path: Path) -> None:
    """``redblue audit-backdoor --repair unlearn,fine-prune`` as a user runs it, on their own
    module and .npz: 7 flagged, the reversed triggers written (hashed), STRIP's threshold, both
    repaired models saved (hashed, loadable the way the original was, the backdoor unlearned),
    before/after clean accuracy, and the report's section rendered from the JSON."""
    from safetensors.torch import load_file

    model = digits_backdoor["poisoned"]
    _user_model(tmp_path, model)

    x_test, y_test = digits_backdoor["x_test"], digits_backdoor["y_test"]
    np.savez(tmp_path / "data.npz", x_train=_u8(digits_backdoor["x_train"]), y_train=digits_backdoor["y_train"].numpy(),
             x_test=_u8(x_test), y_test=y_test.numpy())  # fmt: skip
    np.savez(tmp_path / "test_only.npz", x_test=_u8(x_test), y_test=y_test.numpy())
    common = ["audit-backdoor", "--model", "net.py:build", "--weights", "suspect.safetensors", "--epochs", "20",
              "--steps-per-epoch", "20", "--batch-size", "8", "--device", "cpu", "--strip-copies", "16"]  # fmt: skip
    refused = run_cli(*common, "--dataset", "test_only.npz", "--repair", "unlearn", "--out", "none", cwd=tmp_path)
    assert refused.returncode == 2 and "needs clean training images" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "none" / "metrics").exists()
    unused = run_cli(*common, "--dataset", "data.npz", "--unlearn-triggers", "3", "--out", "none", cwd=tmp_path)
    assert unused.returncode == 2 and "--unlearn-triggers: only used with --repair unlearn" in unused.stderr
    assert "Traceback" not in unused.stderr and not (tmp_path / "none" / "metrics").exists()
    proc = run_cli(*common, "--dataset", "data.npz", "--repair", "unlearn,fine-prune", "--repair-images", "1000",
                   "--repair-epochs", "3", "--out", "out", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out"
    result = json.loads((out / "metrics" / "suspect_backdoor_audit_metrics.json").read_text())
    assert result["flagged"] == [7], result["classes"]
    assert [c["flagged"] for c in result["classes"]] == [k == 7 for k in range(10)]
    assert [bool(c["flagged_by"]) for c in result["classes"]] == [c["flagged"] for c in result["classes"]]
    median = float(np.median([c["l1"] for c in result["classes"]]))  # every class reached the success rate here
    for c in result["classes"]:  # the size ratio by hand from the written norms
        assert c["size_ratio"] == pytest.approx(c["l1"] / median)
    assert result["size_ratio"] == 0.25 and result["max_anomaly_index"] > 0
    assert result["true_trigger"] is None  # a user's model: no record of the true trigger
    assert result["model"]["files"]["suspect.safetensors"] == hashlib.sha256(
        (tmp_path / "suspect.safetensors").read_bytes()).hexdigest()  # fmt: skip
    assert "backdoor suspected: class 7" in proc.stdout and "FLAGGED" in proc.stdout
    for image in ("anomaly", "triggers"):
        assert (out / "images" / f"suspect_backdoor_audit_{image}.png").is_file()
    strip_result = result["strip"]
    assert strip_result["far"] is None and strip_result["n_clean"] == 198 and strip_result["n_held_out"] == 199
    assert strip_result["frr"] <= 0.05  # the 1% threshold, measured on held-out clean images
    assert result["before"]["asr"] is None  # the true trigger is unknown
    methods = {row["method"]: row for row in result["repairs"]}
    assert set(methods) == {"unlearn", "fine-prune"}
    assert methods["unlearn"]["details"]["classes"] == [7]
    # the flagged class's trigger was restored (compact) and that is the one unlearning stamped
    restored = result["restored"]
    assert restored["classes"] == [7] and restored["smoothness"] == 1.0 and restored["restarts"] == 2
    assert methods["unlearn"]["details"]["restored_triggers"] == [7]
    details = methods["unlearn"]["details"]
    assert details["stamped_l1"][0] == pytest.approx(restored["l1"][0], rel=1e-5)  # the restored trigger first
    # then 7's next smallest triggers, each found with the pixels of those before held out,
    # each under the size rule's share of the median norm; why the search stopped is recorded
    (found,) = details["more_triggers"]
    assert found["class"] == 7 and found["l1"] == pytest.approx(details["stamped_l1"], rel=1e-5)
    assert details["triggers_per_class"] == [len(found["l1"])] and found["limit"] == pytest.approx(0.25 * median)
    assert 1 <= len(found["l1"]) <= 6 and all(v < 0.25 * median for v in found["l1"][1:]) and found["stop"]
    triggers = load_file(out / "metrics" / result["triggers_file"])
    assert set(triggers) == {"masks", "patterns", "restored_masks", "restored_patterns",
                             "unlearn_masks", "unlearn_patterns", "unlearn_classes"}  # fmt: skip
    stamped = triggers["unlearn_masks"]
    assert triggers["unlearn_classes"].tolist() == [7] * len(found["l1"]) and torch.equal(stamped[0], triggers["restored_masks"][7])
    assert [float(m.sum()) for m in stamped] == pytest.approx(found["l1"], rel=1e-5)
    for i in range(1, stamped.shape[0]):  # none uses a pixel an earlier one used
        assert float(stamped[i][(stamped[:i] > 0.05).any(0)].abs().sum()) == 0.0
    said = f"{len(found['l1'])} trigger{'s' if len(found['l1']) != 1 else ''} of class 7 (mask L1"
    assert f"unlearned {said}" in proc.stdout and found["stop"] in proc.stdout
    assert float(triggers["restored_masks"][7].sum()) == pytest.approx(restored["l1"][0], rel=1e-5)
    assert all(float(triggers["restored_masks"][k].abs().sum()) == 0 for k in range(10) if k != 7)
    assert restored["attack_success_rate"][0] >= 0.99
    assert "restored (compact) trigger, mask L1 per class 7:" in proc.stdout
    _, asr_before = _rates(model, x_test, y_test)
    for method, row in methods.items():
        saved = out / "models" / f"{row['model']['name']}.safetensors"
        assert row["model"]["weights_file"] == f"../models/{saved.name}"  # checked by redblue verify
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == row["model"]["weights_sha256"]
        repaired = build()
        repaired.load_state_dict(load_file(saved))  # the module's own state dict, as the original was given
        clean_after, asr_after = _rates(repaired.eval(), x_test, y_test)
        assert row["after"]["clean_accuracy"] == pytest.approx(clean_after, abs=1e-6), method
        assert abs(clean_after - result["before"]["clean_accuracy"]) <= 0.1, method
        if method == "unlearn":
            assert asr_after <= asr_before - 0.5, (asr_before, asr_after)  # the reversed trigger was unlearned
    assert "repair unlearn: clean accuracy" in proc.stdout and "STRIP: entropy threshold" in proc.stdout
    report = run_cli("report", "--out", str(out))
    assert report.returncode == 0, report.stderr
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Neural Cleanse" in html and "backdoor suspected" in html
    assert "Removal by unlearning" in html and "Removal by fine-pruning" in html and "STRIP" in html
    assert "Restored triggers (compact, the ones a repair stamps)" in html and "mask L1 per class 7:" in html
    assert "Triggers unlearned" in html and said in html
    verified = run_cli("verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # the paper's rule alone (--size-ratio 0): the same optimisation, reused from the cache, a new verdict
    paper = run_cli(*common, "--dataset", "data.npz", "--no-strip", "--size-ratio", "0", "--name", "paper", "--out", "out",
                    cwd=tmp_path)  # fmt: skip
    assert paper.returncode == 0, paper.stderr[-2000:]
    alone = json.loads((out / "metrics" / "paper_metrics.json").read_text())
    assert alone["seconds"] == result["seconds"] and alone["size_ratio"] == 0  # the cached Neural Cleanse run
    assert [c["l1"] for c in alone["classes"]] == [c["l1"] for c in result["classes"]]
    for c in alone["classes"]:  # only the paper's rule can flag, by the index written beside it
        assert c["flagged_by"] == (["anomaly-index"] if c["size_ratio"] < 1 and c["anomaly_index"] > 2 else [])
    assert alone["flagged"] == [c["class"] for c in alone["classes"] if c["flagged_by"]]
    # no restoration (--restore-smoothness 0): the triggers judged are the ones written, none restored
    plain = run_cli(*common, "--dataset", "data.npz", "--no-strip", "--restore-smoothness", "0", "--name", "plain",
                    "--out", "out", cwd=tmp_path)  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-2000:]
    unrestored = json.loads((out / "metrics" / "plain_metrics.json").read_text())
    assert unrestored["restored"] is None and unrestored["flagged"] == [7]
    assert set(load_file(out / "metrics" / unrestored["triggers_file"])) == {"masks", "patterns"}


def test_defend_backdoor_screens_a_users_training_set(digits_backdoor: dict, tmp_path: Path) -> None:
    """``defend-backdoor`` on a user's module and the poisoned training set it was trained on:
    the flagged indices are written (hashed), precision and recall are scored only against
    the true indices given (.txt or .npy, equal results), and misuse is one line."""
    from safetensors.torch import load_file

    _user_model(tmp_path, digits_backdoor["poisoned"])

    np.savez(tmp_path / "trainset.npz", x_train=_u8(digits_backdoor["x_poison"]), y_train=digits_backdoor["y_poison"].numpy(),
             x_test=_u8(digits_backdoor["x_test"]), y_test=digits_backdoor["y_test"].numpy())  # fmt: skip
    truth = digits_backdoor["poison_indices"]
    (tmp_path / "poison.txt").write_text(",".join(str(i) for i in truth.tolist()))
    np.save(tmp_path / "poison.npy", truth.numpy())
    common = ["defend-backdoor", "--model", "net.py:build", "--weights", "suspect.safetensors", "--dataset",
              "trainset.npz", "--method", "spectral", "--device", "cpu"]  # fmt: skip
    no_share = run_cli(*common, "--out", "x", cwd=tmp_path)
    assert no_share.returncode == 2 and "--expected-share" in no_share.stderr and "Traceback" not in no_share.stderr
    retrain = run_cli(*common, "--expected-share", "0.1", "--retrain", "--out", "x", cwd=tmp_path)
    assert retrain.returncode == 2 and "--retrain" in retrain.stderr
    assert not (tmp_path / "x" / "metrics").exists()
    scored = run_cli(*common, "--expected-share", "0.1", "--poison-indices", "poison.txt", "--out", "out", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    out = tmp_path / "out"
    result = json.loads((out / "metrics" / "suspect_backdoor_defense_spectral_metrics.json").read_text())
    det = result["detection"]
    flagged_path = out / "metrics" / det["flagged_file"]
    assert hashlib.sha256(flagged_path.read_bytes()).hexdigest() == det["flagged_sha256"]
    flagged = set(load_file(flagged_path)["flagged"].tolist())
    true_set = set(truth.tolist())
    assert det["n"] == 1400 and det["n_flagged"] == len(flagged) and det["n_poison"] == len(true_set)
    assert det["precision"] == pytest.approx(len(flagged & true_set) / len(flagged))  # by hand from the written file
    assert det["recall"] == pytest.approx(len(flagged & true_set) / len(true_set))
    assert det["precision"] > len(true_set) / 1400  # better than flagging at random
    assert result["retrained_model"] is None and result["after"] is None and result["before"]["asr"] is None
    # the same truth as .npy reads the same; without it nothing is scored
    from_txt, from_npy = read_indices(tmp_path / "poison.txt"), read_indices(tmp_path / "poison.npy")
    assert torch.equal(from_txt[0], truth) and torch.equal(from_npy[0], truth)
    assert from_txt[1] == hashlib.sha256((tmp_path / "poison.txt").read_bytes()).hexdigest()
    assert result["poisoned_model"]["poison_indices_sha256"] == from_txt[1]
    (tmp_path / "bad.txt").write_text("1, 2, x")
    with pytest.raises(ConfigError, match="expected integers"):
        read_indices(tmp_path / "bad.txt")
    unscored = run_cli(*common[:-6], "--dataset", "trainset.npz", "--method", "ac", "--device", "cpu", "--out", "out",
                       cwd=tmp_path)  # fmt: skip
    assert unscored.returncode == 0, unscored.stderr[-1500:]
    ac = json.loads((out / "metrics" / "suspect_backdoor_defense_ac_metrics.json").read_text())
    assert ac["detection"]["precision"] is None and ac["detection"]["n_poison"] is None
    assert "not scored" in unscored.stdout
    report = run_cli("report", "--out", str(out))
    assert report.returncode == 0, report.stderr
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Training-set screening (spectral)" in html and "not scored: no true poison indices given" in html
    assert run_cli("verify", str(out)).returncode == 0


def test_repairs_of_a_redblue_poisoned_model_are_records_with_the_true_asr(mini_poisoned: Path, mini: Dataset,
                                                                           tmp_path: Path) -> None:
    """On redblue's own poisoned model the true trigger is known: ASR and RA before and after
    each repair, STRIP's false acceptance, and the repaired models saved as redblue records
    that load alone (hash-verified) and reproduce the recorded clean accuracy and ASR."""
    from redblue.artifacts import load_model
    from redblue.metrics import backdoor_metrics
    from redblue.stages.backdoor_audit import audit_backdoor_stage
    from redblue.stages.poison import poison_config_from_record

    shutil.copytree(mini_poisoned / "models", tmp_path / "models")
    loaded = load_model(tmp_path / "models" / "poisoned.json")
    cfg = BackdoorAuditConfig(n_images=200, epochs=8, steps_per_epoch=10, batch_size=8, strip_copies=8,
                              repair=("unlearn", "fine-prune"), unlearn_classes=(7,), repair_images=1000,
                              repair_val=200, repair_epochs=1, device="cpu")  # fmt: skip
    result = audit_backdoor_stage(tmp_path, loaded, mini, cfg, progress=False)
    poison = poison_config_from_record(loaded.record)
    assert result.before is not None and result.before["asr"] is not None
    assert result.strip is not None and result.strip["far"] is not None and result.strip["n_triggered"] > 0
    assert [row["method"] for row in result.repairs] == ["unlearn", "fine-prune"]
    assert all(row["skipped"] is None for row in result.repairs), result.repairs
    for row in result.repairs:
        repaired = load_model(tmp_path / "models" / f"{row['model']['name']}.json")
        assert repaired.record["weights_sha256"] == row["model"]["weights_sha256"]
        assert repaired.record["repair"]["method"] == row["method"] and repaired.record["poison"] == loaded.record["poison"]
        m = backdoor_metrics(repaired.model, mini.x_test, mini.y_test, poison.trigger(), poison.target)
        assert (m.clean_accuracy, m.asr, m.ra) == pytest.approx(
            (row["after"]["clean_accuracy"], row["after"]["asr"], row["after"]["ra"]), abs=1e-6)  # fmt: skip
    # rerun: the cached result is served while the repaired models are there, recomputed once one is gone
    again = audit_backdoor_stage(tmp_path, loaded, mini, cfg, progress=False)
    assert again.repairs == result.repairs
    (tmp_path / "models" / f"{result.repairs[0]['model']['name']}.safetensors").unlink()
    third = audit_backdoor_stage(tmp_path, loaded, mini, cfg, progress=False)
    assert (tmp_path / "models" / f"{third.repairs[0]['model']['name']}.safetensors").is_file()


def test_more_triggers_hold_out_the_pixels_found_and_stop_at_ordinary_size(digits_backdoor: dict) -> None:
    """A class's further triggers (what unlearning stamps beside the restored one): each found
    with the pixels of those before held out, each a real trigger (>= 99% of the other
    classes' images sent to 7), as many as asked while under the limit; a limit the next one
    does not get under stops the search, and says so."""
    from redblue.defenses.neural_cleanse import stamp
    from redblue.stages.backdoor_audit import PIXEL_USED, more_triggers

    model, x, y = digits_backdoor["poisoned"], digits_backdoor["x_test"], digits_backdoor["y_test"]
    cfg = BackdoorAuditConfig(epochs=20, steps_per_epoch=20, batch_size=16, unlearn_triggers=3, device="cpu")
    first = torch.zeros(8, 8)
    first[6:8, 6:8] = 1.0  # the planted patch itself as the first trigger
    pattern = torch.ones(1, 8, 8)
    tensors, meta = more_triggers(model, x, y, cfg, 7, first, pattern, limit=float("inf"))
    masks, patterns = tensors["masks"], tensors["patterns"]
    assert masks.shape == (3, 8, 8) and patterns.shape == (3, 1, 8, 8) and torch.equal(masks[0], first)
    assert meta["class"] == 7 and meta["l1"] == pytest.approx([float(m.sum()) for m in masks]) and "most asked for (3)" in meta["stop"]
    for i in range(1, 3):
        assert float(masks[i][(masks[:i] > PIXEL_USED).any(0)].abs().sum()) == 0.0  # no pixel used before
        with torch.no_grad():
            moved = model(stamp(x[y != 7], masks[i], patterns[i])).argmax(1) == 7
        assert float(moved.float().mean()) >= 0.985, i  # a real trigger (the check's 99%, up to one image's layout noise)
    _, stopped = more_triggers(model, x, y, cfg, 7, first, pattern, limit=0.5, rule="a test's limit")
    assert stopped["l1"] == [4.0] and stopped["limit"] == 0.5 and stopped["stop"].endswith("is not under 0.5, a test's limit")


def test_unlearning_draws_every_class_as_often_and_the_limit_needs_a_median() -> None:
    """Two classes, one with three triggers: each class is drawn half the time, not a quarter;
    with fewer than three judged norms there is no median to measure further triggers by;
    --unlearn-classes 7,7 is 7."""
    from redblue.defenses.repair import trigger_weights
    from redblue.stages.backdoor_audit import unlearn_limit

    weights = trigger_weights(torch.tensor([3, 7, 7, 7]))
    assert weights is not None
    draws = torch.multinomial(weights, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs(float((draws == 0).float().mean()) - 0.5) < 0.02  # class 3's one trigger
    assert trigger_weights(torch.tensor([7, 7])) is None and trigger_weights(None) is None  # one class: uniform
    cfg = BackdoorAuditConfig()
    assert unlearn_limit(torch.tensor([10.0, 50.0, float("inf")]), cfg) is None
    assert unlearn_limit(torch.tensor([10.0, 50.0, 30.0]), cfg) == (pytest.approx(7.5), "0.25 of the median judged norm 30.0")
    assert BackdoorAuditConfig(repair=("unlearn",), unlearn_classes=(7, 7, 3)).unlearn_classes == (7, 3)
