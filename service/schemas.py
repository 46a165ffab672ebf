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


class InfluenceResponse(BaseModel):
    prediction: Optional[Prediction] = Field(None, description="null for train_id queries (no gradient work)")
    label_used: LabelValue = Field(description="label of the query loss: `label` if given, else the prediction "
                                               "(train_id: the stored training label)")
    label_used_name: str
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

class _InfluenceRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
                           default_rerank: int = 0, metrics: dict[str, Any] | None = None) -> type[BaseModel]:
    """The POST /influence body for one task: give `example` (gradient work) or `train_id` (a training example)."""
    return create_model(
        "InfluenceRequest",
        __base__=_InfluenceRequestBase,
        example=(Optional[example_schema], Field(None, description="the query example in the task's schema")),
        train_id=(Optional[StrictStr], Field(None, description="explain a training example from its stored "
                                                               "vector instead (no gradient work)")),
        label=(Optional[QueryLabel], Field(None, description="label for the query loss, in the form the task's loss "
                                                             "takes: class id or name, regression target (number or "
                                                             "list), or multi-label vector (0/1 list or class names); "
                                                             "default: the model's prediction at the last checkpoint")),
        k=(StrictInt, Field(default_k, ge=1, le=max_k, description=f"proponents and opponents to return (1..{max_k})")),
        filter_label=(Optional[Label], Field(None, description="only search training examples with this label "
                                                               "(applied inside FAISS with an ID selector)")),
        exclude_self=(StrictBool, Field(False, description="train_id queries: leave the example itself out of the "
                                                     "proponents")),
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
