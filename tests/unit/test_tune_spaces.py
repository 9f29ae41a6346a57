"""Search spaces: presets, TOML loading, errors before any trial, sampling, Ray Tune form; no Ray cluster."""

import random
import subprocess
import sys

import pytest

from ampray.amp.config import ConfigError
from ampray.job import JobConfig
from ampray.tune_spaces import PRESETS, Space, apply, load_space


def job_validator(overrides):
    JobConfig.load(None, overrides)


def write(tmp_path, text, name="space.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


USER_SPACE = """
[params]
"precision.init_scale" = { loguniform = [256.0, 16777216.0] }
"precision.hysteresis" = { choice = [1, 2, 4] }
"optimizer.lr" = { loguniform = [1e-4, 1e-2] }
"model.options.hidden" = { choice = [16, 32] }
[fixed]
"run.adaptive" = true
"""


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("validate", [job_validator, None], ids=["job", "precision-only"])
def test_every_preset_loads_and_validates(name, validate):
    space = load_space(name, validate)
    assert space.params == PRESETS[name]["params"] and space.fixed == PRESETS[name]["fixed"]


def test_full_is_the_union_and_adaptive_fixes_run_adaptive():
    full = load_space("full")
    for part in ("scaler", "adaptive", "precision"):
        assert PRESETS[part]["params"].items() <= full.params.items()
    assert load_space("adaptive").fixed == {"run.adaptive": True} == full.fixed


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_samples_are_within_bounds_and_valid_jobs(name):
    space, rng = load_space(name, job_validator), random.Random(0)
    for _ in range(50):
        sampled = space.sample(rng)
        assert set(sampled) == set(space.params) | set(space.fixed)
        for path, spec in space.params.items():
            ((kind, args),) = spec.items()
            value = sampled[path]
            if kind == "choice":
                assert value in args
            elif kind in ("randint", "lograndint"):
                assert isinstance(value, int) and args[0] <= value < args[1]
            else:
                assert isinstance(value, float) and args[0] <= value <= args[1]
        job = apply(JobConfig(), sampled)
        assert isinstance(job, JobConfig)
        flat = job.flat()
        assert flat["precision.init_scale"] == sampled.get("precision.init_scale", 2.0**16)
        assert flat["run.adaptive"] is True


def test_sample_extremes_of_qloguniform_and_lograndint_stay_inside():
    space = Space({"precision.init_scale": {"qloguniform": [300.0, 5000.0, 256.0]},
                   "precision.growth_interval": {"lograndint": [1, 3]}})
    rng = random.Random(1)
    draws = [space.sample(rng) for _ in range(300)]
    assert {d["precision.init_scale"] for d in draws} <= {256.0 * k for k in range(2, 20)}
    assert {d["precision.growth_interval"] for d in draws} == {1, 2}


def test_user_space_from_toml_round_trips(tmp_path):
    space = load_space(write(tmp_path, USER_SPACE), job_validator)
    assert space.params["precision.hysteresis"] == {"choice": [1, 2, 4]}
    assert space.fixed == {"run.adaptive": True}
    again = load_space(write(tmp_path, space.to_toml(), "again.toml"), job_validator)
    assert again == space and again.to_dict() == space.to_dict()
    job = apply(JobConfig(), space.sample(random.Random(3)))
    assert job.model.options["hidden"] in (16, 32) and 1e-4 <= job.optimizer.lr <= 1e-2


def test_apply_to_a_dict_gives_a_dict_and_leaves_the_base_alone():
    base = {"precision": {"init_scale": 1024.0}}
    out = apply(base, {"precision.adaptation.window": 50, "run.steps": 10})
    assert out == {"precision": {"init_scale": 1024.0, "adaptation": {"window": 50}}, "run": {"steps": 10}}
    assert base == {"precision": {"init_scale": 1024.0}}
    assert JobConfig.from_dict(out).precision.adaptation.window == 50


@pytest.mark.parametrize("text,needles", [
    ('[params]\n"precision.init_scal" = { uniform = [1.0, 2.0] }', ["precision.init_scal", "init_scale"]),
    ('[params]\n"precision.adaptation.windw" = { choice = [1] }', ["windw", "AdaptationConfig"]),
    ('[params]\n"precision.adaptation" = { choice = [1] }', ["precision.adaptation", "table"]),
    ('[params]\n"runn.steps" = { choice = [1] }', ["runn.steps", "section in"]),
    ('[params]\n"optimizer.lrr" = { loguniform = [0.001, 0.1] }', ["optimizer.lrr", "0.001", "lrr"]),
    ('[params]\n"precision.init_scale" = { gaussian = [1.0, 2.0] }', ["precision.init_scale", "gaussian",
                                                                      "loguniform"]),
    ('[params]\n"precision.init_scale" = { uniform = [4096.0, 256.0] }', ["precision.init_scale", "4096.0",
                                                                          "low=4096.0 must be < high=256.0"]),
    ('[params]\n"optimizer.lr" = { loguniform = [0.0, 0.1] }', ["optimizer.lr", "low=0.0", "low > 0"]),
    ('[params]\n"precision.backoff_factor" = { uniform = [0.5, 1.5] }', ["precision.backoff_factor", "1.5",
                                                                         "(0, 1)"]),
    ('[params]\n"precision.dtype" = { choice = ["fp16", "fp8"] }', ["precision.dtype", "'fp8'", "bfloat16"]),
    ('[params]\n"precision.hysteresis" = { uniform = [1, 4] }', ["precision.hysteresis", "1.0", "randint"]),
    ('[params]\n"precision.growth_interval" = { randint = [1.5, 4] }', ["growth_interval", "1.5", "integers"]),
    ('[params]\n"precision.growth_interval" = { randint = [0, 4] }', ["growth_interval", "value 0", ">= 1"]),
    ('[params]\n"precision.init_scale" = { qloguniform = [1.0, 2.0] }', ["init_scale", "[low, high, q]"]),
    ('[params]\n"run.steps" = 3', ["run.steps", "[fixed]"]),
    ('[params]\n"run.steps" = { choice = [10] }\n[fixed]\n"run.steps" = 5', ["run.steps", "both"]),
    ('[params]\n"run.steps" = { choice = [10] }\n[fixed]\n"run.adaptive" = "yes"', ["run.adaptive", "'yes'"]),
    ('[params]\n"model.options.depth_of_field" = { choice = [3] }', ["depth_of_field", "3"]),
    ('[fixed]\n"run.adaptive" = true', ["no [params]"]),
    ('[params]\n"run.steps" = { choice = [10] }\n[extra]\nx = 1', ["extra"]),
    ('[params\n"run.steps" = 1', ["not valid TOML"]),
])
def test_bad_spaces_fail_naming_parameter_and_value(tmp_path, text, needles):
    with pytest.raises(ConfigError) as info:
        load_space(write(tmp_path, text), job_validator)
    for needle in needles:
        assert needle in str(info.value)


def test_without_validator_only_precision_values_are_checked(tmp_path):
    path = write(tmp_path, '[params]\n"optimizer.lr" = { uniform = [-1.0, 0.1] }\n'
                           '"precision.growth_factor" = { uniform = [1.5, 3.0] }')
    assert load_space(path).params["optimizer.lr"] == {"uniform": [-1.0, 0.1]}
    with pytest.raises(ConfigError, match=r"optimizer.lr.*-1.0"):
        load_space(path, job_validator)
    with pytest.raises(ConfigError, match=r"growth_factor.*0.5"):
        load_space(write(tmp_path, '[params]\n"precision.growth_factor" = { uniform = [0.5, 3.0] }'))


def test_fixed_values_take_part_in_validation(tmp_path):
    text = '[params]\n"precision.init_scale" = { loguniform = [256.0, 1e9] }\n'
    with pytest.raises(ConfigError, match=r"init_scale.*1000000000.0"):
        load_space(write(tmp_path, text))
    widened = load_space(write(tmp_path, text + '[fixed]\n"precision.max_scale" = 1e9\n', "w.toml"))
    assert widened.fixed == {"precision.max_scale": 1e9}


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"'scalar'.*\['scaler', 'adaptive', 'precision', 'full'\]"):
        load_space("scalar")
    with pytest.raises(ConfigError, match="no such file"):
        load_space(tmp_path / "nope.toml")


def test_to_tune_gives_ray_domains_with_the_right_bounds():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized, Uniform

    space = Space({"precision.init_scale": {"loguniform": [256.0, 65536.0]},
                   "precision.backoff_factor": {"uniform": [0.25, 0.9]},
                   "optimizer.lr": {"qloguniform": [1e-4, 1e-2, 1e-4]},
                   "precision.adaptation.cooldown": {"randint": [0, 500]},
                   "precision.growth_interval": {"lograndint": [50, 5000]},
                   "precision.dtype": {"choice": ["fp16", "bf16"]}}, fixed={"run.adaptive": True})
    ts = space.to_tune()
    assert ts["run.adaptive"] is True
    expect = {"precision.init_scale": (Float, LogUniform, 256.0, 65536.0),
              "precision.backoff_factor": (Float, Uniform, 0.25, 0.9),
              "precision.adaptation.cooldown": (Integer, Uniform, 0, 500),
              "precision.growth_interval": (Integer, LogUniform, 50, 5000)}
    for path, (domain, sampler, low, high) in expect.items():
        assert isinstance(ts[path], domain) and isinstance(ts[path].get_sampler(), sampler)
        assert (ts[path].lower, ts[path].upper) == (low, high)
    lr = ts["optimizer.lr"].get_sampler()
    assert isinstance(lr, Quantized) and lr.q == 1e-4 and isinstance(lr.sampler, LogUniform)
    assert isinstance(ts["precision.dtype"], Categorical) and ts["precision.dtype"].categories == ["fp16", "bf16"]
    assert isinstance(tune.choice([1]), Categorical)
    assert 256.0 <= ts["precision.init_scale"].sample() <= 65536.0


def test_mutations_and_clip_for_pbt():
    from ray.tune.search.sample import Domain

    space = load_space("full")
    mutations = space.mutations()
    assert set(mutations) == set(space.params)
    assert mutations["precision.dtype"] == ["fp16", "bf16"] and isinstance(mutations["precision.init_scale"], Domain)
    perturbed = {"precision.backoff_factor": 0.9 * 1.2, "precision.growth_interval": 4999 * 1.2,
                 "precision.adaptation.cooldown": -3, "precision.dtype": "bf16", "run.adaptive": True}
    clipped = space.clip(perturbed)
    assert clipped["precision.backoff_factor"] == 0.9 and clipped["precision.growth_interval"] == 4999
    assert clipped["precision.adaptation.cooldown"] == 0 and clipped["precision.dtype"] == "bf16"
    apply(JobConfig(), clipped)


def test_importing_tune_spaces_does_not_import_ray_or_orchestrator():
    code = ("import sys, ampray.tune_spaces; "
            "assert 'ray' not in sys.modules and 'ampray.orchestrator' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ordered_fields_must_keep_their_order_across_ranges():
    """min_scale <= init_scale <= max_scale for every draw (and every PBT mutation, which clip keeps in
    range): overlapping ranges are refused before any trial starts, naming both fields."""
    overlapping = Space({"precision.min_scale": {"loguniform": [1.0, 1024.0]},
                         "precision.init_scale": {"loguniform": [256.0, 2.0**24]}}, source="mine.toml")
    with pytest.raises(ConfigError, match=r"precision.min_scale \(up to 1024.0\) and precision.init_scale "
                                          r"\(from 256.0\)"):
        overlapping.check()
    crossing = Space({"precision.adaptation.min_growth_interval": {"lograndint": [10, 5000]},
                      "precision.adaptation.max_growth_interval": {"lograndint": [2000, 40000]}})
    with pytest.raises(ConfigError, match="min_growth_interval"):
        crossing.check()
    # Ranges as they are drawn: lograndint excludes its high end, qloguniform draws multiples of q.
    Space({"precision.adaptation.min_growth_interval": {"lograndint": [10, 51]},
           "precision.adaptation.max_growth_interval": {"lograndint": [50, 5000]}}).check()
    Space({"precision.min_scale": {"qloguniform": [1.0, 300.0, 256.0]},
           "precision.init_scale": {"loguniform": [256.0, 2.0**20]}}).check()
    # A neighbour that is not searched is the job's (checked per bound), not the engine default's.
    Space({"precision.init_scale": {"loguniform": [256.0, 2.0**28]}}).check(
        lambda o: job_validator({"precision.max_scale": 2.0**30, **o}))
    ordered = Space({"precision.min_scale": {"loguniform": [1.0, 128.0]},
                     "precision.init_scale": {"loguniform": [256.0, 2.0**20]},
                     "precision.max_scale": {"choice": [2.0**20, 2.0**24]}}).check()
    rng = random.Random(0)
    for _ in range(50):  # PBT's explore: numbers scaled by a factor (choices step to a listed neighbour)
        d = ordered.clip({k: v if k == "precision.max_scale" else v * rng.choice([0.8, 1.2, 100.0])
                          for k, v in ordered.sample(rng).items()})
        assert d["precision.min_scale"] <= d["precision.init_scale"] <= d["precision.max_scale"]
