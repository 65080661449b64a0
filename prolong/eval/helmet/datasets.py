"""HELMET's datasets and the paper's categories: the one list every part reads (recipes validate
``eval.helmet.datasets`` against it, the loaders dispatch on it, the report groups by it)."""

RAG_DATASETS = ("nq", "triviaqa", "hotpotqa", "popqa")
RERANK_DATASETS = ("msmarco",)
ICL_DATASETS = ("trec_coarse", "trec_fine", "banking77", "clinc150", "nlu")
QA_DATASETS = ("narrativeqa",)
SUMM_DATASETS = ("multi_lexsum",)
HELMET_DATASETS = (*RAG_DATASETS, *RERANK_DATASETS, *ICL_DATASETS, *QA_DATASETS, *SUMM_DATASETS)
# the ProLong paper's subset (TriviaQA, in HELMET's RAG average, is available but not run by default)
HELMET_DEFAULT_DATASETS = [d for d in HELMET_DATASETS if d != "triviaqa"]
# read through Hugging Face datasets, as HELMET reads them, when listed under eval.helmet.hf
HELMET_HF_DATASETS = (*ICL_DATASETS, *QA_DATASETS, *SUMM_DATASETS)

# the paper's Tables 10-13, plus our synthetic tasks
CATEGORIES = {
    "Recall": ("json_kv",),
    "RAG": RAG_DATASETS,
    "Re-rank": RERANK_DATASETS,
    "ICL": ICL_DATASETS,
    "QA": QA_DATASETS,
    "Summ": SUMM_DATASETS,
    "Synthetic": ("passkey", "needle"),
}
