"""Prepared token data (trainer/lm/prepare.py, token_shards.py, mixture.py): the same windows as
the in-memory path, exact resume under another dp size, mixtures, interrupted preparation, and
every bad input in one line."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from trainer.config import Config, ConfigError, DataConfig, validate
from trainer.lm.corpus import preflight_data
from trainer.lm.data import build_mixture, build_text_data
from trainer.lm.mixture import MixtureData
from trainer.lm.prepare import prepare_text
from trainer.prepared import MANIFEST, PARTIAL, read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _corpus(path, n=240, tag="doc", seed=0):
    """A jsonl corpus of n documents of varied lengths; each names itself ("<doc 7>") and its words
    start with the tag's first letter in upper case, so any window shows which corpus it is from."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(f"{tag[0].upper()}{int(x)}" for x in rng.integers(0, 50, size=int(rng.integers(3, 60))))
            f.write(json.dumps({"text": f"<{tag} {i}> {words}"}) + "\n")
    return str(path)


def _cfg(source, **data):
    cfg = Config()
    cfg.data = DataConfig(source=str(source), seq_len=16, max_bytes=0, **data)
    return cfg


def _prepared(tmp_path, name="prep", n=240, tag="doc", shard_tokens=1500, **data):
    corpus = _corpus(tmp_path / f"{name}_corpus" / "c.jsonl", n, tag, seed=len(name))
    out = tmp_path / name
    prepare_text(_cfg(corpus, **data), str(out), num_proc=1, shard_tokens=shard_tokens, progress_bar=False)
    return corpus, str(out)


def _flat(batches):
    return [tuple(r.tolist()) for x, _ in batches for r in x]


def _take(it, n):
    return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------- same data as in memory


def test_prepared_equals_the_in_memory_path_across_shards(tmp_path):
    corpus, out = _prepared(tmp_path)
    manifest = read_manifest(out)
    assert len(manifest["splits"]["train"]["shards"]) >= 3  # windows straddle shard boundaries
    assert manifest["dtype"] == "uint16" and set(manifest["files"]) == set(
        name for s in manifest["splits"].values() for sh in s["shards"] for name in (sh["file"], sh["index"]))
    mem = build_text_data(_cfg(corpus).data, 4)
    disk = build_text_data(_cfg(out).data, 4)
    assert isinstance(disk.train.maps[0], np.memmap)
    assert torch.equal(mem.train_tokens, disk.train_tokens) and torch.equal(mem.val_tokens, disk.val_tokens)
    assert (mem.num_train_docs, mem.num_val_docs) == (disk.num_train_docs, disk.num_val_docs)
    assert disk.unigram_entropy_nats == pytest.approx(mem.unigram_entropy_nats, rel=1e-12)
    for (x, y), (u, v) in zip(_take(mem.train_batches(), 40), _take(disk.train_batches(), 40)):
        assert torch.equal(x, u) and torch.equal(y, v)
    assert _flat(mem.val_batches(3)) == _flat(disk.val_batches(3))
    # The document index: end offsets of each document in its part, eos last.
    shard = manifest["splits"]["train"]["shards"][0]
    ends = np.fromfile(os.path.join(out, shard["index"]), dtype=np.uint64)
    tokens = np.fromfile(os.path.join(out, shard["file"]), dtype=np.uint16)
    assert len(ends) == shard["documents"] and ends[-1] == len(tokens) and (tokens[ends.astype(int) - 1] == 256).all()


def test_parallel_tokenization_writes_the_same_shards(tmp_path):
    corpus = _corpus(tmp_path / "c" / "c.jsonl", 300)
    one, two = tmp_path / "one", tmp_path / "two"
    prepare_text(_cfg(corpus), str(one), num_proc=1, shard_tokens=2000, progress_bar=False)
    prepare_text(_cfg(corpus), str(two), num_proc=2, shard_tokens=2000, progress_bar=False)
    assert read_manifest(str(one))["files"] == read_manifest(str(two))["files"]  # same bytes, same sha256


# --------------------------------------------------------------------------- resume and dp size


@pytest.mark.parametrize("new_dp", [1, 4])
def test_resume_from_dp2_onto_another_dp_continues_the_global_stream(tmp_path, new_dp):
    _, out = _prepared(tmp_path)
    data = _cfg(out).data
    ranks = [build_text_data(data, 4, r, 2, seed=3) for r in range(2)]
    its = [r.train_batches() for r in ranks]
    for _ in range(5):
        [next(it) for it in its]
    state = ranks[0].state_dict()
    # The uninterrupted dp=2 run's next 24 samples, in stream order.
    want = _flat([b for _ in range(3) for b in (next(its[0]), next(its[1]))])
    mbs = 8 // new_dp  # the same global batch of 8 split over new_dp ranks
    resumed = [build_text_data(data, mbs, r, new_dp, seed=3) for r in range(new_dp)]
    for r in resumed:
        r.load_state_dict(state)
    rits = [r.train_batches() for r in resumed]
    got = _flat([b for _ in range(3) for b in (next(it) for it in rits)])
    assert got == want
    # Another micro-batch size on one rank (G 8 -> 2) also goes on from the same sample.
    small = build_text_data(data, 2, 0, 1, seed=3)
    small.load_state_dict(state)
    assert _flat(_take(small.train_batches(), 12)) == want


# --------------------------------------------------------------------------- mixtures


def _mixture(tmp_path, weights, micro_batch_size=8, dp_rank=0, dp_size=1, seed=0):
    dirs = [_prepared(tmp_path, name, n=120, tag=name)[1] for name in ("alpha", "beta", "gamma")[:len(weights)]]
    cfg = _cfg("unused", mix=dict(zip(dirs, weights)))
    return build_mixture(cfg.data, micro_batch_size, dp_rank, dp_size, seed), cfg


def _dataset_of(row, tok):
    letters = {c for c in tok.decode(list(row)) if c.isupper()}
    return {"A": "alpha", "B": "beta", "G": "gamma"}[letters.pop()] if len(letters) == 1 else None


def test_mixture_proportions_within_sampling_error(tmp_path):
    mix, _ = _mixture(tmp_path, [0.6, 0.3, 0.1])
    assert isinstance(mix, MixtureData) and mix.names == ["alpha", "beta", "gamma"]
    n = 20_000
    counts = np.bincount(mix.choices(0, n), minlength=3)
    for share, weight in zip(counts / n, [0.6, 0.3, 0.1]):
        assert abs(share - weight) < 4 * np.sqrt(weight * (1 - weight) / n)
    it = mix.train_batches()
    _take(it, 30)
    shares = mix.metrics()
    assert set(shares) == {"data/mix/alpha", "data/mix/beta", "data/mix/gamma"} and sum(shares.values()) == pytest.approx(1)
    assert mix.metrics() == {}  # shares since the previous log
    # Each row comes from the dataset drawn for its stream position.
    drawn = mix.choices(mix.consumed_samples, 8 * 20)
    rows = [r for x, _ in _take(it, 20) for r in x.tolist()]
    named = [_dataset_of(r, mix.tokenizer) for r in rows]
    assert named == [mix.names[d] for d in drawn]


def test_mixture_resume_exact_under_another_dp_and_val_fixed(tmp_path):
    mix, cfg = _mixture(tmp_path, [0.5, 0.5])
    it = mix.train_batches()
    _take(it, 7)
    state = mix.state_dict()
    want = _flat(_take(it, 4))
    ranks = [build_mixture(cfg.data, 2, r, 4) for r in range(4)]
    for r in ranks:
        r.load_state_dict(state)
    rits = [r.train_batches() for r in ranks]
    assert _flat([b for _ in range(4) for b in (next(it) for it in rits)]) == want
    assert _flat(mix.val_batches(3)) == _flat(build_mixture(cfg.data, 8, seed=5).val_batches(3))
    other, _ = _mixture(tmp_path / "other", [0.9, 0.1])
    with pytest.raises(ConfigError, match="^data: checkpoint data state"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------- interrupted preparation


def test_killed_prepare_leaves_nothing_usable_and_a_rerun_resumes(tmp_path):
    corpus = _corpus(tmp_path / "c" / "c.jsonl", 3000)
    out, ref = tmp_path / "out", tmp_path / "ref"
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "import trainer.lm.prepare as p\n"
            "from trainer.config import Config, DataConfig\n"
            "real = p._save_progress\n"
            "def slow(*a):\n    real(*a); time.sleep(0.3)\n"
            "p._save_progress = slow\n"
            "cfg = Config(); cfg.data = DataConfig(source=%r, seq_len=16, max_bytes=0)\n"
            "p.prepare_text(cfg, %r, num_proc=1, shard_tokens=3000, progress_bar=False)\n") % (ROOT, corpus, str(out))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(out / PARTIAL / "progress.json"):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists() and (out / PARTIAL / "progress.json").exists()
    with pytest.raises(ConfigError, match="unfinished prepare-data output") as e:
        build_text_data(_cfg(out).data, 4)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unfinished"):
        preflight_data(_cfg(out).data)
    done = json.load(open(out / PARTIAL / "progress.json"))["next_doc"]
    assert 0 < done < 3000
    prepare_text(_cfg(corpus), str(out), num_proc=1, shard_tokens=3000, progress_bar=False)  # resumes
    prepare_text(_cfg(corpus), str(ref), num_proc=1, shard_tokens=3000, progress_bar=False)  # uninterrupted
    assert read_manifest(str(out))["files"] == read_manifest(str(ref))["files"]
    assert not (out / PARTIAL).exists()


def test_rerun_on_finished_output(tmp_path, capsys):
    corpus, out = _prepared(tmp_path)
    before = read_manifest(out)
    prepare_text(_cfg(corpus), out, num_proc=1, progress_bar=False)  # same data: nothing to do
    assert read_manifest(out) == before and "already holds this data" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="^--out: .* with other settings"):
        prepare_text(_cfg(corpus, val_fraction=0.2), out, num_proc=1, progress_bar=False)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a prepare-data output"):
        prepare_text(_cfg(corpus), str(stranger), num_proc=1, progress_bar=False)


# --------------------------------------------------------------------------- bad input


def _one_line(match, fn, *args):
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_damaged_shards_are_named_before_training(tmp_path):
    _, out = _prepared(tmp_path)
    manifest = read_manifest(out)
    name = manifest["splits"]["train"]["shards"][1]["file"]
    path = os.path.join(out, name)
    preflight_data(_cfg(out).data, 260)
    data = bytearray(open(path, "rb").read())
    data[10] ^= 1
    open(path, "wb").write(bytes(data))
    assert name in _one_line("does not match its checksum", preflight_data, _cfg(out).data, 260)
    preflight_data(_cfg(out, verify_checksums=False).data, 260)  # sizes only
    open(path, "wb").write(bytes(data[:-6]))
    assert name in _one_line("truncated", preflight_data, _cfg(out).data, 260)
    os.unlink(path)
    assert name in _one_line("is missing", preflight_data, _cfg(out).data, 260)


def _hf_tokenizer(path, words):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    core.train_from_iterator([words], tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]").save_pretrained(path)
    return str(path)


def test_another_tokenizer_or_vocabulary_or_split_is_refused(tmp_path):
    pytest.importorskip("transformers")
    _, out = _prepared(tmp_path)
    tok = _hf_tokenizer(tmp_path / "tok", "w1 w2 w3")
    _one_line(r"^data.source: .* was prepared with tokenizer 'byte'", preflight_data, _cfg(out, tokenizer=tok).data)
    _one_line("split with val_fraction 0.05", preflight_data, _cfg(out, val_fraction=0.1).data)
    _one_line("more than model.vocab_size=200", preflight_data, _cfg(out).data, 200)
    # The same directory name with other tokenizer files is another tokenizer too.
    corpus = _corpus(tmp_path / "hf" / "c.jsonl", 60)
    hf_out = tmp_path / "hf_prep"
    prepare_text(_cfg(corpus, tokenizer=tok), str(hf_out), num_proc=1, progress_bar=False)
    preflight_data(_cfg(hf_out, tokenizer=tok).data, 260)
    _hf_tokenizer(tmp_path / "tok", "w1 w2 w3 w4 w5")
    _one_line("other files", preflight_data, _cfg(hf_out, tokenizer=tok).data)


def test_unusable_tokenizer_directory_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "README").write_text("no tokenizer here")
    msg = _one_line(r"^data.tokenizer: cannot load tokenizer", preflight_data, DataConfig(tokenizer=str(empty)))
    assert str(empty) in msg


def test_mixture_bad_input(tmp_path):
    _, out = _prepared(tmp_path)
    cfg = _cfg("unused", mix={out: 0.5, str(tmp_path / "nope"): 0.5})
    _one_line(r"^data.mix\..*nope: not a directory", preflight_data, cfg.data)
    plain = tmp_path / "plain"
    plain.mkdir()
    cfg = _cfg("unused", mix={out: 0.5, str(plain): 0.5})
    _one_line(r"^data.mix\..*plain: .* is not a prepared data directory", preflight_data, cfg.data)
    for weight in (0.0, -1.0):
        cfg = _cfg("unused", mix={out: 1.0, str(plain): weight})
        _one_line(r"^data.mix\..*plain: the weight must be > 0", validate, cfg)
