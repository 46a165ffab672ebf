"""Request and response models. Imports only pydantic, so the client can use them without torch.

The request model of POST /influence is built at app creation from the task's `example_schema`, so the
OpenAPI document (/docs) shows the real example fields of the served task.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, create_model

#: a class label: an integer class id or a class name (label filters)
Label = Union[StrictInt, StrictStr]
#: a query label in whatever form the task's loss takes: class id or name, a regression target (number or
#: list of numbers), or a multi-label vector (list of 0/1 or of class names)
QueryLabel = Union[StrictInt, StrictFloat, StrictStr, list[Union[StrictInt, StrictFloat, StrictStr]]]
#: a label as stored: class id (int), target (float or list of floats) or label vector (list of 0/1)
LabelValue = Union[int, float, list[Union[int, float]], list[list[Union[int, float]]]]


# -- responses ---------------------------------------------------------------------------------

class Hit(BaseModel):
    """One training example in a proponent / opponent list."""

    id: str
    score: float = Field(description="TracIn score e(train) . e(query) (> 0 for proponents, < 0 for opponents)")
    label: LabelValue = Field(description="training label: class id, regression target(s) or label vector")
    label_name: Optional[str] = Field(None, description="the label as a person reads it (class names, values)")
    display: dict[str, Any] = Field(default_factory=dict, description="task display fields (image, text, flags)")
    checkpoints: Optional[list[float]] = Field(
        None, description="exact per-checkpoint terms lr_i g_i(train) . g_i(query) (normalised like the score), in "
                          "checkpoint order; they sum to the score (present when the scores are exact: re-ranked)")
    raw_score: Optional[float] = Field(None, description="exact TracIn before normalisation (re-ranked answers)")
    losses: Optional[list[float]] = Field(None, description="the training example's loss at each checkpoint")
    self_influence: Optional[float] = Field(None, description="its exact self-influence (= ||g||^2 in the TracIn "
                                                              "metric)")
    self_influence_rank: Optional[int] = Field(None, description="its 1-based rank by descending self-influence")
    blocks: Optional[dict[str, float]] = Field(
        None, description="exact per-layer terms: the score split by traced block (layer parameter), summed over "
                          "checkpoints and normalised like the score; they sum to the score (re-ranked answers)")
    member_scores: Optional[list[float]] = Field(
        None, description="set queries with member_scores: this training example's exact score against each member "
                          "of the set, in member order (examples, then train_ids), normalised like the score and "
                          "divided by the set size for aggregate = mean; they sum to the score")


class Prediction(BaseModel):
    label: LabelValue = Field(description="prediction at the last checkpoint in the form of a label: class id, "
                                          "predicted value(s) (regression) or a 0/1 vector (multi-label, p > 0.5)")
    label_name: str
    probabilities: Optional[list[Union[float, list[float]]]] = Field(
        None, description="softmax (class) or sigmoid (multi-label) probabilities (per position for a class per "
                          "position); null for regression")


class QueryCheckpoint(BaseModel):
    lr: float
    loss: float = Field(description="the query's loss on the label used at this checkpoint")
    metric: float = Field(description="the metric's value at this checkpoint (the loss for metric = loss)")


class QueryInfo(BaseModel):
    train_id: Optional[str] = Field(None, description="set when the query is a stored training example")
    self_influence: Optional[float] = Field(None, description="exact sum_i lr_i ||g_i(query)||^2 of the gradient "
                                                              "used (the metric's, for a metric query)")
    checkpoints: Optional[list[QueryCheckpoint]] = Field(None, description="loss and metric at each checkpoint")
    embedding: Optional[list[float]] = Field(None, description="the query embedding (only with include_embedding)")


class IndexBrief(BaseModel):
    approximate: bool = Field(description="true when the FAISS index is approximate (IVF, HNSW, PQ ...)")
    count: int = Field(description="training examples in the index")
    candidates: int = Field(description="training examples searched (the label subset when filter_label is set)")


class RerankInfo(BaseModel):
    depth: int = Field(description="K': candidates per end taken from the index and re-scored")
    candidates: int = Field(description="distinct training examples re-scored by exact TracIn")


class Hint(BaseModel):
    """Something to know about this answer (service.hints)."""

    code: str = Field(description="machine-readable, e.g. high_self_influence")
    message: str
    fraction: Optional[float] = Field(None, description="high_self_influence: share of the hits in the top 10% "
                                                        "by self-influence (0..1)")
    in_top: Optional[int] = None
    hits: Optional[int] = None
    top_ranks: Optional[int] = Field(None, description="ranks 1..top_ranks are the top 10% by self-influence")
    suggestion: dict[str, Any] = Field(default_factory=dict, description="request fields that answer the hint, "
                                                                         "e.g. {\"normalize\": \"train\"}")


class SetMember(BaseModel):
    """One member of a set query, in member order (examples, then train_ids)."""

    field: str = Field(description="where the member was given, e.g. examples.3 or train_ids.0")
    train_id: Optional[str] = None
    label_used: LabelValue = Field(description="label of the member's loss: its `labels` entry, else the prediction "
                                               "(train_ids: the stored training label)")
    label_used_name: str
    prediction: Optional[Prediction] = None
    self_influence: Optional[float] = Field(None, description="the member's own exact squared gradient norm")
    checkpoints: Optional[list["QueryCheckpoint"]] = Field(None, description="its loss and metric at each "
                                                                             "checkpoint")


class SetInfo(BaseModel):
    aggregate: Literal["sum", "mean"] = Field(description="the set's metric is the sum (or mean) of its members'")
    size: int = Field(description="members in the set")
    members: list[SetMember]


class InfluenceResponse(BaseModel):
    prediction: Optional[Prediction] = Field(None, description="the model's prediction at the last checkpoint; for "
                                                               "a train_id query null only when the training set is "
                                                               "not loaded here (re-ranking off or unavailable); null "
                                                               "for sets (see set.members)")
    label_used: Optional[LabelValue] = Field(
        None, description="label of the query loss: `label` if given, else the prediction (train_id: the stored "
                          "training label); null for a set (see set.members)")
    label_used_name: Optional[str] = None
    set: Optional[SetInfo] = Field(None, description="set queries (aggregate): the members, each with its label and "
                                                     "prediction")
    query: QueryInfo
    proponents: list[Hit] = Field(description="largest positive scores first")
    opponents: list[Hit] = Field(description="most negative scores first")
    metric: dict[str, Any] = Field(default_factory=dict, description="the query metric: name, params, "
                                                                      "higher_is_better")
    normalize: str = Field("none", description="none | cosine | train")
    exact: bool = Field(description="true when every score is exact TracIn: re-ranked from the training examples' "
                                    "gradients, or read from an exact-mode Flat index (float32); false when the "
                                    "scores are the compact index's estimates (re-ranking off)")
    rerank: Optional[RerankInfo] = Field(None, description="the second stage, when it ran")
    index: IndexBrief
    took_ms: float = Field(description="server-side time of this request in milliseconds")
    warnings: list[str] = Field(
        default_factory=list,
        description="the posted example is unlike the training inputs (in words: another scale, e.g. 0..1 where "
                    "the training range is expected; many values far from the training data at their position, e.g. a "
                    "white background; ids never seen in training), judged from ranges of the training inputs "
                    "recorded at index time; empty when it looks like training data, for train_id queries, and for "
                    "an index built before the ranges were recorded. The answer is computed all the same")
    hints: list[Hint] = Field(
        default_factory=list,
        description="about the hits: `high_self_influence` when more than half of them are among the top 10% of "
                    "training examples by self-influence (raw scores favour mislabeled and atypical examples); "
                    "its `suggestion` {\"normalize\": \"train\"} asks for the normalised ranking. Raw TracIn "
                    "stays the default (`normalize`)")


class BatchInfluenceResponse(BaseModel):
    """A batch query (`examples` / `train_ids` without `aggregate`): one answer per member, in member order
    (examples, then train_ids), each what the member alone would have got."""

    results: list[InfluenceResponse]
    size: int = Field(description="members in the batch")
    took_ms: float = Field(description="server-side time of the whole batch in milliseconds")


class SelfInfluenceItem(BaseModel):
    id: str
    score: float = Field(description="exact self-influence sum_i lr_i ||g_i(z)||^2")
    label: LabelValue
    label_name: Optional[str] = None
    display: dict[str, Any] = Field(default_factory=dict)
    rank: int = Field(description="1-based rank by descending self-influence among all training examples")


class SelfInfluencePage(BaseModel):
    items: list[SelfInfluenceItem]
    total: int = Field(description="training examples matching the label filter (all when no filter)")
    offset: int
    k: int
    label: Optional[int] = None


class SelfInfluenceHistogram(BaseModel):
    edges: list[float] = Field(description="bins + 1 bin edges (ascending)")
    counts: list[int] = Field(description="training examples per bin")
    total: int
    scale: Literal["log", "linear"] = Field(description="log when asked and the scores allow it")
    label: Optional[int] = None
    flagged: dict[str, list[int]] = Field(
        default_factory=dict, description="per boolean display field (e.g. `flipped`): examples per bin where true")


RankingName = Literal["combined", "self_influence", "loss", "margin", "aum"]


class LabelReviewItem(BaseModel):
    """One training example in the label-review list."""

    id: str
    rank: int = Field(description="1-based rank by the ranking among all training examples (1 = most suspicious)")
    score: float = Field(description="the ranking's score, in its own units (see `ranking`, `order`)")
    label: LabelValue = Field(description="the given (training) label")
    label_name: Optional[str] = None
    display: dict[str, Any] = Field(default_factory=dict)
    self_influence: float = Field(description="exact self-influence sum_i lr_i ||g_i(z)||^2")
    prediction: Optional[LabelValue] = Field(
        None, description="the model's prediction at the last checkpoint, in the form of a label (class id, 0/1 "
                          "vector, predicted value(s)); null for an index built before label review")
    prediction_name: Optional[str] = None
    probability: Optional[float] = Field(
        None, description="the model's probability of its prediction at the last checkpoint (class: softmax; "
                          "multi-label: the predicted label vector under independent sigmoids); null for regression")
    label_probability: Optional[float] = Field(None, description="the same probability for the given label")
    suggested_label: Optional[LabelValue] = Field(
        None, description="the prediction where it differs from the given label (class and multi-label tasks); null "
                          "when the model agrees with the label, and for regression")
    suggested_label_name: Optional[str] = None


class LabelReviewPage(BaseModel):
    items: list[LabelReviewItem]
    total: int = Field(description="training examples matching the label filter (all when no filter)")
    offset: int
    k: int
    label: Optional[int] = None
    ranking: str = Field(description="the ranking used")
    order: Literal["descending", "ascending"] = Field(
        description="how `score` runs from the most suspicious down: descending (self_influence, loss, combined) or "
                    "ascending (margin, aum)")
    description: str = Field(description="what the ranking measures")
    default_ranking: str = Field(description="the ranking used when none is asked for")
    rankings: list[str] = Field(description="the rankings this index supports")


class LabelReviewHistogram(BaseModel):
    edges: list[float] = Field(description="bins + 1 bin edges (ascending)")
    counts: list[int] = Field(description="training examples per bin")
    total: int
    scale: Literal["log", "linear"] = Field(description="log when asked and every score is >= 0")
    order: Literal["descending", "ascending"] = Field(
        description="descending: bin i's first row is at offset sum(counts[i+1:]); ascending: sum(counts[:i])")
    ranking: str
    label: Optional[int] = None
    flagged: dict[str, list[int]] = Field(default_factory=dict)


class ExampleInfo(BaseModel):
    id: str
    row: int
    label: LabelValue
    label_name: str
    display: dict[str, Any] = Field(default_factory=dict)
    self_influence: float
    rank: int = Field(description="1-based rank by descending self-influence")


class QueryExample(BaseModel):
    id: str
    label: Optional[LabelValue] = None
    prediction: Optional[Prediction] = Field(None, description="the model's prediction at the last checkpoint "
                                                               "(only with predictions=true)")
    example: Optional[dict[str, Any]] = Field(None, description="the example in the task's schema: post it as "
                                                                "`example` to POST /influence")
    display: dict[str, Any] = Field(default_factory=dict)


class QueryPage(BaseModel):
    items: list[QueryExample]
    total: int
    offset: int
    limit: int


class StepGroupInfo(BaseModel):
    lr: float = Field(description="the learning rate of this parameter group at the checkpoint")
    params: int = Field(description="traced parameter tensors in the group")


class CheckpointInfo(BaseModel):
    file: str
    lr: float = Field(description="the first parameter group's learning rate")
    sha256: str
    formula: str = Field("sgd", description="how gradients are weighted at this checkpoint: sgd (lr of each "
                                            "parameter's group), adam / rmsprop / adagrad (lr * Gamma from the "
                                            "optimizer state saved with the checkpoint)")
    groups: list[StepGroupInfo] = Field(default_factory=list)


class OptimizerInfo(BaseModel):
    formula: str = Field(description="sgd, adam, rmsprop, adagrad, or mixed (per checkpoint)")
    why: str = Field(description="why this formula (where the optimizer state was read, or why none was used)")
    forced: bool = Field(False, description="the plain formula was forced by the config ([optimizer] formula)")
    per_checkpoint: list[str] = Field(default_factory=list)
    bounded: int = Field(0, description="preconditioner coordinates bounded because their second moment was 0")
    momentum: str = "ignore"


class IndexVersion(BaseModel):
    number: int = Field(description="the version served: 1 for a directory never updated, n + 1 after each "
                                    "tracin index --update / --remove-ids")
    manifest_sha256: Optional[str] = Field(None, description="sha256 of the version's manifest.json: its identity")
    parent: Optional[int] = Field(None, description="the version this one was updated from")
    rows_added: Optional[int] = None
    checkpoints_added: Optional[int] = None
    removed: int = Field(0, description="training examples marked removed (kept out of every answer)")
    created_at: Optional[str] = None
    loaded_at: Optional[str] = Field(None, description="when this server loaded the version (UTC)")


class ReloadResponse(BaseModel):
    reloaded: bool = Field(description="a version was loaded and is served now")
    changed: bool = Field(description="the version served differs from the one before the reload")
    trigger: Optional[str] = None
    version: Optional[IndexVersion] = Field(None, description="the version served now")
    previous: Optional[IndexVersion] = None
    seconds: float = 0.0
    error: Optional[str] = Field(None, description="why the new version was refused (the previous one is served)")
    running: Optional[bool] = Field(None, description="GET: whether a reload is in progress")


class IndexInfo(BaseModel):
    path: str = Field(description="the index directory's name (not its location on the server)")
    version: Optional[IndexVersion] = Field(None, description="which version of the index directory is served")
    task: dict[str, Any]
    class_names: Optional[list[str]] = None
    count: int
    embedding_dim: int
    approximate: bool
    faiss: dict[str, Any]
    projection: dict[str, Any]
    checkpoints: list[CheckpointInfo]
    optimizer: OptimizerInfo = Field(description="which TracIn formula the index uses and why")
    layers: list[dict[str, Any]]
    queries: int = Field(description="held-out examples listed by GET /queries")
    created_at: Optional[str] = None
    versions: dict[str, str] = Field(default_factory=dict)
    mmap: bool
    max_k: int
    label_kind: str = Field("class", description="class, regression or multilabel")
    metrics: list[dict[str, Any]] = Field(default_factory=list, description="query metrics (POST /influence `metric`)")
    rerank: dict[str, Any] = Field(default_factory=dict, description="exact re-ranking: available, default K', "
                                                                     "max K', why unavailable")
    example_schema: dict[str, Any] = Field(description="JSON schema of one example of this task")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    count: Optional[int] = None
    load_seconds: Optional[float] = None


class ErrorItem(BaseModel):
    loc: list[Union[str, int]]
    field: str = Field(description="the field at fault, dotted (e.g. example.pixels.3)")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. validation_error, not_found, body_too_large")
    message: str
    detail: list[ErrorItem]


# -- requests ----------------------------------------------------------------------------------

EXACTLY_ONE = ("Give exactly one kind of question: `example` (a posted example, gradient work), `train_id` (a "
               "training example to explain), or members in `examples` and/or `train_ids` (a set with "
               "`aggregate`, else a batch); none or more than one is 422 naming `example`.")


def _exactly_one_of_example_and_train_id(schema: dict[str, Any]) -> None:
    """The JSON-schema form of EXACTLY_ONE (a `oneOf` of the three ways to ask), for OpenAPI clients."""
    ways = {"example": ["example"], "train_id": ["train_id"], "members": ["examples", "train_ids"]}

    def only(way: str) -> dict[str, Any]:
        absent = {f: {"type": "null"} for other, fields in ways.items() if other != way for f in fields}
        given = ways[way]
        present = ({"required": given} if len(given) == 1 else
                   {"anyOf": [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in given]})
        props = {f: {"not": {"type": "null"}} for f in given} if len(given) == 1 else {}
        return {"title": f"by {way}", **present, "properties": {**props, **absent}}

    schema["oneOf"] = [only(way) for way in ways]


class _InfluenceRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one_of_example_and_train_id)


def metric_field(metrics: dict[str, Any] | None):
    """The `metric` request field for a task's metrics (indexer.score.metrics.Metric by name): a name, or an object
    {"name": ..., parameters} whose model documents each metric's parameters in OpenAPI."""
    metrics = metrics or {}
    names = tuple(metrics) or ("loss",)
    models = []
    for name, metric in metrics.items():
        base = metric.params if getattr(metric, "params", None) is not None else BaseModel
        models.append(create_model(f"Metric_{name}", __base__=base, __config__=None,
                                   __doc__=getattr(metric, "description", None),
                                   name=(Literal[name], Field(description=getattr(metric, "description", name)))))
    for model in models:
        model.model_config["extra"] = "forbid"
        model.model_rebuild(force=True)
    objects = models[0] if len(models) == 1 else Annotated[Union[tuple(models)], Field(discriminator="name")]
    description = ("the function of the query's output whose influence is measured: " + "; ".join(
        f"`{n}`: {getattr(m, 'description', '')}" for n, m in metrics.items()) + ". Positive scores are always "
        "proponents (they moved the metric the right way: a loss down, a logit up). Give a name, or an object "
        "with `name` and the metric's parameters")
    return (Optional[Union[Literal[names], objects]], Field(None, description=description))


def make_influence_request(example_schema: type[BaseModel], max_k: int, default_k: int, max_rerank: int = 1000,
                           default_rerank: int = 0, metrics: dict[str, Any] | None = None, max_set: int = 1000,
                           max_batch: int = 100) -> type[BaseModel]:
    """The POST /influence body for one task: give `example` (gradient work), `train_id` (a training example),
    or several members (`examples` and/or `train_ids`): a set query with `aggregate`, else a batch."""
    return create_model(
        "InfluenceRequest",
        __base__=_InfluenceRequestBase,
        __doc__=f"The body of POST /influence. {EXACTLY_ONE}",
        example=(Optional[example_schema], Field(None, description="the query example in the task's schema")),
        train_id=(Optional[StrictStr], Field(None, description="explain a training example instead (its stored "
                                                               "vector; its gradients are recomputed for exact "
                                                               "re-ranking and metrics)")),
        examples=(Optional[list[example_schema]], Field(None, description=(
            "several query examples in the task's schema: with `aggregate`, ONE set query (which training examples "
            "moved the set's summed or mean metric); without, a batch (one answer per example in `results`, "
            f"computed together). At most {max_set} members in a set, {max_batch} in a batch (examples + "
            "train_ids)"))),
        train_ids=(Optional[list[StrictStr]], Field(None, description=(
            "training examples as members of a set or batch (each explained with its training label), after "
            "`examples` in member order"))),
        labels=(Optional[list[Optional[QueryLabel]]], Field(None, description=(
            "one label per entry of `examples` (null: the model's prediction), in the form `label` takes"))),
        aggregate=(Optional[Literal["sum", "mean"]], Field(None, description=(
            "make `examples` / `train_ids` one set query: rank training examples by their exact influence on the "
            "sum (or mean) of the members' metric; the scores equal the sum (mean) of the members' own scores"))),
        member_scores=(StrictBool, Field(False, description=(
            "set queries: give each hit its exact score against every member (`member_scores`, summing to the "
            "score): which members it affects most"))),
        exclude=(Optional[list[StrictStr]], Field(None, description=(
            "training example ids to leave out of the answer (e.g. a set's own training members)"))),
        label=(Optional[QueryLabel], Field(None, description="label for the query loss, in the form the task's loss "
                                                             "takes: class id or name, regression target (number or "
                                                             "list), or multi-label vector (0/1 list or class names); "
                                                             "default: the model's prediction at the last checkpoint")),
        k=(StrictInt, Field(default_k, ge=1, le=max_k, description=f"proponents and opponents to return (1..{max_k})")),
        filter_label=(Optional[Label], Field(None, description="only search training examples with this label "
                                                               "(applied inside FAISS with an ID selector)")),
        exclude_self=(StrictBool, Field(False, description="train_id queries: leave the example itself out of the "
                                                     "answer; sets and batches: each train_ids member (a set: all "
                                                     "of them)")),
        include_embedding=(StrictBool, Field(False, description="return the query embedding (debugging)")),
        metric=metric_field(metrics),
        normalize=(Literal["none", "cosine", "train"], Field("none", description=(
            "none: raw TracIn (as in the paper); cosine: score / (||g(train)|| ||g(query)||), the gradient-cosine "
            "variant; train: score / ||g(train)||, a RelatIF-style normalisation that discounts training examples "
            "with large gradients (mislabeled, rare). Norms are exact (sqrt of self-influence); the ranking is "
            "over the whole index"))),
        rerank=(Optional[StrictInt], Field(None, ge=0, le=max_rerank, description=(
            f"K': take the K' best candidates of each end from the compact index and return the top k by exact "
            f"TracIn, recomputed from the training examples (0 = off: the index's estimates; at most {max_rerank}; "
            f"default: the server's, {default_rerank})"))),
    )
