"""Teacher-written training text: the batched, cached sampler against a plain loop; the disk cache; training on it."""
import warnings

import pytest
import torch
from pack_helpers import SPECIALS, encode, tiny_lm, tiny_tokenizer

from binarymos import synth
from binarymos.data import DataError
from binarymos.train import TrainConfig, prepare

BOS = SPECIALS.index("<s>")


@torch.no_grad()
def plain_sampling(model, count, seq_len, temperature, seed, bos=None, prompts=None):
    """The documented contract, one sequence at a time, the whole prefix through the model at every step;
    with ``bos``, each sequence is that id, the drawn first token, then tokens 2.. sampled by columns 2..;
    with ``prompts``, row i's prompt replaces the drawn token."""
    u = torch.rand(count, seq_len, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    starts = list(range(len(SPECIALS), model.config.vocab_size))  # every id of the tiny tokenizer but its specials
    rows = []
    for i in range(count):
        first = [starts[int(u[i, 0] * len(starts))]] if prompts is None else prompts[i].tolist()
        seq = ([] if bos is None else [bos]) + first
        for t in range(len(seq), seq_len):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            if temperature == 0:
                seq.append(int(logits.argmax()))
            else:
                cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
                seq.append(int((cdf < u[i, t] * cdf[-1]).sum()))  # first id whose cumulative mass reaches u
        rows.append(seq)
    return torch.tensor(rows)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batched_sampling_with_a_cache_equals_a_plain_loop(temperature, cache):
    model = tiny_lm("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the KV cache goes by the name this transformers takes
        ids = synth.sample(model, tiny_tokenizer(), count=5, seq_len=12, temperature=temperature, seed=7,
                           batch_size=2, cache=cache)
    assert torch.equal(ids, plain_sampling(model, 5, 12, temperature, seed=7))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_gemma_teachers_sequences_start_with_its_bos(temperature, cache):
    model = tiny_lm("gemma3_text")
    ids = synth.sample(model, tiny_tokenizer(), count=5, seq_len=12, temperature=temperature, seed=7, batch_size=2,
                       cache=cache)
    assert ids[:, 0].tolist() == [BOS] * 5 and (ids[:, 1] >= len(SPECIALS)).all()
    assert torch.equal(ids, plain_sampling(model, 5, 12, temperature, seed=7, bos=BOS))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch, bos", [("llama", None), ("gemma3_text", BOS)])
def test_prompted_sequences_continue_their_prompts_as_a_plain_loop_does(arch, bos, cache):
    model = tiny_lm(arch)
    prompts = torch.randint(len(SPECIALS), model.config.vocab_size, (5, 4), generator=torch.Generator().manual_seed(1))
    ids = synth.sample(model, tiny_tokenizer(), count=5, seq_len=12, temperature=0.8, seed=7, batch_size=2,
                       cache=cache, prompts=prompts)
    start = 0 if bos is None else 1
    assert torch.equal(ids[:, start:start + 4], prompts)
    assert torch.equal(ids, plain_sampling(model, 5, 12, 0.8, seed=7, bos=bos, prompts=prompts))
    with pytest.raises(ValueError, match="prompts"):
        synth.sample(model, tiny_tokenizer(), count=5, seq_len=4 + start, prompts=prompts)


def test_prompt_windows_are_seeded_runs_of_real_text_past_the_bos():
    blocks = torch.arange(40).reshape(4, 10)  # each row's first id stands for its BOS
    windows = synth.prompt_windows(blocks, count=50, length=3, seed=2, bos_token_id=0)
    assert windows.shape == (50, 3)
    assert torch.equal(windows, synth.prompt_windows(blocks, 50, 3, seed=2, bos_token_id=0))  # seeded
    assert ((windows[:, 1:] - windows[:, :-1]) == 1).all() and (windows % 10 != 0).all()  # contiguous, no BOS column
    assert len({tuple(w) for w in windows.tolist()}) > 10  # spread over blocks and offsets
    assert synth.prompt_windows(blocks, 50, 10, seed=2).tolist() == [r.tolist() for r in blocks[
        torch.randint(4, (50, 1), generator=torch.Generator().manual_seed(2)).squeeze(1)]]  # whole blocks without a BOS
    with pytest.raises(DataError, match="does not fit"):
        synth.prompt_windows(blocks, 5, 10, bos_token_id=0)


def test_training_on_teacher_text_that_continues_the_real_text(teacher_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("BINARYMOS_CACHE", str(tmp_path))
    base = dict(model=str(teacher_dir), seq_len=16, device="cpu", out=str(tmp_path / "run"))
    real = prepare(TrainConfig(data=str(text_file), **base))[3]
    mixed = prepare(TrainConfig(data=f"teacher+{text_file}", teacher_samples=6, teacher_seq_len=24,
                                teacher_prompt_len=5, **base))[3]
    prompts = synth.prompt_windows(real, 6, 5, seed=0)
    assert torch.equal(mixed[:len(real)], real)
    assert torch.equal(mixed[len(real):].reshape(6, 24), plain_sampling(tiny_lm("llama"), 6, 24, 1.0, seed=0,
                                                                       prompts=prompts))
    assert len(list((tmp_path / "teacher").iterdir())) == 1
    prepare(TrainConfig(data=f"teacher+{text_file}", teacher_samples=6, teacher_seq_len=24, **base))
    assert len(list((tmp_path / "teacher").iterdir())) == 2  # unprompted text has a cache file of its own
    with pytest.raises(DataError, match="teacher\\+SOURCE"):
        prepare(TrainConfig(data="teacher", teacher_prompt_len=5, **base))


def test_an_unknown_cache_is_refused():
    with pytest.raises(ValueError, match="dynamic, static or graph"):
        synth.sample(tiny_lm("llama"), tiny_tokenizer(), count=2, seq_len=4, cache="paged")


def test_sequences_cached_without_a_bos_are_not_read_back_for_a_model_that_needs_one(teacher_dir, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv("BINARYMOS_CACHE", str(tmp_path))
    tokenizer = tiny_tokenizer()
    plain = synth.teacher_tokens(tiny_lm("llama"), tokenizer, str(teacher_dir), 4, 10, seed=3)
    with_bos = synth.teacher_tokens(tiny_lm("gemma3_text"), tokenizer, str(teacher_dir), 4, 10, seed=3)
    assert (plain[:, 0] != BOS).all() and (with_bos[:, 0] == BOS).all()
    assert len(list((tmp_path / "teacher").iterdir())) == 2


def test_second_call_reads_the_cache_and_the_key_holds_the_setting(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BINARYMOS_CACHE", str(tmp_path))
    model, tokenizer = tiny_lm("llama"), tiny_tokenizer()
    first = synth.teacher_tokens(model, tokenizer, str(teacher_dir), 4, 10, temperature=1.0, seed=3)
    files = list((tmp_path / "teacher").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary file left behind

    def no_sampling(*args, **kwargs):
        raise RuntimeError("sampled again")

    monkeypatch.setattr(synth, "sample", no_sampling)
    assert torch.equal(synth.teacher_tokens(model, tokenizer, str(teacher_dir), 4, 10, temperature=1.0, seed=3), first)
    for other in [dict(temperature=0.5, seed=3), dict(temperature=1.0, seed=4)]:
        with pytest.raises(RuntimeError, match="sampled again"):
            synth.teacher_tokens(model, tokenizer, str(teacher_dir), 4, 10, **other)


def test_training_data_is_real_text_then_the_teachers(teacher_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("BINARYMOS_CACHE", str(tmp_path))
    base = dict(model=str(teacher_dir), seq_len=16, device="cpu", out=str(tmp_path / "run"))
    real = prepare(TrainConfig(data=str(text_file), **base))[3]
    mixed = prepare(TrainConfig(data=f"teacher+{text_file}", teacher_samples=6, teacher_seq_len=24, **base))[3]
    assert torch.equal(mixed[:len(real)], real)
    # 6 sequences of 24 tokens joined and cut into 9 blocks of 16
    assert torch.equal(mixed[len(real):].reshape(6, 24), plain_sampling(tiny_lm("llama"), 6, 24, 1.0, seed=0))


@pytest.mark.parametrize("name", ["teacher+teacher", "teacher+", "+c4"])
def test_bad_data_names_are_refused(name):
    with pytest.raises(DataError, match="bad data"):
        synth.split_data(name)


def gemma_teacher(tmp_path, monkeypatch):
    """A tiny Gemma saved with the tiny tokenizer under tmp_path, which also holds the sampled text's cache."""
    monkeypatch.setenv("BINARYMOS_CACHE", str(tmp_path))
    teacher = tmp_path / "gemma"
    tiny_lm("gemma3_text").save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    return teacher


def test_a_gemma_teachers_training_blocks_start_with_its_bos(tmp_path, monkeypatch):
    teacher = gemma_teacher(tmp_path, monkeypatch)
    tokenizer = tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "train.txt").write_text(text)
    stream = encode(text) + [tokenizer.eos_token_id]
    blocks = prepare(TrainConfig(model=str(teacher), data=f"teacher+{tmp_path / 'train.txt'}", teacher_samples=3,
                                 seq_len=16, device="cpu", out=str(tmp_path / "run")))[3]
    real, sampled = blocks[:len(stream) // 15], blocks[len(stream) // 15:]
    assert blocks[:, 0].tolist() == [BOS] * len(blocks)
    assert real[:, 1:].flatten().tolist() == stream[: len(real) * 15]
    assert torch.equal(sampled, plain_sampling(tiny_lm("gemma3_text"), 3, 16, 1.0, seed=0, bos=BOS))


@pytest.mark.parametrize("teacher_seq_len", [10, 24])
def test_a_gemma_teachers_sequences_of_another_length_are_cut_into_blocks_that_start_with_its_bos(
        tmp_path, monkeypatch, teacher_seq_len):
    teacher = gemma_teacher(tmp_path, monkeypatch)
    blocks = prepare(TrainConfig(model=str(teacher), data="teacher", teacher_samples=3, teacher_seq_len=teacher_seq_len,
                                 seq_len=16, device="cpu", out=str(tmp_path / "run")))[3]
    # the sequences without their BOS, joined: each block is the BOS and the next 15 tokens of that stream
    stream = plain_sampling(tiny_lm("gemma3_text"), 3, teacher_seq_len, 1.0, seed=0, bos=BOS)[:, 1:].flatten()
    assert len(blocks) == len(stream) // 15
    assert blocks[:, 0].tolist() == [BOS] * len(blocks) and (blocks[:, 1:] != BOS).all()
    assert blocks[:, 1:].flatten().tolist() == stream[: len(blocks) * 15].tolist()
