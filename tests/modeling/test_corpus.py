"""--dataset through 🤗 datasets on local sources (save_to_disk, parquet, jsonl, a WikiText-shaped
file), the documents each gives, and the one-line refusals; the Hub path up to its offline error."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import SMALL

from cwa_dist.analysis.data import load_texts, tokenize_documents
from cwa_dist.config import RunConfig
from cwa_dist.errors import UsageError
from cwa_dist.modeling.corpus import document_rule, read_corpus, wikitext_articles

TEXTS = [f"Document {i} says something about weights number {i * 7} and their sensitivity." for i in range(12)]


def _data(**flat):
    return RunConfig.of(model="m", **flat).data


def _lines_file(tmp_path, texts):
    f = tmp_path / "lines.txt"
    f.write_text("\n".join(texts) + "\n")
    return f


def test_a_saved_dataset_reads_as_one_document_per_row(tmp_path):
    import datasets

    rows = [*TEXTS[:5], "", "   ", *TEXTS[5:]]  # blank rows are no documents
    datasets.Dataset.from_dict({"id": list(range(len(rows))), "text": rows}).save_to_disk(str(tmp_path / "ds"))
    corpus = read_corpus(_data(dataset=str(tmp_path / "ds"), eval_limit=None), announce=lambda _: None)
    assert corpus.texts == TEXTS
    assert corpus.record["kind"] == "saved" and corpus.record["documents"] == 12
    assert corpus.record["column"] == "text" and corpus.record["document_split"] == "rows"
    # --eval-limit counts documents, in the source's order.
    assert read_corpus(_data(dataset=str(tmp_path / "ds"), eval_limit=4), announce=print).texts == TEXTS[:4]


def test_a_saved_dataset_dict_picks_test_unless_told(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS[:3], "n": [1, 2, 3]}),
                               "test": datasets.Dataset.from_dict({"body": TEXTS[3:6], "n": [4, 5, 6]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    source = str(tmp_path / "dd")
    assert read_corpus(_data(dataset=source), announce=print).texts == TEXTS[3:6]  # the only string column
    assert read_corpus(_data(dataset=source, dataset_split="train"), announce=print).texts == TEXTS[:3]
    with pytest.raises(UsageError, match="--dataset-split 'dev': .* has the splits train, test"):
        read_corpus(_data(dataset=source, dataset_split="dev"), announce=print)
    with pytest.raises(UsageError, match="--text-column 'txt': .* has the columns body, n"):
        read_corpus(_data(dataset=source, text_column="txt"), announce=print)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json", ".csv"])
def test_local_data_files_give_the_same_windows_as_a_data_file(tmp_path, suffix, tiny_model_dir):
    frame = pd.DataFrame({"content": TEXTS, "label": range(len(TEXTS))})
    path = tmp_path / f"data{suffix}"
    {".parquet": lambda: frame.to_parquet(path), ".csv": lambda: frame.to_csv(path, index=False),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".json": lambda: frame.to_json(path, orient="records", lines=True)}[suffix]()
    corpus = read_corpus(_data(dataset=str(path), text_column="content", eval_limit=None), announce=print)
    plain = load_texts(str(_lines_file(tmp_path, TEXTS)), None)
    assert corpus.texts == plain
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir["llama"])
    ours, theirs = tokenize_documents(tok, corpus.texts, 16), tokenize_documents(tok, plain, 16)
    assert [[w.tolist() for w in d] for d in ours] == [[w.tolist() for w in d] for d in theirs]


WIKITEXT_ROWS = [
    "", " = Alpha = \n", "", " Alpha is first . \n", " = = History = = \n", " Alpha had a history . \n",
    " = = = Early = = = \n", " Very early . \n", " = Beta = \n", "", " Beta is second . \n", " = B = \n", " b . \n",
]


def test_wikitext_rows_join_into_articles_at_top_level_headings_only():
    articles = wikitext_articles(WIKITEXT_ROWS)
    assert articles == [
        "= Alpha = \n\n Alpha is first . \n = = History = = \n Alpha had a history . \n = = = Early = = = \n"
        " Very early .",
        "= Beta = \n\n Beta is second .",
        "= B = \n b .",
    ]
    assert wikitext_articles(WIKITEXT_ROWS, limit=2) == articles[:2]
    assert wikitext_articles(["intro line\n", " = T = \n", " body \n"]) == ["intro line", "= T = \n body"]


def test_a_wikitext_shaped_source_splits_into_articles(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": WIKITEXT_ROWS}).save_to_disk(str(tmp_path / "wikitext"))
    auto = read_corpus(_data(dataset=str(tmp_path / "wikitext")), announce=print)  # named wikitext: articles
    assert auto.texts == wikitext_articles(WIKITEXT_ROWS) and auto.record["document_split"] == "wikitext"
    datasets.Dataset.from_dict({"text": WIKITEXT_ROWS}).save_to_disk(str(tmp_path / "other"))
    rows = read_corpus(_data(dataset=str(tmp_path / "other")), announce=print)
    assert len(rows.texts) == sum(1 for r in WIKITEXT_ROWS if r.strip())
    told = read_corpus(_data(dataset=str(tmp_path / "other"), document_split="wikitext"), announce=print)
    assert told.texts == auto.texts
    assert document_rule("auto", "Salesforce/wikitext") == "wikitext" and document_rule("auto", "allenai/c4") == "rows"


def test_dataset_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(UsageError, match="--data-file and --dataset"):
        RunConfig.of(model="m", data_file="x.txt", dataset="wikitext")
    with pytest.raises(UsageError, match="--dataset-split needs --dataset"):
        RunConfig.of(model="m", dataset_split="test")
    with pytest.raises(UsageError, match="does not exist"):
        read_corpus(_data(dataset=str(tmp_path / "missing")), announce=print)
    (tmp_path / "d.xlsx").write_bytes(b"x")
    with pytest.raises(UsageError, match="a file must be one of"):
        read_corpus(_data(dataset=str(tmp_path / "d.xlsx")), announce=print)


def test_an_uncached_hub_dataset_offline_is_one_line_and_exit_2(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "cwa_dist.run", "--model", str(tmp_path), "--dataset",
                           "someone/not-cached", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not in its cache" in lines[0] and "someone/not-cached" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any stage


@pytest.mark.ray
@pytest.mark.extended  # two whole runs; the default suite checks the same windows without Ray
def test_a_run_on_a_dataset_ranks_as_the_same_texts_through_data_file(tiny_model_dir, tmp_path):
    path = tmp_path / "data.jsonl"
    pd.DataFrame({"text": TEXTS}).to_json(path, orient="records", lines=True)
    common = [sys.executable, "-m", "cwa_dist.run", "--model", str(tiny_model_dir["llama"]), *SMALL, "--topk", "20",
              "--no-perturbation", "--super-weights", "0", "--output", str(tmp_path / "out")]
    runs = {}
    for name, source in (("dataset", ["--dataset", str(path)]),
                         ("file", ["--data-file", str(_lines_file(tmp_path, TEXTS))])):
        proc = subprocess.run([*common, *source, "--experiment-id", name], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs[name] = tmp_path / "out" / name
    a, b = (pd.read_parquet(runs[n] / "rankings.parquet") for n in ("dataset", "file"))
    pd.testing.assert_frame_equal(a, b)
    record = json.loads((runs["dataset"] / "config.json").read_text())
    assert record["dataset"] == str(path) and record["corpus"]["kind"] == "files"
    assert record["corpus"]["documents"] == len(TEXTS) and record["corpus"]["column"] == "text"
