// The playground: forms for P2P and IP2P edits on the public /v1 API, through the TypeScript client
// (lib/, compiled from clients/typescript). The API key lives in memory (and in sessionStorage when the
// user asks), goes out only as an Authorization header, never in a URL.
import { APIError, EditCanceled, EditFailed, EditserveClient, isTerminal, parseNpy, tokenMap } from "./lib/index.js";
import { autoEdit, clipWords, describeEdit, spaceWords } from "./diff.js";
import { snippet } from "./snippets.js";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];
const KEY_STORAGE = "editserve.apiKey";
const FIELD_ALIASES = { width: "height" };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// ------------------------------------------------------------------------------------------ API key, client

const state = { client: null, apiKey: "", models: [] };

function makeClient() {
  state.client = new EditserveClient({ baseUrl: location.origin, apiKey: state.apiKey || undefined, retries: 1 });
}

function setupKey() {
  const input = $("#api-key"), keep = $("#keep-key");
  const stored = sessionStorage.getItem(KEY_STORAGE);
  if (stored) {
    input.value = stored;
    keep.checked = true;
  }
  const apply = () => {
    state.apiKey = input.value.trim();
    if (keep.checked && state.apiKey) sessionStorage.setItem(KEY_STORAGE, state.apiKey);
    else sessionStorage.removeItem(KEY_STORAGE);
    $("#key-state").textContent = state.apiKey ? "key set" : "no key";
    makeClient();
  };
  input.addEventListener("input", apply);
  keep.addEventListener("change", apply);
  $("#key-form").addEventListener("submit", (e) => e.preventDefault());
  apply();
}

async function loadModels() {
  try {
    state.models = await state.client.models();
  } catch (error) {
    showBanner(`could not list models: ${error.message}`);
    return;
  }
  for (const select of $$(".model-select")) {
    const kind = select.dataset.kind;
    select.replaceChildren(el("option", { value: "", text: "default" }),
      ...state.models.filter((m) => m.edit_kinds.includes(kind))
        .map((m) => el("option", { value: m.name, text: `${m.name} (${m.default_size}px default, max ${m.max_size})` })));
  }
  $("#weights-note").hidden = !state.models.some((m) => m.random_weights);
}

// ------------------------------------------------------------------------------------------ errors

function showBanner(message) {
  const banner = $("#banner");
  banner.textContent = message;
  banner.hidden = !message;
}

function clearErrors(form) {
  for (const root of [form, $("#key-form")]) {
    for (const node of $$(".field-error", root)) node.remove();
    for (const node of $$("[aria-invalid]", root)) node.removeAttribute("aria-invalid");
  }
  showBanner("");
}

/** The element a server `field` names: exact, else its closest named parent (`sweep.seeds.2` → `sweep.seeds`). */
function fieldElement(form, field) {
  let name = FIELD_ALIASES[field] ?? field;
  while (name) {
    const found = form.querySelector(`[data-field="${CSS.escape(name)}"]`);
    if (found) return found;
    name = name.includes(".") ? name.slice(0, name.lastIndexOf(".")) : "";
  }
  return null;
}

function showError(form, error) {
  const field = error instanceof APIError ? error.field : null;
  const unauthorized = error instanceof APIError && error.status === 401;
  const target = unauthorized ? $("#key-form") : field ? fieldElement(form, field) : null;
  const message = error instanceof APIError ? `${error.message}` : String(error.message ?? error);
  if (!target) {
    showBanner(error instanceof APIError ? `${error.status} ${error.type}: ${message}` : message);
    return;
  }
  const id = `error-${Math.random().toString(36).slice(2, 8)}`;
  target.append(el("p", { class: "field-error", role: "alert", id, "data-error-field": field ?? "api_key", text: message }));
  const input = target.matches("input, select") ? target : target.querySelector("input:not([type=checkbox]), select, textarea, [tabindex]");
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", id);
    input.focus();
  }
}

// ------------------------------------------------------------------------------------------ tabs, sliders

function setupTabs() {
  const tabs = $$('[role="tab"]');
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(`#${t.getAttribute("aria-controls")}`).hidden = !on;
    }
    tab.focus();
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        select(tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length]);
        e.preventDefault();
      }
    });
  });
}

function bindOutputs(root = document) {
  for (const range of $$('input[type="range"]', root)) {
    const output = range.nextElementSibling?.tagName === "OUTPUT" ? range.nextElementSibling : null;
    if (!output || range.dataset.bound) continue;
    range.dataset.bound = "1";
    const show = () => { output.textContent = range.value; };
    range.addEventListener("input", show);
    show();
  }
}

// ------------------------------------------------------------------------------------------ P2P form

const p2p = { targets: ["a photo of a dog riding a bicycle"], reweight: [new Map()], lbSource: new Set(), lbTarget: [new Set()] };

function renderTargets() {
  const list = $("#p2p-targets");
  list.replaceChildren(...p2p.targets.map((text, i) => el("li", { class: "target", "data-field": `target_prompts.${i}` },
    el("label", { for: `p2p-target-${i}`, class: "sr-only", text: `Target prompt ${i + 1}` }),
    el("input", { id: `p2p-target-${i}`, value: text, spellcheck: "false",
                  oninput: (e) => { p2p.targets[i] = e.target.value; renderP2PDerived(); } }),
    p2p.targets.length > 1 ? el("button", { type: "button", "aria-label": `remove target ${i + 1}`, text: "×",
      onclick: () => { p2p.targets.splice(i, 1); p2p.reweight.splice(i, 1); p2p.lbTarget.splice(i, 1); renderTargets(); } }) : null)));
  renderP2PDerived();
}

function resolvedEdit() {
  const chosen = $("#p2p-edit").value;
  return chosen === "auto" ? autoEdit($("#p2p-source").value, p2p.targets) : chosen;
}

function chip(word, pressed, onToggle, extra = {}) {
  return el("button", { type: "button", class: "chip", "aria-pressed": String(pressed), text: word, ...extra,
    onclick: (e) => { onToggle(); e.currentTarget.setAttribute("aria-pressed", e.currentTarget.getAttribute("aria-pressed") === "true" ? "false" : "true"); } });
}

function renderP2PDerived() {
  const source = $("#p2p-source").value;
  const edit = resolvedEdit();
  // The diff: the edit that will run, per target.
  $("#p2p-diff").replaceChildren(el("p", { class: "muted", text: `will run: ${edit}` }),
    ...p2p.targets.map((target, i) => el("p", { class: "diff-line", "data-target": i },
      el("span", { class: "muted", text: `T${i + 1}: ` }),
      ...describeEdit(edit === "replace" ? "replace" : "refine", source, target).map((item) =>
        item.op === "swap" ? el("span", { class: "swap", title: `${item.from} → ${item.word}` },
          el("del", { text: item.from }), "→", el("ins", { text: item.word }))
          : el("span", { class: item.op, text: item.word })))));
  // Reweight sliders: one per distinct word of each target.
  $("#p2p-reweight").replaceChildren(...p2p.targets.map((target, i) => el("div", { class: "slider-row", "data-field": `reweight.${i}` },
    el("span", { class: "muted", text: `T${i + 1}` }),
    ...[...new Set(clipWords(target))].map((word) => {
      const id = `rw-${i}-${word.replace(/[^\p{L}\p{N}]/gu, "_")}`;
      const value = p2p.reweight[i]?.get(word) ?? 1;
      const out = el("output", { for: id, text: String(value) });
      return el("span", { class: "rw" }, el("label", { for: id, text: word }),
        el("input", { id, type: "range", min: "-2", max: "5", step: "0.1", value: String(value), "data-word": word,
          oninput: (e) => { const v = Number(e.target.value); (p2p.reweight[i] ??= new Map()).set(word, v); out.textContent = String(v); } }), out);
    }))));
  // Local blend: click words.
  const sourceWords = [...new Set(clipWords(source))];
  for (const w of [...p2p.lbSource]) if (!sourceWords.includes(w)) p2p.lbSource.delete(w);
  $("#lb-source").replaceChildren(...sourceWords.map((word) => chip(word, p2p.lbSource.has(word),
    () => (p2p.lbSource.has(word) ? p2p.lbSource.delete(word) : p2p.lbSource.add(word)), { "data-word": word })));
  $("#lb-target").replaceChildren(...p2p.targets.map((target, i) => {
    const words = [...new Set(clipWords(target))];
    const picked = (p2p.lbTarget[i] ??= new Set());
    for (const w of [...picked]) if (!words.includes(w)) picked.delete(w);
    return el("span", { class: "chip-group", "data-field": `local_blend.target_words.${i}` }, el("span", { class: "muted", text: `T${i + 1}` }),
      ...words.map((word) => chip(word, picked.has(word), () => (picked.has(word) ? picked.delete(word) : picked.add(word)),
        { "data-word": word, "data-target": i })));
  }));
}

const numberOrUndefined = (value) => (value === "" || value === undefined ? undefined : Number(value));

function buildP2P() {
  const source = $("#p2p-source").value;
  const size = numberOrUndefined($("#p2p-size").value);
  const many = p2p.targets.length > 1;
  const weights = p2p.targets.map((_, i) => Object.fromEntries([...(p2p.reweight[i] ?? new Map())].filter(([, v]) => v !== 1)));
  const request = {
    kind: "p2p", source_prompt: source, target_prompts: [...p2p.targets], edit: resolvedEdit(),
    cross_replace_steps: Number($("#p2p-cross").value), self_replace_steps: Number($("#p2p-self").value),
    guidance_scale: Number($("#p2p-guidance").value), steps: numberOrUndefined($("#p2p-steps").value),
    seed: numberOrUndefined($("#p2p-seed").value), height: size, width: size,
    model: $("#p2p-model").value || undefined, scheduler: $("#p2p-scheduler").value || undefined,
    attention_maps: $("#p2p-maps").checked,
  };
  if (weights.some((w) => Object.keys(w).length)) request.reweight = many ? weights : weights[0];
  const targetWords = p2p.lbTarget.slice(0, p2p.targets.length).map((s) => [...(s ?? [])]);
  if (p2p.lbSource.size || targetWords.some((w) => w.length)) {
    request.local_blend = { source_words: [...p2p.lbSource], target_words: many ? targetWords : targetWords[0],
                            threshold: Number($("#lb-threshold").value) };
  }
  return Object.fromEntries(Object.entries(request).filter(([, v]) => v !== undefined));
}

function setupP2P() {
  renderTargets();
  $("#p2p-source").addEventListener("input", renderP2PDerived);
  $("#p2p-edit").addEventListener("change", renderP2PDerived);
  $("#add-target").addEventListener("click", () => {
    p2p.targets.push(p2p.targets.at(-1) ?? "");
    p2p.reweight.push(new Map());
    p2p.lbTarget.push(new Set());
    renderTargets();
    $(`#p2p-target-${p2p.targets.length - 1}`).focus();
  });
  $("#p2p-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.currentTarget;
    clearErrors(form);
    const request = buildP2P();
    await submitFrom(form, $("#p2p-submit"), () => state.client.submit(request), request);
  });
}

// ------------------------------------------------------------------------------------------ IP2P form

const ip2p = { file: null };

function chooseFile(file) {
  if (!file) return;
  ip2p.file = file;
  const preview = $("#ip2p-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("#drop-hint").textContent = `${file.name} (${Math.round(file.size / 1024)} KiB): drop or press Enter to change`;
}

const listOf = (text) => text.split(/[\s,;]+/).filter(Boolean).map(Number);

function buildIP2P() {
  const request = {
    kind: "ip2p", instruction: $("#ip2p-instruction").value,
    text_guidance: Number($("#ip2p-text").value), image_guidance: Number($("#ip2p-image").value),
    seed: numberOrUndefined($("#ip2p-seed").value), steps: numberOrUndefined($("#ip2p-steps").value),
    resolution: numberOrUndefined($("#ip2p-resolution").value), model: $("#ip2p-model").value || undefined,
  };
  const sweep = { image_guidance: listOf($("#sweep-image").value), text_guidance: listOf($("#sweep-text").value),
                  seeds: listOf($("#sweep-seeds").value) };
  for (const axis of Object.keys(sweep)) if (!sweep[axis].length) delete sweep[axis];
  if (Object.keys(sweep).length) request.sweep = sweep;
  return Object.fromEntries(Object.entries(request).filter(([, v]) => v !== undefined));
}

function setupIP2P() {
  const drop = $("#drop"), file = $("#ip2p-file");
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { file.click(); e.preventDefault(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
  file.addEventListener("change", () => chooseFile(file.files[0]));
  $("#ip2p-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.currentTarget;
    clearErrors(form);
    const request = buildIP2P();
    if (!ip2p.file) {
      showError(form, new APIError("choose or drop a photo first", 0, "invalid_request", "image", null));
      return;
    }
    const shown = { ...request, inputUrl: $("#ip2p-preview").src };
    await submitFrom(form, $("#ip2p-submit"), () => state.client.submit(request, { image: ip2p.file, filename: ip2p.file.name }), shown);
  });
}

// ------------------------------------------------------------------------------------------ submit, follow

async function submitFrom(form, button, send, request) {
  button.disabled = true;
  try {
    const edit = await send();
    follow(edit, request);
  } catch (error) {
    showError(form, error);
  } finally {
    button.disabled = false;
  }
}

function statusText(edit) {
  if (edit.status === "queued") {
    const eta = edit.eta_seconds != null ? `, about ${Math.ceil(edit.eta_seconds)} s` : "";
    return edit.queue_position != null ? `queued: position ${edit.queue_position + 1}${eta}` : `queued${eta}`;
  }
  if (edit.status === "processing") {
    const p = edit.progress;
    return p ? `processing: step ${p.step} of ${p.total}${edit.cancel_requested ? " (cancelling)" : ""}` : "processing";
  }
  if (edit.status === "failed") return `failed: ${edit.error?.message ?? ""}`;
  return edit.status;
}

function follow(edit, request) {
  const bar = el("div", { class: "fill" });
  const progress = el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "1", "aria-valuenow": "0",
                               "aria-label": `progress of ${edit.id}` }, bar);
  const status = el("span", { class: "status", "aria-live": "polite" });
  const cancel = el("button", { type: "button", class: "cancel", text: "Cancel",
    onclick: async () => { try { update(await state.client.cancel(edit.id)); } catch (error) { status.textContent = error.message; } } });
  const results = el("div", { class: "results" });
  const maps = el("div", { class: "maps" });
  const card = el("article", { class: "job", "data-edit-id": edit.id, "data-kind": edit.kind, "data-status": edit.status },
    el("header", {}, el("strong", { text: edit.kind.toUpperCase() }), el("code", { text: edit.id }), status, cancel),
    el("p", { class: "summary", text: request.kind === "p2p"
      ? `${request.source_prompt} → ${request.target_prompts.join(" | ")} (${request.edit})`
      : `“${request.instruction}”${request.sweep ? `, sweep ${Object.entries(request.sweep).map(([k, v]) => `${k} [${v.join(", ")}]`).join(" × ")}` : ""}` }),
    progress, results, maps);
  $("#jobs").prepend(card);

  function update(current) {
    card.dataset.status = current.status;
    status.textContent = statusText(current);
    if (current.progress) {
      const { step, total } = current.progress;
      progress.setAttribute("aria-valuemax", String(total));
      progress.setAttribute("aria-valuenow", String(step));
      card.dataset.step = String(step);
      bar.style.width = `${total ? (100 * step) / total : 0}%`;
    }
    if (current.status === "succeeded") bar.style.width = "100%";
    cancel.hidden = isTerminal(current);
  }
  update(edit);
  state.client.wait(edit.id, { onProgress: update })
    .then((done) => { update(done); renderResults(done, request, results, maps); })
    .catch((error) => {
      if (error instanceof EditFailed || error instanceof EditCanceled) update(error.edit);
      else status.textContent = `lost track: ${error.message}`;
    });
}

// ------------------------------------------------------------------------------------------ results

async function download(url, name) {
  try {
    const blob = await (await fetch(url)).blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  } catch {
    window.open(url, "_blank", "noopener");
  }
}

function renderResults(edit, request, results, maps) {
  if (edit.kind === "ip2p") {
    const columns = (request.sweep?.text_guidance?.length ?? 1) * (request.sweep?.seeds?.length ?? 1);
    results.classList.add("sweep");
    results.style.gridTemplateColumns = `repeat(${columns}, minmax(0, 1fr))`;
  }
  const figures = edit.results.map((result) => {
    const overlay = el("canvas", { class: "overlay", "aria-hidden": "true" });
    const caption = edit.kind === "ip2p"
      ? `s_I ${result.image_guidance} · s_T ${result.text_guidance} · seed ${result.seed}`
      : `${result.index === 0 ? "source" : `target ${result.index}`}: ${result.label}`;
    const figure = el("figure", { class: "result", "data-index": result.index },
      el("div", { class: "frame" }, el("img", { src: result.url, alt: caption, width: result.width, height: result.height }), overlay),
      el("figcaption", {}, el("span", { text: caption }), " ",
        el("button", { type: "button", class: "download", text: "Download",
                       onclick: () => download(result.url, `${edit.id}-${new URL(result.url).pathname.split("/").pop()}`) })));
    return figure;
  });
  const input = edit.kind === "ip2p" && request.inputUrl
    ? el("figure", { class: "result input" }, el("div", { class: "frame" }, el("img", { src: request.inputUrl, alt: "the input photo" })),
         el("figcaption", { text: "input" }))
    : null;
  results.replaceChildren(...(input ? [input] : []), ...figures);
  maps.replaceChildren(...edit.attention_maps.map((map) => {
    const figure = figures.find((f) => Number(f.dataset.index) === map.prompt_index);
    let loaded = null;
    const load = () => (loaded ??= state.client.download(map.array_url).then(parseNpy));
    const caption = figure ? $(".attn-caption", figure) ?? figure.querySelector("figcaption").appendChild(el("span", { class: "attn-caption" })) : null;
    const show = async (token, word) => {
      if (!figure) return;
      const overlay = $(".overlay", figure);
      try {
        drawHeatmap(overlay, tokenMap(await load(), token));
        overlay.dataset.token = word;
        overlay.classList.add("shown");
        caption.textContent = ` attention: “${word}”`;
      } catch (error) {
        caption.textContent = ` attention unavailable: ${error.message}`;
      }
    };
    const hide = () => {
      if (!figure) return;
      $(".overlay", figure).classList.remove("shown");
      caption.textContent = "";
    };
    return el("div", { class: "map-row", "data-prompt": map.prompt_index },
      el("span", { class: "muted", text: `${map.prompt_index === 0 ? "source" : `target ${map.prompt_index}`}:` }),
      ...map.tokens.map((word, k) => el("button", { type: "button", class: "token", "data-token": k, text: word,
        "aria-label": `attention map of “${word}”`,
        onmouseenter: () => show(k, word), onfocus: () => show(k, word), onmouseleave: hide, onblur: hide })),
      el("a", { href: map.grid_url, target: "_blank", rel: "noopener", class: "grid-link", text: "all maps (PNG)" }));
  }));
}

/** One token's map as a heat colour overlay: normalised by its own maximum, negative values clipped. */
function drawHeatmap(canvas, { width, height, values }) {
  const small = document.createElement("canvas");
  small.width = width;
  small.height = height;
  const ctx = small.getContext("2d");
  const image = ctx.createImageData(width, height);
  let peak = 0;
  for (const v of values) if (v > peak) peak = v;
  values.forEach((v, i) => {
    const t = peak > 0 ? Math.min(1, Math.max(0, v / peak)) : 0;
    image.data.set([Math.round(255 * Math.min(1, 2 * t)), Math.round(255 * Math.max(0, 2 * t - 1)), Math.round(255 * (1 - t) * 0.6),
                    Math.round(60 + 160 * t)], i * 4);
  });
  ctx.putImageData(image, 0, 0);
  const frame = canvas.parentElement.querySelector("img");
  canvas.width = frame.naturalWidth || frame.width || width;
  canvas.height = frame.naturalHeight || frame.height || height;
  const out = canvas.getContext("2d");
  out.imageSmoothingEnabled = true;
  out.clearRect(0, 0, canvas.width, canvas.height);
  out.drawImage(small, 0, 0, canvas.width, canvas.height);
}

// ------------------------------------------------------------------------------------------ copy as code

function setupCopy() {
  for (const button of $$("[data-copy]")) {
    button.addEventListener("click", async () => {
      const ip = button.closest("form").id === "ip2p-form";
      const request = ip ? buildIP2P() : buildP2P();
      const text = snippet(button.dataset.copy, location.origin, request, ip2p.file?.name ?? "photo.png");
      $("#snippet").textContent = text;
      $("#snippet-title").textContent = button.textContent;
      $("#snippet-box").hidden = false;
      try {
        await navigator.clipboard.writeText(text);
        $("#snippet-state").textContent = "copied to the clipboard";
      } catch {
        $("#snippet-state").textContent = "select and copy";
        $("#snippet").focus();
      }
    });
  }
  $("#snippet-close").addEventListener("click", () => { $("#snippet-box").hidden = true; });
}

// ------------------------------------------------------------------------------------------ start

document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    const panel = $$('[role="tabpanel"]').find((p) => !p.hidden);
    panel?.querySelector("form")?.requestSubmit();
    e.preventDefault();
  }
});

setupKey();
setupTabs();
setupP2P();
setupIP2P();
setupCopy();
bindOutputs();
loadModels();
document.body.dataset.ready = "true";
