"""scaling.strategy = "fsdp" as a job field: its settings checked, what it cannot do refused before any
worker starts, the blocks it shards by default."""

import pytest
from torch import nn

from ampray.actors.worker import fsdp_blocks
from ampray.job import ConfigError, JobConfig, choose_compile
from ampray.models import build_model


@pytest.mark.parametrize("overrides,expected", [
    ({"scaling.strategy": "zero"}, "scaling.strategy='zero' is not allowed: expected one of ['ddp', 'fsdp']"),
    ({"scaling.fsdp_cpu_offload": True}, "scaling.fsdp_cpu_offload=True is not allowed: expected its default unless "
                                         "scaling.strategy = 'fsdp'"),
    ({"scaling.strategy": "fsdp", "scaling.fsdp_blocks": [""]}, "scaling.fsdp_blocks=[''] is not allowed"),
    ({"scaling.strategy": "fsdp", "precision.oom_policy": "split"},
     "precision.oom_policy='split' is not allowed: expected 'raise' with scaling.strategy='fsdp'"),
    ({"scaling.strategy": "fsdp", "model.compile": True}, "model.compile=True is not allowed"),
    ({"scaling.strategy": "fsdp", "run.on_divergence": "rollback"}, "run.on_divergence='rollback' is not allowed"),
    ({"scaling.strategy": "fsdp", "precision.fp32_modules": ["LayerNorm"]}, "precision.fp32_modules=['LayerNorm']"),
    ({"scaling.strategy": "fsdp", "precision.stall_policy": "fallback_bf16"},
     "precision.stall_policy='fallback_bf16' is not allowed: expected 'raise' with scaling.strategy='fsdp' and fp16"),
])
def test_fsdp_settings_and_refusals_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        JobConfig.load(None, overrides)
    assert expected in str(err.value)


def test_fsdp_with_bf16_takes_the_fallback_policies_and_compile_is_never_chosen():
    job = JobConfig.load(None, {"scaling.strategy": "fsdp", "precision.dtype": "bf16",
                                "precision.stall_policy": "fallback_bf16", "model.kind": "gpt", "run.steps": 10**6})
    assert job.scaling.strategy == "fsdp"
    assert choose_compile(job, True, set()) == (job, None)


def test_the_blocks_sharded_by_default():
    gpt = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "gpt"})
    assert fsdp_blocks(build_model("gpt", preset="nano"), gpt) == ["Block"]

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.layers = nn.ModuleList([Layer(), Layer()])

    mlp = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "mlp"})
    assert fsdp_blocks(Net(), mlp) == ["Layer"]  # a user's model: what its ModuleList holds
    assert fsdp_blocks(nn.Sequential(nn.Linear(4, 4)), mlp) == []  # nothing to split: the root only

    class Flat(nn.Module):  # a ModuleList of plain layers is no list of blocks
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)])

    assert fsdp_blocks(Flat(), mlp) == []
    given = JobConfig.load(None, {"scaling.strategy": "fsdp", "scaling.fsdp_blocks": ["Layer", "Other"]})
    assert fsdp_blocks(Net(), given) == ["Layer", "Other"]
