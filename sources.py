"""
Where the documents come from: the files a local --dataset names (a file, a folder or a glob), and the source of
each document (web, code, books...), so that a run can show which sources its weights favour.

A document's source is a field of its record (prepare_data.py --source_field NAME) or, when several files are
read, the file it came from: the file's stem (web.jsonl.gz -> web), or the name of its sub-folder below the files'
common folder (web/part-0.jsonl -> web), so that one source may span many files. prepare_data.py stores each
document's source index in {split}_docs.npz ("sources", beside "offsets" and "ids") and the names in meta.json
("sources"); train.py logs each sample's index in weights.jsonl ("source"); plot.py draws each source's share of
the weight against its share of the samples.
"""
import glob
import os
from pathlib import Path

import numpy as np

from tokenization import DataError

# local file types and the datasets builder for each; datasets decompresses .gz itself (parquet is compressed inside)
BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
            ".txt.gz": "text", ".md.gz": "text", ".json.gz": "json", ".jsonl.gz": "json"}
FILE_FIELD = "__file__"  # the column that names each record's file, added when several files are read


def local_files(dataset):
    """The files a local --dataset names (file, folder or glob), and the datasets builder that reads them."""
    if any(c in dataset for c in "*?["):
        files = sorted(glob.glob(os.path.expanduser(dataset), recursive=True))
    elif Path(dataset).expanduser().is_dir():
        files = sorted(str(p) for p in Path(dataset).expanduser().rglob("*") if p.is_file() and kind(p))
    else:
        files = [os.path.expanduser(dataset)] if Path(dataset).expanduser().is_file() else []
    if not files:
        raise DataError(f"no such file, folder or matching files: {dataset!r}; check the path")
    kinds = {kind(f) for f in files}
    if None in kinds:
        bad = next(f for f in files if kind(f) is None)
        raise DataError(f"unknown file type {bad!r}; use .txt, .json, .jsonl (optionally .gz) or .parquet")
    if len(kinds) > 1:
        raise DataError(f"{dataset!r} mixes file types {sorted(kinds)}; point --dataset at one kind")
    return files, kinds.pop()


def kind(path):
    return next((b for ext, b in BUILDERS.items() if str(path).lower().endswith(ext)), None)


def stem(name):
    """A file name without the extension of its type: web.jsonl.gz -> web."""
    ext = next((ext for ext in BUILDERS if name.lower().endswith(ext)), "")
    return name[:len(name) - len(ext)]


def load_files(datasets, builder, files, **kw):
    """datasets' `builder` over the files, one Dataset in file order (as one load_dataset of them all gives), with
    each record's file label in FILE_FIELD when there are several files. Each file is read as its own split, so
    that its records can be told apart; datasets gives every split the same columns."""
    if len(files) == 1:
        return datasets.load_dataset(builder, data_files=files, split="train", **kw)
    parts = datasets.load_dataset(builder, data_files={f"file{i}": f for i, f in enumerate(files)}, **kw)
    return datasets.concatenate_datasets([parts[f"file{i}"].add_column(FILE_FIELD, [label] * len(parts[f"file{i}"]))
                                          for i, label in enumerate(file_labels(files))])


def file_labels(files):
    """The source of each file: the first part of its path below the files' common folder (a sub-folder's name,
    or the file's stem)."""
    paths = [Path(os.path.abspath(os.path.expanduser(f))) for f in files]  # links as given
    top = os.path.commonpath([p.parent for p in paths])
    return [stem(p.relative_to(top).parts[0]) for p in paths]


def labels(fields, column, source_field, dataset):
    """Each record's source label (a string): its source_field, else its file (several files), else None."""
    if source_field is not None and source_field not in fields:
        shown = [f for f in fields if f != FILE_FIELD]
        raise DataError(f"source_field {source_field!r} is not in the records of {dataset!r} (fields: {shown}); "
                        "pass --source_field with one of them")
    field = source_field or (FILE_FIELD if FILE_FIELD in fields else None)
    return None if field is None else ["(none)" if v is None else str(v) for v in column(field)]


def record_labels(records, source_field, dataset):
    """labels() of a list of records (dicts)."""
    return labels(list(records[0]) if records else [], lambda k: [r.get(k) for r in records], source_field, dataset)


def index(labels):
    """Labels -> (the source names, sorted; each label's index among them, int64); None -> (None, None)."""
    if labels is None:
        return None, None
    names = sorted(set(labels))
    at = {name: i for i, name in enumerate(names)}
    return names, np.array([at[label] for label in labels], dtype=np.int64)


def check(names, sources, n_docs, npz, again):
    """prepare_data.read_split's check: a split's per-document source indices agree with meta.json's names."""
    if names is not None and sources is None:  # the npz of another preparation, or meta.json's
        raise DataError(f"{npz} has no sources for the {len(names)} sources meta.json names (from another "
                        f"preparation?): {again}")
    if sources is not None and (names is None or len(sources) != n_docs or len(sources) and not
                                0 <= sources.min() <= sources.max() < len(names)):
        raise DataError(f"{npz} is damaged (its sources are not one of the {len(names or [])} sources meta.json "
                        f"names for each of its {n_docs} documents): {again}")
