// The chat page: keeps the conversation, sends it to /v1/chat/completions and
// shows the answer as it streams in. Model output is HTML-escaped before any
// markdown is applied, so it can only ever become text and our own tags.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // {role, content} of every turn so far
let controller = null; // aborts the answer being streamed
let chatNumber = 0; // counts "New chat"s, so an answer cut off by one stays out of the next chat

// --- markdown ---------------------------------------------------------------

function escapeHtml(text) {
  const entities = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  return text.replace(/[&<>"']/g, (c) => entities[c]);
}

// Inline spans of an escaped line; `code` is cut out first so nothing inside it is formatted.
function renderInline(line) {
  return line
    .split(/(`[^`]+`)/)
    .map((part, i) =>
      i % 2
        ? `<code>${part.slice(1, -1)}</code>`
        : part
            .replace(/\*\*(?=\S)(.+?)(?<=\S)\*\*/g, "<strong>$1</strong>")
            .replace(/\*(?=\S)(.+?)(?<=\S)\*/g, "<em>$1</em>"),
    )
    .join("");
}

// Paragraphs, headings, lists and fenced code blocks. A fence still open (the
// answer is streaming) runs to the end of the text.
function renderMarkdown(source) {
  const lines = escapeHtml(source).split("\n");
  const html = [];
  let paragraph = [];
  let list = null; // {tag: "ul" | "ol", items: [...]}
  const closeParagraph = () => {
    if (paragraph.length) html.push(`<p>${paragraph.map(renderInline).join("<br>")}</p>`);
    paragraph = [];
  };
  const closeList = () => {
    if (list) html.push(`<${list.tag}>${list.items.map((item) => `<li>${renderInline(item)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let match;
    if (/^\s*```/.test(line)) {
      closeParagraph();
      closeList();
      const code = [];
      while (++i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i]);
      html.push(`<pre><code>${code.join("\n")}</code></pre>`);
    } else if ((match = line.match(/^(#{1,6})\s+(.*)$/))) {
      closeParagraph();
      closeList();
      const level = match[1].length;
      html.push(`<h${level}>${renderInline(match[2])}</h${level}>`);
    } else if ((match = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/))) {
      closeParagraph();
      const tag = /\d/.test(match[1]) ? "ol" : "ul";
      if (list?.tag !== tag) {
        closeList();
        list = { tag, items: [] };
      }
      list.items.push(match[2]);
    } else if (!line.trim()) {
      closeParagraph();
      closeList();
    } else if (list && /^\s/.test(line)) {
      list.items[list.items.length - 1] += " " + line.trim(); // an indented line continues the item
    } else {
      closeList();
      paragraph.push(line);
    }
  }
  closeParagraph();
  closeList();
  return html.join("");
}

// --- settings ---------------------------------------------------------------

const SETTINGS = ["temperature", "system-prompt", "api-key"];
// The key lasts only as long as the tab; the other settings are remembered.
const storeFor = (id) => (id === "api-key" ? sessionStorage : localStorage);

function loadSettings() {
  for (const id of SETTINGS) {
    $(id).value = storeFor(id).getItem(`llamazip.${id}`) ?? "";
    $(id).addEventListener("change", () => storeFor(id).setItem(`llamazip.${id}`, $(id).value));
  }
}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// --- talking to the server ----------------------------------------------------

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `the server answered ${response.status}`;
  }
}

async function showModelName() {
  const response = await fetch("v1/models", { headers: apiHeaders() });
  if (!response.ok) return;
  const name = (await response.json()).data[0]?.id;
  if (name) {
    $("model-name").textContent = name;
    document.title = `${name} · llamazip`;
  }
}

function chatRequest() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const request = { messages, stream: true };
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) request.temperature = temperature;
  return request;
}

// Stream the answer's text to onText; ends at "data: [DONE]" or when the server closes.
async function streamAnswer(request, signal, onText) {
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: apiHeaders(), body: JSON.stringify(request), signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop(); // the part of an event still to come
    for (const event of events) {
      const data = event.replace(/^data: ?/, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const text = chunk.choices?.[0]?.delta?.content;
      if (text) onText(text);
    }
  }
}

// --- the conversation on screen -------------------------------------------------

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  message.append(content);
  $("messages").append(message);
  showText(content, role, text);
  return content;
}

function showText(content, role, text) {
  if (role === "assistant") content.innerHTML = renderMarkdown(text); // escaped inside
  else content.textContent = text;
  content.scrollIntoView({ block: "end" });
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const content = addMessage("assistant", "");
  content.parentElement.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  const chat = chatNumber;
  let answer = "";
  try {
    await streamAnswer(chatRequest(), controller.signal, (piece) => {
      answer += piece;
      showText(content, "assistant", answer);
    });
  } catch (error) {
    if (error.name !== "AbortError") addMessage("error", error.message);
  } finally {
    content.parentElement.classList.remove("streaming");
    if (chat === chatNumber) {
      if (answer) conversation.push({ role: "assistant", content: answer });
      else conversation.pop(); // nothing came back: the question can be asked again
    }
    controller = null;
    setBusy(false);
    $("input").focus();
  }
}

function newChat() {
  controller?.abort();
  chatNumber++;
  conversation.length = 0;
  $("messages").replaceChildren();
  $("input").focus();
}

function toggleSettings() {
  const open = $("settings").hidden;
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
}

function start() {
  loadSettings();
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("settings-toggle").addEventListener("click", toggleSettings);
  $("api-key").addEventListener("change", showModelName);
  showModelName().catch(() => {});
  $("input").focus();
}

start();
