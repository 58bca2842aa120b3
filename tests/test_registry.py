"""The one registry helper: duplicates are refused, unknown names name the field and the
allowed names, and every registry of moejax is one."""
import pytest

from moejax import data, sharding
from moejax.data import tokenizers
from moejax.errors import ConfigError
from moejax.interop.hf.loader import FAMILIES
from moejax.moe import DISPATCHERS, EP_EXCHANGES, FFN_FORMS, GMM_BACKENDS, ROUTERS
from moejax.registry import Registry
from moejax.scaling import laws


def test_register_lookup_duplicate_and_unknown():
  r = Registry("model.moe.thing", {"a": 1})
  assert r.register("b", 2) == 2
  @r.register("c")
  def c():
    return 3
  assert dict(r) == {"a": 1, "b": 2, "c": c} and "a" in r and "z" not in r and len(r) == 3
  with pytest.raises(ValueError, match="'a' is registered twice"):
    r.register("a", 9)
  with pytest.raises(ConfigError) as err:
    r["z"]
  assert (err.value.field, err.value.value) == ("model.moe.thing", "z")
  assert "['a', 'b', 'c']" in str(err.value)
  with pytest.raises(ConfigError):
    r.check(3)


@pytest.mark.parametrize("registry,field", [
    (ROUTERS, "model.moe.router"), (DISPATCHERS, "model.moe.dispatch"),
    (EP_EXCHANGES, "model.moe.ep_exchange"), (GMM_BACKENDS, "model.moe.gmm_backend"),
    (FFN_FORMS, "model.moe.expert_type"), (sharding.MESH_PRESETS, "mesh.preset"),
    (data.SOURCES, "data.source"), (tokenizers.TOKENIZERS, "data.tokenizer"),
    (laws.LAWS, "law"), (FAMILIES, "config.json:model_type")])
def test_every_registry_is_one(registry, field):
  assert isinstance(registry, Registry) and registry.field == field and len(registry) >= 2
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    registry["no such name"]
