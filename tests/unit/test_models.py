"""CPU tests of the model zoo: shapes, parameter counts, GPT invariants, training, errors."""

from __future__ import annotations

import pytest
import torch

from ampray.models import (
    MODEL_KINDS,
    CNNConfig,
    GPTConfig,
    MLPConfig,
    build_config,
    build_criterion,
    build_model,
    example_batch,
)

# Small settings per kind, shared by the shape and training tests.
SMALL_KWARGS = {
    "mlp": dict(in_features=20, hidden=32, depth=2, num_classes=5),
    "cnn": dict(arch="small", width=8, num_classes=10),
    "gpt": dict(preset="nano"),
}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _on_meta(kind: str, **kwargs) -> torch.nn.Module:
    # Meta tensors have shapes but no storage: counting a 124M model this way costs no memory.
    with torch.device("meta"):
        return build_model(kind, **kwargs)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_output_shape_matches_example_batch(kind):
    torch.manual_seed(0)
    model = build_model(kind, **SMALL_KWARGS[kind])
    x, y = example_batch(kind, model.config, batch_size=3)
    out = model(x)
    if kind == "gpt":
        assert x.dtype == y.dtype == torch.long
        assert out.shape == (3, model.config.block_size, model.config.vocab_size)
    else:
        assert x.dtype == torch.float32 and y.dtype == torch.long
        assert out.shape == (3, model.config.num_classes)
    assert torch.isfinite(build_criterion(kind)(out, y))


@pytest.mark.parametrize("arch", ["small", "resnet18", "resnet50"])
def test_cnn_archs_classify_32px_images(arch):
    model = build_model("cnn", arch=arch, width=8, num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("preset", ["nano", "micro"])
def test_gpt_presets_shape(preset):
    model = build_model("gpt", preset=preset)
    T = 16
    logits = model(torch.randint(model.config.vocab_size, (2, T)))
    assert logits.shape == (2, T, 256)


def test_gpt_gpt2_preset_is_small():
    assert GPTConfig.preset("gpt2") == GPTConfig.preset("small") == GPTConfig()


def test_gpt_small_has_124m_parameters():
    model = _on_meta("gpt", preset="small")
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.num_params(non_embedding=False) - 124_000_000) <= 1_000_000
    assert model.num_params() == model.num_params(non_embedding=False) - 1024 * 768


@pytest.mark.parametrize(("arch", "expected"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnet_parameter_count_matches_reference(arch, expected):
    model = _on_meta("cnn", arch=arch, num_classes=1000)
    assert abs(_num_params(model) - expected) <= 100_000


def test_flops_estimates():
    mlp = build_model("mlp", in_features=10, hidden=20, depth=1, num_classes=3)
    assert mlp.flops_per_sample() == 3 * 2 * (10 * 20 + 20 * 3)
    # ResNet-50 at 224px is the well-known ~4.1 GMACs forward.
    resnet = _on_meta("cnn", arch="resnet50", num_classes=1000)
    assert resnet.flops_per_sample(224) / 6 == pytest.approx(4.1e9, rel=0.02)
    gpt = build_model("gpt", preset="nano")
    cfg = gpt.config
    assert gpt.flops_per_token() == 6 * gpt.num_params() + 12 * cfg.n_layer * cfg.n_embd * 64


def test_gpt_weight_tying_is_one_tensor():
    model = build_model("gpt", preset="nano")
    assert model.lm_head.weight is model.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = build_model("gpt", preset="nano").eval()
    idx = torch.randint(256, (1, 32))
    changed = idx.clone()
    changed[0, 20] = (idx[0, 20] + 1) % 256
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :20], after[:, :20])
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def test_gpt_rejects_too_long_sequence():
    model = build_model("gpt", preset="nano")
    with pytest.raises(ValueError, match="block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_sgd_steps_reduce_loss_on_fixed_batch(kind):
    torch.manual_seed(0)
    model = build_model(kind, **SMALL_KWARGS[kind])
    generator = torch.Generator().manual_seed(0)
    x, y = example_batch(kind, model.config, batch_size=8, generator=generator)
    criterion = build_criterion(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_example_batch_accepts_kwargs_and_shifts_gpt_targets():
    x, y = example_batch("gpt", {"preset": "nano", "block_size": 8}, batch_size=2)
    assert x.shape == y.shape == (2, 8)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    x, _ = example_batch("cnn", CNNConfig(in_channels=1, image_size=28), batch_size=4)
    assert x.shape == (4, 1, 28, 28)


def test_build_model_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"kind='resnet'.*allowed: mlp, cnn, gpt"):
        build_model("resnet")
    with pytest.raises(ValueError, match="kind="):
        build_criterion("resnet")


def test_build_model_rejects_unknown_argument():
    with pytest.raises(ValueError, match=r"unknown argument 'hiden'.*allowed: in_features, hidden"):
        build_model("mlp", hiden=3)
    with pytest.raises(ValueError, match=r"unknown argument 'layers'.*preset"):
        build_model("gpt", preset="nano", layers=3)


def test_config_validation_names_field_and_allowed_values():
    with pytest.raises(ValueError, match=r"CNNConfig.arch='vgg'.*resnet50"):
        CNNConfig(arch="vgg")
    with pytest.raises(ValueError, match=r"name='huge'.*nano"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match=r"n_embd=65.*n_head=2"):
        GPTConfig.preset("nano", n_embd=65)
    with pytest.raises(ValueError, match=r"MLPConfig.dropout=1.5"):
        MLPConfig(dropout=1.5)
    with pytest.raises(ValueError, match="model_config=MLPConfig"):
        example_batch("gpt", MLPConfig(), batch_size=1)


def test_cnn_width_default_is_resolved():
    assert build_config("cnn", arch="resnet18").width == 64
    assert build_config("cnn").width == 32


def test_cnn_flops_leave_batchnorm_statistics_untouched():
    model = build_model("cnn", width=8)
    before = model.features[1].running_mean.clone()
    model.flops_per_sample()
    torch.testing.assert_close(model.features[1].running_mean, before)
