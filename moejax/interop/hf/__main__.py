"""Command line: `python -m moejax.interop.hf {import,export,logits} ...`.

  import --hf_dir DIR --workdir OUT [--base_config configs/default.py]
      OUT/config.py (a moejax config; `python -m moejax.main --config=OUT/config.py
      --workdir=OUT` continues training from the import) and OUT/checkpoints/0 (the train state
      {params, opt_state, step, rng} as `moejax.train.Trainer` saves it).
  export --workdir OUT --hf_dir DIR [--model_type NAME]
      the latest checkpoint of OUT as config.json + model.safetensors for transformers.
  logits --hf_dir DIR --input_ids IDS.npy --out LOGITS.npy
      the moejax model's float32 logits [B, S, V] on int ids [B, S] (a check after an import).

Families: Mixtral (arXiv:2401.04088), Qwen2-MoE (arXiv:2407.10671), Qwen3-MoE (arXiv:2505.09388),
OLMoE (arXiv:2409.02060), DeepSeek-V3 (arXiv:2412.19437).
"""
from __future__ import annotations

import argparse
import json
import os
import pprint
import sys

_CONFIG_FILE = '''"""moejax config of the Hugging Face checkpoint {hf_dir} ({model_type}), written by
`python -m moejax.interop.hf import`. Train on with
`python -m moejax.main --config={workdir}/config.py --workdir={workdir}`; change the train, data
and mesh fields here (or on the command line), not the model's."""
from moejax.config import load_config_file, set_fields

BASE_CONFIG = {base!r}
MODEL = {model}
# config.json of the import: `python -m moejax.interop.hf export` writes its other fields back.
HF_CONFIG = {hf_config!r}


def get_config():
  config = set_fields(load_config_file(BASE_CONFIG), MODEL)
  config.hf_config = HF_CONFIG
  return config
'''


def import_checkpoint(hf_dir: str, workdir: str, base_config: str | None = None) -> dict:
  """Writes `workdir`/config.py and the step-0 train state of the checkpoint in `hf_dir`
  (see the module docstring); returns {"config": path, "checkpoint": dir, "report": str}."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from moejax import checkpoint, data  # noqa: PLC0415
  from moejax.config import load_config_file  # noqa: PLC0415
  from moejax.interop.hf import loader  # noqa: PLC0415
  from moejax.train import Trainer  # noqa: PLC0415

  base = os.path.abspath(base_config or loader.DEFAULT_CONFIG)
  hf = loader.read_hf_config(hf_dir)
  fields = loader.family(hf).to_moejax(hf)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.py")
  with open(path, "w") as f:
    f.write(_CONFIG_FILE.format(hf_dir=os.path.abspath(hf_dir), model_type=hf["model_type"],
                                workdir=workdir, base=base,
                                model=pprint.pformat(fields, indent=4, sort_dicts=True),
                                hf_config=json.dumps(hf, sort_keys=True)))
  config = load_config_file(path)
  trainer = Trainer(config)
  model, _, report = loader.load(hf_dir, mesh=trainer.mesh, config=config,
                                 shardings=trainer.param_shardings)
  from flax import nnx  # noqa: PLC0415
  params = nnx.to_pure_dict(nnx.state(model))
  opt_state = jax.jit(trainer.tx.init,
                      out_shardings=trainer.state_shardings["opt_state"])(params)
  state = {"params": params, "opt_state": opt_state,
           "step": jax.device_put(jnp.zeros((), jnp.int32), trainer.replicated),
           "rng": jax.device_put(jax.random.key_data(jax.random.key(config.seed + 1)),
                                 trainer.replicated)}
  # The train loop restores the data position and the NaN guard's counters with the state.
  extra = {"data": data.make_sources(config)["train"].get_state(),
           "nan_guard": {"skipped": 0, "in_row": 0}}
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.train.keep_checkpoints, every=0)
  ckpt.save(0, state, extra, force=True)
  ckpt.close()
  return {"config": path, "checkpoint": ckpt.directory, "report": str(report)}


def export_checkpoint(workdir: str, hf_dir: str, model_type: str | None = None) -> list[str]:
  """Writes the latest checkpoint of `workdir` (config `workdir`/config.py) to `hf_dir` as
  config.json + model.safetensors; returns the tensor names."""
  from moejax import checkpoint  # noqa: PLC0415
  from moejax.config import load_config_file  # noqa: PLC0415
  from moejax.interop.hf import loader  # noqa: PLC0415
  from moejax.train import Trainer  # noqa: PLC0415

  config = load_config_file(os.path.join(workdir, "config.py"))
  trainer = Trainer(config)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, every=0) as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to export")
    _, state, _ = ckpt.restore(abstract_state=trainer.abstract_state())
  return loader.save(state["params"], config, hf_dir, model_type=model_type)


def logits(hf_dir: str, input_ids, *, mesh=None):
  """The moejax model's float32 logits [B, S, V] (numpy) on int ids [B, S] of the checkpoint
  in `hf_dir`."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from moejax.interop.hf import loader  # noqa: PLC0415
  model, _, _ = loader.load(hf_dir, mesh=mesh, overrides={"model.dtype": "float32"})
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)[0])
  return np.asarray(run(state, jnp.asarray(input_ids, jnp.int32)), np.float32)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m moejax.interop.hf", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("import", help="a Hugging Face checkpoint -> moejax config + checkpoint")
  p.add_argument("--hf_dir", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--base_config", default=None,
                 help="moejax config whose train/data/mesh fields to use (configs/default.py)")
  p = sub.add_parser("export", help="the latest moejax checkpoint -> a Hugging Face folder")
  p.add_argument("--workdir", required=True)
  p.add_argument("--hf_dir", required=True)
  p.add_argument("--model_type", default=None, help="family (default: the imported one)")
  p = sub.add_parser("logits", help="moejax float32 logits of a Hugging Face checkpoint")
  p.add_argument("--hf_dir", required=True)
  p.add_argument("--input_ids", required=True, help=".npy of int ids [B, S]")
  p.add_argument("--out", required=True, help=".npy for the float32 logits [B, S, V]")
  args = parser.parse_args(argv)
  from moejax.errors import ConfigError  # noqa: PLC0415
  try:
    if args.command == "import":
      out = import_checkpoint(args.hf_dir, args.workdir, args.base_config)
      print(f"{out['report']}\nwrote {out['config']} and {out['checkpoint']}/0")
    elif args.command == "export":
      names = export_checkpoint(args.workdir, args.hf_dir, args.model_type)
      print(f"wrote {len(names)} tensors and config.json to {args.hf_dir}")
    else:
      import numpy as np  # noqa: PLC0415
      np.save(args.out, logits(args.hf_dir, np.load(args.input_ids)))
      print(f"wrote {args.out}")
  except (ConfigError, KeyError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
