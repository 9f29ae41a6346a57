"""The adaptive trainer under injected overflows, clean stretches, cool-down, hand calls and resume."""

import torch
import torch.nn.functional as F

from ampray.amp.adaptive import AdaptiveMixedPrecisionTrainer
from ampray.amp.config import AdaptationConfig, MixedPrecisionConfig
from ampray.amp.loop import train_with_mixed_precision
from tests.unit.helpers import GradPoison, batches, tiny_mlp


def adaptive(**adapt):
    cfg = MixedPrecisionConfig(init_scale=2.0**10, growth_interval=100, adaptation=AdaptationConfig(**adapt))
    return AdaptiveMixedPrecisionTrainer(cfg, device="cpu")


def run(eng, model, n, poison_steps=()):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    poison = GradPoison(model[0].weight, steps=set(poison_steps))
    for x, y in batches(n, batch=4):
        eng.train_step(model, opt, F.cross_entropy, x, y)
    poison.remove()


def test_frequent_overflows_make_scaling_gentler_once_per_cooldown():
    eng = adaptive(window=10, overflow_rate_high=0.2, cooldown=15, clean_steps_to_increase=1000)
    model = tiny_mlp()
    run(eng, model, 30, poison_steps=range(0, 30, 2))  # 50% of steps overflow
    summary = eng.get_adaptation_summary()
    # windows end at steps 10, 20, 30; the one at 20 falls inside the cool-down of the change at 10
    assert [h["step"] for h in summary["history"]] == [10, 30]
    first = summary["history"][0]
    assert first["before"] == {"growth_factor": 2.0, "growth_interval": 100}
    assert first["after"] == {"growth_factor": 1.5, "growth_interval": 200}
    assert "overflow rate 0.5000" in first["reason"] and first["observed"]["overflow_rate"] == 0.5
    assert summary["total_adaptations"] == 2
    assert summary["current_config"]["growth_factor"] == 1.25
    assert summary["current_config"]["growth_interval"] == 400
    assert eng.scaler.growth_interval == 400  # the live scaler uses the adapted values


def test_clean_stretch_makes_scaling_bolder_within_bounds():
    eng = adaptive(window=5, clean_steps_to_increase=10, cooldown=0, min_growth_interval=30)
    run(eng, tiny_mlp(), 20)
    hist = eng.get_adaptation_summary()["history"]
    assert [h["step"] for h in hist] == [10, 20]
    assert hist[0]["after"] == {"growth_interval": 50} and hist[1]["after"] == {"growth_interval": 30}


def test_adapt_config_by_hand_returns_changes_and_reports_no_payoff():
    eng = adaptive(min_speedup=1.2, window=10**6)
    changes = eng.adapt_config({"overflow_rate": 0.5, "samples_per_s": 100.0}, {"samples_per_s": 95.0})
    assert changes == {"growth_factor": {"before": 2.0, "after": 1.5},
                       "growth_interval": {"before": 100, "after": 200}}
    warnings = eng.get_adaptation_summary()["warnings"]
    assert len(warnings) == 1 and "not paying off" in warnings[0]["message"]
    assert abs(warnings[0]["speedup"] - 100 / 95) < 1e-12
    assert eng.adapt_config({"overflow_rate": 0.01, "clean_steps": 0}) == {}


def test_gentler_scaling_keeps_the_growth_tracker():
    eng = adaptive(window=10**6)
    run(eng, tiny_mlp(), 7)
    assert eng.scaler.read().growth_tracker == 7
    eng.adapt_config({"overflow_rate": 0.9})
    assert eng.scaler.read().growth_tracker == 7


def test_adaptation_state_resumes():
    eng = adaptive(window=10, overflow_rate_high=0.2, cooldown=0)
    run(eng, tiny_mlp(), 10, poison_steps=range(0, 10, 2))
    state = eng.state_dict()
    other = adaptive()
    other.load_state_dict(state)
    assert other.get_adaptation_summary() == eng.get_adaptation_summary()
    assert other.scaler.settings() == eng.scaler.settings()


def test_train_with_mixed_precision_learns_and_reports():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    out = train_with_mixed_precision(model, loader, opt, F.cross_entropy, num_epochs=8,
                                     config=MixedPrecisionConfig(dtype="bf16"), device="cpu")
    assert len(out["epoch_losses"]) == 8 and out["final_loss"] == out["epoch_losses"][-1]
    assert out["final_loss"] < 0.5 * out["epoch_losses"][0]
    assert out["performance_summary"]["performance"]["optimizer_steps"] == 32
    assert out["adaptation_summary"]["total_adaptations"] == 0 and out["total_training_time"] > 0
