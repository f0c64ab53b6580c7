// The gateway's web page: plain JavaScript calling the JSON API (relative URLs, so it also works under a prefix).
"use strict";

const KEY_STORAGE = "hqclip.apiKey";
const $ = (id) => document.getElementById(id);
let imageData = null; // the uploaded image of the classify/tags/refine panel, as a data URI

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// One call to the gateway: the API key as a bearer token, its OpenAI-shaped error shown as it says.
async function api(path, body) {
  const headers = { "content-type": "application/json" };
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.authorization = `Bearer ${key}`;
  const response = await fetch(path, body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) });
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = payload.error || {};
    let message = `${response.status}: ${error.message || response.statusText}`;
    if (error.param) message += ` (field: ${error.param})`;
    if (response.status === 401) message += " — enter the API key at the top right.";
    throw new Error(message);
  }
  return payload;
}

async function busy(button, work) {
  button.disabled = true;
  showError("");
  try {
    await work();
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
  }
}

function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function readAsDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// --- what is served ---
async function loadModel() {
  const models = await api("v1/models");
  const model = models.data[0];
  $("model-info").textContent = `${model.id} · ${model.embed_dim}-d · ${model.backend}` +
    (model.tags ? ` · ${model.tags} tags` : "");
  $("tags-button").hidden = !model.tags;
}

async function loadCollections() {
  const select = $("collection");
  const previous = select.value;
  const collections = (await api("v1/collections")).data;
  select.replaceChildren(...collections.map((c) =>
    element("option", { value: c.name, textContent: `${c.name} (${c.count})` })));
  if (collections.some((c) => c.name === previous)) select.value = previous;
  $("search-status").textContent = collections.length ? "" :
    "No collection yet: create one and add images (hqclip-client ingest FOLDER NAME --create).";
}

async function loadRefiner() {
  const ready = await fetch("ready").then((r) => r.json()).catch(() => ({}));
  $("refine-button").hidden = !("lvlm" in ready); // reported only when an LVLM is configured
}

// --- search ---
function thumbnailOf(hit) {
  const uri = hit.uri || "";
  if (/^(https?:|data:image\/)/.test(uri)) return uri;
  return (hit.attributes && hit.attributes.thumbnail) || null;
}

function renderHits(hits) {
  $("results").replaceChildren(...hits.map((hit) => {
    const src = thumbnailOf(hit);
    const thumb = element("div", { className: "thumb" },
      [src ? element("img", { src, alt: hit.caption || hit.id, loading: "lazy" }) : "no image"]);
    const tags = element("div", { className: "chips" }, hit.tags.map((tag) =>
      element("button", { type: "button", className: "chip", textContent: tag, title: `only items tagged ${tag}`,
                          onclick: () => filterByTag(tag) })));
    const meta = element("div", { className: "meta" }, [
      element("div", { className: "score", textContent: hit.score.toFixed(3) }),
      element("div", { className: "id", textContent: hit.id }),
      element("div", { className: "muted", textContent: hit.caption || "" }),
      tags,
    ]);
    return element("div", { className: "hit", title: hit.uri || hit.id }, [thumb, meta]);
  }));
}

async function search(event) {
  event.preventDefault();
  await busy($("search-button"), async () => {
    const collection = $("collection").value;
    if (!collection) throw new Error("pick a collection first");
    const body = { top_k: Number($("top-k").value) || 12 };
    const tag = $("tag-filter").value.trim();
    if (tag) body.filters = { tags: [tag] };
    const file = $("query-image").files[0];
    const text = $("query").value.trim();
    if (file) body.image = await readAsDataUri(file);
    else if (text) body.text = text;
    else throw new Error("type a query or choose an image");
    const result = await api(`v1/collections/${encodeURIComponent(collection)}/search`, body);
    $("search-status").textContent = `${result.results.length} results in ${collection}` +
      (file ? ` for ${file.name}` : ` for “${text}”`) + (tag ? ` tagged “${tag}”` : "");
    renderHits(result.results);
  });
}

function filterByTag(tag) {
  $("tag-filter").value = tag;
  $("search-form").requestSubmit();
}

// --- classify, tags, refine ---
function requireImage() {
  if (!imageData) throw new Error("choose an image first");
  return imageData;
}

async function classify(event) {
  event.preventDefault();
  await busy($("classify-button"), async () => {
    const labels = $("labels").value.split(",").map((l) => l.trim()).filter(Boolean);
    if (!labels.length) throw new Error("type some labels, separated by commas");
    const result = await api("v1/classify", { images: [requireImage()], labels, top_k: labels.length });
    $("classify-result").replaceChildren(...result.data[0].labels.map(({ label, score }) =>
      element("div", { className: "bar label-row" }, [
        element("span", { className: "label", textContent: label }),
        element("div", {}, [element("div", { className: "fill", style: `width:${(score * 100).toFixed(1)}%` })]),
        element("span", { className: "value", textContent: score.toFixed(3) }),
      ])));
  });
}

async function tags() {
  await busy($("tags-button"), async () => {
    const result = await api("v1/tags", { images: [requireImage()], top_k: 10 });
    $("tags-result").replaceChildren(...result.data[0].tags.map(({ tag, probability }) =>
      element("span", { className: "chip", textContent: `${tag} ${probability.toFixed(2)}` })));
  });
}

async function refine() {
  await busy($("refine-button"), async () => {
    const result = await api("v1/refine", { input: [{ image: requireImage() }] });
    const refined = result.data[0];
    $("refine-result").replaceChildren(...["desc", "neg_desc", "tags", "neg_tags"].flatMap((field) => [
      element("dt", { textContent: field }),
      element("dd", { textContent: refined[field].join(field.endsWith("tags") ? ", " : " ") }),
    ]));
  });
}

async function chooseImage() {
  const file = $("image-file").files[0];
  imageData = file ? await readAsDataUri(file) : null;
  $("image-preview").hidden = !imageData;
  if (imageData) $("image-preview").src = imageData;
  for (const id of ["classify-result", "tags-result", "refine-result"]) $(id).replaceChildren();
}

async function start() {
  showError("");
  try {
    await loadModel();
    await Promise.all([loadCollections(), loadRefiner()]);
  } catch (error) {
    showError(error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    start();
  });
  $("search-form").addEventListener("submit", search);
  $("query-image").addEventListener("change", () => { if ($("query-image").files[0]) $("query").value = ""; });
  $("query").addEventListener("input", () => { $("query-image").value = ""; });
  $("image-file").addEventListener("change", chooseImage);
  $("classify-form").addEventListener("submit", classify);
  $("tags-button").addEventListener("click", tags);
  $("refine-button").addEventListener("click", refine);
  start();
});
