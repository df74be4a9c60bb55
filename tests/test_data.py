import pytest
import torch

from cwa_dist.data import load_texts, split_chunks, tokenize_chunks
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
    [(None, "does not exist"), (b"\n \n", "holds no text"), (b"abc\x00def", "looks binary"), (b"\xff\xfe\xfa", "not UTF-8")],
)
def test_bad_data_files(tmp_path, content, message):
    f = tmp_path / "d.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_texts(str(f), None)


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}


def test_chunks_cover_the_stream_and_split_is_disjoint():
    chunks = tokenize_chunks(CharTokenizer(), ["abcde", "fgh"], seq_len=3)
    stream = torch.cat(chunks).tolist()
    # texts joined by EOS (0); the final one-token chunk predicts nothing and is dropped
    assert stream == [97, 98, 99, 100, 101, 0, 102, 103, 104]
    assert [len(c) for c in chunks] == [3, 3, 3]
    split = split_chunks(chunks, 0.5, seed=0)
    assert set(split.calibration_ids).isdisjoint(split.evaluation_ids)
    assert sorted(split.calibration_ids + split.evaluation_ids) == list(range(len(chunks)))
    assert split.calibration_ids == split_chunks(chunks, 0.5, seed=0).calibration_ids


def test_too_little_text_is_a_usage_error():
    with pytest.raises(UsageError, match="need one each"):
        split_chunks(tokenize_chunks(CharTokenizer(), ["a"], seq_len=8), 0.5, seed=0)
