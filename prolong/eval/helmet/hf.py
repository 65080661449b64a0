"""HELMET's ICL, NarrativeQA and Multi-LexSum sets through Hugging Face ``datasets``, as HELMET's
data.py loads them (load_icl, load_narrativeqa, load_multi_lexsum): the same hub ids, subsets,
splits and columns. ``eval.helmet.hf.<dataset>.name`` may instead name a local copy — a
``save_to_disk`` folder, a folder of data files, or ``json``/``parquet`` with ``data_files`` — so
the path works offline; rows come out in the shapes ``prolong.eval.helmet_tasks`` reads.
"""

from __future__ import annotations

from pathlib import Path

from prolong.errors import DataError

# HELMET's hub ids (narrativeqa: the canonical "narrativeqa" now lives at deepmind/narrativeqa)
HUB = {"trec_coarse": ("CogComp/trec", None), "trec_fine": ("CogComp/trec", None),
       "banking77": ("PolyAI/banking77", None), "clinc150": ("clinc_oos", "plus"),
       "nlu": ("xingkunliuxtracta/nlu_evaluation_data", None),
       "narrativeqa": ("deepmind/narrativeqa", None), "multi_lexsum": ("allenai/multi_lexsum", "v20230518")}
PARQUET_REVISION = "refs/convert/parquet"
# label column, test split (nlu: HELMET holds out 10% of its one split), HELMET's label count
ICL_COLUMNS = {"trec_coarse": ("coarse_label", "test", 6), "trec_fine": ("fine_label", "test", 50),
               "banking77": ("label", "test", 77), "clinc150": ("intent", "validation", 151),
               "nlu": ("label", None, 68)}


def load(dataset: str, cfg):
    """The dataset with its splits (a ``DatasetDict``), from the hub or a local copy."""
    import datasets

    from prolong import assets

    where = f"eval.helmet.hf.{dataset}"
    name, subset = (cfg.name, cfg.subset) if cfg.name else (HUB[dataset][0], cfg.subset or HUB[dataset][1])
    name = assets.resolve(name)
    try:
        local = Path(name)
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
            ds = datasets.load_from_disk(str(local))
        else:
            try:
                ds = datasets.load_dataset(name, subset, revision=cfg.revision, data_files=cfg.data_files)
            except Exception as e:
                # several of HELMET's hub sets ship only a loading script, which datasets>=4 refuses;
                # the hub's parquet conversion of the same data loads instead
                if cfg.revision is not None or "script" not in str(e).lower():
                    raise
                ds = datasets.load_dataset(name, subset, revision=PARQUET_REVISION, data_files=cfg.data_files)
    except FileNotFoundError as e:
        raise DataError(f"{where}.name: dataset {name!r} not found ({e})") from None
    except Exception as e:  # datasets raises many types for unreachable hubs, scripts and bad configs
        raise DataError(f"{where}: cannot load dataset {name!r} ({type(e).__name__}: {e})") from None
    if not isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{where}.name: {name!r} is a single split; save or name the dataset with its splits")
    return ds


def split(ds, name: str, where: str):
    if name not in ds:
        raise DataError(f"{where}: no {name!r} split (it has {', '.join(ds)})")
    return ds[name]


def _columns(table, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{where}: no {', '.join(missing)} column (it has {', '.join(table.column_names)})")


def icl_rows(dataset: str, cfg, seed: int) -> tuple[list[dict], list[dict], int | None]:
    """(train, test, label count where the dataset names its classes): rows {text, label}, in order."""
    where = f"eval.helmet.hf.{dataset}"
    ds = load(dataset, cfg)
    label, test_split, _ = ICL_COLUMNS[dataset]
    train = split(ds, "train", where)
    if test_split is None:  # HELMET's nlu: train_test_split(test_size=0.1, seed=seed)
        parts = train.train_test_split(test_size=0.1, seed=seed)
        train, test = parts["train"], parts["test"]
    else:
        test = split(ds, test_split, where)
    for table in (train, test):
        _columns(table, ("text", label), where)
    names = getattr(train.features[label], "names", None)  # a ClassLabel's classes
    return ([{"text": t, "label": v} for t, v in zip(train["text"], train[label])],
            [{"text": t, "label": v} for t, v in zip(test["text"], test[label])],
            len(names) if names else None)


class NarrativeQA:
    """deepmind/narrativeqa: test rows one at a time (the stories are long), train rows as demos."""

    def __init__(self, cfg):
        self.where = "eval.helmet.hf.narrativeqa"
        ds = load("narrativeqa", cfg)
        self.test = split(ds, "test", self.where)
        self.train = split(ds, "train", self.where)
        for table in (self.test, self.train):
            _columns(table, ("document", "question", "answers"), self.where)

    def test_row(self, i: int) -> dict:
        r = self.test[i]
        return {"context": r["document"]["text"], "doc_id": r["document"].get("id"),
                "question": r["question"]["text"], "answers": [a["text"] for a in r["answers"]]}

    def demo_row(self, i: int) -> dict:
        r = self.train[i]
        return {"question": r["question"]["text"], "answers": [a["text"] for a in r["answers"]]}


def multi_lexsum_rows(cfg) -> tuple[list[dict], list[dict]]:
    """(validation rows with a short summary, train short summaries): HELMET tests on validation."""
    where = "eval.helmet.hf.multi_lexsum"
    ds = load("multi_lexsum", cfg)
    val, train = split(ds, "validation", where), split(ds, "train", where)
    _columns(val, ("id", "sources", "summary/short", "summary/long"), where)
    rows = [{"id": r["id"], "context": "\n\n".join(r["sources"]), "summary_short": r["summary/short"],
             "summary_long": r["summary/long"], "key_points": r.get("summary/short_keypoints")}
            for r in val if r["summary/short"] is not None]
    return rows, [{"summary_short": s} for s in train["summary/short"] if s is not None]
