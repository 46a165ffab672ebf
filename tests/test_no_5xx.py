"""No input gets a 5xx (issue 22, item 1): every request field of every route, against a real
`tracin serve` (uvicorn) on the float64 MLP index (a class task with class names), and the label fields
of the other label kinds (regression, multi-label, a class per position) through the app.

The named cases of the issue first (labels of non-ASCII digits, list labels on a class task, an empty
`?label=`), then property-based tests (hypothesis): arbitrary unicode, numbers (huge, NaN, Infinity),
nesting and nulls in each field; the answer is a 2xx or a 4xx with the JSON error shape, never a 5xx.
The runs are bounded (a few dozen examples per test, no deadline) so that the file stays well under a
minute on a busy machine; TRACIN_FUZZ_EXAMPLES=500 runs longer hunts.
"""
from __future__ import annotations

import json
import os
import socket
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings, strategies as st

from service.app import create_app
from service.settings import Settings
from tests import zoo
from tests.service_support import mlp_index, start_server, zoo_index

KEY = "fuzz-key"
X = [0.1, -0.2, 0.3, 0.0, 0.5, -1.0]  # a valid MLP example
BASES = {"example": {"example": {"x": X}, "k": 3}, "train_id": {"train_id": "ex1", "k": 3}}
LABEL_ROUTES = ["/self-influence/top", "/self-influence/histogram", "/label-review", "/label-review/histogram",
                "/label-review/export"]
GET_PARAMS = {
    "/self-influence/top": ["k", "offset", "label"],
    "/self-influence/histogram": ["bins", "label", "scale"],
    "/label-review": ["ranking", "k", "offset", "label"],
    "/label-review/histogram": ["ranking", "bins", "label", "scale"],
    "/label-review/export": ["format", "ranking", "label", "limit"],
    "/queries": ["offset", "limit"],
    "/index": [], "/healthz": [], "/readyz": [], "/metrics": [], "/": [],
}
NON_ASCII_DIGITS = ["²", "③", "¹", "٣", "३", "߃", "-²", "１", "𝟙", "Ⅻ", "½", "1²"]
EXAMPLES = int(os.environ.get("TRACIN_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the server and the checks ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    proc = start_server(mlp_index(), env={"TRACIN_API_KEY": KEY, "TRACIN_BODY_TIMEOUT_S": "5"})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def no_5xx(r: httpx.Response, field: str | None = None) -> None:
    """A 2xx with JSON (CSV / metrics text where the route says so), or a 4xx with the JSON error shape that
    names `field` (when given) among its fields."""
    assert r.status_code < 500, (r.status_code, r.request.method, str(r.request.url)[:300], r.text[:500])
    kind = r.headers.get("content-type", "")
    if 300 <= r.status_code < 400:  # e.g. "/examples/." -> "/examples/": a redirect to the slash route
        return
    if r.status_code < 400:
        assert kind.startswith(("application/json", "text/csv", "text/plain")), kind
        return
    assert kind.startswith("application/json"), (r.status_code, kind, r.text[:300])
    body = r.json()
    assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), body
    assert isinstance(body.get("detail"), list) and "Traceback" not in r.text, body
    if field is not None:
        fields = [d["field"] for d in body["detail"]]
        assert any(f == field or f.startswith(field + ".") for f in fields), (field, body)


def post(http: httpx.Client, body) -> httpx.Response:
    # allow_nan: NaN and Infinity reach the server as the tokens Python's json writes (and reads)
    return http.post("/influence", content=json.dumps(body, allow_nan=True),
                     headers={"Content-Type": "application/json"})


# -- the cases ------------------------------------------------------------------------------

@pytest.mark.parametrize("label", NON_ASCII_DIGITS + [[3], [1, 2], [], [[0]], ["a"]])
@pytest.mark.parametrize("field,base", [("label", "example"), ("filter_label", "example"),
                                        ("filter_label", "train_id")])
def test_odd_labels_in_the_body_are_422_naming_the_field(http, field, base, label):
    r = post(http, {**BASES[base], field: label})
    assert r.status_code == 422, r.text
    no_5xx(r, field)


@pytest.mark.parametrize("label", NON_ASCII_DIGITS)
@pytest.mark.parametrize("route", LABEL_ROUTES)
def test_odd_label_filters_are_422_naming_label(http, route, label):
    r = http.get(route, params={"label": label})
    assert r.status_code == 422, r.text
    no_5xx(r, "label")


@pytest.mark.parametrize("route", LABEL_ROUTES)
def test_an_empty_label_filter_is_no_filter(http, route):
    """`?label=` (what an HTML form sends for "all") lists every training example, like no `label`."""
    empty, absent = http.get(route, params={"label": ""}), http.get(route)
    assert empty.status_code == absent.status_code == 200, empty.text
    assert empty.content == absent.content


def test_ascii_digit_labels_still_work(http):
    """The class id as text keeps working where a label filter is a query parameter."""
    assert http.get("/self-influence/top", params={"label": "1"}).json()["label"] == 1
    assert http.get("/self-influence/top", params={"label": "b"}).json()["label"] == 1
    assert post(http, {**BASES["example"], "label": "1"}).json()["label_used"] == 1


# -- property-based: every field of every route ---------------------------------------------------

def _digits_like() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(NON_ASCII_DIGITS),
                     st.text(alphabet=st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=4))


SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([0, -1, 1, 2, 3, 2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 30, 10 ** 300]),
    st.floats(),  # NaN and +-Infinity included
    st.text(max_size=40), _digits_like(),
    st.sampled_from(["", " ", "a", "c", "ex1", "1e999", "NaN", "-0", "0x1", "1_000", "\x00", "a" * 5000]),
)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
QUERY_TEXT = st.one_of(st.text(max_size=40), _digits_like(),
                       st.sampled_from(["", "0", "-1", "1e3", "99999999999999999999999", "NaN", "inf", "true",
                                        "log", "csv", "combined", "aum", "1.5", "\x00", "%", "a" * 3000]))

#: every field of the POST /influence body, as a path into a valid body ("example.x.3": one number)
BODY_FIELDS = ["example", "example.x", "example.x.3", "example.extra", "train_id", "label", "k", "filter_label",
               "exclude_self", "include_embedding", "metric", "metric.name", "metric.class_id", "normalize",
               "rerank", "unknown_field"]


def _with(body: dict, path: str, value) -> dict:
    out = json.loads(json.dumps(body))
    node, *rest = path.split(".")
    target = out
    parts = [node, *rest]
    for part in parts[:-1]:
        if isinstance(target, dict):
            nxt = target.get(part)
            if not isinstance(nxt, (dict, list)):
                nxt = {"name": "logit"} if part == "metric" else {}
                target[part] = nxt
            target = nxt
        else:
            target = target[int(part)]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return out


@FUZZ
@given(field=st.sampled_from(BODY_FIELDS), base=st.sampled_from(sorted(BASES)), value=JSON)
@example(field="label", base="example", value="²")
@example(field="filter_label", base="train_id", value="③")
@example(field="label", base="example", value=[1, 2])
@example(field="k", base="example", value=10 ** 300)
@example(field="example.x.3", base="example", value=float("nan"))
def test_any_value_in_any_body_field(http, field, base, value):
    no_5xx(post(http, _with(BASES[base], field, value)))


@FUZZ
@given(body=JSON)
def test_any_json_body(http, body):
    no_5xx(post(http, body))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
@example(raw=b'{"k": ' + b"1" * 5000 + b', "train_id": "ex1"}')  # past Python's int digit limit
@example(raw=b'{"label": ' + b"9" * 5000 + b', "example": {"x": [0, 0, 0, 0, 0, 0]}}')
def test_any_bytes_as_body(http, raw):
    no_5xx(http.post("/influence", content=raw, headers={"Content-Type": "application/json"}))


@FUZZ
@given(route=st.sampled_from(sorted(GET_PARAMS)), data=st.data())
def test_any_query_parameter_of_any_get_route(http, route, data):
    names = GET_PARAMS[route] + ["unknown"]
    name = data.draw(st.sampled_from(names), label="parameter")
    value = data.draw(QUERY_TEXT, label="value")
    r = http.get(route, params={name: value})
    no_5xx(r)
    if r.status_code == 422:
        no_5xx(r, name)


@FUZZ
@given(example_id=st.text(min_size=1, max_size=60))
@example(example_id="²")
@example(example_id="../../etc/passwd")
@example(example_id="ex1/../ex2")
def test_any_example_id_in_the_path(http, example_id):
    r = http.get("/examples/" + quote(example_id, safe=""))
    no_5xx(r)
    assert r.status_code in (200, 307, 404), r.text


def raw_request(server, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (a request without body) over a plain socket: (status, headers, body) of the answer."""
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


@FUZZ
@given(value=st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b))
@example(value=b" ")
@example(value=b"\x7f")
@example(value=b"Bearer \xff\x00")
def test_any_authorization_header(server, value):
    """Any bytes as the key (sent over a plain socket: httpx refuses to send some): 200, 401, or 400 JSON
    from the server's HTTP parser, never a 5xx."""
    status, headers, body = raw_request(server, b"GET /index HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                                b"Authorization: " + value + b"\r\n\r\n")
    assert status in (200, 400, 401), (status, body[:300])
    assert headers["content-type"].startswith("application/json")
    if status != 200:
        error = json.loads(body)
        assert error["error"] and error["detail"][0]["field"] in ("authorization", "request"), error


# -- the other label kinds: the label fields through the app -----------------------------------------

@pytest.fixture(scope="module", params=["Regression", "MultiLabel", "CausalLM"])
def kind_app(request):
    name = request.param
    settings_ = Settings(index_dir=zoo_index(name), access_log=False, warmup=False)
    with TestClient(create_app(settings_), raise_server_exceptions=False) as client:
        yield name, client, zoo.EXACT[name]().held_out_set().example_of(0)


@settings(max_examples=max(10, EXAMPLES * 3 // 4), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(["label", "filter_label", "?label"]), value=JSON)
@example(field="label", value="²")
@example(field="label", value=[1, 2])
@example(field="label", value=[[2, 3]])
@example(field="label", value=[10 ** 30] * 6)
@example(field="label", value=[-1] * 6)
@example(field="filter_label", value="③")
@example(field="?label", value="¹")
def test_labels_of_every_kind(kind_app, field, value):
    name, client, held = kind_app
    if field == "?label":
        text = value if isinstance(value, str) else json.dumps(value)
        for route in LABEL_ROUTES:
            r = client.get(route, params={"label": text})
            no_5xx(r)
        return
    r = client.post("/influence", content=json.dumps({"example": held, field: value, "k": 3}, allow_nan=True),
                    headers={"Content-Type": "application/json"})
    no_5xx(r)
    if r.status_code == 422 and not isinstance(value, dict) and value is not None:
        assert r.json()["detail"][0]["field"].split(".")[0] in (field, "example"), (name, r.text)
