"""A TFDS dataset over local text files, for examples, tests and your own small corpora.

`MoejaxLocalText` (TFDS name `moejax_local_text`) reads a folder laid out as
```
CORPUS/<split>/**/*.txt                   one document per file (UTF-8)
CORPUS/<split>/**/*.jsonl, *.json.gz, ...  one document per line: {"text": "...", ...}
```
with one sub-folder per split (e.g. train/, validation/), and writes a TFDS dataset with one
feature, `text` (tfds.features.Text), following the TFDS guide "Writing custom datasets"
(`GeneratorBasedBuilder`, manual-download data). Build it without TensorFlow, in ArrayRecord
format so that `tfds.data_source` can read it:

  python -m moejax.data.tfds_builder --corpus CORPUS --data_dir DIR
  python -m moejax.data.tfds_builder --dataset lm1b --data_dir DIR   # a catalog dataset

then train with `--config.data.source=tfds:moejax_local_text --config.data.tfds_data_dir=DIR`.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os

import tensorflow_datasets as tfds   # the `data` extra

NAME = "moejax_local_text"
JSON_LINES = (".jsonl", ".jsonl.gz", ".json.gz")


class MoejaxLocalText(tfds.core.GeneratorBasedBuilder):
  """Local text files as a TFDS dataset with a `text` feature (the TFDS custom-dataset guide)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One document per .txt file or per JSON line."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the corpus folder as the manual dir: one sub-folder per "
                                  "split holding .txt files (a document each) or .jsonl / "
                                  ".json.gz files (a {\"text\": ...} document per line).")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Local text files (moejax.data.tfds_builder).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    corpus = os.fspath(dl_manager.manual_dir)
    splits = sorted(d for d in os.listdir(corpus) if os.path.isdir(os.path.join(corpus, d)))
    if not splits:
      raise ValueError(f"corpus: got {corpus!r}, which has no split sub-folder; allowed: a "
                       f"folder with e.g. train/ and validation/ holding .txt or .jsonl files")
    return {split: self._generate_examples(os.path.join(corpus, split)) for split in splits}

  def _generate_examples(self, folder: str):
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
      rel = os.path.relpath(path, folder)
      if path.endswith(".txt"):
        with open(path, "rb") as f:
          yield rel, {"text": f.read().decode("utf-8", errors="replace")}
      elif path.endswith(JSON_LINES):
        # JSON lines, gzipped or not (e.g. the allenai/c4 shards c4-train.*.json.gz).
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
          for line_number, line in enumerate(f):
            if line.strip():
              yield f"{rel}:{line_number}", {"text": json.loads(line)["text"]}


def build(corpus: str, data_dir: str) -> str:
  """Prepares `moejax_local_text` from the folder `corpus` into `data_dir` (ArrayRecord files).

  Returns the dataset's directory. Rebuilding an existing version is a no-op (TFDS's rule):
  remove the directory to rebuild.
  """
  builder = MoejaxLocalText(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(corpus)))
  return os.fspath(builder.data_dir)


def prepare_catalog_dataset(name: str, data_dir: str) -> str:
  """Downloads and prepares the TFDS catalog dataset `name` (e.g. 'lm1b') in ArrayRecord format,
  without TensorFlow (the `tfds build` command line needs TensorFlow). Needs internet."""
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--corpus", help="local folder with one sub-folder per split")
  what.add_argument("--dataset", help="a TFDS catalog dataset to download, e.g. lm1b")
  parser.add_argument("--data_dir", required=True, help="TFDS data dir to write the dataset to")
  args = parser.parse_args(argv)
  if args.corpus:
    name, path = NAME, build(args.corpus, args.data_dir)
  else:
    name, path = args.dataset, prepare_catalog_dataset(args.dataset, args.data_dir)
  print(f"prepared {name} in {path}; train with --config.data.source=tfds:{name} "
        f"--config.data.tfds_data_dir={args.data_dir}")


if __name__ == "__main__":
  main()
