"""The text-generation setting's parts: the byte-level tokenizer loses nothing, the
Kneser-Ney reference is a distribution with the textbook values, both language models
declare their layer groups, carry their state, round-trip through a checkpoint and learn
through the shared training loop."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import AIRLINES, REPO
from tlpipe.params import FinetuneParams, OptimParams, TokenizerParams, parse_params
from tlpipe.settings.text_generation.export import write_bundle
from tlpipe.settings.text_generation.lm import (
    LOSS_CHUNK_ROWS,
    LanguageModelTask,
    SourceLm,
    block_starts,
    lm_loss,
    scores,
    stream_nll,
    torch_continuation,
)
from tlpipe.settings.text_generation.model import (
    LstmLM,
    layer_groups,
    load_lm,
    logits,
    new_gpt,
    new_lstm,
    save_lm,
)
from tlpipe.settings.text_generation.ngram import KneserNey
from tlpipe.settings.text_generation.sampling import Sampling, next_token
from tlpipe.settings.text_generation.serve import LanguageModelBundle, decoded_pieces
from tlpipe.settings.text_generation.tokenizer import (
    EOS,
    encode_texts,
    eos_id,
    load_tokenizer,
    token_stream,
    train_bpe,
)
from tlpipe.train import CPU_FP32, train_model


@pytest.fixture(scope="module")
def corpora(sample_csv: Path) -> tuple[list[str], list[str]]:
    """(source, target) texts: the sample's other tweets and its airline tweets."""
    frame = pd.read_csv(sample_csv, dtype=str)
    airline = frame["text"].str.contains(AIRLINES, case=False, regex=True)
    return frame.loc[~airline, "text"].tolist(), frame.loc[airline, "text"].tolist()


@pytest.fixture(scope="module")
def tok(corpora: tuple[list[str], list[str]]):
    return train_bpe(corpora[0], TokenizerParams(vocab_size=600, min_frequency=2, lowercase=False))


def test_byte_level_bpe_encodes_any_text_without_loss(tok) -> None:
    assert tok.get_vocab_size() <= 600
    unseen = [
        "Zürich → Reykjavík 🛫✈️ @JetBlue délai #neverAgain",
        "日本語のツイート",
        "tabs\tand\nnewlines  ",
    ]
    for text, ids in zip(unseen, encode_texts(tok, unseen), strict=True):
        assert len(ids) > 0
        assert tok.decode(ids.tolist()) == text
    assert EOS in tok.get_vocab() and "[UNK]" not in tok.get_vocab()


def test_a_token_stream_reads_every_text_from_a_boundary(tok) -> None:
    texts = ["first tweet", "second one", "third"]
    stream = token_stream(tok, texts)
    eos = eos_id(tok)
    assert stream.dtype == np.int32
    assert stream[0] == eos and stream[-1] == eos
    assert int((stream == eos).sum()) == len(texts) + 1
    pieces = np.split(stream, np.flatnonzero(stream == eos))[1:-1]
    assert [tok.decode(p[1:].tolist()) for p in pieces] == texts


def test_kneser_ney_gives_the_textbook_probabilities() -> None:
    # Bigrams (0,1) x2, (1,2), (2,0), (1,3): D2 = n1 / (n1 + 2 n2) = 3 / 5; every token has
    # one distinct predecessor, so the continuation unigram is uniform (1/4).
    kn = KneserNey.fit(np.array([0, 1, 2, 0, 1, 3]), order=2, vocab_size=4)
    assert kn.levels[1].discount == pytest.approx(0.6)
    assert kn.prob((1,), 2) == pytest.approx((1 - 0.6) / 2 + 0.6 * 2 / 2 * 0.25)
    assert kn.prob((0,), 1) == pytest.approx((2 - 0.6) / 2 + 0.6 * 1 / 2 * 0.25)
    assert kn.prob((3,), 0) == pytest.approx(0.25)  # an unseen context backs off entirely


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_is_a_distribution_after_any_context(tok, corpora, order: int) -> None:
    stream = token_stream(tok, corpora[1])
    vocab = tok.get_vocab_size()
    kn = KneserNey.fit(stream, order, vocab)
    seen = tuple(int(t) for t in stream[10:13])
    for context in (seen, (vocab - 1, vocab - 2, vocab - 3), ()):
        assert sum(kn.prob(context, w) for w in range(vocab)) == pytest.approx(1.0, abs=1e-9)


def test_kneser_ney_trigrams_beat_unigrams_on_held_out_tweets(tok, corpora) -> None:
    target = corpora[1]
    train, test = token_stream(tok, target[:150]), token_stream(tok, target[150:])
    ppl = {n: math.exp(-KneserNey.fit(train, n, tok.get_vocab_size()).log_probs(test).mean()) for n in (1, 3)}
    assert len(KneserNey.fit(train, 3, 600).log_probs(test)) == len(test) - 1
    assert ppl[3] < 0.8 * ppl[1]


def _models(vocab: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "lstm": new_lstm(vocab, 32, 2, 0.1),
        "gpt": new_gpt(vocab, 32, 2, 2, 0.1, positions=64, eos=0),
    }


def test_both_architectures_declare_their_layer_groups() -> None:
    lstm, gpt = _models(100).values()
    groups = layer_groups(lstm)
    assert groups.blocks == 2
    assert groups.depth("embed.weight") == 0
    assert groups.depth("layers.1.weight_hh_l0") == 2
    assert groups.depth("bias") == groups.head == 3
    groups = layer_groups(gpt)
    assert groups.depth("transformer.wte.weight") == groups.depth("transformer.wpe.weight") == 0
    assert groups.depth("transformer.h.1.mlp.c_fc.weight") == 2
    assert groups.depth("transformer.ln_f.weight") == groups.head
    # The LM head is the token embedding itself: one tensor, at depth 0.
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    assert "lm_head.weight" not in dict(gpt.named_parameters())


def test_the_lstm_carries_its_state_between_calls() -> None:
    model = _models(100)["lstm"].eval()
    ids = torch.randint(0, 100, (3, 12))
    with torch.no_grad():
        whole, _ = model(ids)
        first, state = model(ids[:, :5])
        rest, _ = model(ids[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole)


@pytest.mark.parametrize("arch", ["lstm", "gpt"])
def test_a_checkpoint_rebuilds_the_same_model(tmp_path: Path, tok, arch: str) -> None:
    model = _models(tok.get_vocab_size())[arch].eval()
    save_lm(model, tok, tmp_path, {"made_by": "test"})
    loaded = load_lm(tmp_path)
    assert isinstance(loaded, LstmLM) == (arch == "lstm")
    ids = torch.randint(0, tok.get_vocab_size(), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), logits(model, ids))
    assert {p.name for p in tmp_path.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tlpipe.json",
    }


def test_block_starts_lay_blocks_end_to_end() -> None:
    assert block_starts(10, 4).tolist() == [0, 4]  # tokens 0-4 and 4-8; 9 is left over
    assert block_starts(10, 4, offset=1).tolist() == [1, 5]
    assert block_starts(10, 4, offset=2).tolist() == [2]
    assert block_starts(4, 4).tolist() == []


def test_perplexity_scores_every_token_after_the_first_once() -> None:
    model = _models(100)["gpt"].eval()
    stream = np.random.default_rng(0).integers(0, 100, 50).astype(np.int32)
    nll = stream_nll(model, stream, block=16, batch_size=2)
    assert nll.shape == (49,)
    ids = torch.as_tensor(stream[None].astype(np.int64))
    with torch.no_grad():
        # With one block as long as the stream, the model sees all of it at once.
        whole = torch.nn.functional.cross_entropy(logits(model, ids[:, :-1])[0], ids[0, 1:], reduction="none")
    np.testing.assert_allclose(stream_nll(model, stream, block=64, batch_size=2), whole.numpy(), rtol=1e-5)
    # The first block of 16 predictions reads the same context either way.
    np.testing.assert_allclose(nll[:16], whole.numpy()[:16], rtol=1e-4, atol=1e-5)
    found = scores(nll)
    assert found["perplexity"] == pytest.approx(math.exp(found["loss"]))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("arch", ["lstm", "gpt"])
def test_the_fused_loss_matches_logits_then_cross_entropy(arch: str, bf16: bool) -> None:
    model = _models(100)[arch].eval()  # the LSTM's projection has a bias, GPT's is tied without
    windows = torch.as_tensor(np.random.default_rng(0).integers(0, 100, (5, 61)))
    assert LOSS_CHUNK_ROWS < 5 * 60  # more than one chunk of rows

    def loss_and_grads(loss_fn, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(windows)
        return loss, torch.autograd.grad(0.3 * loss, list(model.parameters()))

    def unfused(w: torch.Tensor) -> torch.Tensor:
        out = logits(model, w[:, :-1]).float()
        return torch.nn.functional.cross_entropy(out.flatten(0, 1), w[:, 1:].flatten())

    def error(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
        """Each gradient's largest deviation, relative to its largest entry."""
        for got, want in zip(grads, ref, strict=True):
            assert got.dtype == want.dtype == torch.float32
        return [float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, ref, strict=True)]

    fused, fused_grads = loss_and_grads(lambda w: lm_loss(model, w), bf16)
    want, want_grads = loss_and_grads(unfused, bf16)
    if not bf16:
        torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
        assert max(error(fused_grads, want_grads)) <= 1e-5
        return
    # bf16 rounds the products either way, in a different order: both sit about 1% of each
    # gradient's scale from fp32's; the fused loss must be about as close as the unfused one.
    torch.testing.assert_close(fused, want, rtol=1e-2, atol=1e-2)
    _, exact = loss_and_grads(unfused, False)
    for fused_error, unfused_error in zip(error(fused_grads, exact), error(want_grads, exact), strict=True):
        assert fused_error <= 2 * unfused_error + 1e-3


@pytest.mark.parametrize("arch", ["lstm", "gpt"])
def test_a_language_model_learns_through_the_shared_loop(tok, corpora, arch: str) -> None:
    target = corpora[1]
    vocab = tok.get_vocab_size()
    model = _models(vocab)[arch]
    train, val = token_stream(tok, target[:150]), token_stream(tok, target[150:])
    task = LanguageModelTask(
        train, val, block=32, batch_size=16, eval_batch_size=32, runtime=CPU_FP32, seed=0
    )
    before = task.validate(model)["val_perplexity"]
    p = FinetuneParams(
        epochs=1,
        min_steps=60,
        max_steps=60,
        evaluations=3,
        patience=3,
        optim=OptimParams(lr=3e-3, batch_size=16),
    )
    run = train_model(model, task, p, layer_groups(model), runtime=CPU_FP32)
    assert run.steps == 60
    assert run.best_score == min(row["val_perplexity"] for row in run.history)
    assert run.best_score < 0.5 * min(before, vocab)


def test_the_joint_objective_mixes_source_and_target_losses(tok, corpora) -> None:
    source, target = corpora
    model = _models(tok.get_vocab_size())["lstm"].eval()
    train, src = token_stream(tok, target), token_stream(tok, source)
    plain = LanguageModelTask(train, train, 16, 8, 8, CPU_FP32, 0)
    joint = LanguageModelTask(train, train, 16, 8, 8, CPU_FP32, 0, source=SourceLm(src, alpha=1.0))
    only_source = LanguageModelTask(src, src, 16, 8, 8, CPU_FP32, 0)
    idx = np.array([0, 16, 32])
    # alpha = 1: the target rows play no part; the source rows are drawn by the rng.
    with torch.no_grad():
        got = joint.loss(model, idx, np.random.default_rng(5))
        picked = block_starts(len(src), 16)[
            np.random.default_rng(5).integers(0, len(block_starts(len(src), 16)), 3)
        ]
        torch.testing.assert_close(got, only_source.loss(model, picked, np.random.default_rng(0)))
        assert not torch.equal(got, plain.loss(model, idx, np.random.default_rng(5)))


def test_sampling_cuts_to_the_top_k_and_the_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = lambda s: {next_token(logits, s, r) for r in [np.random.default_rng(i) for i in range(200)]}  # noqa: E731
    assert draws(Sampling(greedy=True)) == {0}
    assert draws(Sampling(top_k=1)) == {0}
    assert draws(Sampling(top_k=2)) == {0, 1}
    # 0.5 + 0.3 passes 0.79: the nucleus is the first two tokens; 0.81 takes the third.
    assert draws(Sampling(top_p=0.79)) == {0, 1}
    assert draws(Sampling(top_p=0.81)) == {0, 1, 2}
    assert draws(Sampling()) == {0, 1, 2, 3}
    # A low temperature sharpens toward the argmax.
    assert draws(Sampling(temperature=0.05)) == {0}
    first = [next_token(logits, Sampling(seed=3), Sampling(seed=3).rng()) for _ in range(3)]
    assert len(set(first)) == 1
    for bad in ({"temperature": 0}, {"top_p": 0}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            Sampling(**bad)


@pytest.fixture(scope="module", params=["lstm", "gpt"])
def lm_bundle(
    request, tmp_path_factory: pytest.TempPathFactory, tok, corpora
) -> tuple[Path, torch.nn.Module]:
    """A small model of each architecture trained briefly on the target tweets (so its
    greedy choices are not ties), its checkpoint and its bundle."""
    root = tmp_path_factory.mktemp(request.param)
    model = _models(tok.get_vocab_size())[request.param]
    stream = token_stream(tok, corpora[1])
    task = LanguageModelTask(stream, stream[:400], 32, 16, 32, CPU_FP32, 0)
    p = FinetuneParams(epochs=1, min_steps=40, max_steps=40, evaluations=1, optim=OptimParams(lr=3e-3))
    train_model(model, task, p, layer_groups(model), runtime=CPU_FP32)
    save_lm(model, tok, root / "model", {})
    model = load_lm(root / "model")
    write_bundle(model, root / "model", root / "bundle", opset=18)
    assert not any(m.training for m in model.modules())  # exporting leaves dropout off
    return root / "bundle", model


def test_the_bundle_matches_pytorch_and_carries_its_state(lm_bundle, tok) -> None:
    bundle_dir, model = lm_bundle
    bundle = LanguageModelBundle(bundle_dir)
    ids = np.random.default_rng(0).integers(0, tok.get_vocab_size(), (3, 17))
    got, state = bundle.step(ids)
    with torch.no_grad():
        want = logits(model, torch.as_tensor(ids))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    # Ten tokens, then seven more from the state they left: the same as all seventeen.
    first, state = bundle.step(ids[:, :10])
    rest, _ = bundle.step(ids[:, 10:], state)
    np.testing.assert_allclose(np.concatenate([first, rest], 1), got, atol=1e-4)
    if bundle.spec.architecture == "gpt":
        assert state["past_keys"].shape[3] == 10  # the cache holds every position read


def test_a_decoder_stops_at_its_last_position(lm_bundle, tok) -> None:
    bundle_dir, model = lm_bundle
    bundle = LanguageModelBundle(bundle_dir)
    limit = bundle.spec.max_positions
    if limit is None:
        assert bundle.spec.architecture == "lstm"
        return
    prompt = [eos_id(tok)] + [5] * (limit - 3)
    s = Sampling(top_k=50, seed=2, max_new_tokens=100)  # sampling rarely picks EOS
    got = list(bundle.continuation_ids(prompt, s))
    assert len(got) <= 4 and got == torch_continuation(model, prompt, s, eos_id(tok))
    with pytest.raises(ValueError, match="reads at most"):
        list(bundle.continuation_ids([5] * (limit + 1), s))


def test_the_bundle_continues_prompts_as_pytorch_does(lm_bundle, tok) -> None:
    bundle_dir, model = lm_bundle
    bundle = LanguageModelBundle(bundle_dir)
    for prompt in ("@united my flight", "thanks @JetBlue", "Zürich ✈️"):
        ids = bundle.prompt_ids(prompt)
        for s in (Sampling(greedy=True, max_new_tokens=20), Sampling(top_k=20, top_p=0.9, seed=4)):
            assert list(bundle.continuation_ids(ids, s)) == torch_continuation(model, ids, s, eos_id(tok))


def test_streamed_pieces_are_whole_characters(lm_bundle, tok) -> None:
    text = "ok 🛫 Zürich 日本"
    ids = encode_texts(tok, [text])[0].tolist()
    assert len(ids) > len(text.split())  # the emoji and the kanji take several byte tokens
    pieces = list(decoded_pieces(tok, iter(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    bundle = LanguageModelBundle(lm_bundle[0])
    s = Sampling(temperature=1.5, max_new_tokens=30, seed=1)
    assert "".join(bundle.stream("@united", s)) == bundle.generate("@united", s)


def test_the_bundle_scores_text_as_evaluate_does_in_pytorch(lm_bundle, tok, corpora) -> None:
    """The champion check's score (onnxruntime, each block from a fresh state) is the loss
    per token evaluate computes in PyTorch over the same stream and blocks."""
    from tlpipe.settings.text_generation.serve import SCORE_BLOCK

    bundle_dir, model = lm_bundle
    bundle = LanguageModelBundle(bundle_dir)
    texts = list(corpora[1][:60])
    got = bundle.score(pd.DataFrame({"text": texts}))
    block = min(SCORE_BLOCK, bundle.spec.max_positions or SCORE_BLOCK)
    want = scores(stream_nll(model, token_stream(tok, texts), block, 8))
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)


def test_a_language_model_bundle_generates_without_torch(lm_bundle) -> None:
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from pathlib import Path\n"
        "from tlpipe.settings.text_generation.serve import LanguageModelBundle\n"
        "from tlpipe.settings.text_generation.sampling import Sampling\n"
        f"b = LanguageModelBundle(Path({str(lm_bundle[0])!r}))\n"
        "print(repr(b.generate('@united', Sampling(greedy=True, max_new_tokens=8))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("'")


def _generation_params(**overrides: object):
    from tests.test_params import _generation

    raw = _generation(**overrides)
    for name in ("target", "source"):
        raw["data"][name].update({"path": "data/raw/sample.csv", "sha256": None})
    raw["prepare"]["split"].update({"train": 40, "val": 40, "test": 60})
    raw["validate"].update({"min_per_class": 2, "min_source_rows": 50})
    raw["pretrain"].update({"steps": 30, "evaluations": 2, "max_length": 32})
    raw["pretrain"]["tokenizer"]["vocab_size"] = 500
    raw["pretrain"]["lm"]["hidden_size"] = 32
    raw["finetune"].update({"max_length": 32, "min_steps": 10, "max_steps": 10, "evaluations": 1})
    return parse_params(raw)


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory: pytest.TempPathFactory, sample_csv: Path) -> tuple[Path, Path]:
    """(prepare_dir, pretrain model dir) of the generation example on the sample's tweets."""
    from tasks.prepare import prepare
    from tasks.pretrain import pretrain
    from tlpipe.setting import get_setting, row_rules

    root = tmp_path_factory.mktemp("generation")
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/sample.csv").write_bytes(sample_csv.read_bytes())
    p = _generation_params()
    prepare(row_rules(p.setting), p.prepare, p.data, p.validate_, root, root / "prepare")
    result = pretrain(get_setting(p.setting), p.pretrain, p.data, root / "prepare", root / "pretrain")
    return root / "prepare", result.model_dir


@pytest.mark.faults
def test_a_text_in_two_splits_fails_validation(generation_run, tmp_path: Path) -> None:
    import shutil

    from tasks.validate import validate
    from tlpipe.errors import GateFailed
    from tlpipe.setting import validation_suite

    prepared, _ = generation_run
    p = _generation_params()
    leaky = tmp_path / "prepare"
    shutil.copytree(prepared, leaky)
    train, test = pd.read_parquet(leaky / "train.parquet"), pd.read_parquet(leaky / "test.parquet")
    test.loc[0, "text"] = "  " + train.loc[3, "text"].upper()  # the same text, normalised
    test.to_parquet(leaky / "test.parquet", index=False)
    with pytest.raises(GateFailed, match="no_leakage"):
        validate(validation_suite(p.setting), p.validate_, p.data, leaky, tmp_path / "validate")
    result = validate(validation_suite(p.setting), p.validate_, p.data, prepared, tmp_path / "ok")
    assert result.success and {c.check for c in result.checks} >= {"min_rows", "text_length", "no_leakage"}


def test_curve_sizes_count_tokens_and_nest(generation_run) -> None:
    from tasks.evaluate import labelled_target, subsample
    from tlpipe.errors import DataError
    from tlpipe.settings.text_generation.setting import SETTING

    prepared, source_dir = generation_run
    target = labelled_target(prepared)
    units = SETTING.units(target, source_dir)
    assert len(units) == len(target) and units.min() >= 2  # a text's tokens and its EOS
    small, large = (subsample(target, n, 0, units, "tokens") for n in (300, 900))
    assert units[small.index].sum() >= 300 > units[small.index[:-1]].sum()
    assert list(large.index[: len(small)]) == list(small.index)
    with pytest.raises(DataError, match="training tokens; the target has"):
        subsample(target, int(units.sum()) + 1, 0, units, "tokens")


def test_embedding_transfer_reinitialises_every_other_layer(generation_run) -> None:
    from tlpipe.settings.text_generation.setting import SETTING

    prepared, source_dir = generation_run
    p = _generation_params(**{"finetune.transfer": "embeddings"})
    source = load_lm(source_dir)
    arm = SETTING.transfer_arm(p.finetune, p.data, source_dir, prepared)
    assert arm.transferred == {"embed.weight"} and arm.facts == {"transferred": "embeddings"}
    torch.testing.assert_close(arm.model.embed.weight, source.embed.weight)
    assert not torch.equal(arm.model.layers[0].weight_ih_l0, source.layers[0].weight_ih_l0)
    whole = SETTING.transfer_arm(_generation_params().finetune, p.data, source_dir, prepared)
    assert whole.transferred == {n for n, _ in source.named_parameters()}


def test_the_joint_objective_reads_the_source_pretrain_trained_on(generation_run) -> None:
    from tlpipe.data import read_split, source_split
    from tlpipe.settings.text_generation.setting import SETTING

    prepared, source_dir = generation_run
    p = _generation_params(**{"finetune.joint_alpha": 0.3})
    arm = SETTING.transfer_arm(p.finetune, p.data, source_dir, prepared)
    _, trained_on = source_split(read_split(prepared, "source"))
    assert arm.extras.alpha == 0.3
    assert len(arm.extras.stream) == len(
        token_stream(load_tokenizer(source_dir), trained_on["text"].tolist())
    )


def test_the_reference_and_the_baseline_score_the_same_tokens(generation_run) -> None:
    from tlpipe.data import read_split
    from tlpipe.settings.text_generation.setting import REFERENCE_ORDERS, SETTING

    prepared, source_dir = generation_run
    p = _generation_params()
    train, val, test = (read_split(prepared, s) for s in ("train", "val", "test"))
    found, facts = SETTING.reference(train, val, test, p.data, source_dir)
    unigram = SETTING.baseline(train, test, p.data, source_dir)
    assert facts["order"] in REFERENCE_ORDERS and set(facts["val_perplexity"]) <= {
        str(o) for o in REFERENCE_ORDERS
    }
    assert found["perplexity"] < unigram["perplexity"] < load_tokenizer(source_dir).get_vocab_size()
    model = load_lm(source_dir)
    neural = SETTING.score(model, test, p.finetune, p.data, source_dir)
    assert set(neural) == set(found) == {"loss", "perplexity"}
    forgot = SETTING.forgetting(p.evaluate, p.finetune, p.data, source_dir, model, prepared)
    # The source model itself: nothing forgotten.
    assert forgot["perplexity_before"] == pytest.approx(forgot["perplexity_after"])


def test_a_gpt_goes_from_pretrain_to_a_bundle_at_parity(generation_run, tmp_path: Path) -> None:
    from tasks.export import export
    from tasks.finetune import finetune
    from tasks.pretrain import pretrain
    from tlpipe.setting import get_exporter, get_setting

    prepared, _ = generation_run
    p = _generation_params(**{"pretrain.lm.architecture": "gpt", "pretrain.lm.num_heads": 2})
    setting = get_setting(p.setting)
    source = pretrain(setting, p.pretrain, p.data, prepared, tmp_path / "pretrain")
    assert source.metrics["source_perplexity"] < source.metrics["vocab_size"]
    tuned = finetune(setting, p.finetune, p.data, source.model_dir, prepared, tmp_path / "finetune")
    assert tuned.val_score < source.metrics["vocab_size"]
    result = export(get_exporter(p.setting), p.export, tmp_path / "finetune", prepared, tmp_path / "export")
    assert result.max_abs_diff < 1e-4 and result.argmax_agreement == 1.0
    bundle = LanguageModelBundle(result.bundle_dir)
    assert bundle.spec.architecture == "gpt" and bundle.spec.max_positions == p.pretrain.max_length
    with pytest.raises(ValueError, match="finetune.max_length is 64 tokens, but the model reads at most 32"):
        finetune(
            setting,
            p.finetune.model_copy(update={"max_length": 64}),
            p.data,
            source.model_dir,
            prepared,
            tmp_path / "too-long",
        )


def test_a_hugging_face_causal_lm_folder_starts_pretrain(tmp_path: Path, tok) -> None:
    from tlpipe.settings.text_generation.setting import SETTING

    model = new_gpt(tok.get_vocab_size(), 32, 1, 2, 0.0, 32, eos_id(tok))
    model.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    SETTING.copy_checkpoint(tmp_path / "hf", tmp_path / "copied")
    ids = torch.randint(0, tok.get_vocab_size(), (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(logits(load_lm(tmp_path / "copied"), ids), logits(model.eval(), ids))
    from tlpipe.settings.text_classification.text import train_wordpiece

    # A classifier's WordPiece vocabulary: [CLS] and [SEP], no end-of-text token.
    no_eos = train_wordpiece(
        ["a tokenizer without the end of text token"] * 5, TokenizerParams(vocab_size=300)
    )
    no_eos.save(str(tmp_path / "hf" / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"has no <\|endoftext\|> token"):
        SETTING.copy_checkpoint(tmp_path / "hf", tmp_path / "refused")
