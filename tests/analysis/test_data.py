import pytest
import torch

from cwa_dist.analysis.data import load_texts, split_documents, tokenize_chunks, tokenize_documents
from cwa_dist.analysis.evaluate import perplexity
from cwa_dist.errors import UsageError


def test_default_text_is_bundled_and_limited():
    texts = load_texts(None, None)
    assert len(texts) >= 40 and all(len(t.split()) > 30 for t in texts)
    assert load_texts(None, 5) == texts[:5]


def test_data_file_ignores_blank_lines(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("first text\n\n   \nsecond text\n")
    assert load_texts(str(f), None) == ["first text", "second text"]


@pytest.mark.parametrize(
    "content,message",
    [(None, "does not exist"), (b"\n \n", "holds no text"), (b"abc\x00def", "looks binary"),
     (b"\xff\xfe\xfa", "not UTF-8")],
)
def test_bad_data_files(tmp_path, content, message):
    f = tmp_path / "d.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_texts(str(f), None)


class CharTokenizer:
    """One token per character; with `bos`, prepends token 1 as a Llama tokenizer prepends BOS."""

    eos_token_id = 0

    def __init__(self, bos: bool = False):
        self.bos = bos

    def __call__(self, text, add_special_tokens):
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + [ord(c) for c in text]}


def test_windows_never_span_two_texts_and_nothing_is_inserted():
    docs = tokenize_documents(CharTokenizer(), ["abcde", "fgh", "i"], seq_len=3)
    assert [[w.tolist() for w in d] for d in docs] == [[[97, 98, 99], [100, 101]], [[102, 103, 104]], []]
    assert 0 not in torch.cat([w for d in docs for w in d]).tolist()  # no EOS between texts
    assert [w.tolist() for w in tokenize_chunks(CharTokenizer(), ["abcde", "fgh"], 3)] == [[97, 98, 99], [100, 101],
                                                                                           [102, 103, 104]]


def test_bos_only_where_the_tokenizer_puts_it():
    docs = tokenize_documents(CharTokenizer(bos=True), ["abcde", "fg"], seq_len=4)
    assert [[w.tolist() for w in d] for d in docs] == [[[1, 97, 98, 99], [100, 101]], [[1, 102, 103]]]


def test_split_is_by_text_disjoint_and_seeded():
    texts = [f"text number {i} " * (1 + i % 4) for i in range(20)]
    docs = tokenize_documents(CharTokenizer(), texts, seq_len=16)
    split = split_documents(docs, 0.5, seed=3)
    assert set(split.calibration_texts).isdisjoint(split.evaluation_texts)
    assert sorted(split.calibration_texts + split.evaluation_texts) == list(range(20))
    assert len(split.calibration_texts) == 10
    # every window of a text lands in the set of its text
    assert len(split.calibration) == sum(len(docs[i]) for i in split.calibration_texts)
    evaluation_windows = [x for i in split.evaluation_texts for x in docs[i]]
    assert len(evaluation_windows) == len(split.evaluation)
    assert all(a is b for a, b in zip(split.evaluation, evaluation_windows))
    assert split.calibration_texts == split_documents(docs, 0.5, seed=3).calibration_texts
    assert split.calibration_texts != split_documents(docs, 0.5, seed=4).calibration_texts


def test_too_little_text_is_a_usage_error():
    with pytest.raises(UsageError, match="need one each"):
        split_documents(tokenize_documents(CharTokenizer(), ["abcdef", "x"], seq_len=8), 0.5, seed=0)


def test_perplexity_is_the_per_document_computation_and_padding_changes_nothing():
    """Windows of unequal length batched with padding give the perplexity of scoring every text
    on its own, window by window, in plain PyTorch."""
    from conftest import VOCAB, build_tiny_model

    net = build_tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    texts_ids = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 23, 40, 9, 17)]

    class Ids:
        def __call__(self, text, add_special_tokens):
            return {"input_ids": texts_ids[int(text)]}

    docs = tokenize_documents(Ids(), [str(i) for i in range(len(texts_ids))], seq_len=16)
    windows = [w for d in docs for w in d]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids in texts_ids:
            for start in range(0, len(ids), 16):
                w = torch.tensor(ids[start : start + 16])
                if len(w) < 2:
                    continue
                logits = net(input_ids=w[None]).logits[0, :-1]
                nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
                tokens += len(w) - 1
    for batch_size in (1, 3, len(windows)):
        got = perplexity(net, windows, batch_size)
        assert got.tokens == tokens
        assert got.nll_sum == pytest.approx(nll, rel=1e-5)


def test_rolling_windows_predict_every_token_once_with_context():
    from cwa_dist.analysis.data import document_windows
    from cwa_dist.analysis.evaluate import Window, first_target, predicted_tokens, window_ids

    ids = list(range(100, 120))  # 20 tokens
    plain = document_windows(ids, seq_len=8)
    assert [w.tolist() for w in plain] == [ids[0:8], ids[8:16], ids[16:20]]
    assert [w.tolist() for w in document_windows(ids, seq_len=8, stride=8)] == [w.tolist() for w in plain]
    rolling = document_windows(ids, seq_len=8, stride=3)
    predicted = []
    for w in rolling:
        tokens = window_ids(w).tolist()
        assert len(tokens) <= 8
        predicted += tokens[first_target(w):]
    assert predicted == ids[1:]  # every token but the first, once, in order
    assert predicted_tokens(rolling) == 19 and predicted_tokens(plain) == 17
    # after the first window, each reads a full 8 tokens, 5 of them context
    assert all(isinstance(w, Window) and len(w.ids) == 8 and w.context == 5 for w in rolling[1:-1])
    assert rolling[-1].context == 5 and window_ids(rolling[-1]).tolist() == ids[12:20]


def test_rolling_perplexity_is_the_per_token_computation_and_padding_changes_nothing():
    """--stride: each token's NLL given exactly the context its window holds, computed token by
    token in plain PyTorch, equals the batched, padded, masked computation."""
    from conftest import VOCAB, build_tiny_model

    net = build_tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    texts_ids = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 23, 40)]

    class Ids:
        def __call__(self, text, add_special_tokens):
            return {"input_ids": texts_ids[int(text)]}

    seq_len, stride = 16, 5
    windows = tokenize_chunks(Ids(), ["0", "1", "2"], seq_len, stride)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids in texts_ids:
            ends = [seq_len]  # where each window ends, the last one cut short by the text's end
            while ends[-1] < len(ids):
                ends.append(ends[-1] + stride)
            for t in range(1, len(ids)):
                end = next(e for e in ends if e > t)  # the window that predicts token t
                start = max(0, end - seq_len)
                logits = net(input_ids=torch.tensor(ids[start:t])[None]).logits[0, -1]
                nll += float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([ids[t]])))
                tokens += 1
    for batch_size in (1, 4):
        got = perplexity(net, windows, batch_size)
        assert got.tokens == tokens == sum(len(i) - 1 for i in texts_ids)
        assert got.nll_sum == pytest.approx(nll, rel=1e-5)


def test_stride_is_checked():
    from cwa_dist.config import RunConfig

    with pytest.raises(UsageError, match="--stride 200 is outside 1..--seq-len"):
        RunConfig.of(model="x", seq_len=128, stride=200)
