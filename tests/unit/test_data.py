"""trainer.lm.data: corpus loading (offline), split, packing, dp sharding, resume."""
import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, DataConfig
from trainer.lm.corpus import load_corpus, preflight_data, pydoc_topics, resolve_source
from trainer.lm.data import (TextData, build_text_data, make_windows, pack_documents, split_documents,
                             unigram_entropy_nats)
from trainer.lm.tokenizer import ByteTokenizer, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _docs(n):
    # Distinct, recognisable documents: "<doc 7>" can be found again in decoded tokens.
    return [f"<doc {i}> " + "lorem ipsum dolor sit amet " * (3 + i % 5) for i in range(n)]


def _synthetic(seq_len=7, num_windows=20, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0):
    # arange tokens: every window is unique, so rows identify windows.
    tok = ByteTokenizer()
    n = num_windows * (seq_len + 1)
    return TextData(tok, torch.arange(n, dtype=torch.int32) % 250, torch.arange(3 * (seq_len + 1), dtype=torch.int32),
                    seq_len, micro_batch_size, dp_rank, dp_size, seed)


def _rows(x):
    return [tuple(r.tolist()) for r in x]


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_eos():
    tok = build_tokenizer(DataConfig())
    assert isinstance(tok, ByteTokenizer) and tok.eos_id == 256 and tok.vocab_size <= 260
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    packed = pack_documents([tok.encode("ab"), tok.encode("c")], tok.eos_id)
    assert packed.tolist() == [97, 98, 256, 99, 256]
    assert tok.decode(packed) == "abc"  # eos is not text


def test_hf_tokenizer_from_local_dir(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"])
    core.train_from_iterator(["hello world foo bar"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    tok = build_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok")))
    assert tok.vocab_size == 6 and tok.eos_id == 1
    assert tok.decode(tok.encode("hello foo")) == "hello foo"


def test_missing_tokenizer_path_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: path not found"):
        preflight_data(DataConfig(tokenizer=str(tmp_path / "nope")))


# --------------------------------------------------------------------------- corpus


def test_stdlib_corpus_offline_deterministic_and_capped():
    cfg = DataConfig(max_bytes=200_000)
    src = resolve_source(cfg)
    assert list(src.files) == sorted(src.files, key=lambda p: p.split(os.sep))
    assert not any("site-packages" in p for p in src.files)
    ds1, ds2 = load_corpus(cfg), load_corpus(cfg)
    texts = ds1["text"]
    assert list(texts) == list(ds2["text"]) and len(texts) == len(src.files) > 5
    assert 0 < sum(len(t.encode("utf-8")) for t in texts) <= 200_000
    bigger = resolve_source(DataConfig(max_bytes=400_000)).files  # whole files, in order, until the cap
    assert bigger[: len(src.files)] == src.files and len(bigger) > len(src.files)


def test_pydoc_corpus_is_prose_one_topic_per_document():
    import pydoc_data.topics

    names, texts = pydoc_topics()
    assert names == sorted(pydoc_data.topics.topics) and len(names) > 50
    cfg = DataConfig(source="pydoc", text_field="body", seq_len=64, val_fraction=0.1)
    preflight_data(cfg)
    assert resolve_source(cfg).kind == "pydoc"
    ds = load_corpus(cfg)
    assert ds.column_names == ["body"] and list(ds["body"]) == texts == [pydoc_data.topics.topics[n] for n in names]
    assert 200_000 < sum(len(t.encode("utf-8")) for t in texts) < 2_000_000
    # English prose, not the code of the stdlib corpus: words and sentences, few code lines.
    assert 'The "if" statement' in texts[names.index("if")]
    code = load_corpus(DataConfig(max_bytes=500_000))["text"]
    share = lambda docs, s: sum(t.count(s) for t in docs) / sum(len(t) for t in docs)
    assert share(texts, ". ") > 3 * share(code, ". ") and share(texts, "def ") < share(code, "def ") / 3
    capped = load_corpus(DataConfig(source="pydoc", max_bytes=50_000))["text"]  # leading whole topics
    assert list(capped) == texts[: len(capped)] and 1 <= len(capped) < len(texts)


def test_pydoc_split_holds_out_whole_topics_deterministically():
    names, texts = pydoc_topics()
    cfg = DataConfig(source="pydoc", seq_len=64, val_fraction=0.1)
    a, b = build_text_data(cfg, 2, seed=0), build_text_data(cfg, 2, seed=7)
    train_idx, val_idx = split_documents(len(names), 0.1)
    assert (a.num_train_docs, a.num_val_docs) == (len(train_idx), len(val_idx)) and len(val_idx) == 8
    decoded_val, decoded_train = a.tokenizer.decode(a.val_tokens), a.tokenizer.decode(a.train_tokens)
    assert decoded_val == "".join(texts[i] for i in val_idx)  # whole topics, in topic order
    assert decoded_train == "".join(texts[i] for i in train_idx)
    assert (a.val_tokens == a.tokenizer.eos_id).sum() == len(val_idx)  # one eos per topic
    assert torch.equal(a.train_tokens, b.train_tokens) and torch.equal(a.val_tokens, b.val_tokens)
    x, y = next(a.train_batches())
    assert x.shape == y.shape == (2, 64)


def test_pydoc_missing_is_one_line_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pydoc_data.topics" else real(name, *a))
    for call in (preflight_data, load_corpus):
        with pytest.raises(ConfigError, match=r"^data\.source: pydoc: this Python has no pydoc_data\.topics") as err:
            call(DataConfig(source="pydoc"))
        assert "\n" not in str(err.value)


def _write_txt_dir(root, docs):
    (root / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):
        (root / ("sub" if i % 2 else "") / f"d{i:02d}.txt").write_text(d)
    (root / "ignored.csv").write_text("not,text\n")  # unsupported extension: skipped
    (root / "empty.txt").write_text("")  # empty: skipped


def test_local_txt_jsonl_parquet_same_path(tmp_path):
    import datasets

    docs = _docs(30)
    _write_txt_dir(tmp_path / "txt", docs)
    datasets.Dataset.from_dict({"body": docs, "id": list(range(30))}).to_json(str(tmp_path / "c.jsonl"))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    sources = [(tmp_path / "txt", "text"), (tmp_path / "txt" / "**" / "*.txt", "text"),
               (tmp_path / "c.jsonl", "body"), (tmp_path / "c.parquet", "text")]
    for source, field in sources:
        cfg = DataConfig(source=str(source), text_field=field, seq_len=16, val_fraction=0.1)
        preflight_data(cfg)
        ds = load_corpus(cfg)
        assert ds.column_names == [field] and sorted(ds[field]) == sorted(docs)
        data = build_text_data(cfg, micro_batch_size=2)
        assert (data.num_train_docs, data.num_val_docs) == (27, 3)
        x, y = next(data.train_batches())
        assert x.shape == y.shape == (2, 16)


def test_without_datasets_plain_text_and_pydoc_are_the_same_documents(tmp_path, monkeypatch):
    """A bare GPU box has no `datasets`: plain-text sources and pydoc read with the standard
    library give exactly what `datasets` gives; other sources say what to install."""
    _write_txt_dir(tmp_path / "txt", _docs(6))
    (tmp_path / "txt" / "crlf.txt").write_bytes(b"line one\r\nline two\rthree\n")  # universal newlines
    (tmp_path / "txt" / "bad.txt").write_bytes(b"caf\xe9 \xff\xfe ok\n")  # undecodable bytes replaced
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "x"}))
    configs = [DataConfig(max_bytes=300_000), DataConfig(source="pydoc", text_field="body", max_bytes=60_000),
               DataConfig(source=str(tmp_path / "txt"), text_field="doc", max_bytes=0)]
    with_datasets = [load_corpus(cfg) for cfg in configs]
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    for cfg, want in zip(configs, with_datasets):
        got = load_corpus(cfg)
        field = cfg.text_field
        assert type(got).__name__ == "TextDocuments" and got.column_names == [field] and len(got) == len(want)
        assert got[field] == list(want[field]) and got[[2, 0]] == want[[2, 0]]
    plain = "".join(load_corpus(configs[2])["doc"])
    assert plain.count("\ufffd") == 3 and "\r" not in plain and "line two\nthree" in plain
    data = build_text_data(DataConfig(source="pydoc", seq_len=64, val_fraction=0.1), micro_batch_size=2)
    assert next(data.train_batches())[0].shape == (2, 64)
    with pytest.raises(ConfigError, match=r"^data\.source: reading json files needs HF datasets \(pip install"):
        load_corpus(DataConfig(source=str(tmp_path / "c.jsonl")))


def test_text_field_missing_names_key(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in _docs(4)))
    with pytest.raises(ConfigError, match=r"^data\.text_field: no column 'text'.*body"):
        load_corpus(DataConfig(source=str(tmp_path / "c.jsonl")))


def test_bad_local_paths_name_data_source(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    bad = [tmp_path / "missing", tmp_path / "empty_dir", tmp_path / "empty.txt", tmp_path / "*.jsonl",
           "./no/such/dir", "corpus.txt", "~/no-such-sparseforge-corpus"]
    for source in bad:
        with pytest.raises(ConfigError, match=r"^data\.source: ") as err:
            preflight_data(DataConfig(source=str(source)))
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^data\.source: path not found"):
        load_corpus(DataConfig(source=str(tmp_path / "missing")))


def test_hub_name_is_not_a_missing_local_path(monkeypatch):
    import datasets

    cfg = DataConfig(source="someone/some-corpus", split="validation")
    assert resolve_source(cfg).kind == "hub"
    preflight_data(cfg)  # nothing to check offline: no error
    calls = []

    def offline(name, **kwargs):
        calls.append((name, kwargs))
        raise ConnectionError("Couldn't reach 'someone/some-corpus' on the Hub\n(more detail)")

    monkeypatch.setattr(datasets, "load_dataset", offline)  # never touch the network in tests
    with pytest.raises(ConfigError, match=r"^data\.source: cannot load hub dataset 'someone/some-corpus'") as err:
        load_corpus(cfg)
    assert "\n" not in str(err.value) and calls == [("someone/some-corpus", {"split": "validation"})]


def test_concurrent_ranks_load_the_same_corpus(tmp_path):
    # 3 "ranks" on one machine at once: private caches, no lock contention, identical tokens.
    code = ("import hashlib, sys; from trainer.config import DataConfig; from trainer.lm.data import build_text_data;"
            "d = build_text_data(DataConfig(max_bytes=300_000), 4, int(sys.argv[1]), 3);"
            "print(hashlib.sha1(d.train_tokens.numpy().tobytes()).hexdigest())")
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HOME=str(tmp_path / "hf"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1


# --------------------------------------------------------------------------- split / windows


def test_val_split_disjoint_by_documents(tmp_path):
    train, val = split_documents(100, 0.05)
    assert len(val) == 5 and set(train).isdisjoint(val) and sorted([*train, *val]) == list(range(100))
    assert len(split_documents(3, 0.01)[1]) == 1  # at least one validation document
    with pytest.raises(ConfigError, match=r"^data\.source: 1 document"):
        split_documents(1, 0.05)

    docs = _docs(40)
    _write_txt_dir(tmp_path / "txt", docs)
    a = build_text_data(DataConfig(source=str(tmp_path / "txt"), seq_len=16, val_fraction=0.2), 2, seed=0)
    b = build_text_data(DataConfig(source=str(tmp_path / "txt"), seq_len=16, val_fraction=0.2), 2, seed=5)
    markers = lambda tokens: {m.split(">")[0] for m in a.tokenizer.decode(tokens).split("<doc ")[1:]}
    train_docs, val_docs = markers(a.train_tokens), markers(a.val_tokens)
    assert len(val_docs) == 8 and len(train_docs) == 32 and train_docs.isdisjoint(val_docs)
    assert torch.equal(a.val_tokens, b.val_tokens)  # the split does not follow train.seed
    assert (a.train_tokens == a.tokenizer.eos_id).sum() == 32  # one eos per document


def test_windows_shapes_and_shifted_targets():
    data = _synthetic(seq_len=7, num_windows=20, micro_batch_size=3)
    stream = data.train_tokens.tolist()
    for _, (x, y) in zip(range(10), data.train_batches()):
        assert x.shape == y.shape == (3, 7) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            start = stream.index(row_x[0]) if row_x[0] < 250 else None
            window = row_x + row_y[-1:]
            assert start is not None and start % 8 == 0 and stream[start:start + 8] == window
    assert make_windows(torch.arange(17), 7).shape == (2, 8)  # the short tail is dropped


def test_dp_sharding_matches_single_rank_global_batch():
    # 20 windows, global batch 6: batches straddle the epoch boundaries of the sample stream.
    single = _synthetic(micro_batch_size=6, dp_size=1).train_batches()
    ranks = [_synthetic(micro_batch_size=3, dp_rank=r, dp_size=2).train_batches() for r in range(2)]
    stream = []
    for n in range(10):
        x1, y1 = next(single)
        parts = [next(g) for g in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1) and torch.equal(torch.cat([p[1] for p in parts]), y1)
        stream += _rows(x1)
    assert len(set(stream[:20])) == 20 and len(set(stream[20:40])) == 20  # each epoch: every window once
    assert stream[20:40] != stream[:20]  # a new order each epoch


def test_stream_is_the_same_for_any_batch_layout():
    # The sample stream depends on (seed, windows) only: G = 4, 6 or 12 read the same windows.
    def stream(mbs, dp, batches):
        its = [_synthetic(micro_batch_size=mbs, dp_rank=r, dp_size=dp).train_batches() for r in range(dp)]
        return sum((sum((_rows(next(it)[0]) for it in its), []) for _ in range(batches)), [])
    ref = stream(12, 1, 4)
    assert stream(2, 2, 12) == ref and stream(2, 3, 8) == ref


def test_resume_gives_the_uninterrupted_batches():
    ref = _synthetic(seed=3).train_batches()
    expected = [next(ref) for _ in range(25)]
    first = _synthetic(seed=3)
    it = first.train_batches()
    for _ in range(11):
        next(it)
    state = first.state_dict()
    assert state["global_micro_batches"] == 11
    resumed = _synthetic(seed=3)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(resumed.train_batches(), expected[11:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    # Same global batch split over 2 ranks resumes at the same place.
    rank1 = _synthetic(seed=3, micro_batch_size=1, dp_rank=1, dp_size=2)
    rank1.load_state_dict(state)
    assert torch.equal(next(rank1.train_batches())[0], expected[11][0][1:])
    # Another micro-batch size (G = 4 instead of 2) goes on from the same sample of the stream.
    wider = _synthetic(seed=3, micro_batch_size=4)
    wider.load_state_dict(state)
    flat = lambda batches: sum((_rows(x) for x, _ in batches), [])
    assert flat([next(wider.train_batches()) for _ in range(3)]) == flat(expected[11:17])
    # A state written before the stream was per sample (whole global batches) still resumes.
    old = _synthetic(seed=3)
    old.load_state_dict({k: v for k, v in state.items() if k != "consumed_samples"})
    assert torch.equal(next(old.train_batches())[0], expected[11][0])
    for other in (_synthetic(seed=4), _synthetic(seed=3, num_windows=30)):
        with pytest.raises(ConfigError, match="^data: checkpoint"):
            other.load_state_dict(state)


def test_val_batches_fixed_wrapping_and_sharded():
    whole = _synthetic(micro_batch_size=2, dp_size=1).val_batches(4)  # 3 val windows: wraps around
    assert len(whole) == 4 and _rows(whole[1][0])[1] == _rows(whole[0][0])[0]
    assert [_rows(x) for x, _ in whole] == [_rows(x) for x, _ in _synthetic(seed=9).val_batches(4)]
    halves = [_synthetic(micro_batch_size=1, dp_rank=r, dp_size=2).val_batches(4) for r in range(2)]
    for b in range(4):
        assert torch.equal(torch.cat([halves[0][b][0], halves[1][b][0]]), whole[b][0])


def test_unigram_entropy_matches_direct_computation():
    tokens = torch.tensor([1, 1, 2, 3, 3, 3, 256, 0], dtype=torch.int32)
    counts = Counter(tokens.tolist())
    direct = -sum(c / 8 * math.log(c / 8) for c in counts.values())
    assert unigram_entropy_nats(tokens, 257) == pytest.approx(direct, rel=1e-12)
    data = _synthetic()
    counts = Counter(data.train_tokens.tolist())
    n = data.num_train_tokens
    assert data.unigram_entropy_nats == pytest.approx(-sum(c / n * math.log(c / n) for c in counts.values()))


def test_too_little_data_is_a_config_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("y")
    with pytest.raises(ConfigError, match=r"^data\.seq_len: the training split has 2 tokens"):
        build_text_data(DataConfig(source=str(tmp_path), seq_len=16), 2)
    with pytest.raises(ConfigError, match=r"^data\.source: the training split has 20 windows, fewer than one global"):
        _synthetic(num_windows=20, micro_batch_size=11, dp_size=2)
