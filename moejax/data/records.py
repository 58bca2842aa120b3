"""Random-access documents for the Grain pipeline: TFDS data sources and ArrayRecord files.

Each function returns a `grain.MapDataset` of one split's documents as bytes (one element per
document), checked before anything is compiled:
- `tfds_documents`: a dataset prepared by `tfds build --file_format=array_record` under
  `data.tfds_data_dir`, read through `tfds.data_source` (TFDS docs, "Data sources": random
  access without TensorFlow); the text is the record's `tfds.features.Text` feature.
- `array_record_documents`: ArrayRecord files (github.com/google/array_record) whose records
  are documents as UTF-8 bytes, read with `grain.sources.ArrayRecordDataSource`.
"""
from __future__ import annotations

import bisect
import os

import grain   # the `data` extra: this module is imported only by the Grain sources
import numpy as np

from moejax.data import base

# moejax split -> the config field naming the TFDS split it reads.
TFDS_SPLIT_FIELDS = {"train": "data.train_split", "eval": "data.eval_split"}


def source_argument(config, prefix: str, example: str) -> str:
  """What follows `prefix:` in config.data.source (e.g. 'c4/en' in 'tfds:c4/en')."""
  source = config.data.source
  name, _, arg = source.partition(":")
  if name != prefix or not arg:
    raise ValueError(f"data.source: got {source!r}; allowed: {prefix}:{example}")
  return arg


class _Field:
  """Record dict -> the bytes of its text feature `key` (a picklable map for Grain workers)."""

  def __init__(self, key: str):
    self.key = key

  def __call__(self, record) -> bytes:
    value = record[self.key]
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def tfds_documents(config, split: str) -> grain.MapDataset:
  """The documents of `split` of the TFDS dataset config.data.source = 'tfds:<name>[/<config>]'.

  Reads from config.data.tfds_data_dir (never downloads); the TFDS split is
  config.data.train_split or config.data.eval_split (TFDS slicing such as 'train[:99%]' works);
  the text is config.data.text_feature, or when that is '' the feature named 'text', or else
  the dataset's only Text feature. Raises ValueError naming the field at fault: a missing data
  dir, a dataset not prepared there (listing the ones that are), a dataset not in ArrayRecord
  format, an unknown split, no text feature (listing the features there are).
  """
  import tensorflow_datasets as tfds   # the `data` extra

  name = source_argument(config, "tfds", "<name>[/<config>][:<version>], e.g. 'tfds:c4/en'")
  data_dir = base.existing_path(
      config.data.get("tfds_data_dir", ""), "data.tfds_data_dir", "directory",
      f"the directory of TFDS datasets that `tfds build --data_dir=DIR "
      f"--file_format=array_record` prepared {name!r} in",
      f"required for data.source={config.data.source!r}")
  dataset = name.split("/")[0].split(":")[0]
  present = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d))
                   and not d.startswith(("downloads", ".")))
  if dataset not in present:
    raise ValueError(f"data.source: got {config.data.source!r}, but data.tfds_data_dir="
                     f"{data_dir!r} holds no dataset {dataset!r}; allowed: one of {present} "
                     f"there, or prepare it (README, \"Real corpora\"): `python -m "
                     f"moejax.data.tfds_builder --dataset {name} --data_dir={data_dir}`, or "
                     f"`tfds build {name} --file_format=array_record --data_dir={data_dir}`")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:   # TFDS raises several types here (not found, bad config, version)
    raise ValueError(f"data.source: got {config.data.source!r}; TFDS cannot open it in "
                     f"data.tfds_data_dir={data_dir!r} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:300]}); allowed: a dataset prepared "
                     f"there") from None
  if not builder.is_prepared():
    raise ValueError(f"data.source: got {config.data.source!r}, which is not prepared in "
                     f"data.tfds_data_dir={data_dir!r} (no {builder.data_dir}); allowed: a "
                     f"dataset prepared there with `tfds build --file_format=array_record`")
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format != "array_record":
    raise ValueError(f"data.source: got {config.data.source!r}, stored as {file_format!r} in "
                     f"{builder.data_dir}; allowed: a dataset prepared with "
                     f"`tfds build --file_format=array_record` (random access, no TensorFlow)")
  text_key = _text_feature(builder, config)
  field = TFDS_SPLIT_FIELDS[split]
  tfds_split = config.data.get(field.split(".")[1], "train" if split == "train" else "validation")
  try:
    records = builder.as_data_source(split=tfds_split)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{field}: got {tfds_split!r}; allowed: a split of {name!r}: "
                     f"{sorted(builder.info.splits)} (TFDS slicing such as 'train[:99%]' too): "
                     f"{str(e).splitlines()[0][:200]}") from None
  if len(records) == 0:
    raise ValueError(f"{field}: got {tfds_split!r}, which has no examples; allowed: a non-empty "
                     f"split of {name!r}: {sorted(builder.info.splits)}")
  return grain.MapDataset.source(records).map(_Field(text_key))


def _text_feature(builder, config) -> str:
  """The name of the text feature of `builder`'s dataset (see `tfds_documents`)."""
  import tensorflow_datasets as tfds

  features = builder.info.features
  described = {k: type(v).__name__ for k, v in features.items()}
  texts = [k for k, v in features.items() if isinstance(v, tfds.features.Text)]
  key = config.data.get("text_feature", "")
  if key:
    if key not in texts:
      raise ValueError(f"data.text_feature: got {key!r}; allowed: a Text feature of "
                       f"{builder.name!r}: {texts} (its features: {described})")
    return key
  if "text" in texts:
    return "text"
  if len(texts) == 1:
    return texts[0]
  if not texts:
    raise ValueError(f"data.source: got {config.data.source!r}, a dataset without a text "
                     f"feature (its features: {described}); allowed: a TFDS dataset with a "
                     f"tfds.features.Text feature")
  raise ValueError(f"data.text_feature: got ''; allowed: one of the Text features {texts} of "
                   f"{builder.name!r} (it has several)")


def _array_record_files(pattern: str, field: str) -> list[str]:
  """Sorted files matching the glob `pattern`; raises ValueError naming `field` if none."""
  return base.match_files(pattern, field,
                          "a glob of ArrayRecord files, e.g. 'corpus/*.array_record'")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: " + (text.splitlines()[0][:300] if text else "(no message)")


class ArrayRecordFiles:
  """The records of several ArrayRecord files as one random-access source (for Grain), whose
  errors name the file and the record.

  Each file's footer is read when this is built: a truncated file, or one that is not
  ArrayRecord, fails there with a ValueError naming `field`, its value and the file. A record
  whose chunk is corrupt (riegeli's hash check) fails when first read, with a ValueError naming
  the file and the record's index in it.

  Args:
    paths: the files, in order (record i of the source is record i - start of its file).
    field, value: the config field that named the files and its value, for error messages.
  """

  def __init__(self, paths: list[str], field: str, value: str):
    from array_record.python import array_record_module  # the `data` extra

    self.paths, self.field, self.value = list(paths), field, value
    counts = []
    for path in self.paths:
      try:
        reader = array_record_module.ArrayRecordReader(path)
        counts.append(int(reader.num_records()))
        reader.close()
      except Exception as e:   # array_record raises RuntimeError/OSError, sometimes empty
        raise ValueError(
            f"{field}: got {value!r}; the file {path} ({os.path.getsize(path)} bytes) is not a "
            f"readable ArrayRecord file, truncated or not ArrayRecord ({_first_line(e)}); "
            "allowed: complete ArrayRecord files (ArrayRecordWriter closed), or leave it out "
            "of the glob") from None
    self.starts = np.cumsum([0] + counts).tolist()   # starts[f]: first record of file f
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return self.starts[-1]

  def __getitem__(self, index: int) -> bytes:
    try:
      return self._source[index]
    except Exception as e:   # riegeli: "Corrupted Riegeli/records file: ... hash mismatch"
      f = bisect.bisect_right(self.starts, int(index)) - 1
      raise ValueError(
          f"{self.field}: got {self.value!r}; record {int(index) - self.starts[f]} of the file "
          f"{self.paths[f]} (record {int(index)} of {len(self)} in all) cannot be read, the "
          f"file is corrupt ({_first_line(e)}); allowed: readable ArrayRecord files: write "
          "it again, or leave it out of the glob") from None

  def __repr__(self) -> str:
    return f"ArrayRecordFiles({len(self.paths)} files, {len(self)} records)"


def array_record_documents(config, split: str) -> grain.MapDataset:
  """The documents of `split` in the ArrayRecord files of config.data.source='array_record:GLOB'.

  Every record is one document (UTF-8 bytes). 'eval' reads config.data.eval_glob when set;
  otherwise the records (in sorted-file order) are cut like the text source: 'eval' gets the
  last ceil(eval_fraction * n) records and 'train' the rest.
  """
  pattern = source_argument(config, "array_record",
                            "<glob>, e.g. 'array_record:data/*.array_record'")
  eval_glob = config.data.get("eval_glob", "")
  use_eval_glob = split == "eval" and eval_glob
  paths = (_array_record_files(eval_glob, "data.eval_glob") if use_eval_glob
           else _array_record_files(pattern, "data.source"))
  field = "data.eval_glob" if use_eval_glob else "data.source"
  records = grain.MapDataset.source(
      ArrayRecordFiles(paths, field, eval_glob if use_eval_glob else config.data.source))
  if use_eval_glob:
    return records
  fraction = config.data.get("eval_fraction", 0.1)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
    raise ValueError(f"data.eval_fraction: got {fraction!r}; allowed: a number in (0, 1)")
  n = len(records)
  held_out = int(np.ceil(fraction * n))
  if n - held_out < 1 or held_out < 1:
    raise ValueError(f"data.source: got {config.data.source!r} with {n} record(s), too few to "
                     f"hold out data.eval_fraction={fraction} for eval; allowed: more records, or "
                     f"data.eval_glob")
  return records[n - held_out:] if split == "eval" else records[:n - held_out]
