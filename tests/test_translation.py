"""Translation: text metrics against plain formulas, beam search against greedy and brute
force, the num2words corpus, the WMT14 loader on generated files, and the task end to end."""

from __future__ import annotations

import gzip
import itertools
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlab.tasks.translation  # noqa: F401  (registers the task until the lead does)
from attnlab.cli.main import main
from attnlab.data.seq2seq import collate, pad_sequences, seq2seq_task
from attnlab.data.sources import DataError
from attnlab.data.translation import load_wmt14, num2words_corpus
from attnlab.models.seq2seq import Seq2SeqTransformer
from attnlab.tasks import get_task
from attnlab.train.config import ConfigError
from attnlab.train.loop import train
from attnlab.train.text_metrics import bleu, chrf, rouge_l, text_scores

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
pytest.importorskip("num2words")
pytestmark = pytest.mark.usefixtures("one_thread")

BOS, EOS = 1, 2  # attnlab.data.seq2seq's, for the model-level tests


# ------------------------------------------------------------------------------- metrics
def random_sentences(n, seed=0, alphabet="abcdefghijklmnopqrstuvwxyz"):
    rng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice(list(alphabet), rng.integers(4, 9))) for _ in range(3000)]
    return [" ".join(rng.choice(vocab, rng.integers(8, 16))) for _ in range(n)]


def test_identity_scores_full_marks_and_unrelated_text_near_zero():
    refs = random_sentences(100)
    assert text_scores(refs, refs) == pytest.approx(
        {"bleu": 100.0, "chrf": 100.0, "rougeL": 1.0, "exact": 1.0})
    shuffled = refs[1:] + refs[:1]  # every hypothesis is another sentence
    s = text_scores(shuffled, refs)
    assert s["bleu"] < 5 and s["rougeL"] < 0.05 and s["exact"] == 0
    # chrF still credits shared letters (12 here); with no character in common it is 0
    assert s["chrf"] < 20
    own = ["".join(chr(0x4E00 + 40 * i + j) for j in range(12)) for i in range(50)]
    assert chrf(own[1:] + own[:1], own) < 1 and rouge_l(own[1:] + own[:1], own) == 0.0


def plain_bleu(hyps, refs):
    """Papineni et al.'s corpus BLEU on whitespace tokens, written out."""
    logs, hyp_len, ref_len = [], 0, 0
    for n in range(1, 5):
        match = total = 0
        for h, r in zip(hyps, refs, strict=True):
            h, r = h.split(), r.split()
            hc = [tuple(h[i:i + n]) for i in range(len(h) - n + 1)]
            rc = [tuple(r[i:i + n]) for i in range(len(r) - n + 1)]
            match += sum(min(hc.count(g), rc.count(g)) for g in set(hc))
            total += len(hc)
        logs.append(np.log(match / total))
    hyp_len = sum(len(h.split()) for h in hyps)
    ref_len = sum(len(r.split()) for r in refs)
    bp = 1.0 if hyp_len > ref_len else np.exp(1 - ref_len / hyp_len)
    return 100 * bp * np.exp(np.mean(logs))


def plain_rouge_l(hyp, ref):
    h, r = re.findall(r"\w+", hyp.lower()), re.findall(r"\w+", ref.lower())
    lcs = np.zeros((len(h) + 1, len(r) + 1), dtype=int)
    for i, j in itertools.product(range(len(h)), range(len(r))):
        lcs[i + 1, j + 1] = lcs[i, j] + 1 if h[i] == r[j] else max(lcs[i, j + 1], lcs[i + 1, j])
    p, rec = lcs[-1, -1] / len(h), lcs[-1, -1] / len(r)
    return 0.0 if p + rec == 0 else 2 * p * rec / (p + rec)


def test_bleu_and_rouge_l_match_their_formulas():
    refs = ["one hundred and twenty one", "two thousand three hundred and five",
            "the cat sat on the mat today", "nine hundred and ninety nine"]
    hyps = ["one hundred and twenty two", "two thousand three hundred and five",
            "the cat sat on a mat", "nine hundred ninety nine"]  # short: brevity penalty
    assert bleu(hyps, refs) == pytest.approx(plain_bleu(hyps, refs), rel=1e-9)
    # ROUGE-L on Unicode words: an ASCII tokenizer would cut "dreißig" into drei|ig
    hyps2, refs2 = hyps + ["dreißig und zwei"], refs + ["dreißig"]
    want = np.mean([plain_rouge_l(h, r) for h, r in zip(hyps2, refs2, strict=True)])
    assert rouge_l(hyps2, refs2) == pytest.approx(want, rel=1e-12)
    assert plain_rouge_l("dreißig und zwei", "dreißig") == pytest.approx(0.5)


def test_chrf_credits_a_half_right_compound_that_bleu_scores_zero():
    hyp, ref = ["einundzwanzig"], ["zweiundzwanzig"]
    assert bleu(hyp, ref) == 0.0
    assert 40 < chrf(hyp, ref) < 100


@pytest.mark.parametrize("fn", [bleu, chrf, rouge_l, text_scores])
def test_metrics_refuse_mismatched_or_bad_input(fn):
    with pytest.raises(ValueError, match="2 hypotheses and 3 references"):
        fn(["a", "b"], ["a", "b", "c"])
    with pytest.raises(TypeError, match=r"hypotheses\[1\] must be a str; got int"):
        fn(["a", 3], ["a", "b"])
    with pytest.raises(TypeError, match="references must be a list of str"):
        fn(["a"], "a")
    with pytest.raises(ValueError, match="at least one"):
        fn([], [])


# --------------------------------------------------------------------------- beam search
@pytest.fixture(scope="module")
def model():
    """A tiny model trained a little on reversal: varied outputs of varied lengths."""
    torch.manual_seed(0)
    m = Seq2SeqTransformer(10, 10, d_model=16, num_heads=2, num_layers=1, max_len=12,
                           dropout=0.0)
    b = collate(*seq2seq_task(64, task="reverse", min_len=2, max_len=7, vocab=10, seed=0))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(40):
        logits = m(b["src"], b["tgt_in"], b["src_padding_mask"], b["tgt_padding_mask"])
        loss = F.cross_entropy(logits.flatten(0, 1), b["tgt_out"].flatten(), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def sources():
    return pad_sequences(seq2seq_task(16, task="reverse", min_len=2, max_len=7, vocab=10,
                                      seed=5)[0])


def log_prob(m, src, mask, out):
    """log P(y | x) of decoded rows ``[BOS] + y`` (up to and including EOS) by teacher
    forcing: the decoder is causal, so what follows EOS changes nothing before it."""
    with torch.no_grad():
        logp = F.log_softmax(m(src, out[:, :-1], mask).double(), dim=-1)
    tok = logp.gather(-1, out[:, 1:, None])[..., 0]
    after_eos = (out[:, 1:] == EOS).int().cumsum(1) - (out[:, 1:] == EOS).int() > 0
    return tok.masked_fill(after_eos, 0.0).sum(1)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.5])
def test_beam_size_one_is_greedy_token_for_token(model, sources, length_penalty):
    src, mask = sources
    for cache in (None, False):  # with a KV cache that follows the beams, and without
        beam = model.beam_search(src, 10, BOS, EOS, 1, mask, length_penalty, use_cache=cache)
        greedy = model.greedy_decode(src, 10, BOS, EOS, mask, use_cache=cache)
        assert torch.equal(beam, greedy)
    ends = (beam == EOS).float().argmax(1)
    assert len(set(ends.tolist())) > 2  # rows end at different lengths: padding exercised


def test_beam_finds_a_hypothesis_at_least_as_likely_as_greedy(model, sources):
    src, mask = sources
    greedy = model.greedy_decode(src, 10, BOS, EOS, mask)
    out, scores = model.beam_search(src, 10, BOS, EOS, 4, mask, 0.0, return_scores=True)
    assert torch.allclose(scores, log_prob(model, src, mask, out), atol=1e-5)
    uncached, s2 = model.beam_search(src, 10, BOS, EOS, 4, mask, 0.0, return_scores=True,
                                     use_cache=False)
    assert torch.equal(uncached, out) and torch.allclose(s2, scores, atol=1e-5)
    g = log_prob(model, src, mask, greedy)
    assert bool((scores >= g - 1e-6).all())
    assert bool((scores > g + 1e-3).any())  # and it is not greedy in disguise
    for i in range(src.shape[0]):  # batched = one row at a time (padding changes nothing)
        n = int((~mask[i]).sum())
        alone = model.beam_search(src[i:i + 1, :n], 10, BOS, EOS, 4, None, 0.0)
        row = out[i, :alone.shape[1]]
        assert torch.equal(alone[0], row) and bool((out[i, alone.shape[1]:] == 0).all())


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_beam_wider_than_the_search_space_finds_the_exact_best(alpha):
    """Vocabulary 5, 3 steps: every sequence fits the beam, so beam search must return
    argmax log P(y | x) / |y|^alpha over all of them (enumerated here)."""
    torch.manual_seed(3)
    V, L = 5, 3
    m = Seq2SeqTransformer(V, V, d_model=8, num_heads=2, num_layers=1, max_len=4,
                           dropout=0.0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.8)  # peaked, varied distributions
    src = torch.tensor([[3, 4, 3], [4, 4, 3]])
    seqs = [list(s) for n in range(1, L + 1) for s in itertools.product(range(V), repeat=n)
            if (EOS not in s[:-1]) and (s[-1] == EOS or n == L)]
    for b in range(2):
        x = src[b:b + 1].expand(len(seqs), -1)
        rows = torch.tensor([[BOS, *s] + [0] * (L - len(s)) for s in seqs])
        lp = log_prob(m, x, None, rows)
        best = max(range(len(seqs)), key=lambda i: float(lp[i]) / len(seqs[i]) ** alpha)
        out, score = m.beam_search(src[b:b + 1], L, BOS, EOS, V ** L, None, alpha,
                                   return_scores=True)
        got = out[0, 1:].tolist()
        assert got[:len(seqs[best])] == seqs[best]
        assert float(score[0]) == pytest.approx(float(lp[best]), abs=1e-6)


def test_beam_search_refuses_bad_arguments(model, sources):
    src, mask = sources
    cases = [(dict(beam_size=0), ValueError, "beam_size must be >= 1; got 0"),
             (dict(beam_size=2.0), TypeError, "beam_size must be an int"),
             (dict(length_penalty=-1.0), ValueError, "length_penalty must be a finite"),
             (dict(max_len=13), ValueError, "beam_search max_len must be <= the model's max_len=12"),
             (dict(eos_id=10), ValueError, "eos_id must be < tgt_vocab=10")]
    for kw, err, msg in cases:
        args = {"max_len": 10, "bos_id": BOS, "eos_id": EOS, "beam_size": 2, **kw}
        with pytest.raises(err, match=re.escape(msg)):
            model.beam_search(src, src_padding_mask=mask, **args)


def test_decoder_mechanism_lets_an_encoder_only_mechanism_encode():
    m = Seq2SeqTransformer(10, 10, mechanism="linformer", decoder_mechanism="sdpa",
                           d_model=16, num_heads=2, max_len=12)
    assert m.encoder.layers[0].self_attn.spec.name == "linformer"
    assert m.decoder.layers[0].self_attn.spec.name == "sdpa"
    assert type(m)(**m.config).config == m.config
    with pytest.raises(ValueError, match="mechanism='linformer' has no causal form"):
        Seq2SeqTransformer(10, 10, mechanism="linformer")
    with pytest.raises(ValueError, match="decoder_mechanism='nystromformer' has no causal"):
        Seq2SeqTransformer(10, 10, decoder_mechanism="nystromformer")


# ------------------------------------------------------------------------ num2words corpus
def test_num2words_corpus_is_real_deterministic_and_split_by_number():
    kw = dict(max_number=999, n_validation=50, n_test=50, forms="cardinal,ordinal")
    c = num2words_corpus("de", "en", **kw)
    assert c == num2words_corpus("de", "en", **kw)
    assert c.splits["test"].keys != num2words_corpus("de", "en", **kw, seed=1).splits[
        "test"].keys
    numbers = {s: set(p.keys) for s, p in c.splits.items()}
    assert {s: len(n) for s, n in numbers.items()} == {"train": 900, "validation": 50,
                                                       "test": 50}
    assert not (numbers["train"] & numbers["validation"] or numbers["train"] & numbers["test"]
                or numbers["validation"] & numbers["test"])
    pairs = {(k, s, t) for p in c.splits.values() for k, s, t in zip(p.keys, p.src, p.tgt,
                                                                         strict=True)}
    assert (21, "einundzwanzig", "twenty-one") in pairs       # units before tens in German
    assert (21, "einundzwanzigste", "twenty-first") in pairs  # the ordinal form
    assert (345, "dreihundertfünfundvierzig", "three hundred and forty-five") in pairs
    fr = num2words_corpus("en", "fr", max_number=99, n_validation=5, n_test=5)
    assert "quatre-vingt-dix-sept" in fr.splits["train"].tgt + fr.splits["test"].tgt + \
        fr.splits["validation"].tgt


@pytest.mark.parametrize("kw, err, msg", [
    (dict(src_lang="xx"), ValueError, "src_lang must be a language num2words knows"),
    (dict(tgt_lang="dee"), ValueError, "did you mean 'de'"),
    (dict(src_lang="en", tgt_lang="en"), ValueError, "src_lang and tgt_lang must differ"),
    (dict(max_number=10, n_validation=6, n_test=5), ValueError, "holds 11 numbers, fewer than"),
    (dict(min_number=-1), ValueError, "min_number must be >= 0"),
    (dict(n_test=0), ValueError, "n_test must be >= 1"),
    (dict(forms="ordinals"), ValueError, "did you mean 'ordinal'"),
    (dict(forms="cardinal,cardinal"), ValueError, "forms has repeats"),
    (dict(n_train=True), TypeError, "n_train must be an int or None"),
])
def test_num2words_corpus_options_are_validated(kw, err, msg):
    with pytest.raises(err, match=re.escape(msg)):
        num2words_corpus(**kw)


# ---------------------------------------------------------------------------- WMT14 files
ROWS = {s: [{"de": f"Satz {s} {i}", "en": f"sentence {s} {i}"} for i in range(n)]
        for s, n in (("train", 7), ("validation", 3), ("test", 2))}


def test_wmt14_loader_reads_the_hub_parquet_layout(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    folder = tmp_path / "wmt14" / "de-en"
    folder.mkdir(parents=True)
    shards = {"train-00000-of-00002": ROWS["train"][:4], "train-00001-of-00002":
              ROWS["train"][4:], "validation-00000-of-00001": ROWS["validation"],
              "test-00000-of-00001": ROWS["test"]}
    for name, rows in shards.items():
        pd.DataFrame({"translation": rows}).to_parquet(folder / f"{name}.parquet")
    c = load_wmt14(tmp_path, "de-en")
    assert (c.src_lang, c.tgt_lang) == ("de", "en")
    for s, rows in ROWS.items():  # shards in order, every row
        assert c.splits[s].src == [r["de"] for r in rows]
        assert c.splits[s].tgt == [r["en"] for r in rows]
    flipped = load_wmt14(tmp_path, "de-en", src_lang="en", max_rows=5)
    assert flipped.splits["train"].src == [r["en"] for r in ROWS["train"][:5]]
    assert any("max_rows" in n for n in flipped.notes)
    with pytest.raises(ValueError, match="src_lang must be one of the pair"):
        load_wmt14(tmp_path, "de-en", src_lang="fr")


def test_wmt14_loader_reads_json_lines_and_names_bad_rows(tmp_path):
    folder = tmp_path / "de-en"
    folder.mkdir()
    rows = ROWS["train"] + [{"de": " ", "en": "an empty side"}]
    (folder / "train.jsonl").write_text("".join(json.dumps({"translation": r}) + "\n"
                                                for r in rows), encoding="utf-8")
    (folder / "validation.jsonl").write_text(
        "\n".join(json.dumps({"translation": r}) for r in ROWS["validation"]))
    with gzip.open(folder / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"translation": r}) + "\n" for r in ROWS["test"]))
    c = load_wmt14(tmp_path)
    assert c.splits["train"].tgt == [r["en"] for r in ROWS["train"]]
    assert c.splits["test"].src == [r["de"] for r in ROWS["test"]]
    assert any("skipped 1 rows with an empty side" in n for n in c.notes)
    (folder / "validation.jsonl").write_text('{"translation": {"de": "x"}}\n')
    with pytest.raises(DataError, match=r"validation.jsonl: line 1: 'translation' must map"):
        load_wmt14(tmp_path)
    (folder / "validation.jsonl").write_text('{"translation": {"de": "x", "en": "y"}}\n{oops\n')
    with pytest.raises(DataError, match=r"validation.jsonl:2: not valid JSON"):
        load_wmt14(tmp_path)


def test_wmt14_loader_says_what_it_tried(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_wmt14(tmp_path / "nowhere")
    (tmp_path / "wmt14" / "de-en").mkdir(parents=True)
    (tmp_path / "wmt14" / "de-en" / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"(?s)wmt14 de-en: no data files found.*"
                                        r"validation-\*\.parquet.*local files only"):
        load_wmt14(tmp_path)
    with pytest.raises(ValueError, match="pair must be two language codes"):
        load_wmt14(tmp_path, "deen")


# --------------------------------------------------------------------------------- task
TINY = {"max_number": 399, "n_validation": 24, "n_test": 24, "max_len": 32, "beam_size": 2}
SMALL = {"d_model": 32, "num_heads": 2, "num_layers": 1, "dropout": 0.0}


def config(steps, mechanism="sdpa", model_kwargs=None, **task_kwargs):
    return get_task("translation").make_config(
        max_steps=steps, eval_every=max(1, steps // 2), warmup_steps=5, batch_size=32, lr=3e-3,
        mechanism=mechanism, model_kwargs={**SMALL, **(model_kwargs or {})},
        task_kwargs={**TINY, **task_kwargs}, eval_batches=1)


def test_translation_trains_resumes_and_saves_examples(tmp_path):
    cfg = config(6, n_examples=3)
    whole = train(cfg, tmp_path / "whole", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_after=3)
    assert part.status == "interrupted"
    resumed = train(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed.status == "done" and resumed.test == whole.test
    for key in ("bleu", "chrf", "rougeL", "exact", "bleu_greedy", "chrf_beam2",
                "rougeL_beam2", "token_accuracy"):
        assert key in whole.test
    assert whole.test["bleu"] == whole.test["bleu_beam2"]  # the beam's is the primary
    examples = json.loads((whole.run_dir / "examples-test.json").read_text())
    assert len(examples) == 3 and set(examples[0]) == {"source", "reference", "greedy",
                                                       "beam2"}
    assert (whole.run_dir / "tokenizer-src").is_dir()
    assert json.loads((whole.run_dir / "data.json").read_text())["sizes"]["test"] == 24


def test_training_moves_every_metric_off_an_untrained_model(tmp_path):
    cfg = config(150, decoding="greedy")
    task = get_task("translation")(cfg, tmp_path / "untrained")
    task.setup()
    torch.manual_seed(0)
    before = task.evaluate(task.build_model(), "test")
    after = train(cfg, tmp_path / "trained", progress=False).test
    assert after["chrf"] > before["chrf"] + 20
    assert after["bleu"] > before["bleu"] + 5
    assert after["rougeL"] > before["rougeL"] + 0.2
    assert after["token_accuracy"] > before["token_accuracy"] + 0.3


@pytest.mark.parametrize("kw, msg", [
    (dict(corpus="wmt"), "corpus must be one of 'num2words', 'wmt14'"),
    (dict(tokenizer="chars"), "did you mean 'char'"),
    (dict(beam_size=0), "beam_size must be >= 1"),
    (dict(decoding="sample"), "decoding must be one of 'greedy', 'beam'"),
    (dict(length_penalty=-0.5), "length_penalty must be a finite number"),
    (dict(data_dir="/tmp"), "corpus 'num2words' is generated: data_dir does not apply"),
    (dict(corpus="wmt14", max_number=9), "'max_number', 'n_validation', 'n_test'] do not apply to corpus 'wmt14'"),
    (dict(src_lang="xx"), "src_lang must be a language num2words knows"),
    (dict(tokenizer="bpe", vocab_size=100), "src tokenizer: vocab_size: kind 'bpe' needs"),
    (dict(lenght=3), "unknown option(s) 'lenght'"),
])
def test_bad_task_options_are_named(tmp_path, kw, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        train(config(2, **kw), tmp_path / "r", progress=False)


def test_bad_mechanisms_and_model_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no causal form.*decoder_mechanism=sdpa"):
        train(config(2, mechanism="nystromformer"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="did you mean 'cross_mechanism'"):
        train(config(2, model_kwargs={"cross_mechanis": "sdpa"}), tmp_path / "b",
              progress=False)


def test_cli_trains_translation_with_a_low_rank_encoder(tmp_path):
    args = ["train", "--task", "translation", "--mechanism", "linformer", "--max-steps", "2",
            "--no-progress", "--run-dir", str(tmp_path / "r"), "--model-opt", "d_model=16",
            "--model-opt", "num_heads=2", "--model-opt", "num_layers=1", "--model-opt",
            "decoder_mechanism=sdpa", "--set", "eval_every=2", "--set", "eval_batches=1",
            *[x for k, v in TINY.items() for x in ("--task-opt", f"{k}={v}")]]
    assert main(args) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["metric"] == "bleu" and "chrf_beam2" in summary["test"]
