// The public REST API of tracin-service, as the dashboard uses it. Same origin only; no other hosts.

const KEY_STORAGE = "tracin.apiKey";

export class ApiError extends Error {
  // status: HTTP status (0 = no response); code: the API's `error`; fields: detail[].field
  constructor(status, code, message, fields = [], path = "") {
    super(message);
    this.status = status;
    this.code = code;
    this.fields = fields;
    this.path = path;
  }
}

export function getApiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setApiKey(value) {
  try {
    if (value) localStorage.setItem(KEY_STORAGE, value);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lives for this page only */
  }
  sessionKey = value;
}

let sessionKey = getApiKey();

// The API lives where the page was served from (the service serves the page at its root).
const BASE = new URL("./", location.href);

export async function request(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = sessionKey || getApiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const url = new URL(path.replace(/^\//, ""), BASE);
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (exc) {
    throw new ApiError(0, "network_error", `cannot reach the API at ${url.origin}: ${exc.message}`, [], path);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const fields = Array.isArray(data?.detail) ? data.detail.map((d) => d.field).filter(Boolean) : [];
    const message = data?.message || `${response.status} ${response.statusText || "error"}`;
    throw new ApiError(response.status, data?.error || "http_error", message, fields, path);
  }
  if (data === null) throw new ApiError(response.status, "bad_response", `${path}: the response is not JSON`, [], path);
  return data;
}

async function download(path) {
  const headers = {};
  const key = sessionKey || getApiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const url = new URL(path.replace(/^\//, ""), BASE);
  let response;
  try {
    response = await fetch(url, { headers, cache: "no-store" });
  } catch (exc) {
    throw new ApiError(0, "network_error", `cannot reach the API at ${url.origin}: ${exc.message}`, [], path);
  }
  if (!response.ok) {
    let data = null;
    try { data = JSON.parse(await response.text()); } catch { data = null; }
    const fields = Array.isArray(data?.detail) ? data.detail.map((d) => d.field).filter(Boolean) : [];
    throw new ApiError(response.status, data?.error || "http_error",
      data?.message || `${response.status} ${response.statusText || "error"}`, fields, path);
  }
  const disposition = response.headers.get("Content-Disposition") || "";
  const filename = (disposition.match(/filename="([^"]+)"/) || [])[1] || "label-review";
  return { blob: await response.blob(), filename };
}

const qs = (params) => {
  const out = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") out.set(k, v);
  const s = out.toString();
  return s ? `?${s}` : "";
};

export const api = {
  index: () => request("GET", "/index"),
  ready: () => request("GET", "/readyz"),
  queries: (offset = 0, limit = 100, predictions = false) =>
    request("GET", `/queries${qs({ offset, limit, predictions: predictions ? "true" : undefined })}`),
  example: (id) => request("GET", `/examples/${encodeURIComponent(id)}`),
  influence: (body) => request("POST", "/influence", body),
  selfInfluence: (k, offset = 0, label) => request("GET", `/self-influence/top${qs({ k, offset, label })}`),
  labelReview: (k, offset = 0, label, ranking) => request("GET", `/label-review${qs({ k, offset, label, ranking })}`),
  labelReviewHistogram: (bins, label, scale, ranking) =>
    request("GET", `/label-review/histogram${qs({ bins, label, scale, ranking })}`),
  // The ranked list as a file: {blob, filename} (a fetch with the API key, so that it works behind auth).
  labelReviewExport: (format, label, ranking) => download(`/label-review/export${qs({ format, label, ranking })}`),
  // Optional route (not every server has it): {edges, counts, total, ...}; 404 -> computed client-side.
  selfInfluenceHistogram: (bins, label, scale) =>
    request("GET", `/self-influence/histogram${qs({ bins, label, scale })}`),
};
