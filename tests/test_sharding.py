"""Mesh presets and mesh errors: the sizes each preset gives on 8 devices, and a bad mesh is a
ConfigError naming mesh.<axis> (or the batch) before anything is built."""
import pytest

from moejax.config import validate
from moejax.errors import ConfigError
from moejax.sharding import resolve_mesh

from helpers import load_config


def _mesh(**fields):
  c = load_config().mesh
  c.update(fields)
  return c


@pytest.mark.parametrize("fields,want", [
    (dict(preset="data"), dict(data=8, fsdp=1, expert=1, tensor=1)),
    (dict(preset="fsdp"), dict(data=1, fsdp=8, expert=1, tensor=1)),
    (dict(preset="ep_data", expert=4), dict(data=2, fsdp=1, expert=4, tensor=1)),
    (dict(preset="ep_fsdp", expert=2), dict(data=1, fsdp=4, expert=2, tensor=1)),
    (dict(preset="ep_tensor", expert=2, tensor=2), dict(data=2, fsdp=1, expert=2, tensor=2)),
    # A preset overrides the sizes it fills.
    (dict(preset="data", fsdp=4, expert=2), dict(data=8, fsdp=1, expert=1, tensor=1)),
    (dict(data=-1, expert=2), dict(data=4, fsdp=1, expert=2, tensor=1)),
    (dict(data=1, fsdp=2), dict(data=1, fsdp=2, expert=1, tensor=1)),   # 2 of the 8 devices
])
def test_preset_sizes(fields, want):
  assert resolve_mesh(_mesh(**fields), 8) == want


@pytest.mark.parametrize("fields,num_experts,field", [
    (dict(preset="ep_data"), None, "mesh.expert"),                      # EP preset, EP 1
    (dict(preset="ep_tensor", expert=2), None, "mesh.tensor"),
    (dict(preset="dp"), None, "mesh.preset"),                           # unknown preset
    (dict(data=-1, expert=3), None, "mesh.expert"),                     # 3 does not divide 8
    (dict(data=4, fsdp=4), None, "mesh.data"),                          # 16 > 8 devices
    (dict(data=-1, fsdp=-1), None, "mesh"),                             # two -1 axes
    (dict(data=0), None, "mesh.data"),
    (dict(data=-1, expert=8), 4, "mesh.expert"),                        # EP > E
    (dict(data=-1, expert=4), 6, "mesh.expert"),                        # E not divisible
])
def test_bad_mesh_names_its_axis(fields, num_experts, field):
  with pytest.raises(ConfigError) as err:
    resolve_mesh(_mesh(**fields), 8, num_experts)
  assert err.value.field == field


@pytest.mark.parametrize("overrides,field", [
    ({"mesh.expert": 16, "mesh.data": 1}, "mesh.expert"),                # needs 16 devices
    ({"mesh.expert": 4, "model.moe.num_experts": 6}, "mesh.expert"),
    ({"mesh.tensor": 4, "mesh.data": 1, "model.d_ff": 126}, "mesh.tensor"),   # 4 into F = 126
    ({"train.batch_size": 12}, "train.batch_size"),                       # data = 8
    ({"model.moe.dispatch": "capacity", "model.moe.routing_group": 256}, "model.moe.routing_group"),
])
def test_validate_rejects_a_mesh_that_does_not_fit_the_model(overrides, field):
  config = load_config(**overrides)
  with pytest.raises(ConfigError) as err:
    validate(config, num_devices=8)
  assert err.value.field == field
