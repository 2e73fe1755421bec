"""Embedding evaluation through sentence-transformers' own evaluators, chosen by the data layout
(pmetal.data.embedding): pairs -> InformationRetrievalEvaluator (each anchor a query whose
relevant document is its positive, the corpus every positive and hard negative), scored pairs ->
EmbeddingSimilarityEvaluator (Pearson/Spearman of the cosine against the scores), triplets ->
TripletEvaluator (one triplet per hard negative)."""

from __future__ import annotations

import logging


def _ids(texts) -> dict[str, str]:
    """text -> a stable id, equal texts sharing one (so a duplicated document is one document)."""
    ids: dict[str, str] = {}
    for text in texts:
        ids.setdefault(text, f"d{len(ids)}")
    return ids


def build_evaluator(kind: str, examples, *, batch_size: int = 32):
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
        InformationRetrievalEvaluator,
        TripletEvaluator,
    )

    common = dict(batch_size=batch_size, name="eval", write_csv=False, show_progress_bar=False)
    if kind == "scored":
        return EmbeddingSimilarityEvaluator([e.anchor for e in examples], [e.positive for e in examples],
                                            [e.score for e in examples], **common)  # fmt: skip
    if kind == "triplets":
        triplets = [(e.anchor, e.positive, n) for e in examples for n in e.negatives]
        return TripletEvaluator(*map(list, zip(*triplets)), **common)
    queries = _ids(e.anchor for e in examples)
    corpus = _ids([e.positive for e in examples] + [n for e in examples for n in e.negatives])
    relevant: dict[str, set[str]] = {}
    for e in examples:
        relevant.setdefault(queries[e.anchor], set()).add(corpus[e.positive])
    return InformationRetrievalEvaluator({i: t for t, i in queries.items()}, {i: t for t, i in corpus.items()}, relevant,
                                         **common)  # fmt: skip


def embedding_eval(model_name: str, rows, path: str, report, *, batch_size: int = 32,
                   trust_remote_code: bool = False) -> None:
    """Evaluate a sentence-embedding model (pmetal.embedding.load_sentence_transformer) on `rows`."""
    from pmetal.data.embedding import to_embedding_examples
    from pmetal.embedding import load_sentence_transformer
    from pmetal.export.source import resolve_source

    kind, examples = to_embedding_examples(rows, path=path)
    model = load_sentence_transformer(str(resolve_source(model_name)), normalize=True, trust_remote_code=trust_remote_code)
    evaluator = build_evaluator(kind, examples, batch_size=batch_size)
    quiet = logging.getLogger("sentence_transformers")  # its evaluators log their own report; pmetal prints the table
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        scores = evaluator(model)
    finally:
        quiet.setLevel(level)
    report.notes.append(f"{kind}: {len(examples)} rows through sentence-transformers' {type(evaluator).__name__}")
    report.add("model", {name.removeprefix("eval_"): value for name, value in scores.items()})
