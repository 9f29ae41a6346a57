"""Lightning's precision plugins train with ampray.GradScaler: the one changed line is the scaler passed in.

Lightning refuses fp16 AMP on CPU when asked by string: `Trainer(accelerator="cpu", precision="16-mixed")`
warns and silently switches to bf16-mixed (which uses no scaler). The supported way to get fp16 with a
chosen scaler is the plugin object, passed explicitly: `plugins=[MixedPrecision("16-mixed", "cpu",
scaler=...)]`, which the accelerator connector takes as it is. That is what a user on CUDA writes too.
"""

import pytest
import torch
from torch import nn

import ampray

lightning = pytest.importorskip("lightning")
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision as FabricMixedPrecision
from lightning.pytorch.plugins.precision import MixedPrecision

INF = float("inf")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:GPU available but not used"),
              pytest.mark.filterwarnings("ignore:The 'train_dataloader' does not have many workers")]


def data(n=12, batch=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n * batch, 8, generator=g)
    y = (x @ torch.randn(8, 1, generator=g)).tanh()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


class Tiny(lightning.LightningModule):
    """An MLP that makes one gradient inf after the backward of chosen batches (counted by the module)."""

    def __init__(self, poison=()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.poison, self.batches, self.losses, self.snapshots, self.scales = set(poison), 0, [], [], []

    def training_step(self, batch, _):
        self.snapshots.append([p.detach().clone() for p in self.parameters()])
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.losses.append(loss.item())
        return loss

    def on_after_backward(self):  # before Lightning's unscale_ and the scaler's inf check
        if self.batches in self.poison:
            self.net[2].weight.grad[0, 0] = INF
        self.batches += 1

    def on_train_batch_end(self, *_):
        self.scales.append(self.trainer.precision_plugin.scaler.get_scale())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(root, scaler, poison=(), max_steps=12, ckpt_path=None, model=None, device="cpu"):
    model = model or Tiny(poison)
    trainer = lightning.Trainer(
        accelerator="gpu" if device == "cuda" else device, devices=1, max_steps=max_steps,
        plugins=[MixedPrecision("16-mixed", device, scaler=scaler)],
        default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    assert trainer.precision_plugin.scaler is scaler
    return model, trainer


def unchanged(model, i):
    return all(torch.equal(a, b) for a, b in zip(model.snapshots[i], model.snapshots[i + 1]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_trainer_trains_with_ampray_gradscaler_bitwise_as_with_torchs(tmp_path, device):
    ours = ampray.GradScaler(device, init_scale=2.0**10, growth_interval=3)
    model, _ = fit(tmp_path, ours, poison={4, 8}, device=device)
    ref, _ = fit(tmp_path, torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=3), poison={4, 8},
                 device=device)
    assert model.scales == ref.scales and model.losses == ref.losses
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    st = ours.stats()
    assert (st.steps, st.skipped_steps, st.overflows, st.backoffs) == (12, 2, 2, 2)
    assert model.scales[4] == model.scales[3] / 2 and model.scales[8] == model.scales[7] / 2
    assert unchanged(model, 4) and unchanged(model, 8) and not unchanged(model, 5)
    assert sum(model.losses[-3:]) < sum(model.losses[:3])


def test_trainer_gets_the_extras_and_checkpoints_them(tmp_path):
    model = Tiny(poison={3, 6, 7})
    ours = ampray.GradScaler("cpu", init_scale=2.0**10, growth_interval=100, hysteresis=2, attribution=True)
    model, trainer = fit(tmp_path, ours.attach(model), model=model)
    # hysteresis 2: the overflow at 3 spends the budget, the clean step 4 refills it; 6 spends it, 7 backs off
    assert model.scales[2:9] == [2.0**10] * 5 + [2.0**9] * 2
    assert [unchanged(model, i) for i in (3, 4, 6, 7)] == [True, False, True, True]
    st = ours.stats()
    assert (st.steps, st.skipped_steps, st.overflows, st.backoffs, st.hysteresis_left) == (12, 3, 3, 1, 2)
    assert ours.top_offenders() == [("net.2.weight", 3)]

    path = tmp_path / "scaler.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["MixedPrecision"]
    assert saved["scale"] == 2.0**9 and saved["ampray"]["hysteresis"] == 2 and saved["ampray"]["skipped_steps"] == 3

    fresh = Tiny(poison={0})  # the first batch after the resume overflows
    resumed = ampray.GradScaler("cpu", attribution=True).attach(fresh)  # Lightning restores the state into it
    fit(tmp_path, resumed, max_steps=14, ckpt_path=path, model=fresh)
    st = resumed.stats()
    assert (st.steps, st.skipped_steps, st.overflows, st.backoffs, resumed.hysteresis) == (14, 4, 4, 1, 2)
    assert fresh.scales == [2.0**9, 2.0**9]  # the restored budget absorbed the overflow
    assert resumed.top_offenders() == [("net.2.weight", 4)]


def test_fabric_loop_with_ampray_gradscaler_matches_torchs():
    def run(scaler):
        fabric = Fabric(accelerator="cpu", devices=1, plugins=FabricMixedPrecision("16-mixed", "cpu", scaler=scaler))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        model, opt = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=1e-2))
        scales = []
        for i, (x, y) in enumerate(data()):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x).float(), y)
            fabric.backward(loss)
            if i in (2, 5):
                model.module[0].bias.grad[1] = INF
            opt.step()
            scales.append(scaler.get_scale())
        return model, scales

    ours = ampray.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    model, scales = run(ours)
    ref, ref_scales = run(torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2))
    assert scales == ref_scales and len(set(scales)) > 2
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert (ours.stats().steps, ours.stats().skipped_steps) == (12, 2)
