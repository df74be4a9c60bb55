"""Where the evaluation texts come from, as documents: the bundled text or a file of lines
(--data-file), or a dataset read through 🤗 datasets (--dataset): a Hub dataset, a directory
written by `save_to_disk`, or local data files (parquet, json/jsonl, csv, txt).

A *document* is what windows never cross and what the calibration/evaluation split assigns whole.
By default one row (one non-blank line of a --data-file) is one document. WikiText's convention is
whole articles: its rows joined and cut at the top-level ` = Title = ` headings, never at the
` = = Section = = ` ones (`--document-split wikitext`, the default for a dataset named wikitext).
No Ray and no torch here; the driver reads the texts once and sends the workers token windows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cwa_dist.analysis.data import load_texts
from cwa_dist.errors import UsageError

# Local data files by suffix → the 🤗 datasets builder that reads them.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
# What save_to_disk writes at the top of a Dataset or DatasetDict directory.
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_TOP_HEADING = re.compile(r"^ ?= [^=](?:.*[^=])? = ?$")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True, slots=True)
class Corpus:
    """The documents a run reads (at most --eval-limit, in the source's order) and what config.json
    records of where they came from."""

    texts: list[str]
    record: dict

    @property
    def revision(self) -> str | None:
        return self.record.get("revision")

    def describe(self) -> str:
        r = self.record
        if r["kind"] == "bundled":
            return "the bundled text"
        if r["kind"] == "file":
            return f"lines of {r['source']}"
        at = f" at {r['revision'][:12]}" if r.get("revision") else ""
        config = f"/{r['config']}" if r.get("config") else ""
        unit = "articles" if r["document_split"] == "wikitext" else "rows"
        return f"{unit} of {r['source']}{config} ({r['split']}{at}), column {r['column']!r}"


def read_corpus(data, announce: Callable[[str], None] = print) -> Corpus:
    """The run's documents, from `data` (the config's data section)."""
    if data.dataset is None:
        texts = load_texts(data.data_file, data.eval_limit)
        return Corpus(texts, {"kind": "file" if data.data_file else "bundled", "source": data.data_file,
                              "documents": len(texts), "document_split": "rows"})
    table, record = _open_dataset(data, announce)
    column = _text_column(table, data.text_column, data.dataset)
    split_rule = document_rule(data.document_split, data.dataset)
    rows = (str(v) if v is not None else "" for v in table[column])
    split = wikitext_articles if split_rule == "wikitext" else _row_documents
    texts = split(rows, data.eval_limit)
    if not texts:
        raise UsageError(f"--dataset {data.dataset}: column {column!r} of split {record['split']!r} holds no text")
    record.update(column=column, document_split=split_rule, documents=len(texts))
    return Corpus(texts, record)


def document_rule(choice: str, dataset: str) -> str:
    """`auto` is `wikitext` for a dataset whose name is wikitext (any owner, any path), else `rows`."""
    if choice != "auto":
        return choice
    name = Path(dataset.rstrip("/")).name.lower()
    return "wikitext" if name.startswith("wikitext") else "rows"


def wikitext_articles(rows: Iterable[str], limit: int | None = None) -> list[str]:
    """WikiText rows joined into articles, each starting at a top-level heading (` = Title = `);
    section headings (` = = Section = = `) stay inside their article. Text before the first
    heading is a document of its own; blank documents are dropped."""
    articles: list[str] = []
    current: list[str] = []

    def close() -> None:
        text = "".join(current).strip()
        if text:
            articles.append(text)
        current.clear()

    for row in rows:
        if _TOP_HEADING.match(row.rstrip("\n")):
            close()
            if limit is not None and len(articles) >= limit:
                return articles
        current.append(row if row.endswith("\n") else row + "\n")
    close()
    return articles[:limit] if limit is not None else articles


def _row_documents(rows: Iterable[str], limit: int | None) -> list[str]:
    out = []
    for row in rows:
        text = row.strip()
        if text:
            out.append(text)
            if limit is not None and len(out) >= limit:
                break
    return out


def _open_dataset(data, announce):
    """(one split as a datasets.Dataset, the record of where it came from)."""
    name = data.dataset
    path = Path(name).expanduser()
    if path.exists():
        import datasets

        if path.is_dir() and any((path / m).exists() for m in SAVED_MARKERS):
            loaded, kind = datasets.load_from_disk(str(path)), "saved"
        elif path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UsageError(f"--dataset {name}: a file must be one of {', '.join(BUILDERS)}; "
                                 "or give a directory written by save_to_disk, or a Hub dataset id")
            loaded, kind = datasets.load_dataset(builder, data_files=str(path)), "files"
        else:
            loaded, kind = datasets.load_dataset(str(path), data.dataset_config), "files"
        split = _pick_split(_split_names(loaded), data.dataset_split, name)
        table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return table, {"kind": kind, "source": str(path.resolve()), "config": data.dataset_config,
                       "split": split, "revision": None}
    if name.startswith(("/", "./", "../", "~")):
        raise UsageError(f"--dataset {name} does not exist; give a Hub dataset id, a save_to_disk directory or a "
                         "data file")
    return _hub_dataset(data, announce)


def _split_names(loaded) -> list[str]:
    import datasets

    return list(loaded) if isinstance(loaded, datasets.DatasetDict) else [str(loaded.split or "train")]


def _pick_split(names: list[str], asked: str | None, dataset: str) -> str:
    if asked is not None:
        if asked not in names:
            raise UsageError(f"--dataset-split {asked!r}: {dataset} has the splits {', '.join(names)}")
        return asked
    if len(names) == 1:
        return names[0]
    if "test" in names:
        return "test"
    raise UsageError(f"{dataset} has the splits {', '.join(names)}; choose one with --dataset-split")


def _text_column(table, asked: str | None, dataset: str) -> str:
    import datasets

    strings = [c for c, f in table.features.items() if isinstance(f, datasets.Value) and f.dtype in ("string",
                                                                                                    "large_string")]
    if asked is not None:
        if asked not in table.column_names:
            raise UsageError(f"--text-column {asked!r}: {dataset} has the columns {', '.join(table.column_names)}")
        return asked
    if "text" in table.column_names:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise UsageError(f"{dataset}: which column holds the text? Its columns: {', '.join(table.column_names)}; "
                     "choose one with --text-column")


def _hub_dataset(data, announce):
    from cwa_dist.modeling.sources import hub_reachable

    name = data.dataset
    online = hub_reachable()
    commit = _hub_commit(name, data.dataset_revision, online)
    if not online:
        # The datasets library reads these when it is first imported; from here on it uses its cache only.
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    if not online:
        datasets.config.HF_HUB_OFFLINE = True
    try:
        split = data.dataset_split
        if split is None:
            names = datasets.get_dataset_split_names(name, data.dataset_config, revision=commit)
            split = _pick_split(names, None, name)
        announce(f"📥 Reading {name}{'/' + data.dataset_config if data.dataset_config else ''} ({split}) "
                 f"at {commit[:12]} through 🤗 datasets")
        table = datasets.load_dataset(name, data.dataset_config, split=split, revision=commit)
    except UsageError:
        raise
    except Exception as e:  # DatasetNotFoundError, ValueError (unknown config or split), connection errors
        raise UsageError(f"--dataset {name}: {' '.join(str(e).split())[:300]}") from e
    return table, {"kind": "hub", "source": name, "config": data.dataset_config, "split": split, "revision": commit}


def _hub_commit(name: str, revision: str | None, online: bool) -> str:
    """The commit `revision` (default: main) of Hub dataset `name`: asked of the Hub, or read from
    this machine's Hub cache when offline."""
    if revision is not None and _COMMIT.fullmatch(revision):
        return revision
    if online:
        from huggingface_hub import HfApi

        try:
            return HfApi().dataset_info(name, revision=revision).sha
        except Exception as e:  # RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, HTTP errors
            raise UsageError(f"--dataset {name}: {' '.join(str(e).split())[:300]}") from e
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}" / "refs" / (revision or "main")
    if not ref.is_file():
        raise UsageError(f"--dataset {name}: the Hugging Face Hub cannot be reached from this machine and the dataset "
                         f"is not in its cache ({constants.HF_HUB_CACHE}); run once with network access, or give a "
                         "save_to_disk directory or local data files")
    return ref.read_text().strip()
