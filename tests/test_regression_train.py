"""SoftmaxRegression, the training loop on the library's kernels, the reference, checkpoints."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import triton_softmax as ts
from triton_softmax.regression import (
    Dataset,
    SoftmaxRegression,
    TrainConfig,
    TrainingError,
    load_checkpoint,
    load_iris,
    save_checkpoint,
    train,
)
from triton_softmax.regression.checkpoint import CHECKPOINT_FORMAT


@pytest.fixture(scope="module")
def iris_run():
    """The default run on Iris: what `triton-softmax train` does before exporting."""
    return train(load_iris())


@pytest.fixture(scope="module")
def short_run():
    """A few epochs of the default run on Iris: enough for what does not need a trained model."""
    return train(load_iris(), TrainConfig(epochs=5))


def _blobs(n_classes: int, n_per_class: int = 20, seed: int = 0) -> Dataset:
    """Well separated Gaussian blobs in 3-D, one per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=5.0, size=(n_classes, 3))
    x = np.concatenate([c + rng.normal(size=(n_per_class, 3)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return Dataset(
        x.astype(np.float32),
        y.astype(np.int64),
        ("f0", "f1", "f2"),
        tuple(f"c{i}" for i in range(n_classes)),
        "blobs",
    )


@pytest.mark.slow  # the full default run through the interpreter: ~40 s on 2 cores
def test_default_iris_run_reaches_the_bar_and_matches_the_reference(iris_run):
    m = iris_run.metrics
    assert m["test_accuracy"] >= 0.95
    assert m["train_accuracy"] >= 0.95
    assert (m["n_train"], m["n_test"]) == (120, 30)
    assert np.bincount(iris_run.data.labels[iris_run.test_indices]).tolist() == [10, 10, 10]
    assert m["kernel_path"] == ts.kernel_path(iris_run.device)
    # Same split, same initial weights, same optimizer: only the loss kernel differs.
    assert m["reference_test_accuracy"] == m["test_accuracy"]
    assert m["reference_epochs_run"] == m["epochs_run"]
    assert abs(m["reference_final_loss"] - m["final_loss"]) < 1e-4
    assert m["max_abs_weight_diff_vs_reference"] < 1e-3
    assert m["stopped_early"] and m["epochs_run"] < iris_run.config.epochs


@pytest.mark.slow  # shares the default run above
def test_training_loss_falls_and_probabilities_are_the_library_softmax(iris_run):
    losses = iris_run.fit.losses
    assert losses[-1] < 0.25 * losses[0]
    x = torch.from_numpy(iris_run.test.features).to(iris_run.device)
    with torch.no_grad():
        probs = iris_run.model(x)
        expected = torch.softmax(iris_run.model.logits(x), dim=-1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(x), device=x.device))


def test_same_seed_same_weights_other_seed_other_weights():
    data = _blobs(3)
    config = TrainConfig(epochs=4, optimizer="sgd", lr=0.05, batch_size=16, patience=0, seed=7)
    a = train(data, config, reference=False).model.state_dict()
    b = train(data, config, reference=False).model.state_dict()
    c = train(data, TrainConfig(**{**vars(config), "seed": 8}), reference=False).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["linear.weight"], c["linear.weight"])


def test_mini_batch_sgd_and_adam_learn_separable_blobs():
    data = _blobs(4)
    sgd = TrainConfig(epochs=15, optimizer="sgd", lr=0.2, batch_size=32, patience=0)
    adam = TrainConfig(epochs=15, optimizer="adam", lr=0.1, batch_size=0, weight_decay=1e-3)
    for config in (sgd, adam):
        run = train(data, config, reference=False)
        assert run.metrics["train_accuracy"] >= 0.9, config
        assert run.metrics["test_accuracy"] >= 0.9, config


def test_two_classes_is_logistic_regression():
    run = train(_blobs(2), TrainConfig(epochs=20), reference=True)
    assert run.model.linear.weight.shape == (2, 3)
    assert run.metrics["test_accuracy"] == 1.0
    x = torch.from_numpy(run.test.features).to(run.device)
    with torch.no_grad():
        probs = run.model(x)
        logits = run.model.logits(x)
    assert probs.shape == (len(x), 2)
    # Two-class softmax is the logistic sigmoid of the logit difference.
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(logits[:, 1] - logits[:, 0]))


def test_early_stop_on_a_plateau():
    # The first epoch sets the best loss; no later epoch can beat it by 10, so training stops
    # after `patience` more epochs.
    run = train(_blobs(3), TrainConfig(epochs=50, patience=3, min_delta=10.0), reference=False)
    assert run.fit.stopped_early and run.fit.epochs_run == 4


def test_progress_bar_ends_at_the_number_of_epochs_run(capsys):
    run = train(
        _blobs(3),
        TrainConfig(epochs=50, patience=3, min_delta=10.0),
        progress=True,
        reference=False,
    )
    final = capsys.readouterr().err.rstrip().split("\r")[-1]
    assert run.fit.epochs_run == 4 and " 4/50 " in final, final


def test_diverging_loss_raises_a_clear_error():
    config = TrainConfig(epochs=5, optimizer="sgd", lr=1e38, momentum=0.0, patience=0)
    with pytest.raises(TrainingError, match="lower the learning rate"):
        train(_blobs(3), config, reference=False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs"),
        ("lr", -1.0, "learning rate"),
        ("optimizer", "rmsprop", "optimizer"),
        ("momentum", 1.0, "momentum"),
        ("weight_decay", -1.0, "weight decay"),
        ("batch_size", -2, "batch size"),
        ("test_size", 1.0, "test size"),
        ("seed", -1, "seed"),
        ("patience", -1, "patience"),
        ("min_delta", -1.0, "min delta"),
    ],
)
def test_config_rejects_out_of_range_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value}).validate()


def test_model_loss_accepts_indices_one_hot_and_probabilities():
    torch.manual_seed(0)
    model = SoftmaxRegression(3, 4)
    x = torch.randn(6, 3)
    target = torch.tensor([0, 3, 1, 2, 2, 0])
    one_hot = F.one_hot(target, 4).float()
    soft = torch.softmax(torch.randn(6, 4), dim=-1)
    logits = model.logits(x)
    torch.testing.assert_close(model.loss(x, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(model.loss(x, one_hot), F.cross_entropy(logits, target))
    torch.testing.assert_close(model.loss(x, soft), F.cross_entropy(logits, soft))
    model.loss(x, one_hot).backward()
    assert model.linear.weight.grad is not None and torch.isfinite(model.linear.weight.grad).all()


def test_normalisation_and_shape_checks():
    model = SoftmaxRegression(3, 2)
    x = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 2.0]])
    model.fit_normalization(x)
    torch.testing.assert_close(model.feature_mean, torch.tensor([2.0, 5.0, 1.0]))
    torch.testing.assert_close(model.feature_std, torch.tensor([1.0, 1.0, 1.0]))  # constant: 1
    with pytest.raises(ValueError, match=r"shape \(N, 3\), got \(2, 4\)"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="n_classes must be at least 2"):
        SoftmaxRegression(3, 1)


def test_checkpoint_round_trip(tmp_path, short_run):
    iris_run = short_run
    data = iris_run.data
    path = save_checkpoint(
        tmp_path / "sub" / "model.safetensors",
        iris_run.model,
        feature_names=data.feature_names,
        class_names=data.class_names,
        config=iris_run.config,
        metrics=iris_run.metrics,
    )
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left
    ckpt = load_checkpoint(path)
    assert ckpt.feature_names == list(data.feature_names)
    assert ckpt.class_names == list(data.class_names)
    assert ckpt.config == vars(iris_run.config)
    assert ckpt.metrics == json.loads(json.dumps(iris_run.metrics))
    assert ckpt.versions["torch"] == torch.__version__
    assert not ckpt.model.training
    for key, value in iris_run.model.state_dict().items():
        torch.testing.assert_close(ckpt.model.state_dict()[key], value.cpu(), rtol=0, atol=0)
    x = torch.from_numpy(data.features)
    torch.testing.assert_close(
        ckpt.model.logits(x), iris_run.model.logits(x.to(iris_run.device)).cpu()
    )


def test_load_checkpoint_rejects_other_files(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_checkpoint(junk)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a triton-softmax checkpoint"):
        load_checkpoint(other)


def _crafted(tmp_path, **changes):
    """A valid 4-feature, 3-class checkpoint whose metadata fields are replaced by ``changes``
    (JSON texts; ``None`` deletes the field)."""
    model = SoftmaxRegression(4, 3)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "feature_names": json.dumps(["a", "b", "c", "d"]),
        "class_names": json.dumps(["x", "y", "z"]),
        "config": json.dumps({"epochs": 5, "lr": 0.1, "optimizer": "adam"}),
        "metrics": json.dumps({"test_accuracy": 0.9, "stopped_early": False}),
        "versions": json.dumps({"torch": "2.0"}),
    }
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    path = tmp_path / "crafted.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), meta)
    return path


@pytest.mark.parametrize(
    ("field", "text", "message"),
    [
        ("versions", "[1]", "is not a JSON object of strings"),
        ("versions", '{"torch": 2}', "is not a JSON object of strings"),
        ("config", "null", "is not a JSON object of scalars"),
        ("config", "[]", "is not a JSON object of scalars"),
        ("config", '{"epochs": "many"}', "has epochs='many', expected int"),
        ("config", '{"lr": true}', "has lr=True, expected float"),
        ("config", None, "is missing"),
        ("metrics", "5", "is not a JSON object of scalars"),
        ("metrics", '{"curve": [1, 2]}', "is not a JSON object of scalars"),
        ("metrics", "{", "is not JSON"),
        ("class_names", '"abc"', "is not a JSON list of names"),
        ("class_names", '["x", "x", "z"]', "repeats 'x'; names must be unique"),
        ("class_names", "[1, 2, 3]", "not a non-empty string"),
        ("class_names", '["x", "", "z"]', "not a non-empty string"),
        ("class_names", '["x", "y"]', "has 2 names; the weights have 3 classes"),
        ("feature_names", '{"a": 1, "b": 2, "c": 3, "d": 4}', "is not a JSON list of names"),
        ("feature_names", '["a", "a", "b", "c"]', "repeats 'a'"),
        ("feature_names", None, "is missing"),
    ],
)
def test_load_checkpoint_checks_every_metadata_field(tmp_path, field, text, message):
    path = _crafted(tmp_path, **{field: text})
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"{path}: checkpoint metadata field {field!r} ")
    assert message in str(e.value)


def test_load_checkpoint_accepts_absent_metrics_and_versions(tmp_path):
    ckpt = load_checkpoint(_crafted(tmp_path, metrics=None, versions=None))
    assert (ckpt.metrics, ckpt.versions) == ({}, {})
    assert ckpt.class_names == ["x", "y", "z"]


def test_save_checkpoint_refuses_names_load_would_refuse(tmp_path):
    with pytest.raises(ValueError, match="class_names repeats 'x'"):
        save_checkpoint(
            tmp_path / "m.safetensors",
            SoftmaxRegression(2, 3),
            feature_names=["a", "b"],
            class_names=["x", "x", "y"],
            config=TrainConfig(),
            metrics={},
        )
    assert not any(tmp_path.iterdir())
