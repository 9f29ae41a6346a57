import json
import re

import pytest
import torch

from ampray.amp.config import AdaptationConfig, ConfigError, MixedPrecisionConfig


def test_defaults_match_the_documented_values():
    c = MixedPrecisionConfig()
    assert (c.enabled, c.dtype, c.init_scale, c.growth_factor, c.backoff_factor, c.growth_interval) == (
        True, torch.float16, 2.0**16, 2.0, 0.5, 2000)
    assert c.memory_efficient and c.use_dynamic_loss_scaling and c.use_grad_scaling
    assert c.log_scaling and c.track_performance and c.save_scaler_state
    assert (c.hysteresis, c.min_scale, c.max_scale, c.max_grad_norm, c.gradient_accumulation_steps) == (
        1, 1.0, 2.0**24, None, 1)
    assert c.scaling_enabled


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("float16", torch.float16),
                                        ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                        ("fp32", torch.float32), ("float32", torch.float32),
                                        (torch.bfloat16, torch.bfloat16)])
def test_dtype_aliases(name, dtype):
    assert MixedPrecisionConfig(dtype=name).dtype == dtype


def test_bf16_scales_only_when_asked_and_fp32_or_disabled_never():
    assert not MixedPrecisionConfig(dtype="bf16").scaling_enabled
    assert MixedPrecisionConfig(dtype="bf16", bf16_grad_scaling=True).scaling_enabled
    assert not MixedPrecisionConfig(dtype="fp32").scaling_enabled
    assert not MixedPrecisionConfig(enabled=False).scaling_enabled
    assert not MixedPrecisionConfig(use_grad_scaling=False).scaling_enabled


@pytest.mark.parametrize("kwargs,field,allowed", [
    ({"backoff_factor": 1.5}, "backoff_factor", "(0, 1)"),
    ({"backoff_factor": 0.0}, "backoff_factor", "(0, 1)"),
    ({"growth_factor": 1.0}, "growth_factor", "> 1"),
    ({"growth_interval": 0}, "growth_interval", ">= 1"),
    ({"growth_interval": "10"}, "growth_interval", "integer"),
    ({"hysteresis": 0}, "hysteresis", ">= 1"),
    ({"min_scale": 4.0, "init_scale": 2.0}, "init_scale", "min_scale=4.0 <= init_scale"),
    ({"init_scale": 2.0**30}, "init_scale", "<= max_scale"),
    ({"dtype": "fp8"}, "dtype", "bf16"),
    ({"oom_policy": "pray"}, "oom_policy", "split"),
    ({"collapse_policy": "ignore"}, "collapse_policy", "fallback_bf16"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps", ">= 1"),
    ({"max_grad_norm": -1.0}, "max_grad_norm", "> 0"),
    ({"enabled": "yes"}, "enabled", "boolean"),
    ({"adaptation": {"overflow_rate_high": 2.0}}, "overflow_rate_high", "(0, 1)"),
])
def test_validation_names_field_value_and_rule(kwargs, field, allowed):
    with pytest.raises(ConfigError) as err:
        MixedPrecisionConfig(**kwargs)
    msg = str(err.value)
    assert field in msg and allowed in msg
    assert repr(next(iter(kwargs.values()))) in msg or field == "overflow_rate_high" or field == "init_scale"


def test_round_trip_json_and_toml():
    c = MixedPrecisionConfig(dtype="bf16", hysteresis=3, max_grad_norm=1.0, fp32_modules=("head", "LayerNorm"),
                             oom_policy="split", adaptation=AdaptationConfig(window=7, min_speedup=1.3))
    assert MixedPrecisionConfig.from_json(c.to_json()) == c
    pytest.importorskip("tomli_w")  # a declared dependency; absent only on bare GPU hosts
    assert MixedPrecisionConfig.from_toml(c.to_toml()) == c
    assert MixedPrecisionConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    d = MixedPrecisionConfig()
    assert MixedPrecisionConfig.from_toml(d.to_toml()) == d  # None max_grad_norm survives TOML


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['growth_rate'\]"):
        MixedPrecisionConfig.from_dict({"growth_rate": 2.0})


def test_model_options_must_be_values_a_job_file_can_hold():
    """The job is saved as TOML before any worker starts: None (TOML has no null) and objects are refused
    naming the option, not by the TOML writer after the checks."""
    from ampray.job import JobConfig

    for options, named in (({"norm": None}, "model.options.norm=None"),
                           ({"a": {"b": [1, None]}}, "model.options.a.b[1]=None"),
                           ({"act": object()}, "model.options.act=<object")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            JobConfig.load(None, {"model.factory": "m:f", "model.options": options})
    job = JobConfig.load(None, {"model.factory": "m:f", "model.options": {"sizes": (1, 2), "t": {"x": 1.5}}})
    import tomllib

    assert tomllib.loads(job.to_toml())["model"]["options"] == {"sizes": [1, 2], "t": {"x": 1.5}}
