"""Real corpora end to end, offline: a tiny local TFDS dataset (built once per session from text
files written here) and ArrayRecord files -> Grain (shuffle, packing, batching, row streams per
process, workers) -> batches -> train steps through moejax.train, with resume.

References: every batch is rebuilt by a plain-Python pipeline written here (the documents the
test wrote, in Grain's shuffled order, cut into next-token pairs, first-fit packed by a list
packer, row stream r = documents r, r + B, ...); multi-process slices against the one-process
batch; resumed streams and losses against uninterrupted runs.
"""
import gzip
import itertools
import json
import os

import grain
import numpy as np
import pytest
from array_record.python import array_record_module

from moejax import data
from moejax.checkpoint import Checkpointer
from moejax.config import validate
from moejax.errors import ConfigError
from moejax.data import grain_source, records, tfds_builder, tokenizers
from moejax.data.packing import BATCH_KEYS
from moejax.metrics import read_metrics
from moejax.train import Trainer, train_and_evaluate

from helpers import load_config, set_fields

WORDS = ("the a of to and in is was for on that with as by at from his her it an were are "
         "which this be or has had not but first one their its new after who they have two "
         "her she he been other when there all during into school time may years more most "
         "only over city some world would where later up such used many can state about "
         "national out known university united then made").split()


def _documents(n, seed):
  rng = np.random.default_rng(seed)
  return [f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, rng.integers(2, 20))) + "."
          for i in range(n)]


TRAIN_DOCS = _documents(40, 0)
EVAL_DOCS = _documents(8, 1)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A moejax_local_text TFDS dataset (ArrayRecord) over text files written here."""
  root = tmp_path_factory.mktemp("corpus")
  for split, docs in (("train", TRAIN_DOCS), ("validation", EVAL_DOCS)):
    (root / "text" / split).mkdir(parents=True)
    for i, d in enumerate(docs[:-4]):
      (root / "text" / split / f"{i:03d}.txt").write_text(d)
    # The last four as JSON lines (gzipped for validation, as allenai/c4 shards are).
    lines = "".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs[-4:])
    if split == "train":
      (root / "text" / split / "rest.jsonl").write_text(lines)
    else:
      with gzip.open(root / "text" / split / "rest.json.gz", "wt") as f:
        f.write(lines)
  tfds_builder.build(str(root / "text"), str(root / "tfds"))
  return str(root / "tfds")


def _config(tfds_dir, **overrides):
  c = load_config()
  c.model.update(vocab_size=256, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, d_ff=64,
                 num_layers=2, max_len=32)
  c.model.moe.update(num_experts=4, top_k=2)
  c.train.update(steps=8, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=4,
                 eval_batches=2, checkpoint_every=4, keep_checkpoints=2, log_every=1)
  c.data.update(source="tfds:moejax_local_text", tfds_data_dir=tfds_dir, packing_bins=2)
  c.mesh.data = 1
  return set_fields(c, overrides)


def _texts(documents):
  """The bytes of a Grain MapDataset of documents, in its order (the records' order on disk)."""
  return [bytes(documents[i]) for i in range(len(documents))]


# ----------------------------------------------------------------------------- reference


def _chunks(ids, s):
  pairs = [(ids[t], ids[t + 1]) for t in range(len(ids) - 1)]
  for i in range(0, len(pairs), s):
    yield [p[0] for p in pairs[i:i + s]], [p[1] for p in pairs[i:i + s]]


def _first_fit_rows(chunks, s, num_bins, pack=True):
  """Streaming first-fit packer over a chunk iterator: yields rows (dict of lists) forever."""
  bins = [[] for _ in range(num_bins)]
  for chunk in chunks:
    fits = [i for i, b in enumerate(bins)
            if sum(len(c[0]) for c in b) + len(chunk[0]) <= s and (pack or not b)]
    if not fits:
      for b in bins:
        pad = s - sum(len(c[0]) for c in b)
        yield {"inputs": [t for c in b for t in c[0]] + [0] * pad,
               "targets": [t for c in b for t in c[1]] + [0] * pad,
               "segment_ids": [k + 1 for k, c in enumerate(b) for _ in c[0]] + [0] * pad,
               "positions": [i for c in b for i in range(len(c[0]))] + [0] * pad}
      bins = [[] for _ in range(num_bins)]
      fits = [0]
    bins[fits[0]].append(chunk)


def _reference_batches(texts, *, batch_size, seq_len, seed, split, num_bins, num_batches,
                       pack=True, encode=lambda t: list(t), eos=None):
  """What the pipeline must produce, rebuilt in plain Python (see the module docstring)."""
  order = grain.MapDataset.range(len(texts)).shuffle(
      seed=grain_source.shuffle_seed(seed, split)).repeat()

  def stream(r):   # documents r, r + B, r + 2B, ... of the shuffled, repeated order
    for k in itertools.count():
      ids = encode(texts[order[r + k * batch_size]]) + ([eos] if eos is not None else [])
      yield from _chunks(ids, seq_len)

  streams = [_first_fit_rows(stream(r), seq_len, num_bins, pack) for r in range(batch_size)]
  out = []
  for _ in range(num_batches):
    rows = [next(st) for st in streams]
    out.append({k: np.array([row[k] for row in rows], np.int32) for k in rows[0]})
  return out


def _assert_batches_equal(got, want):
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want)):
    assert set(g) == set(BATCH_KEYS)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=f"batch {i} {k}")


def _source(config, split="train", *, process_index=0, process_count=1):
  """A GrainSource for simulated process `process_index` of `process_count`."""
  docs = records.tfds_documents(config, split)
  d = config.data
  return grain_source.GrainSource(
      docs, tokenizers.make_tokenizer(config), batch_size=config.train.batch_size,
      seq_len=config.train.seq_len, seed=d.seed, split=split, num_bins=d.packing_bins,
      pack=d.pack, worker_count=d.worker_count, process_index=process_index,
      process_count=process_count)


# ----------------------------------------------------------------------------- TFDS -> batches


def test_tfds_batches_equal_a_plain_python_pipeline(tfds_dir):
  config = _config(tfds_dir)
  source = data.make_source(config, "train")
  assert source.loss_floor is None
  texts = _texts(records.tfds_documents(config, "train"))
  assert sorted(t.decode() for t in texts) == sorted(TRAIN_DOCS)   # .txt and .jsonl documents
  n = 16   # > one epoch: 40 documents of ~70 bytes; each row stream reads 5 per epoch
  got = [source.next() for _ in range(n)]
  for batch in got:
    assert all(v.dtype == np.int32 and v.shape == (8, 32) for v in batch.values())
  _assert_batches_equal(got, _reference_batches(
      texts, batch_size=8, seq_len=32, seed=0, split="train", num_bins=2, num_batches=n))
  # Every document was read, and a segment is always a piece of one document.
  seen = set()
  for batch in got:
    for r in range(8):
      for seg in range(1, batch["segment_ids"][r].max() + 1):
        where = batch["segment_ids"][r] == seg
        piece = bytes(batch["inputs"][r][where].tolist() + [batch["targets"][r][where][-1]])
        owners = [i for i, t in enumerate(texts) if piece in t]
        assert owners, piece
        seen.update(owners)
  assert seen == set(range(len(texts)))


def test_shuffle_depends_on_seed_and_split(tfds_dir):
  a = data.make_source(_config(tfds_dir), "train").next()
  b = data.make_source(_config(tfds_dir), "train").next()
  c = data.make_source(_config(tfds_dir, **{"data.seed": 1}), "train").next()
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(a["inputs"], c["inputs"])
  # Eval reads the validation split, and only it.
  config = _config(tfds_dir)
  ev = data.make_source(config, "eval")
  eval_texts = _texts(records.tfds_documents(config, "eval"))
  assert sorted(t.decode() for t in eval_texts) == sorted(EVAL_DOCS)
  _assert_batches_equal([ev.next() for _ in range(2)], _reference_batches(
      eval_texts, batch_size=8, seq_len=32, seed=0, split="eval", num_bins=2, num_batches=2))


def test_sentencepiece_unpacked_pipeline(tfds_dir, tmp_path):
  """SentencePiece ids with EOS per document, and pack=False (one chunk per row)."""
  from moejax.data import train_tokenizer
  (tmp_path / "train.txt").write_text("\n".join(TRAIN_DOCS))
  model = train_tokenizer.train(str(tmp_path / "train.txt"), 60, str(tmp_path / "sp"))
  config = _config(tfds_dir, **{"data.tokenizer": "sentencepiece", "data.tokenizer_model": model,
                                "data.pack": False, "train.batch_size": 4})
  source = data.make_source(config, "train")
  tok = tokenizers.make_tokenizer(config)
  texts = _texts(records.tfds_documents(config, "train"))
  want = _reference_batches(texts, batch_size=4, seq_len=32, seed=0, split="train", num_bins=2,
                            num_batches=6, pack=False, encode=lambda t: tok.encode(t).tolist(),
                            eos=2)
  got = [source.next() for _ in range(6)]
  _assert_batches_equal(got, want)
  assert all(b["segment_ids"].max(axis=1).max() == 1 for b in got)
  assert any((b["targets"] == 2).any() for b in got)     # documents end with EOS


# ----------------------------------------------------------------------------- processes, resume


def test_process_slices_make_up_the_global_batch(tfds_dir):
  config = _config(tfds_dir)
  whole = _source(config)
  want = [whole.next() for _ in range(4)]
  for p_count in (2, 4):
    parts = [_source(config, process_index=p, process_count=p_count) for p in range(p_count)]
    for w in want:
      locals_ = [part.next() for part in parts]
      assert all(loc["inputs"].shape == (8 // p_count, 32) for loc in locals_)
      for k in w:   # process p holds global rows [p B/P, (p+1) B/P): no row twice, none missing
        np.testing.assert_array_equal(np.concatenate([loc[k] for loc in locals_]), w[k])
  with pytest.raises(ValueError, match="train.batch_size: got 8; allowed: a multiple"):
    _source(config, process_index=0, process_count=3)


def test_resume_continues_the_stream_even_on_another_process_count(tfds_dir):
  config = _config(tfds_dir)
  straight = _source(config)
  for _ in range(5):
    straight.next()
  want = [straight.next() for _ in range(4)]
  # Saved by two processes (each contributes its row streams), restored on 1, 2 and 4.
  parts = [_source(config, process_index=p, process_count=2) for p in range(2)]
  for _ in range(5):
    for part in parts:
      part.next()
  states = [part.get_state() for part in parts]
  saved = {**states[0], "streams": {**states[0]["streams"], **states[1]["streams"]}}
  saved = json.loads(json.dumps(saved))        # as the checkpoint stores it
  for p_count in (1, 2, 4):
    resumed = [_source(config, process_index=p, process_count=p_count) for p in range(p_count)]
    for r in resumed:
      r.set_state(saved)
    for w in want:
      got = [r.next() for r in resumed]
      for k in w:
        np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), w[k])
  # One process's own part is not enough for a whole-batch resume.
  with pytest.raises(ValueError, match="data state"):
    _source(config).set_state(json.loads(json.dumps(states[0])))
  with pytest.raises(ValueError, match="data state"):
    _source(config).set_state({"index": 3})
  with pytest.raises(ValueError, match="data state"):
    _source(_config(tfds_dir, **{"train.seq_len": 16})).set_state(saved)


def test_worker_processes_give_the_same_batches_and_resume(tfds_dir):
  config = _config(tfds_dir, **{"train.batch_size": 4})
  want = _source(config)
  want = [want.next() for _ in range(6)]
  workers = _source(_config(tfds_dir, **{"train.batch_size": 4, "data.worker_count": 2}))
  try:
    got = [workers.next() for _ in range(3)]
    state = json.loads(json.dumps(workers.get_state()))
    got += [workers.next() for _ in range(3)]
    _assert_batches_equal(got, want)     # each worker runs every other row stream
    workers.set_state(state)
    _assert_batches_equal([workers.next() for _ in range(3)], want[3:])
  finally:
    workers.close()
  with pytest.raises(ValueError, match="data.worker_count: got 3; allowed: 0 or a divisor"):
    _source(_config(tfds_dir, **{"train.batch_size": 4, "data.worker_count": 3}))
  with pytest.raises(ValueError, match="data state"):   # a worker state needs the workers
    _source(config).set_state(state)


# ----------------------------------------------------------------------------- ArrayRecord


def test_array_record_source(tmp_path):
  paths = []
  for f in range(2):
    path = str(tmp_path / f"part-{f}.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for d in TRAIN_DOCS[f * 20:(f + 1) * 20]:
      writer.write(d.encode("utf-8"))
    writer.close()
    paths.append(path)
  config = _config("", **{"data.source": f"array_record:{tmp_path}/*.array_record",
                          "data.eval_fraction": 0.1, "train.batch_size": 4})
  texts = [d.encode("utf-8") for d in TRAIN_DOCS]     # files in sorted order, records in order
  train, ev = data.make_source(config, "train"), data.make_source(config, "eval")
  _assert_batches_equal([train.next() for _ in range(4)], _reference_batches(
      texts[:36], batch_size=4, seq_len=32, seed=0, split="train", num_bins=2, num_batches=4))
  _assert_batches_equal([ev.next() for _ in range(2)], _reference_batches(
      texts[36:], batch_size=4, seq_len=32, seed=0, split="eval", num_bins=2, num_batches=2))
  # data.eval_glob: eval reads other files.
  config.data.eval_glob = paths[0]
  ev = data.make_source(config, "eval")
  _assert_batches_equal([ev.next()], _reference_batches(
      texts[:20], batch_size=4, seq_len=32, seed=0, split="eval", num_bins=2, num_batches=1))


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_field_before_anything_compiles(tfds_dir, tmp_path):
  def raises(config, *fragments, split="train"):
    with pytest.raises(ValueError) as err:
      data.make_source(config, split)
    for f in fragments:
      assert f in str(err.value), (f, str(err.value))

  raises(_config(""), "data.tfds_data_dir", "''")
  raises(_config(str(tmp_path / "nowhere")), "data.tfds_data_dir", "nowhere", "not a directory")
  raises(_config(tfds_dir, **{"data.source": "tfds:lm1b"}), "data.source", "'tfds:lm1b'",
         "no dataset 'lm1b'", "moejax_local_text", "tfds build lm1b")
  raises(_config(tfds_dir, **{"data.source": "tfds:"}), "data.source", "tfds:<name>")
  raises(_config(tfds_dir, **{"data.eval_split": "test"}), "data.eval_split", "'test'",
         "train", "validation", split="eval")
  raises(_config(tfds_dir, **{"data.text_feature": "body"}), "data.text_feature", "'body'",
         "['text']")
  raises(_config(tfds_dir, **{"model.vocab_size": 100}), "model.vocab_size", "100", ">= 256")
  raises(_config(tfds_dir, **{"data.tokenizer": "bpe"}), "data.tokenizer", "'bpe'", "byte")
  raises(_config("", **{"data.source": f"array_record:{tmp_path}/*.none"}), "data.source",
         "*.none", "matches no file")
  raises(_config("", **{"data.source": "parquet:x"}), "data.source", "'parquet:x'", "tfds")
  # A dataset without a text feature: its features are listed.
  import tensorflow_datasets as tfds

  class MoejaxNumbersOnly(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"label": tfds.features.ClassLabel(num_classes=3), "value": np.int64}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"label": i % 3, "value": i}

  MoejaxNumbersOnly(data_dir=str(tmp_path / "tfds"),
                    file_format="array_record").download_and_prepare()
  raises(_config(str(tmp_path / "tfds"), **{"data.source": "tfds:moejax_numbers_only"}),
         "data.source", "without a text feature", "label", "ClassLabel", "value")
  # The sequence length is checked against the model's before any tracing.
  with pytest.raises(ConfigError, match="train.seq_len"):
    validate(_config(tfds_dir, **{"train.seq_len": 64}))
  with pytest.raises(ConfigError, match="data.source"):
    validate(_config(tfds_dir, **{"data.source": "parquet:x"}))
  with pytest.raises(ConfigError, match="data.packing_bins"):
    validate(_config(tfds_dir, **{"data.packing_bins": 0}))


# ----------------------------------------------------------------------------- training


def test_train_on_tfds_and_resume_equals_uninterrupted(tfds_dir, tmp_path):
  """TFDS -> Grain -> packed batches -> train steps; a run stopped at step 5 and resumed from
  its checkpoint (with the saved data state) reproduces the uninterrupted run exactly."""
  config = _config(tfds_dir)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  summary = train_and_evaluate(config, straight, progress=False)
  assert summary["step"] == 8 and "data/loss_floor" not in summary
  assert np.isfinite(summary["eval/loss"]) and summary["eval/loss"] < np.log(256)
  first = train_and_evaluate(config, resumed, progress=False, stop_after=5)
  assert first["stopped_early"] and first["step"] == 5
  train_and_evaluate(config, resumed, progress=False)

  def losses(workdir, key="train/loss"):
    return {r["step"]: r[key] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if key in r}

  assert losses(straight) == losses(resumed) and sorted(losses(straight)) == list(range(1, 9))
  assert losses(straight, "eval/loss") == losses(resumed, "eval/loss")
  # The data state saved at step 5 continues the uninterrupted stream at batch 5.
  ckpt = Checkpointer(os.path.join(resumed, "checkpoints"), keep=2, every=4)
  _, _, extra = ckpt.restore(5, abstract_state=Trainer(config).abstract_state())
  ckpt.close()
  source = data.make_source(config, "train")
  source.set_state(extra["data"])
  reference = data.make_source(config, "train")
  for _ in range(5):
    reference.next()
  _assert_batches_equal([source.next() for _ in range(3)], [reference.next() for _ in range(3)])
