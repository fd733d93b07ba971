"""trainer.lm.streaming: exact resume, dp sharding, held-out validation, a bounded buffer, and the
refusals (dp change, config rules); one tiny Trainer run stopped and resumed. Local jsonl/txt files
only (nothing downloaded); a few hundred short documents."""
import io
import json
import os
import re

import pytest
import torch

from trainer.config import Config, ConfigError, DataConfig, validate
from trainer.lm.streaming import StreamingTextData
from trainer.lm.tokenizer import ByteTokenizer

NUM_DOCS, DOCS_PER_FILE = 300, 100
SEQ_LEN, B = 15, 2
NEED = B * (SEQ_LEN + 1)  # tokens per micro-batch


def _doc(i):
    # At least 40 bytes, marker first: a marker survives make_windows' dropped tail (< one window).
    return f"<doc {i}> " + "lorem ipsum " * (3 + i % 7)


def _corpus(root, num_files=NUM_DOCS // DOCS_PER_FILE):
    """NUM_DOCS documents over num_files jsonl files, doc i in file i // (NUM_DOCS / num_files)."""
    root.mkdir(exist_ok=True)
    per_file = NUM_DOCS // num_files
    for f in range(num_files):
        with open(root / f"part{f}.jsonl", "w") as fh:
            for i in range(f * per_file, (f + 1) * per_file):
                fh.write(json.dumps({"text": _doc(i), "id": i}) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def corpus3(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("stream3") / "c")


@pytest.fixture(scope="module")
def corpus4(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("stream4") / "c", num_files=4)


def _data(source, dp_rank=0, dp_size=1, **kw):
    cfg = DataConfig(source=source, seq_len=SEQ_LEN, val_fraction=0.1, streaming=True)
    return StreamingTextData(cfg, B, dp_rank, dp_size, **kw)


def _take(data, n):
    it = data.train_batches()
    return [next(it) for _ in range(n)]


def _doc_ids(batches):
    """Document ids whose marker appears in these consecutive batches (their windows are contiguous)."""
    rows = [torch.cat([x, y[:, -1:]], dim=1).flatten() for x, y in batches]
    text = ByteTokenizer().decode(torch.cat(rows)) if rows else ""
    return [int(m) for m in re.findall(r"<doc (\d+)>", text)]


def _round_trip(state):
    buf = io.BytesIO()  # as trainer/checkpoint.py stores it: torch.save, weights_only=False
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# --------------------------------------------------------------------------- (a) exact resume


@pytest.mark.parametrize("dp_size,corpus,k,where", [
    (1, "corpus3", 0, "start"),  # a state taken before any batch
    (1, "corpus3", 3, "first file"),
    (1, "corpus3", 300, "later file"),  # a file holds ~250 batches here
    (1, "corpus3", 700, "second pass"),  # after the end of the stream (~680 batches)
    (2, "corpus3", 150, "later file"),  # 3 files over 2 ranks: every other document
    (2, "corpus4", 200, "later file"),  # 4 files over 2 ranks: whole files each (0, 2 | 1, 3)
])
def test_resume_gives_the_uninterrupted_batches(request, dp_size, corpus, k, where):
    source, m = request.getfixturevalue(corpus), 12
    for rank in range(dp_size):
        straight = _take(_data(source, rank, dp_size), k + m)
        first = _data(source, rank, dp_size)
        _take(first, k)
        state = _round_trip(first.state_dict())
        resumed = _data(source, rank, dp_size)
        resumed.load_state_dict(state)
        for (x, y), (ex, ey) in zip(_take(resumed, m), straight[k:], strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)
            assert x.dtype == torch.int64 and x.shape == (B, SEQ_LEN)
        assert resumed.num_train_tokens == (k + m) * NEED
        # The state was taken where the case says (the rank's first file ends at first_end).
        first_end = 75 * (rank + 1) if corpus == "corpus4" else DOCS_PER_FILE
        read = _doc_ids(straight[:k])
        assert first._pass == (where == "second pass")
        assert where in ("second pass", "later file") or not read or max(read) < first_end
        assert where != "later file" or max(read) >= first_end


def test_batches_are_packed_documents_with_eos_and_shifted_targets(corpus3):
    data = _data(corpus3)
    x, y = _take(data, 1)[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = torch.cat([x[0], y[0, -1:], x[1], y[1, -1:]]).tolist()
    expected = []
    for i in (0, 1, 2):  # 0 and 1 train; doc 9 is the first held out (k = 10)
        expected += list(_doc(i).encode()) + [ByteTokenizer.eos_id]
    assert stream == expected[:NEED]


# --------------------------------------------------------------------------- (b), (c) ranks and validation


def _val_ids(data):
    batches = data.val_batches(400)  # more than the held-out documents: the whole held-out stream
    assert data._val[2], "validation read the whole stream"
    return set(_doc_ids(batches))


@pytest.mark.parametrize("corpus", ["corpus3", "corpus4"])
def test_ranks_read_disjoint_documents_that_cover_the_stream(request, corpus):
    source = request.getfixturevalue(corpus)
    passes = NUM_DOCS * len(_doc(6)) // NEED + 10  # more than one whole pass of any rank
    train, val = [], []
    for rank in (0, 1):
        data = _data(source, rank, 2)
        train.append(set(_doc_ids(_take(data, passes))))
        val.append(_val_ids(data))
    assert not train[0] & train[1] and not val[0] & val[1]
    assert not (train[0] | train[1]) & (val[0] | val[1])
    assert train[0] | train[1] | val[0] | val[1] == set(range(NUM_DOCS))


def test_validation_is_every_kth_document_never_trained_and_fixed(corpus3):
    data = _data(corpus3)
    first = data.val_batches(3)
    train = set(_doc_ids(_take(data, NUM_DOCS * len(_doc(6)) // NEED + 10)))
    again = data.val_batches(3)  # after training past a whole pass: the same batches
    fresh = _data(corpus3).val_batches(3)
    for (x, y), (x2, y2), (x3, y3) in zip(first, again, fresh, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(x, x3)
    val = _val_ids(data)
    assert val == {i for i in range(NUM_DOCS) if i % 10 == 9}  # dp=1: the files' order, k = 10
    assert not val & train and train | val == set(range(NUM_DOCS))
    assert 0 < data.unigram_entropy_nats < 5.6  # bytes of a few words: well below log(257)


def test_buffer_is_bounded_during_iteration(corpus3):
    data = _data(corpus3, read_docs=4)
    longest = max(len(_doc(i)) for i in range(NUM_DOCS)) + 1  # + eos
    bound = NEED + 4 * longest
    it = data.train_batches()
    for _ in range(150):
        next(it)
        assert len(data._tokens) < NEED + 4 * longest
    assert data.peak_buffered_docs == 4  # never more texts than read_docs at once
    assert NEED <= data.peak_buffered_tokens < bound
    assert data.state_dict()["tokens"].numel() < bound  # what a checkpoint stores is as small


# --------------------------------------------------------------------------- (e) refusals


def _one_line_error(fn, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        fn()
    assert "\n" not in str(info.value)


def test_resume_under_another_dp_size_or_rank_is_refused(corpus4):
    saved = _data(corpus4, 0, 2)
    _take(saved, 5)
    state = saved.state_dict()
    _one_line_error(lambda: _data(corpus4, 0, 4).load_state_dict(state),
                    r"^data\.streaming: the checkpoint was written with dp=2, this run has dp=4; "
                    r"a streaming position is per rank$")
    _one_line_error(lambda: _data(corpus4, 1, 2).load_state_dict(state), r"^data\.streaming: dp rank 1 found the "
                                                                         r"position of dp rank 0")
    _one_line_error(lambda: _data(corpus4).load_state_dict({"consumed_samples": 0, "seed": 0}),
                    r"^data\.streaming: the checkpoint's data position was written with data\.streaming=false")
    other = DataConfig(source=corpus4, seq_len=SEQ_LEN, val_fraction=0.2, streaming=True)
    _one_line_error(lambda: StreamingTextData(other, B, 0, 2).load_state_dict(state),
                    r"^data\.streaming: the checkpoint streamed")


def test_config_rules_name_the_key():
    def check(**changes):
        cfg = Config()
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(cfg, section), name, value)
        cfg.data.streaming = True
        return lambda: validate(cfg)

    validate(Config(data=DataConfig(streaming=True)))  # the stdlib, streamed: allowed
    _one_line_error(check(model__family="dit"), r"^data\.streaming: only for model\.family=llm")
    _one_line_error(check(data__mix={"/a": 1.0}), r"^data\.streaming: not with data\.mix")
    _one_line_error(check(data__source="pydoc"), r"^data\.streaming: not with data\.source=pydoc")
    _one_line_error(check(data__val_fraction=0.7), r"^data\.val_fraction: 0\.7 under data\.streaming")


def test_unreadable_hub_name_and_empty_rank_are_one_line(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    data = _data("someone/no-such-corpus")
    _one_line_error(lambda: _take(data, 1), r"^data\.source: cannot stream 'someone/no-such-corpus': "
                                            r"ConnectionError: Couldn't reach")
    monkeypatch.undo()
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": _doc(1)}) + "\n")
    _one_line_error(lambda: _take(_data(str(tmp_path / "one.jsonl"), 1, 2), 1),
                    r"^data\.source: dp rank 1's share of .* is empty")


@pytest.mark.parametrize("kind", ["txt", "parquet"])
def test_text_and_parquet_files_stream_in_order(tmp_path, kind):
    if kind == "txt":  # one file = one document, as trainer/lm/corpus.py reads text files
        for i in range(12):
            (tmp_path / f"f{i:02d}.txt").write_text(_doc(i) + "\nsecond line\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for f in range(2):
            pq.write_table(pa.table({"text": [_doc(i) for i in range(6 * f, 6 * f + 6)]}), tmp_path / f"p{f}.parquet")
    ids = _doc_ids(_take(_data(str(tmp_path)), 40))
    assert ids[:8] == [0, 1, 2, 3, 4, 5, 6, 7] and 9 not in ids  # document 9 is the held-out one


def test_save_take_restore_on_the_same_object(corpus3):
    """As ESFT and pruning calibrate: state, a few batches, the state back, training from batch 0."""
    data = _data(corpus3)
    state = data.state_dict()
    calib = _take(data, 40)
    data.load_state_dict(state)
    for (x, _), (cx, _) in zip(_take(data, 40), calib, strict=True):
        assert torch.equal(x, cx)


# --------------------------------------------------------------------------- (f) through the Trainer


TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "moe.expert_ffn_dim=32", "data.seq_len=32", "train.micro_batch_size=4", "train.log_every=1",
        "eval.every=2", "eval.batches=1", "optim.warmup_steps=2", "logging.wandb=false",
        "logging.progress_bar=false", "logging.heatmap_every=0", "checkpoint.keep_last=0",
        "train.steps=4", "checkpoint.every=2", "data.streaming=true"]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r})


def test_trainer_stopped_and_resumed_matches_uninterrupted(corpus3, tmp_path, capsys):
    from trainer.loop import Trainer
    from trainer.recipe import load_config

    def run(run_dir, *extra):
        os.makedirs(run_dir, exist_ok=True)
        return Trainer(load_config("recipes/llm/pretrain_tiny.yaml", TINY + [f"data.source={corpus3}", *extra]),
                       str(run_dir)).run()

    run(tmp_path / "straight")
    assert f"streaming {corpus3}" in capsys.readouterr().err  # the run summary line
    assert run(tmp_path / "resumed", "train.stop_at_step=2").final_step == 2
    assert run(tmp_path / "resumed").final_step == 4
    (train, val), (rtrain, rval) = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(rtrain) == [1, 2, 3, 4] and rtrain == train  # bit-exact: same batches after the resume
    assert rval == val
