"""POST /influence in stages, over one small query object: parse -> embed -> first stage -> re-rank -> answer.

    parse(engine, req)                         -> Plan: the validated request: its kind (one example or
                                                  training example, a set, a batch), its members, metric,
                                                  normalisation, label filter, K', k, rows left out
    embed(engine, plan)                        -> Embedded: one Query per question (a vector for the first
                                                  stage and, when exact, block gradients). A set is ONE query
                                                  whose vector and gradients are the sums (means) of its
                                                  members'; a batch is one query per member; the members of
                                                  both are captured together (one pass per MEMBER_CHUNK)
    first_stage(engine, plan, query)           -> Candidates from the FAISS index (normalised if asked); a
                                                  batch scans an exact Flat index once for all its members
    rerank(engine, plan, embedded, candidates) -> exact scores of each query's candidates; a batch scores
                                                  the union of its members' candidates once
    assemble(engine, plan, query, candidates, exact) -> the answer of one query (the response dict)

`answer_request` runs them. TracIn is linear in the query's gradient, so for a set Q
    score(z, Q) = sum_{q in Q} score(z, q) = e(z) . sum_q e(q)      (mean: divided by |Q|)
and the exact re-ranking scores the candidates against the members' summed gradient (`sum_queries`): equal to
the sum (mean) of the members' own exact scores. Normalisation of a set: `train` divides by ||g(z)||,
`cosine` also by the exact norm of the set's summed (weighted) gradient, ||sum_q g(q)|| in the TracIn metric
(`query_self_influence`; mean: ||mean_q g(q)||, which gives the same cosine), never by a sum of the members'
norms. No gradient or projection math lives here: it is in `indexer/`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import ApiError
from service.first_stage import _ends
from service.hints import influence_hints
from service.ood import example_warnings

#: members captured per pass (a batch of up to this many members is one capture pass)
MEMBER_CHUNK = 256


@dataclass
class Member:
    """One question of a request: a posted example (with its label, None = the prediction) or a training row."""

    field: str  # where it was given: example, train_id, examples.3, train_ids.0
    example: Any = None
    label: Any = None
    row: int | None = None
    train_id: str | None = None

    @property
    def label_field(self) -> str:
        return "label" if self.field == "example" else f"labels.{self.field.split('.')[1]}"


@dataclass
class Plan:
    """A validated request. kind: single (example / train_id), set (aggregate) or batch."""

    kind: str
    members: list[Member]
    metric: Any
    params: Any
    objective: Any
    normalize: str
    rows: np.ndarray | None  # label filter: the training rows searched (None: all)
    depth: int  # K': 0 = the index's estimates
    k: int
    exclude: np.ndarray  # training rows left out of every answer (`exclude`)
    exclude_self: bool
    aggregate: str | None
    include_embedding: bool
    member_scores: bool

    @property
    def keep_grads(self) -> bool:
        """The members' block gradients are needed: exact re-ranking, a set's exact norm (cosine), its
        per-member contributions."""
        return self.depth > 0 or (self.kind == "set" and (self.normalize == "cosine" or self.member_scores))


@dataclass
class Query:
    """One question to the index: what the first stage and the exact re-ranking need, and what the answer says
    about the query."""

    vector: np.ndarray  # float32 [D], as the index stores vectors
    grads: list | None  # per checkpoint, the block gradients (one row), unweighted; None when not kept
    self_influence: float | None  # exact ||g(q)||^2 in the TracIn metric
    exclude: np.ndarray  # training rows left out of this answer
    info: dict[str, Any]  # the answer's `query` field
    prediction: dict[str, Any] | None = None
    label_used: Any = None
    warnings: list[str] = field(default_factory=list)
    set_info: dict[str, Any] | None = None
    member_grads: list | None = None  # set: the members' gradients (n rows) for member_scores
    scale: float = 1.0  # set: 1 (sum) or 1/n (mean)


@dataclass
class Embedded:
    queries: list[Query]
    stacked: list | None = None  # a batch: every member's gradients, one row each in member order (None: one query)


@dataclass
class Candidates:
    """The first stage's proponents and opponents (rows, scores scaled like the answer: x 1/||g(q)|| for cosine)."""

    pro_rows: np.ndarray
    pro_scores: np.ndarray
    opp_rows: np.ndarray
    opp_scores: np.ndarray
    q_scale: float

    def for_rerank(self, depth: int, extra: int, exclude: np.ndarray) -> np.ndarray:
        """The distinct rows re-scored exactly: the best depth (+ rows left out) of each end, minus those."""
        rows = np.unique(np.concatenate([self.pro_rows[:depth + extra], self.opp_rows[:depth + extra]]))
        return rows[~np.isin(rows, exclude)] if exclude.size else rows


def _inverse_norms(self_influence: np.ndarray) -> np.ndarray:
    """1 / ||g(z)|| in the TracIn metric (float64; 0 where the gradient is 0)."""
    norms = np.sqrt(np.asarray(self_influence, dtype=np.float64))
    return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)


# -- 1. parse ----------------------------------------------------------------------------------------
def parse(engine, req: Any) -> Plan:
    """Validate a request beyond its schema (exactly one kind of query, metric, normalisation, label filter,
    K', labels, ids, set limits); every refusal is an ApiError naming the field (a member: `examples.7`)."""
    example, train_id = getattr(req, "example", None), getattr(req, "train_id", None)
    examples, train_ids = getattr(req, "examples", None), getattr(req, "train_ids", None)
    aggregate = getattr(req, "aggregate", None)
    several = examples is not None or train_ids is not None
    if (example is not None) + (train_id is not None) + several != 1:
        raise ApiError(422, "invalid", "example", "give exactly one of `example`, `train_id`, or several members "
                                                  "(`examples` and/or `train_ids`)")
    metric, params = engine.resolve_metric(getattr(req, "metric", None))
    normalize = getattr(req, "normalize", None) or "none"
    if normalize != "none" and not engine.first_stage.can_normalize:
        raise ApiError(422, "unsupported", "normalize", "this index has no normalised first stage (an "
                                                        "approximate index built by an older version): rebuild it")
    rows = None
    if getattr(req, "filter_label", None) is not None:
        _, rows = engine.labels.rows(req.filter_label, "filter_label")
    depth = engine.rerank_depth(req)
    label, labels = getattr(req, "label", None), getattr(req, "labels", None)
    member_scores = bool(getattr(req, "member_scores", False))
    if not several:
        kind = "single"
        for name in ("aggregate", "labels"):
            if getattr(req, name, None) is not None:
                raise ApiError(422, "invalid", name, "applies to several members (`examples` / `train_ids`)")
        if train_id is not None:
            if label is not None:
                raise ApiError(422, "invalid", "label", "cannot be combined with train_id: a training example is "
                                                        "explained with its training label")
            members = [Member("train_id", row=engine.row_of(train_id, "train_id"), train_id=train_id)]
        else:
            members = [Member("example", example=example,
                              label=engine.labels.parse(label, "label") if label is not None else None)]
    else:
        kind = "set" if aggregate is not None else "batch"
        members = _members(engine, examples or [], train_ids or [], label, labels, kind)
    if member_scores and kind != "set":
        raise ApiError(422, "invalid", "member_scores", "applies to set queries (`examples` / `train_ids` with "
                                                        "`aggregate`)")
    if member_scores and depth == 0:
        raise ApiError(422, "invalid", "member_scores", "per-member scores are exact: they need re-ranking "
                                                        "(rerank > 0)")
    exclude = np.asarray(sorted({engine.row_of(x, f"exclude.{i}") for i, x in
                                 enumerate(getattr(req, "exclude", None) or [])}), dtype=np.int64)
    k = int(getattr(req, "k", engine.settings.default_k))
    return Plan(kind, members, metric, params, None if metric.name == "loss" else metric.objective(params), normalize,
                rows, depth, k, exclude, bool(getattr(req, "exclude_self", False)), aggregate,
                bool(getattr(req, "include_embedding", False)), member_scores)


def _members(engine, examples: list, train_ids: list, label, labels, kind: str) -> list[Member]:
    n = len(examples) + len(train_ids)
    if n == 0:
        raise ApiError(422, "invalid", "examples", f"a {kind} needs at least one member (`examples` and/or "
                                                   "`train_ids`)")
    limit, setting = (engine.settings.max_set, "TRACIN_MAX_SET") if kind == "set" else \
        (engine.settings.max_batch, "TRACIN_MAX_BATCH")
    if n > limit:
        beyond = f"examples.{limit}" if limit < len(examples) else f"train_ids.{limit - len(examples)}"
        raise ApiError(413, "too_many_members", beyond, f"a {kind} takes at most {limit} members ({setting}); "
                                                        f"this one has {n}")
    if label is not None:
        raise ApiError(422, "invalid", "label", "give one label per example in `labels` for several members")
    if labels is not None and len(labels) != len(examples):
        raise ApiError(422, "invalid", "labels", f"one label per entry of `examples` (null: the prediction): got "
                                                 f"{len(labels)} labels for {len(examples)} examples")
    out = [Member(f"examples.{i}", example=e,
                  label=engine.labels.parse(labels[i], f"labels.{i}") if labels and labels[i] is not None else None)
           for i, e in enumerate(examples)]
    out += [Member(f"train_ids.{i}", row=engine.row_of(t, f"train_ids.{i}"), train_id=t)
            for i, t in enumerate(train_ids)]
    return out


# -- 2. embed ----------------------------------------------------------------------------------------
@dataclass
class _Part:
    """One capture pass over some members (all posted examples, or all training rows)."""

    members: list[int]  # positions in plan.members
    vectors: np.ndarray  # float32 [B, D]
    self_influence: np.ndarray  # float64 [B]
    grads: list | None  # per checkpoint, block gradients with B rows
    checkpoints: list | None  # per member: loss and metric at each checkpoint
    predictions: list
    labels_used: list


def embed(engine, plan: Plan) -> Embedded:
    """Each question's vector and (when needed) gradients: the members are captured in passes of MEMBER_CHUNK
    (posted examples, then training rows); a set's are summed into one query."""
    from indexer.score.exact import sum_queries

    posted = [i for i, m in enumerate(plan.members) if m.row is None]
    stored = [i for i, m in enumerate(plan.members) if m.row is not None]
    chunks = [(_embed_examples, posted[s:s + MEMBER_CHUNK]) for s in range(0, len(posted), MEMBER_CHUNK)]
    chunks += [(_embed_rows, stored[s:s + MEMBER_CHUNK]) for s in range(0, len(stored), MEMBER_CHUNK)]
    parts = []
    for capture, positions in chunks:
        part = capture(engine, plan, positions)
        if plan.kind == "set" and part.grads is not None and not plan.member_scores:
            with engine.stage("embed"):  # only the set's sum is needed: one row per pass, not the members'
                part.grads = sum_queries([part.grads])
        parts.append(part)
    if plan.kind == "set":
        return Embedded([_set_query(engine, plan, parts)])
    queries = [_member_query(engine, plan, part, j) for part in parts for j in range(len(part.members))]
    stacked = None
    if len(queries) > 1 and plan.keep_grads:
        stacked = _concat([p.grads for p in parts])
    return Embedded(queries, stacked)


def _embed_examples(engine, plan: Plan, positions: list[int]) -> _Part:
    members = [plan.members[i] for i in positions]
    labels = [m.label for m in members]
    out = engine.embed_examples([m.example for m in members], None if all(x is None for x in labels) else labels,
                                plan.keep_grads, plan.objective, [(m.field, m.label_field) for m in members])
    used = out["labels"]
    checkpoints = engine._query_checkpoints(out["per_checkpoint"], engine.task.labels_tensor(used), plan.metric,
                                            plan.params)
    predictions = [engine._prediction(p, out["probabilities"], j) for j, p in enumerate(out["predicted"])]
    return _Part(positions, out["vectors"].to(_float32()).numpy(), out["self_influence"].numpy(), out["grads"],
                 checkpoints, predictions, list(used))


def _embed_rows(engine, plan: Plan, positions: list[int]) -> _Part:
    """Training rows as queries: recomputed from the training examples (with their training labels) when their
    gradients are needed or a metric replaces the loss, else their stored vectors."""
    members = [plan.members[i] for i in positions]
    rows = np.asarray([m.row for m in members], dtype=np.int64)
    fields = [m.field for m in members]
    used = [engine.examples[r]["label"] for r in rows.tolist()]
    predictions: list = [None] * len(members)
    recompute = plan.keep_grads or plan.objective is not None
    if engine.scorer is not None:
        inputs, labels = engine.scorer.rows_of(rows)
        with engine.stage("predict"):
            predicted, probabilities = engine._predict(inputs, fields)
        predictions = [engine._prediction(p, probabilities, j) for j, p in enumerate(predicted)]
    if recompute:
        if engine.scorer is None:
            cause = "metric" if plan.objective is not None else "normalize"
            what = "metric" if cause == "metric" else "normalised set"
            raise ApiError(422, "unsupported", cause,
                           f"a {what} on a training example needs its gradient: {engine.rerank_error}")
        with engine.stage("embed"):
            emb = engine._embed(inputs, labels, plan.keep_grads, plan.objective, fields)
        checkpoints = engine._query_checkpoints(emb["per_checkpoint"], labels, plan.metric, plan.params)
        return _Part(positions, emb["vectors"].to(_float32()).numpy(), emb["self_influence"].numpy(), emb["grads"],
                     checkpoints, predictions, used)
    if engine.first_stage.reconstruct_error is not None:
        raise ApiError(422, "unsupported", fields[0].split(".")[0], engine.first_stage.reconstruct_error)
    with engine.stage("lookup"):
        vectors = np.stack([engine.first_stage.reconstruct(r) for r in rows.tolist()])
    si = np.asarray(engine.index_dir.self_influence[rows], dtype=np.float64)
    return _Part(positions, vectors, si, None, None, predictions, used)


def _member_query(engine, plan: Plan, part: _Part, j: int) -> Query:
    """Member j of a capture pass as a query of its own (a single query, or a member of a batch)."""
    member = plan.members[part.members[j]]
    grads = part.grads
    if grads is not None and len(part.members) > 1:
        grads = [[g.select([j]) for g in per_block] for per_block in grads]
    exclude = plan.exclude
    if plan.exclude_self and member.row is not None:
        exclude = np.union1d(exclude, [member.row])
    info = {"train_id": member.train_id, "self_influence": float(part.self_influence[j]), "embedding": None,
            "checkpoints": part.checkpoints[j] if part.checkpoints is not None else None}
    return Query(part.vectors[j], grads, float(part.self_influence[j]), exclude, info, part.predictions[j],
                 part.labels_used[j], example_warnings(engine, member.example) if member.example is not None else [])


def _set_query(engine, plan: Plan, parts: list[_Part]) -> Query:
    """The set as one query: vector and gradients the sum (mean) of the members'; its exact norm from the summed
    gradient; per member: label, prediction, own norm and losses."""
    from indexer.score.exact import query_self_influence, sum_queries

    n = len(plan.members)
    scale = 1.0 / n if plan.aggregate == "mean" else 1.0
    vectors = np.concatenate([p.vectors for p in parts])
    vector = (vectors.astype(np.float64).sum(axis=0) * scale).astype(np.float32)
    grads, self_influence, member_grads = None, None, None
    if plan.keep_grads:
        with engine.stage("embed"):
            grads = sum_queries([p.grads for p in parts], scale)
            self_influence = float(query_self_influence(engine.embedder, grads)[0])
        if plan.member_scores:
            member_grads = _concat([p.grads for p in parts])
    members, warnings, checkpoints = [], [], []
    for part in parts:
        for j, position in enumerate(part.members):
            member = plan.members[position]
            used = part.labels_used[j]
            members.append({"field": member.field, "train_id": member.train_id, "label_used": used,
                            "label_used_name": engine.label_name(used), "prediction": part.predictions[j],
                            "self_influence": float(part.self_influence[j]),
                            "checkpoints": part.checkpoints[j] if part.checkpoints is not None else None})
            checkpoints.append(members[-1]["checkpoints"])
            if member.example is not None:
                warnings += [f"{member.field}: {w}" for w in example_warnings(engine, member.example)]
    summed = None
    if all(c is not None for c in checkpoints):  # the set's metric at each checkpoint: the sum (mean) of its members'
        summed = [{"lr": per[0]["lr"], "loss": sum(p["loss"] for p in per) * scale,
                   "metric": sum(p["metric"] for p in per) * scale} for per in zip(*checkpoints)]
    exclude = plan.exclude
    if plan.exclude_self:
        exclude = np.union1d(exclude, [m.row for m in plan.members if m.row is not None]).astype(np.int64)
    info = {"train_id": None, "self_influence": self_influence, "embedding": None, "checkpoints": summed}
    return Query(vector, grads, self_influence, exclude, info, None, None, warnings,
                 {"aggregate": plan.aggregate, "size": n, "members": members}, member_grads, scale)


def _concat(parts: list) -> list:
    """Per checkpoint and block, the rows of several passes stacked (`BlockGrad.concat`)."""
    from indexer.capture.grads import BlockGrad

    if len(parts) == 1:
        return parts[0]
    return [[BlockGrad.concat([p[c][b] for p in parts]) for b in range(len(parts[0][c]))]
            for c in range(len(parts[0]))]


def _float32():
    import torch

    return torch.float32


# -- 3. first stage ----------------------------------------------------------------------------------
def first_stage(engine, plan: Plan, query: Query) -> Candidates:
    """Candidate proponents and opponents from the FAISS index: max(k, K') per end, plus one per row left out."""
    q_norm = float(np.sqrt(max(query.self_influence or 0.0, 0.0)))
    q_scale = (1.0 / q_norm if q_norm > 0 else 0.0) if plan.normalize == "cosine" else 1.0
    want = max(plan.k, plan.depth) + int(query.exclude.size)
    with engine.stage("search"):
        (pro_rows, pro_scores), (opp_rows, opp_scores) = engine.first_stage.search(
            query.vector, want, want, plan.rows, normalized=plan.normalize != "none")
    return Candidates(pro_rows, pro_scores * q_scale, opp_rows, opp_scores * q_scale, q_scale)


def first_stage_many(engine, plan: Plan, queries: list[Query]) -> list[Candidates]:
    """`first_stage` for every query of a batch, the stored vectors scanned once for all of them (an exact Flat
    index: one matrix product; the scores equal the single queries' up to float32 summation order)."""
    if len(queries) == 1:
        return [first_stage(engine, plan, queries[0])]
    scales = []
    for q in queries:
        q_norm = float(np.sqrt(max(q.self_influence or 0.0, 0.0)))
        scales.append((1.0 / q_norm if q_norm > 0 else 0.0) if plan.normalize == "cosine" else 1.0)
    wants = [max(plan.k, plan.depth) + int(q.exclude.size) for q in queries]
    with engine.stage("search"):
        found = engine.first_stage.search_many(np.stack([q.vector for q in queries]), max(wants), max(wants),
                                               plan.rows, normalized=plan.normalize != "none")
    out = []
    for ((pr, ps), (orows, os_)), want, scale in zip(found, wants, scales):
        out.append(Candidates(pr[:want], ps[:want] * scale, orows[:want], os_[:want] * scale, scale))
    return out


# -- 4. exact re-ranking -----------------------------------------------------------------------------
def rerank(engine, plan: Plan, embedded: Embedded, candidates: list[Candidates]) -> list:
    """Exact scores (`indexer.score.exact.ExactScores`) of each query's own candidates; None without re-ranking.
    A batch computes every candidate row's gradients once for all its members (the union of their candidates)
    and gives each member the columns of its own candidates, so each answer equals the member's single one."""
    if plan.depth == 0:
        return [None] * len(embedded.queries)
    own = [c.for_rerank(plan.depth, int(q.exclude.size), q.exclude) for q, c in zip(embedded.queries, candidates)]
    with engine.stage("rerank"):
        if embedded.stacked is None:
            return [engine.scorer.scores(q.grads, rows) for q, rows in zip(embedded.queries, own)]
        union = np.unique(np.concatenate(own))
        every = engine.scorer.scores_each(embedded.stacked, union)
    return [_columns(scores, np.searchsorted(union, rows)) for scores, rows in zip(every, own)]


def _columns(scores, at: np.ndarray):
    from indexer.score.exact import ExactScores

    return ExactScores(scores.rows[at], scores.total[at], scores.per_checkpoint[:, at], scores.losses[:, at],
                       scores.per_block[:, :, at], scores.blocks)


# -- 5. the answer -----------------------------------------------------------------------------------
def assemble(engine, plan: Plan, query: Query, cand: Candidates, exact, started: float) -> dict[str, Any]:
    """The answer of one query: proponents and opponents (exact when re-ranked: with per-checkpoint and per-block
    terms, losses, raw scores, and per-member scores for a set when asked), the query, the metric, flags."""
    k = plan.k
    pro_rows, pro_scores, opp_rows, opp_scores = cand.pro_rows, cand.pro_scores, cand.opp_rows, cand.opp_scores
    terms, brief = None, None
    if exact is not None:
        rows = exact.rows
        weight = (_inverse_norms(engine.index_dir.self_influence[rows]) if plan.normalize != "none"
                  else np.ones(rows.size)) * cand.q_scale
        scores = exact.total * weight
        pro_at, opp_at = _ends(scores, k, 1)[0], _ends(scores, k, -1)[0]
        pro_rows, pro_scores, opp_rows, opp_scores = rows[pro_at], scores[pro_at], rows[opp_at], scores[opp_at]
        per_block = exact.per_block.sum(axis=0)  # [L, K]
        hit_at = np.unique(np.concatenate([pro_at, opp_at]))
        terms = {int(rows[i]): {"raw_score": float(exact.total[i]),
                                "checkpoints": [float(x) for x in exact.per_checkpoint[:, i] * weight[i]],
                                "blocks": {name: float(per_block[b, i] * weight[i])
                                           for b, name in enumerate(exact.blocks)},
                                "losses": [float(x) for x in exact.losses[:, i]]} for i in hit_at.tolist()}
        if plan.member_scores and hit_at.size:
            with engine.stage("rerank"):
                matrix = engine.scorer.matrix(query.member_grads, rows[hit_at])  # [n, hits]
            for j, i in enumerate(hit_at.tolist()):
                terms[int(rows[i])]["member_scores"] = [float(x) for x in matrix[:, j] * weight[i] * query.scale]
        brief = {"depth": plan.depth, "candidates": int(rows.size)}
    exclude = set(query.exclude.tolist())
    proponents = engine._hits(pro_rows, pro_scores, k, exclude, terms)
    opponents = engine._hits(opp_rows, opp_scores, k, exclude, terms)
    can_add = engine.scorer is not None or engine.index_dir.label_review is not None
    if terms is None and can_add and (proponents or opponents):
        engine._add_losses(proponents + opponents)
    info = dict(query.info)
    if plan.include_embedding:
        info["embedding"] = query.vector.astype(np.float64).tolist()
    out = {
        "prediction": query.prediction,
        "label_used": query.label_used,
        "label_used_name": engine.label_name(query.label_used) if query.label_used is not None else None,
        "metric": {"name": plan.metric.name, "params": plan.params.model_dump() if plan.params is not None else None,
                   "higher_is_better": plan.metric.higher_is_better},
        "normalize": plan.normalize,
        "query": info,
        "proponents": proponents,
        "opponents": opponents,
        "exact": plan.depth > 0 or (engine.exact_index and plan.metric.name == "loss" and plan.normalize == "none"),
        "rerank": brief,
        "index": {"approximate": engine.approximate, "count": engine.count,
                  "candidates": int(plan.rows.size) if plan.rows is not None else engine.count},
        "took_ms": round((time.perf_counter() - started) * 1000.0, 3),
        "warnings": query.warnings,
        "hints": influence_hints(proponents + opponents, engine.count, plan.normalize),
    }
    if query.set_info is not None:
        out["set"] = query.set_info
    return out


def answer_request(engine, req: Any, started: float) -> dict[str, Any]:
    """POST /influence: the stages in order. One answer for a single or set query; {"results": [...]} for a
    batch, one answer per member, each equal to the member's own single answer."""
    plan = parse(engine, req)
    embedded = embed(engine, plan)
    candidates = first_stage_many(engine, plan, embedded.queries)
    exact = rerank(engine, plan, embedded, candidates)
    answers = [assemble(engine, plan, q, c, e, started) for q, c, e in zip(embedded.queries, candidates, exact)]
    if plan.kind != "batch":
        return answers[0]
    took = round((time.perf_counter() - started) * 1000.0, 3)
    for a in answers:
        a["took_ms"] = took
    return {"results": answers, "size": len(answers), "took_ms": took}
