// For the API docs pages (/docs, /redoc): send the API key that the dashboard saved in this browser with
// the pages' own requests to this origin (the OpenAPI document, Swagger UI's "Try it out"), unless a request
// already carries an Authorization header (Swagger UI's "Authorize" button). When the service answers 401
// for the OpenAPI document, say where to enter the key. Loaded before Swagger UI / ReDoc; no other use.
(() => {
  const KEY_STORAGE = "tracin.apiKey"; // the dashboard's (api.js)
  let key = "";
  try {
    key = localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    key = "";
  }
  const original = window.fetch.bind(window);

  function explain401() {
    if (document.getElementById("tracin-docs-key")) return;
    const note = document.createElement("p");
    note.id = "tracin-docs-key";
    note.setAttribute("role", "alert");
    note.textContent = key
      ? "The service refused the API key saved in this browser (HTTP 401). Enter the right key in the dashboard " +
        "(the API key field at the top right of /), then reload this page."
      : "This service needs an API key (HTTP 401). Enter it in the dashboard (the API key field at the top " +
        "right of /), then reload this page.";
    Object.assign(note.style, { margin: "0", padding: "10px 20px", background: "#fdecea", color: "#b3261e",
      font: "14px/1.4 system-ui, sans-serif" });
    const put = () => document.body.prepend(note);
    if (document.body) put();
    else document.addEventListener("DOMContentLoaded", put);
  }

  window.fetch = async (input, init = {}) => {
    const request = input instanceof Request ? input : null;
    const url = new URL(request ? request.url : String(input), location.href);
    const sameOrigin = url.origin === location.origin;
    if (sameOrigin && key) {
      const headers = new Headers(init.headers || (request ? request.headers : undefined));
      if (!headers.has("Authorization")) headers.set("Authorization", `Bearer ${key}`);
      init = { ...init, headers };
    }
    const response = await original(input, init);
    if (sameOrigin && response.status === 401 && /\/openapi\.json$/.test(url.pathname)) explain401();
    return response;
  };
})();
